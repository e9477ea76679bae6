"""The LoRA/DoRA trainer: real learning on a synthetic commonsense-format task, exact resume after an
interruption (dropout on), gradient accumulation == a larger batch, gradient checkpointing with dropout
against finite differences, the learning-rate schedule, and the ``lora`` command's errors and defaults."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from conftest import colour_task, metrics, tiny_args
from mlx_openelm.adapters import ADAPTER_TYPES, LoRAConfig, apply_adapters, load_adapters
from mlx_openelm.data import generate_prompt
from mlx_openelm.eval.commonsense import evaluate
from mlx_openelm.train.loop import (
    TrainingCallback,
    enable_grad_checkpoint,
    latest_checkpoint,
    learning_rate_schedule,
    list_checkpoints,
    total_steps,
)
from mlx_openelm.train.sft import TrainingArgs, loss_sums, train
from mlx_openelm.model import Model, init_weights

def tiny_model(seed=0, **overrides) -> Model:
    return init_weights(Model(tiny_args(**{"num_transformer_layers": 2, **overrides})), seed)


def adapter_weights(folder: Path):
    return {k: np.array(v) for k, v in mx.load(str(Path(folder) / "adapters.safetensors")).items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_learns_the_task(tmp_path, task_tokenizer, use_dora):
    train_set, test_set = colour_task()
    model = tiny_model()
    assert evaluate(model, task_tokenizer, {"boolq": test_set})["boolq"]["acc"] <= 0.6
    args = TrainingArgs(
        output_dir=str(tmp_path / "out"), adapter=LoRAConfig(rank=8, alpha=16, dropout=0.05, use_dora=use_dora),
        learning_rate=5e-3, min_learning_rate=1e-3, warmup=0, batch_size=8, grad_accum=1, iters=150,
        train_on_inputs=False, steps_per_eval=75, save_every=0, seed=0,
    )
    seen = {"step": 0, "val": 0, "save": []}

    class Count(TrainingCallback):
        def on_step(self, m):
            seen["step"] += 1

        def on_val(self, m):
            seen["val"] += 1

        def on_save(self, path):
            seen["save"].append(path)

    result = train(model, task_tokenizer, train_set, test_set[:8], args, callback=Count())
    model.eval()
    acc = evaluate(model, task_tokenizer, {"boolq": test_set})["boolq"]["acc"]
    assert acc >= 0.9, f"held-out accuracy {acc}"
    assert seen == {"step": 150, "val": 2, "save": [tmp_path / "out"]} and result["steps"] == 150

    steps, vals = metrics(tmp_path / "out")
    assert [s["step"] for s in steps] == list(range(1, 151)) and [v["step"] for v in vals] == [75, 150]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    for key in ("lr", "grad_norm", "tokens_per_sec", "peak_memory_gb", "tokens"):
        assert all(np.isfinite(s[key]) for s in steps), key
    # The saved adapters reproduce the trained model on a fresh copy of the base.
    fresh = tiny_model()
    config = load_adapters(fresh, tmp_path / "out")
    assert config.use_dora == use_dora and config.rank == 8
    fresh.eval()
    x = mx.array([task_tokenizer.encode(generate_prompt(test_set[0], train=False))])
    assert np.allclose(np.array(fresh(x)), np.array(model(x)), atol=1e-5)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


class StopAfterSave(TrainingCallback):
    """Simulates a kill right after a checkpoint is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, path):
        if Path(path).name == f"step_{self.step}":
            raise KeyboardInterrupt


def resume_args(out, **kw):
    return TrainingArgs(
        output_dir=str(out), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.2), learning_rate=3e-3, warmup=2,
        batch_size=4, grad_accum=2, iters=7, save_every=2, keep_checkpoints=2, steps_per_eval=3, seed=3, **kw,
    )


def test_resume_continues_with_the_same_losses(tmp_path, task_tokenizer):
    train_set, val_set = colour_task(n_train_per_word=5, n_test_per_word=1)  # 20 records: epochs of 5 micro-batches
    train(tiny_model(), task_tokenizer, train_set, val_set, resume_args(tmp_path / "full"))

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), task_tokenizer, train_set, val_set, resume_args(out), callback=StopAfterSave(4))
    assert latest_checkpoint(out).name == "step_4" and not (out / "adapters.safetensors").exists()
    with pytest.raises(ValueError, match="resume it"):
        train(tiny_model(), task_tokenizer, train_set, val_set, resume_args(out))
    untouched = tiny_model()
    with pytest.raises(ValueError, match="learning_rate"):
        train(untouched, task_tokenizer, train_set, val_set, TrainingArgs(**{**resume_args(out, resume=True).__dict__, "learning_rate": 1e-3}))
    assert not any(isinstance(m, ADAPTER_TYPES) for _, m in untouched.named_modules())
    train(tiny_model(seed=0), task_tokenizer, train_set, val_set, resume_args(out, resume=True))

    full_steps, full_vals = metrics(tmp_path / "full")
    cut_steps, cut_vals = metrics(out)
    assert [s["step"] for s in cut_steps] == list(range(1, 8))  # lines after the checkpoint were not duplicated
    np.testing.assert_allclose([s["loss"] for s in cut_steps], [s["loss"] for s in full_steps], rtol=1e-5)
    np.testing.assert_allclose([s["lr"] for s in cut_steps], [s["lr"] for s in full_steps], rtol=1e-6)
    np.testing.assert_allclose([v["val_loss"] for v in cut_vals], [v["val_loss"] for v in full_vals], rtol=1e-5)
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert [p.name for p in list_checkpoints(out)] == ["step_4", "step_6"]  # keep_checkpoints=2


def test_resume_depends_on_the_restored_random_state(tmp_path, task_tokenizer, monkeypatch):
    """Control for the resume test: resuming without restoring the PRNG key (dropout masks) does
    not reproduce the uninterrupted losses, so that test really checks the saved random state."""
    from mlx_openelm.train import loop as trainer

    train_set, val_set = colour_task(n_train_per_word=5, n_test_per_word=1)
    train(tiny_model(), task_tokenizer, train_set, [], resume_args(tmp_path / "full"))
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), task_tokenizer, train_set, [], resume_args(out), callback=StopAfterSave(2))
    monkeypatch.setattr(trainer, "_set_random_key", lambda key: None)
    train(tiny_model(), task_tokenizer, train_set, [], resume_args(out, resume=True))
    full = [s["loss"] for s in metrics(tmp_path / "full")[0]]
    cut = [s["loss"] for s in metrics(out)[0]]
    assert cut[:2] == full[:2]
    assert not np.allclose(cut[2:], full[2:], rtol=1e-4)


def test_grad_accumulation_equals_larger_batch(tmp_path, task_tokenizer):
    records, _ = colour_task(n_train_per_word=1, n_test_per_word=1)  # 4 records: one step = all of them
    runs = {}
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}a{accum}"
        args = TrainingArgs(output_dir=str(out), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                            warmup=0, batch_size=batch, grad_accum=accum, iters=3, save_every=0, seed=1)
        train(tiny_model(), task_tokenizer, records, [], args)
        runs[(batch, accum)] = (metrics(out)[0], adapter_weights(out))
    (s1, w1), (s2, w2) = runs[(4, 1)], runs[(2, 2)]
    assert [s["tokens"] for s in s1] == [s["tokens"] for s in s2]
    np.testing.assert_allclose([s["loss"] for s in s1], [s["loss"] for s in s2], rtol=1e-5)
    np.testing.assert_allclose([s["grad_norm"] for s in s1], [s["grad_norm"] for s in s2], rtol=1e-4)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6)


def test_loss_is_token_weighted_mean(task_tokenizer):
    """loss_sums against a numpy cross-entropy, with a mask that skips some tokens."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 200, (2, 9)).astype(np.int32)
    targets = rng.integers(3, 200, (2, 9)).astype(np.int32)
    mask = (rng.random((2, 9)) > 0.3).astype(np.float32)
    s, n = loss_sums(model, mx.array(inputs), mx.array(targets), mx.array(mask))
    logits = np.array(model(mx.array(inputs)), dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert n.item() == mask.sum()
    np.testing.assert_allclose(s.item(), (ce * mask).sum(), rtol=1e-5)


def test_grad_checkpoint_with_dropout_matches_finite_differences():
    """With dropout on, the checkpointed backward must replay the forward's dropout masks: each
    gradient entry equals a central difference of the loss re-seeded to the same masks. (mlx-lm's
    ``grad_checkpoint`` draws fresh masks in the recomputation and fails this: wrong signs even.)"""
    from mlx.utils import tree_map_with_path

    model = tiny_model()
    mx.random.seed(0)
    apply_adapters(model, rank=4, alpha=8, dropout=0.3)
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))  # lora_b != 0
    enable_grad_checkpoint(model)
    model.train()
    x = mx.array(np.random.default_rng(0).integers(3, 300, (2, 12)).astype(np.int32))
    mask = mx.ones((2, 11))
    params = model.trainable_parameters()

    def loss_at(name, index, delta):
        def shift(path, p):
            if path != name:
                return p
            d = np.zeros(p.shape, np.float32)
            d[index] = delta
            return p + mx.array(d)

        model.update(tree_map_with_path(shift, params))
        mx.random.seed(11)
        return loss_sums(model, x[:, :-1], x[:, 1:], mask)[0].item()

    mx.random.seed(11)
    _, grads = nn.value_and_grad(model, loss_sums)(model, x[:, :-1], x[:, 1:], mask)
    grads = dict(tree_flatten(grads))
    eps = 1e-2
    for name, index in [
        ("transformer.layers.0.attn.qkv_proj.lora_b", (0, 3)),
        ("transformer.layers.0.ffn.proj_1.lora_a", (5, 1)),
        ("transformer.layers.1.attn.out_proj.lora_a", (2, 2)),
        ("transformer.layers.1.ffn.proj_2.lora_b", (1, 7)),
    ]:
        numeric = (loss_at(name, index, eps) - loss_at(name, index, -eps)) / (2 * eps)
        analytic = grads[name][index].item()
        assert abs(analytic - numeric) <= 0.03 * abs(numeric) + 2e-3, (name, analytic, numeric)
    model.update(params)


def test_grad_checkpoint_gives_the_same_training(tmp_path, task_tokenizer):
    records, _ = colour_task(n_train_per_word=2, n_test_per_word=1)
    losses = []
    for ckpt in (False, True):
        out = tmp_path / f"ckpt{ckpt}"
        args = TrainingArgs(output_dir=str(out), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.0), learning_rate=1e-2,
                            warmup=0, batch_size=4, grad_accum=1, iters=3, save_every=0, grad_checkpoint=ckpt)
        train(tiny_model(), task_tokenizer, records, [], args)
        losses.append([s["loss"] for s in metrics(out)[0]])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_quantized_base_trains_and_stays_frozen(tmp_path, task_tokenizer, use_dora):
    model = tiny_model()
    nn.quantize(model, group_size=32, bits=4)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    args = TrainingArgs(output_dir=str(tmp_path / "out"), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.1, use_dora=use_dora),
                        learning_rate=1e-2, warmup=0, batch_size=4, grad_accum=1, iters=6, save_every=0)
    train(model, task_tokenizer, colour_task(2, 1)[0], [], args)
    assert isinstance(model.transformer.layers[0].attn.qkv_proj.linear, nn.QuantizedLinear)
    after = {k.replace(".linear.", "."): np.array(v) for k, v in tree_flatten(model.parameters())
             if not k.endswith((".lora_a", ".lora_b", ".m"))}
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[k], before[k]) for k in before)  # the quantized base is untouched
    losses = [s["loss"] for s in metrics(tmp_path / "out")[0]]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_schedule_warmup_then_cosine():
    args = TrainingArgs(learning_rate=3e-4, min_learning_rate=3e-5, warmup=10, warmup_init=1e-6)
    lr = learning_rate_schedule(args, 110)
    values = [lr(mx.array(i)).item() for i in range(111)]
    assert values[0] == pytest.approx(1e-6) and values[10] == pytest.approx(3e-4)
    assert all(a < b for a, b in zip(values[:10], values[1:11]))  # warmup rises
    assert values[60] == pytest.approx(3e-5 + 0.5 * (3e-4 - 3e-5), rel=1e-4)  # half-way down the cosine
    assert values[110] == pytest.approx(3e-5)
    frac = learning_rate_schedule(TrainingArgs(warmup=0.1), 200)
    assert frac(mx.array(20)).item() == pytest.approx(3e-4) and frac(mx.array(10)).item() < 2e-4
    # Commonsense-170k (minus 120 held out), 3 epochs, 16 sequences per update, as LLM-Adapters.
    assert total_steps(TrainingArgs(), math.ceil(169_880 / 4)) == math.ceil(3 * math.ceil(169_880 / 4) / 4)
    assert total_steps(TrainingArgs(iters=7), 10) == 7


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"min_learning_rate": 1.0}, "min_learning_rate"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"cutoff_len": 1}, "cutoff"),
        ({"iters": 0}, "iters"),
    ],
)
def test_bad_settings_fail_before_writing(tmp_path, task_tokenizer, change, message):
    out = tmp_path / "out"
    args = TrainingArgs(**{**TrainingArgs(output_dir=str(out)).__dict__, **change})
    with pytest.raises(ValueError, match=message):
        train(tiny_model(), task_tokenizer, colour_task(1, 1)[0], [], args)
    assert not out.exists()


def test_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="not divisible by the 2 processes"):
        TrainingArgs(batch_size=3).validate(world_size=2)


def test_cli_defaults_are_the_library_defaults():
    from mlx_openelm.cli import train as cli

    defaults = {name: p.default.default for name, p in inspect.signature(cli.lora).parameters.items() if name != "ctx"}
    args, config = TrainingArgs(), LoRAConfig()
    pairs = {
        "learning_rate": args.learning_rate, "min_learning_rate": args.min_learning_rate, "warmup": args.warmup, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "iters": args.iters, "epochs": args.epochs, "cutoff_len": args.cutoff_len,
        "train_on_inputs": args.train_on_inputs, "z_loss": args.z_loss, "group_by_length": args.group_by_length, "steps_per_eval": args.steps_per_eval,
        "save_every": args.save_every, "max_grad_norm": args.max_grad_norm, "grad_checkpoint": args.grad_checkpoint,
        "seed": args.seed, "rank": config.rank, "alpha": config.alpha, "dropout": config.dropout, "dora": config.use_dora,
        "adapt_embeddings": config.adapt_embeddings, "targets": ",".join(config.targets),
    }
    for name, value in pairs.items():
        assert defaults[name] == value, name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "0"], "rank"),
        (["--targets", "q_proj"], "unknown LoRA target"),
        (["--dora", "--adapt-embeddings"], "DoRA is not supported on token embeddings"),
        (["--batch-size", "0"], "batch_size"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    from mlx_openelm.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps(colour_task(1, 1)[0]))
    out = tmp_path / "adapters"
    with pytest.raises(SystemExit) as e:
        main(["lora", "--model", str(tmp_path / "no-such-model"), "--data", str(data), "--adapter-path", str(out), *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_missing_data_is_one_line(tmp_path, capsys):
    from mlx_openelm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lora", "--model", str(tmp_path), "--data", str(tmp_path / "missing.json"), "--adapter-path", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "missing.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()

"""The generic training loop and the SFT objective's fidelity to its references: PyTorch's AdamW (the
optimizer CoreNet and LLM-Adapters use), CoreNet's z-loss written out in float64, Ctrl-C / kill handling,
and the recipe files of the ``lora`` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from conftest import tiny_args, write_hf_checkpoint
from mlx_openelm.adapters import LoRAConfig
from mlx_openelm.model import Model, init_weights
from mlx_openelm.train import loop
from mlx_openelm.train.sft import TrainingArgs, token_loss, train
from conftest import colour_task, metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0):
    return init_weights(Model(tiny_args(num_transformer_layers=2)), seed)


# -- AdamW against PyTorch -----------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    """Same parameters, same gradients, several steps: our optimizer == torch.optim.AdamW."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p0 = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p0.items()} for _ in range(6)]
    args = loop.LoopArgs(learning_rate=1e-2, min_learning_rate=1e-2, warmup=0, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=weight_decay)  # cosine from 1e-2 to 1e-2: a constant rate

    class Params(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = mx.array(p0["a"]), mx.array(p0["b"])

    ours = Params()
    opt = loop.make_optimizer(args, steps=6)
    opt.init(ours.trainable_parameters())
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    topt = torch.optim.AdamW(list(tp.values()), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    for step, g in enumerate(grads, start=1):
        opt.update(ours, tree_unflatten([(k, mx.array(v)) for k, v in g.items()]))
        mx.eval(ours.parameters())
        for k, t in tp.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        topt.step()
        for k, t in tp.items():
            np.testing.assert_allclose(np.array(getattr(ours, k)), t.detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{k} after step {step}")


def test_first_step_size_is_the_learning_rate():
    """Bias correction makes the first Adam step lr * sign(g) (|update| = lr for every entry); MLX's
    default (no correction) with betas (0.9, 0.95) would move 0.1/sqrt(0.05) = 0.447 lr."""
    args = loop.LoopArgs(learning_rate=1e-3, min_learning_rate=1e-3, warmup=0)

    class P(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = mx.zeros((8,))

    p = P()
    opt = loop.make_optimizer(args, 1)
    opt.init(p.trainable_parameters())
    opt.update(p, {"w": mx.array(np.linspace(-2, 2, 8, dtype=np.float32))})
    np.testing.assert_allclose(np.abs(np.array(p.w)), 1e-3, rtol=1e-4)


# -- CoreNet's z-loss ----------------------------------------------------------------------------


def test_z_loss_is_corenets_formula():
    """CoreNet CrossEntropyLM with use_z_loss: CE mean + eps * Σ_valid logsumexp(logits)^2 / n_valid
    (the constant (log V)^2 it adds for ignored positions has no gradient and is left out)."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    inputs = rng.integers(3, 200, (2, 7)).astype(np.int32)
    targets = rng.integers(3, 200, (2, 7)).astype(np.int32)
    mask = (rng.random((2, 7)) > 0.25).astype(np.float32)
    eps = 1e-4
    s, n, extras = token_loss(eps)(model, mx.array(inputs), mx.array(targets), mx.array(mask))
    logits = np.array(model(mx.array(inputs)), dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    valid = mask.astype(bool)
    expected = ce[valid].mean() + eps * (lse[valid] ** 2).sum() / valid.sum()
    assert n.item() == valid.sum()
    np.testing.assert_allclose(s.item() / n.item(), expected, rtol=1e-5)
    z_loss = token_loss(eps)
    np.testing.assert_allclose(z_loss.scales["z_loss"] * extras["z_loss"].item() / n.item(), eps * (lse[valid] ** 2).mean(), rtol=1e-5)
    s0, _, e0 = token_loss(0.0)(model, mx.array(inputs), mx.array(targets), mx.array(mask))
    np.testing.assert_allclose(s0.item() / n.item(), ce[valid].mean(), rtol=1e-5)
    assert "z_loss" not in e0


# -- interruption ----------------------------------------------------------------------------------


def args_for(out, **kw):
    base = dict(output_dir=str(out), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.0), learning_rate=3e-3,
                warmup=0, batch_size=4, grad_accum=1, iters=6, save_every=0, steps_per_eval=0, seed=2)
    return TrainingArgs(**{**base, **kw})


class InterruptAt(loop.TrainingCallback):
    def __init__(self, step):
        self.step = step

    def on_step(self, m):
        if m["step"] == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_the_last_step_and_resume_finishes_the_run(tmp_path, task_tokenizer):
    train_set, _ = colour_task(n_train_per_word=3, n_test_per_word=1)
    train(tiny_model(), task_tokenizer, train_set, [], args_for(tmp_path / "full"))
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), task_tokenizer, train_set, [], args_for(out), callback=InterruptAt(3))
    assert loop.latest_checkpoint(out).name == "step_3"  # saved although save_every=0
    train(tiny_model(), task_tokenizer, train_set, [], args_for(out, resume=True))
    full, cut = metrics(tmp_path / "full")[0], metrics(out)[0]
    assert [s["step"] for s in cut] == list(range(1, 7))
    np.testing.assert_allclose([s["loss"] for s in cut], [s["loss"] for s in full], rtol=1e-5)


def test_a_run_killed_before_its_first_checkpoint_can_be_rerun(tmp_path, task_tokenizer):
    train_set, _ = colour_task(n_train_per_word=2, n_test_per_word=1)
    out = tmp_path / "out"
    out.mkdir()
    for name in (loop.METRICS_FILE, loop.DATA_ORDER_FILE):  # what a kill -9 after step 1 leaves
        (out / name).write_text(json.dumps({"step": 1, "loss": 1.0, "records": [0]}) + "\n")
    (out / loop.CHECKPOINTS_DIR / ".step_2-abc").mkdir(parents=True)  # a half-written checkpoint
    with pytest.raises(FileNotFoundError, match="run again without resume"):
        train(tiny_model(), task_tokenizer, train_set, [], args_for(out, resume=True))
    train(tiny_model(), task_tokenizer, train_set, [], args_for(out))  # the plain re-run works
    assert [s["step"] for s in metrics(out)[0]] == list(range(1, 7))
    assert not list((out / loop.CHECKPOINTS_DIR).glob(".step_*")) if (out / loop.CHECKPOINTS_DIR).exists() else True


def test_training_record_files(tmp_path, task_tokenizer):
    train_set, _ = colour_task(n_train_per_word=2, n_test_per_word=1)  # 8 records, batch 4: 2 batches an epoch
    out = tmp_path / "out"
    train(tiny_model(), task_tokenizer, train_set, [], args_for(out, save_every=2, keep_checkpoints=0))
    order = [json.loads(x) for x in (out / loop.DATA_ORDER_FILE).read_text().splitlines()]
    assert [o["step"] for o in order] == list(range(1, 7))
    for epoch in range(3):  # every epoch visits every record once
        assert sorted(order[2 * epoch]["records"] + order[2 * epoch + 1]["records"]) == list(range(8))
    manifest = json.loads((out / loop.DATA_MANIFEST_FILE).read_text())
    assert manifest["records"] == 8 and len(manifest["dataset_sha256"]) == 64 and manifest["seed"] == 2
    ckpts = [json.loads(x) for x in (out / loop.CHECKPOINTS_DIR / loop.CHECKPOINT_MANIFEST).read_text().splitlines()]
    assert [c["step"] for c in ckpts] == [2, 4]
    for c in ckpts:  # the recorded sha256 are those of the files on disk (hashlib here, independently)
        import hashlib

        for name, digest in c["files"].items():
            assert hashlib.sha256((out / loop.CHECKPOINTS_DIR / c["path"] / name).read_bytes()).hexdigest() == digest
    step = metrics(out)[0][0]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "peak_memory_gb"):
        assert key in step


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, task_spm_path):  # noqa: F811
    folder = tmp_path_factory.mktemp("loop") / "OpenELM-tiny"
    write_hf_checkpoint(folder, tiny_args(num_transformer_layers=2), seed=0, tokenizer=task_spm_path)
    return folder


def cli(args, tmp_path, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, **kw)


def test_recipe_with_flags_winning(tmp_path, hf_model):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(colour_task(2, 1)[0]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rank: 2\nalpha: 4\nz_loss: 1.0e-4\nlearning_rate: 1.0e-3\niters: 2\nval_size: 0\nsave_every: 0\n")
    out = tmp_path / "a"
    r = cli(["lora", "-m", str(hf_model), "--data", str(data), "-o", str(out), "--config", str(recipe),
             "--learning-rate", "2e-3", "--batch-size", "2", "--grad-accum", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["adapter"]["rank"] == 2 and saved["z_loss"] == 1e-4 and saved["iters"] == 2
    assert saved["learning_rate"] == 2e-3  # the flag won over the recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 2\nlearning_rat: 1\n")
    r = cli(["lora", "-m", str(hf_model), "--data", str(data), "-o", str(tmp_path / "b"), "--config", str(bad)], tmp_path)
    assert r.returncode == 1 and "learning_rat" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for shipped in (ROOT / "recipes").glob("*lora*.yaml"):  # the shipped recipes only use known options
        from mlx_openelm.cli.train import lora, locals_of
        from mlx_openelm.utils import read_recipe

        import inspect

        read_recipe(shipped, [p for p in inspect.signature(lora).parameters])
        assert locals_of


@pytest.mark.parametrize("extra, message", [
    (["--cutoff-len", "4096"], "exceeds the model's 2048-token context"),
    (["--learning-rate", "-1"], "learning_rate"),
])
def test_bad_values_are_refused(tmp_path, hf_model, extra, message):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(colour_task(1, 1)[0]))
    r = cli(["lora", "-m", str(hf_model), "--data", str(data), "-o", str(tmp_path / "o"), *extra], tmp_path)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_empty_data_file_is_named_as_such(tmp_path, hf_model):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    r = cli(["lora", "-m", str(hf_model), "--data", str(data), "-o", str(tmp_path / "o")], tmp_path)
    assert r.returncode == 1 and "holds no records" in r.stderr, r.stderr


def test_ctrl_c_exits_130_and_resume_works(tmp_path, hf_model):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(colour_task(6, 1)[0]))
    out = tmp_path / "o"
    args = ["lora", "-m", str(hf_model), "--data", str(data), "-o", str(out), "--rank", "2", "--iters", "300",
            "--batch-size", "2", "--grad-accum", "1", "--val-size", "0", "--save-every", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "cache")}
    p = subprocess.Popen([sys.executable, "-m", "mlx_openelm.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / loop.METRICS_FILE).exists() and (out / loop.METRICS_FILE).read_text().count("\n") >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "resume" in err and "Traceback" not in err
    assert loop.latest_checkpoint(out) is not None
    r = cli([*args, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    steps = [s["step"] for s in metrics(out)[0]]
    assert steps == list(range(1, 301))  # no step lost or repeated across the interruption

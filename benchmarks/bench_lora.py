"""LoRA training speed and peak memory: our trainer vs mlx-lm's, same weights, same data.

Both train rank-32 LoRA (scale alpha/r = 1.0, dropout 0.1) on ``qkv_proj``, ``out_proj``,
``proj_1`` and ``proj_2`` of every layer of the same random-weight float32 model (OpenELM-270M
shapes by default), with AdamW (lr 3e-4, betas 0.9/0.95, no weight decay), ``batch_size``
sequences per optimizer step, on the same synthetic token sequences (lengths uniform in
[min_len, max_len], fixed seed). Each trainer is driven through its public ``train`` function:

- ours: ``mlx_openelm.train.loop.train`` (gradient accumulation 1, its defaults otherwise,
  including gradient clipping at 1.0); records go in through a tokenizer whose "text" is the
  token ids, so ``encode_record`` gives back exactly the synthetic sequence;
- mlx-lm: ``mlx_lm.tuner.utils.linear_to_lora_layers`` (``num_layers`` = all layers, ``keys``
  = the four projections) on mlx-lm's own OpenELM holding the same arrays, and
  ``mlx_lm.tuner.trainer.train`` (its compiled step, ``steps_per_report=1``) with the dataset
  in the ``(token ids, offset)`` form its ``iterate_batches`` expects.

Each trainer batches the data its own way (ours: length-bucketed, width rounded up to 8;
mlx-lm: sorted by length, width 1 + a multiple of 32). ``tokens_per_sec`` counts the same thing
for both: real next-token targets (sum of length - 1 over the batch), over wall-clock time
between the trainers' per-step callbacks (data, step, logging: the whole loop).
``padded_tokens_per_sec`` counts every position computed, padding included.

The data set holds ``steps`` batches of sequences. In each of ``rounds`` rounds every contender
runs ``warmup + steps`` fresh steps (new adapters, optimizer and compiled functions; both loop
over the data into further epochs) and the last ``steps`` are timed; medians over rounds, ratios
ours/mlx-lm are medians of per-round ratios (the rounds run interleaved). Both trainers compile
their step once per batch width met (ours rounds widths up to multiples of 8, mlx-lm to 32), so
short runs also time compilation; with ``--warmup`` equal to ``--steps`` the timed steps are one
whole second epoch in which every width is already compiled: steady-state training. Peak memory
is ``mx.get_peak_memory()`` over a whole run (reset before it) and includes the shared weights.

A correctness check runs first: with dropout 0, identical adapter weights and one batch, each
model's loss and LoRA gradients under the other trainer's loss function must agree.

    python benchmarks/bench_lora.py                 # 270M, the comparison
    python benchmarks/bench_lora.py --shape tiny    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_openelm.bench import core as bench
from mlx_openelm import data as ours_data
from mlx_openelm.train import sft as ours_trainer
from mlx_openelm.train.loop import PAD_MULTIPLE, TrainingCallback
from mlx_openelm.adapters import DEFAULT_TARGETS, LoRAConfig, apply_adapters
from mlx_openelm.model import Model

RANK, ALPHA, DROPOUT = 32, 32.0, 0.1
LR, BETAS = 3e-4, (0.9, 0.95)
BOS, EOS, FIRST_ID = 1, 2, 3


# ---------------------------------------------------------------- data


def synthetic_sequences(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> List[List[int]]:
    """``n`` sequences ``[BOS, random ids..., EOS]`` with lengths uniform in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    return [[BOS, *rng.integers(FIRST_ID, vocab, k - 2).tolist(), EOS] for k in lengths]


class IdsTokenizer:
    """A tokenizer for our trainer whose text is token ids: ``encode`` returns BOS plus the
    integers written in the text (the LLM-Adapters template around them has no digits)."""

    bos_id, eos_id = BOS, EOS

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
        return [BOS] * add_bos + [int(t) for t in re.findall(r"\d+", text)] + [EOS] * add_eos


def as_records(seqs: Sequence[List[int]]) -> List[Dict[str, str]]:
    """LLM-Adapters records that ``encode_record(IdsTokenizer(), r)`` turns back into ``seqs``."""
    return [{"instruction": " ".join(map(str, s[1:-1])), "input": "", "output": "", "answer": ""} for s in seqs]


# ---------------------------------------------------------------- models


def ours_model(checkpoint: Model) -> Model:
    return bench.share_weights(checkpoint, Model(checkpoint.args))


def mlx_lm_lora_model(checkpoint: Model, dropout: float) -> nn.Module:
    """mlx-lm's OpenELM on the checkpoint's arrays with mlx-lm's LoRA on our four targets, all layers."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = bench.share_weights(checkpoint, bench.mlx_lm_model(checkpoint.args))
    model.freeze()
    keys = {"attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"}
    config = {"rank": RANK, "scale": ALPHA / RANK, "dropout": dropout, "keys": keys}
    linear_to_lora_layers(model, len(model.layers), config)
    return model


# ---------------------------------------------------------------- correctness check


def check_same_training(checkpoint: Model, seqs: Sequence[List[int]], batch_size: int) -> Dict[str, Any]:
    """Dropout 0, the same adapter weights (ours copied into mlx-lm's), one batch of ``seqs``:
    the first-step loss of each trainer, each trainer's loss function evaluated on both models,
    and the largest gradient difference."""
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.trainer import iterate_batches as theirs_batches

    mx.random.seed(0)
    ours = apply_adapters(ours_model(checkpoint), rank=RANK, alpha=ALPHA, dropout=0.0)
    theirs = mlx_lm_lora_model(checkpoint, dropout=0.0)
    adapters = tree_flatten(ours.trainable_parameters())
    if sorted(k for k, _ in adapters) != sorted(k for k, _ in tree_flatten(theirs.trainable_parameters())):
        raise RuntimeError("the two models' trainable parameters differ; the LoRA targets do not match")
    # lora_b = 0 at init makes every lora_a gradient zero; a small random lora_b tests them too.
    adapters = [(k, mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v) for k, v in adapters]
    ours.update(tree_unflatten(adapters))
    theirs.update(tree_unflatten(adapters))
    ours.train(), theirs.train()

    batch = seqs[:batch_size]
    encoded = [ours_data.encode_record(IdsTokenizer(), r, cutoff_len=10**6) for r in as_records(batch)]
    if [ids for ids, _ in encoded] != [list(s) for s in batch]:
        raise RuntimeError("IdsTokenizer did not reproduce the synthetic sequences")
    ours_batch = next(ours_data.iterate_batches(encoded, batch_size, shuffle=False))
    theirs_batch = next(theirs_batches([(s, 0) for s in batch], batch_size, max_seq_length=10**6))

    def ours_loss(model):  # the loss our trainer differentiates
        s, n = ours_trainer.loss_sums(model, *ours_batch)
        return s / n

    def theirs_loss(model):
        return default_loss(model, *theirs_batch)[0]

    out: Dict[str, Any] = {"dropout": 0.0, "batch_size": batch_size}
    grads = {}
    for fname, fn in (("ours_loss_fn", ours_loss), ("mlx_lm_loss_fn", theirs_loss)):
        for mname, model in (("ours_model", ours), ("mlx_lm_model", theirs)):
            loss, g = nn.value_and_grad(model, fn)(model)
            out[f"{fname}:{mname}"] = loss.item()
            grads[fname, mname] = dict(tree_flatten(g))
    out["ours_trainer_first_loss"] = out["ours_loss_fn:ours_model"]
    out["mlx_lm_trainer_first_loss"] = out["mlx_lm_loss_fn:mlx_lm_model"]
    out["model_loss_max_abs_diff"] = max(abs(out[f"{f}:ours_model"] - out[f"{f}:mlx_lm_model"]) for f in ("ours_loss_fn", "mlx_lm_loss_fn"))
    diffs = []
    for f in ("ours_loss_fn", "mlx_lm_loss_fn"):
        a, b = grads[f, "ours_model"], grads[f, "mlx_lm_model"]
        scale = max(mx.abs(v).max().item() for v in b.values())
        diffs.append(max(mx.abs(a[k] - b[k]).max().item() for k in a) / scale)
    out["model_grad_max_rel_diff"] = max(diffs)
    # mlx-lm's mask also counts the target after each sequence's last token (a padding id 0),
    # so its first loss differs slightly from ours; each loss function agrees across the models.
    _, theirs_mask = _theirs_mask(*theirs_batch)
    out["ours_target_tokens"] = int(ours_batch[2].sum().item())
    out["mlx_lm_target_tokens"] = int(theirs_mask.sum().item())
    return out


def _theirs_mask(batch: mx.array, lengths: mx.array):
    """mlx-lm's ``default_loss`` mask, recomputed (steps 1..L-1 with offset <= step <= length)."""
    steps = mx.arange(1, batch.shape[1])
    return batch, mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


# ---------------------------------------------------------------- runs


def _fresh() -> None:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()


def _summary(times: List[float], tokens: List[int], padded: List[int], peak: int, warmup: int) -> Dict[str, float]:
    real, pad = tokens[warmup + 1 :], padded[warmup + 1 : len(times)]
    seconds = times[-1] - times[warmup]
    n = len(times) - 1 - warmup
    return {
        "tokens_per_sec": sum(real) / seconds,
        "padded_tokens_per_sec": sum(pad) / seconds,
        "seconds_per_step": seconds / n,
        "peak_memory_gb": peak / 1e9,
        "timed_steps": n,
        "timed_tokens": sum(real),
        "timed_padded_tokens": sum(pad),
        "warmup_seconds": times[warmup] - times[0],
    }


def run_ours(checkpoint: Model, seqs, batch_size: int, warmup: int, steps: int, seed: int) -> Dict[str, float]:
    """``warmup + steps`` optimizer steps of our trainer; timings between ``on_step`` callbacks."""
    stamps, tokens, padded = [], [], []

    class Clock(TrainingCallback):
        def on_start(self, info):
            stamps.append(time.perf_counter())  # after setup, before the first batch
            tokens.append(0)

        def on_step(self, metrics):
            stamps.append(time.perf_counter())
            tokens.append(metrics["tokens"])

    # Positions computed per step: our trainer's batches (same function, seed and epochs), widened to PAD_MULTIPLE.
    encoded = [(list(s), [1] * len(s)) for s in seqs]
    epoch = 0
    while len(padded) < warmup + steps:
        for inputs, _, _ in ours_data.iterate_batches(encoded, batch_size, shuffle=True, seed=seed, epoch=epoch):
            rows, width = inputs.shape
            padded.append(rows * (width + -width % PAD_MULTIPLE))
        epoch += 1

    model = ours_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        args = ours_trainer.TrainingArgs(
            output_dir=str(Path(tmp) / "run"), adapter=LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=DEFAULT_TARGETS),
            learning_rate=LR, min_learning_rate=LR, warmup=0, betas=BETAS, weight_decay=0.0,
            batch_size=batch_size, grad_accum=1, iters=warmup + steps, cutoff_len=checkpoint.args.max_context_length,
            steps_per_eval=0, save_every=0, seed=seed,
        )
        _fresh()
        ours_trainer.train(model, IdsTokenizer(), as_records(seqs), [], args, callback=Clock())
        peak = mx.get_peak_memory()
    return _summary(stamps, tokens, [0] + padded, peak, warmup)


def run_mlx_lm(checkpoint: Model, seqs, batch_size: int, warmup: int, steps: int, seed: int) -> Dict[str, float]:
    """``warmup + steps`` steps of ``mlx_lm.tuner.trainer.train``; timings between its per-step reports."""
    from mlx_lm.tuner import trainer as theirs
    from mlx_lm.tuner.callbacks import TrainingCallback

    stamps, tokens, padded = [], [0], [0]
    pending: List[tuple] = []

    def batches(**kw):  # mlx-lm's own iterate_batches, watched: which batch each step gets
        for batch, lengths in theirs.iterate_batches(**kw):
            pending.append((int((lengths[:, 1] - 1).sum().item()), batch.shape[0] * (batch.shape[1] - 1)))
            yield batch, lengths

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            stamps.append(time.perf_counter())
            real, pad = pending.pop(0)
            tokens.append(real), padded.append(pad)

    mx.random.seed(seed)
    model = mlx_lm_lora_model(checkpoint, DROPOUT)
    optimizer = optim.AdamW(learning_rate=LR, betas=list(BETAS), weight_decay=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = theirs.TrainingArgs(
            batch_size=batch_size, iters=warmup + steps, steps_per_report=1, steps_per_eval=10**9,
            steps_per_save=10**9, max_seq_length=10**6, adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        np.random.seed(seed)  # its iterate_batches shuffles with numpy's global generator
        _fresh()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its progress display
            stamps.append(time.perf_counter())
            theirs.train(model, optimizer, [(list(s), 0) for s in seqs], None, args, iterate_batches=batches,
                         training_callback=Clock())
        peak = mx.get_peak_memory()
    return _summary(stamps, tokens, padded, peak, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="270M", help="270M (default), 450M, 1_1B, 3B or tiny (smoke run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import mlx_lm

    tic = time.perf_counter()
    checkpoint = bench.random_model(a.shape, "float32", seed=a.seed)
    # One epoch is `steps` batches: the timed window covers as many sequences as the data set holds.
    seqs = synthetic_sequences(a.batch_size * a.steps, checkpoint.args.vocab_size, a.min_len, a.max_len, a.seed)

    check = check_same_training(checkpoint, seqs, a.batch_size)
    print(f"check: {json.dumps(check)}", file=sys.stderr, flush=True)

    contenders = {"ours": run_ours, "mlx_lm": run_mlx_lm}
    samples: Dict[str, List[Dict[str, float]]] = {k: [] for k in contenders}
    for r in range(a.rounds):
        for name, run in contenders.items():
            samples[name].append(run(checkpoint, seqs, a.batch_size, a.warmup, a.steps, a.seed))
            s = samples[name][-1]
            print(f"round {r + 1} {name}: {s['tokens_per_sec']:.1f} tok/s, {s['seconds_per_step']:.3f} s/step, "
                  f"{s['peak_memory_gb']:.3f} GB peak", file=sys.stderr, flush=True)

    keys = ("tokens_per_sec", "padded_tokens_per_sec", "seconds_per_step", "peak_memory_gb")
    result: Dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "shape": a.shape, "dtype": "float32", "device": mx.default_device().type.name,
        "mlx_version": mx.__version__, "mlx_lm_version": mlx_lm.__version__,
        "lora": {"rank": RANK, "alpha": ALPHA, "scale": ALPHA / RANK, "dropout": DROPOUT, "targets": list(DEFAULT_TARGETS), "layers": "all"},
        "batch_size": a.batch_size, "warmup_steps": a.warmup, "timed_steps": a.steps, "rounds": a.rounds,
        "sequence_lengths": [a.min_len, a.max_len], "seed": a.seed,
        "check": check,
    }
    for name, rounds in samples.items():
        result[name] = {**{k: statistics.median(s[k] for s in rounds) for k in keys},
                        "samples": {k: [s[k] for s in rounds] for k in (*keys, "warmup_seconds")}}
    result["ratio_ours_over_mlx_lm"] = {
        k: statistics.median(x[k] / y[k] for x, y in zip(samples["ours"], samples["mlx_lm"])) for k in keys
    }
    result["seconds"] = round(time.perf_counter() - tic, 1)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

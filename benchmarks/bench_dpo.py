"""DPO training speed and peak memory: our objective on the generic loop vs mlx-lm-lora's DPO, same
weights, same preference pairs, in the same run.

Both train rank-32 LoRA (alpha 32, dropout 0) on ``qkv_proj``, ``out_proj``, ``proj_1``, ``proj_2`` of
every layer of the same random-weight float32 model (OpenELM-270M shapes by default) with the sigmoid
loss, β 0.1, AdamW (lr 1e-5, constant), ``batch_size`` pairs per optimizer step, on the same synthetic
pairs (prompt and response lengths uniform in the given ranges, fixed seed):

- ours: ``mlx_openelm.train.dpo``: the reference log-probs are computed once, batched, before training
  (timed separately as ``reference_seconds``; its memory is inside our peak), then ``loop.train`` with
  ``make_loss`` runs the steps (chosen and rejected as one batch of 2B rows, one model in memory);
- mlx-lm-lora: ``mlx_lm_lora.trainer.dpo_trainer.train_dpo`` on mlx-lm's OpenELM with mlx-lm's LoRA,
  and, as its DPO needs, a second full copy of the weights as ``ref_model`` that it runs every step.

``tokens_per_sec`` counts the same thing for both: the tokens of both sequences of every pair of a
step (prompt included, padding excluded), over the wall-clock time between the trainers' per-step
callbacks. The first ``warmup`` steps are not timed. Peak memory is ``mx.get_peak_memory()`` over each
whole run (reset before it; the shared policy weights included). ``rounds`` interleaved rounds; medians,
and ratios ours/theirs as medians of per-round ratios.

    python benchmarks/bench_dpo.py                  # 270M shapes
    python benchmarks/bench_dpo.py --shape tiny     # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_openelm.adapters import DEFAULT_TARGETS, apply_adapters
from mlx_openelm.bench import core as bench
from mlx_openelm.model import Model
from mlx_openelm.train import dpo
from mlx_openelm.train import loop
from mlx_openelm.train.dpo_data import EncodedPair

RANK, ALPHA, BETA, LR = 32, 32.0, 0.1, 1e-5
BOS, EOS, FIRST_ID = 1, 2, 3


def synthetic_pairs(n: int, vocab: int, prompt_len, response_len, seed: int) -> List[EncodedPair]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = [BOS] + rng.integers(FIRST_ID, vocab, rng.integers(*prompt_len) - 1).tolist()
        c = rng.integers(FIRST_ID, vocab, rng.integers(*response_len) - 1).tolist() + [EOS]
        r = rng.integers(FIRST_ID, vocab, rng.integers(*response_len) - 1).tolist() + [EOS]
        out.append(EncodedPair(p + c, len(p), p + r, len(p)))
    return out


def _fresh() -> None:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()


def _summary(stamps: List[float], tokens: List[int], peak: int, warmup: int) -> Dict[str, float]:
    seconds = stamps[-1] - stamps[warmup]
    n = len(stamps) - 1 - warmup
    return {"tokens_per_sec": sum(tokens[warmup + 1:]) / seconds, "seconds_per_step": seconds / n,
            "peak_memory_gb": peak / 1e9, "timed_steps": n}


def run_ours(checkpoint: Model, pairs, batch_size: int, warmup: int, steps: int, seed: int) -> Dict[str, float]:
    model = bench.share_weights(checkpoint, Model(checkpoint.args))
    _fresh()
    tic = time.perf_counter()
    ref = dpo.reference_logps(model, pairs, batch_size=batch_size)
    ref_seconds = time.perf_counter() - tic
    mx.random.seed(seed)
    apply_adapters(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=DEFAULT_TARGETS)
    source = dpo.PreferenceBatches(pairs, *dpo.in_loss_units(ref, "sigmoid"), batch_size, shuffle=True, seed=seed)
    stamps: List[float] = []
    tokens: List[int] = [0]
    order: List[List[int]] = []

    class Clock(loop.TrainingCallback):
        def on_start(self, info):
            stamps.append(time.perf_counter())

        def on_step(self, m):
            stamps.append(time.perf_counter())

    epoch = 0
    while len(order) < warmup + steps:
        order += [ids for ids, _ in source.batches(epoch)]
        epoch += 1
    tokens += [sum(len(pairs[i].chosen) + len(pairs[i].rejected) for i in ids) for ids in order[: warmup + steps]]
    with tempfile.TemporaryDirectory() as tmp:
        args = loop.LoopArgs(output_dir=str(Path(tmp) / "run"), learning_rate=LR, min_learning_rate=LR, warmup=0,
                             betas=(0.9, 0.999), batch_size=batch_size, grad_accum=1, iters=warmup + steps,
                             steps_per_eval=0, save_every=0, max_grad_norm=0.0, seed=seed)
        saver = loop.Saver("adapters.safetensors", lambda folder, m: None)
        loop.train(model, dpo.make_loss("sigmoid", BETA), source, None, args, saver=saver,
                   fingerprint={"records": len(pairs)}, run_config={"objective": "dpo-bench"}, callback=Clock())
    peak = mx.get_peak_memory()
    return {**_summary(stamps, tokens, peak, warmup), "reference_seconds": ref_seconds}


def run_theirs(checkpoint: Model, pairs, batch_size: int, warmup: int, steps: int, seed: int) -> Dict[str, float]:
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer import dpo_trainer as theirs

    model = bench.share_weights(checkpoint, bench.mlx_lm_model(checkpoint.args))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                     "keys": {"attn.qkv_proj", "attn.out_proj", "ffn.proj_1", "ffn.proj_2"}})
    ref_model = bench.mlx_lm_model(checkpoint.args)  # its reference: a second full model (own copy of the weights)
    ref_model.update(tree_map(lambda v: v * 1, checkpoint.parameters()))
    ref_model.freeze()
    ref_model.eval()
    mx.eval(ref_model.parameters())
    data = [{"chosen": p.chosen, "rejected": p.rejected, "chosen_prompt_length": p.chosen_start,
             "rejected_prompt_length": p.rejected_start} for p in pairs]
    stamps: List[float] = []
    tokens: List[int] = [0]
    seen: List[int] = []
    real_iterate = theirs.iterate_dpo_batches

    def watched(dataset, batch_size, max_seq_length, train=False):
        for batch in real_iterate(dataset, batch_size, max_seq_length, train):
            c_mask_rows = (batch[0] != 0).sum().item() + (batch[1] != 0).sum().item()  # non-padding ids (no id 0 in data)
            seen.append(int(c_mask_rows))
            yield batch

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            stamps.append(time.perf_counter())
            tokens.append(seen[len(stamps) - 2] if len(seen) >= len(stamps) - 1 else 0)

    optimizer = optim.AdamW(learning_rate=LR, betas=[0.9, 0.999], weight_decay=0.0)
    theirs.iterate_dpo_batches = watched
    real_info = mx.device_info

    def device_info():  # train_dpo reads a Metal-only key and fails on Linux CPU/CUDA without it
        info = dict(real_info())
        info.setdefault("max_recommended_working_set_size", info.get("memory_size", 0))
        return info

    mx.device_info = device_info
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = theirs.DPOTrainingArgs(batch_size=batch_size, iters=warmup + steps, steps_per_report=1, steps_per_eval=10**9,
                                          steps_per_save=10**9, max_seq_length=10**6, adapter_file=str(Path(tmp) / "a.safetensors"),
                                          beta=BETA, loss_type="sigmoid")
            np.random.seed(seed)
            _fresh()
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                stamps.append(time.perf_counter())
                theirs.train_dpo(model, ref_model, optimizer, data, None, args, training_callback=Clock(), loss_type="sigmoid")
            peak = mx.get_peak_memory()
    finally:
        theirs.iterate_dpo_batches = real_iterate
        mx.device_info = real_info
    return _summary(stamps, tokens, peak, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="270M", help="270M (default), 450M, 1_1B, 3B or tiny (smoke run)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(32, 96))
    p.add_argument("--response-len", type=int, nargs=2, default=(32, 96))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import mlx_lm
    from importlib.metadata import version

    tic = time.perf_counter()
    checkpoint = bench.random_model(a.shape, "float32", seed=a.seed)
    mx.eval(checkpoint.parameters())  # materialise the random weights now, not inside the first timed pass
    pairs = synthetic_pairs(a.batch_size * (a.steps + a.warmup), checkpoint.args.vocab_size, a.prompt_len, a.response_len, a.seed)
    contenders = {"ours": run_ours, "mlx_lm_lora": run_theirs}
    samples: Dict[str, List[Dict[str, float]]] = {k: [] for k in contenders}
    for r in range(a.rounds):
        for name, run in contenders.items():
            samples[name].append(run(checkpoint, pairs, a.batch_size, a.warmup, a.steps, a.seed))
            s = samples[name][-1]
            print(f"round {r + 1} {name}: {s['tokens_per_sec']:.1f} tok/s, {s['seconds_per_step']:.3f} s/step, "
                  f"{s['peak_memory_gb']:.3f} GB peak", file=sys.stderr, flush=True)
    keys = ("tokens_per_sec", "seconds_per_step", "peak_memory_gb")
    result: Dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]), "shape": a.shape, "dtype": "float32", "device": mx.default_device().type.name,
        "mlx_version": mx.__version__, "mlx_lm_version": mlx_lm.__version__, "mlx_lm_lora_version": version("mlx-lm-lora"),
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": list(DEFAULT_TARGETS)}, "loss": "sigmoid", "beta": BETA,
        "batch_size_pairs": a.batch_size, "warmup_steps": a.warmup, "timed_steps": a.steps, "rounds": a.rounds,
        "prompt_len": list(a.prompt_len), "response_len": list(a.response_len), "seed": a.seed,
    }
    for name, rounds in samples.items():
        result[name] = {k: statistics.median(s[k] for s in rounds) for k in keys}
        result[name]["samples"] = {k: [s[k] for s in rounds] for k in keys}
    result["ours"]["reference_seconds"] = statistics.median(s["reference_seconds"] for s in samples["ours"])
    result["ratio_ours_over_mlx_lm_lora"] = {
        k: statistics.median(x[k] / y[k] for x, y in zip(samples["ours"], samples["mlx_lm_lora"])) for k in keys}
    result["seconds"] = round(time.perf_counter() - tic, 1)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

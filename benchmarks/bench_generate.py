"""Ours vs mlx-lm's OpenELM, same weights, same run: prompt and decode speed and peak memory.

Random weights at the real shapes (no download), a 512-token prompt and 128 generated tokens by
default, for a float16 checkpoint and a 4-bit one (group size 64). Each gives two comparisons (see
``mlx_openelm/bench.py``):

- ``same_dtype``: ours and mlx-lm both on the checkpoint as stored (float16, or 4-bit with float16
  scales): the same MLX kernels, so the ratio measures the model code alone;
- ``defaults``: ours as our loader makes it (``dtype="auto"``: float32 on the CPU, quantized layers
  dequantized; the stored dtype on a GPU) vs mlx-lm at its defaults (the stored dtype).

Ratios are ours/mlx-lm (above 1 means ours is faster, or for memory, bigger). Prints JSON on
stdout (and after every checkpoint to ``--out``) and a short summary on stderr.

On a CPU the 4-bit checkpoint keeps float32 scales by default: MLX's CPU ``quantized_matmul`` runs
at ~2.2 GFLOP/s with float32 activations but ~0.06 GFLOP/s with float16 ones (measured on the
project's 2-core EPYC), so a float16 4-bit 270M run would take hours (``--quantized-dtype float16``
still asks for it). Slow on a CPU in any case (~15-20 min per checkpoint at 270M): run it once.

    python benchmarks/bench_generate.py                  # 270M
    python benchmarks/bench_generate.py --include-1_1b   # 270M and 1.1B
    python benchmarks/bench_generate.py --shape tiny --prompt-tokens 32 --gen-tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_openelm.bench import core as bench

CHECKPOINTS = {"float16": ("float16", None), "4bit": (None, 4)}  # None: --quantized-dtype


def compare(shape: str, stored: str, bits, args) -> dict:
    checkpoint = bench.random_model(shape, stored, bits, args.seed)
    ours = bench.as_loaded(checkpoint, "auto")
    result = bench.benchmark(
        ours, checkpoint=checkpoint, compare_mlx_lm=True, prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens, repeats=args.repeats, seed=args.seed, label=f"OpenELM-{shape} shapes, random weights",
    )
    del checkpoint, ours
    gc.collect()
    mx.clear_cache()
    return {"shape": shape, "checkpoint": result["checkpoint"], **result["mlx_lm"],
            "machine": {k: result[k] for k in ("device", "device_name", "blas", "mlx_version", "mlx_lm_version")}}


def summary_line(r: dict) -> str:
    def kind(s):
        return s["dtype"] + (f" {s['quantization']['bits']}-bit" if s["quantization"] else "")

    parts = [f"{r['shape']} {kind(r['checkpoint'])} checkpoint"]
    for mode in ("same_dtype", "defaults"):
        m = r[mode]
        o, t, x = m["ours"], m["mlx_lm"], m["ratio"]
        parts.append(
            f"  {mode}: ours {kind(o)} prompt {o['prompt_tps']:.1f} / decode {o['generation_tps']:.1f} tok/s, "
            f"{o['peak_memory_gb']:.2f} GB | mlx-lm {kind(t)} {t['prompt_tps']:.1f} / {t['generation_tps']:.1f} tok/s, "
            f"{t['peak_memory_gb']:.2f} GB | ratio prompt x{x['prompt_tps']:.2f} decode x{x['generation_tps']:.2f} "
            f"memory x{x['peak_memory_gb']:.2f}"
        )
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", help="size to run (repeatable; default 270M): 270M, 450M, 1_1B, 3B, tiny")
    p.add_argument("--include-1_1b", action="store_true", help="also run the 1.1B shapes")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; medians are reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", action="append", choices=list(CHECKPOINTS), help="which checkpoints (repeatable; default both)")
    p.add_argument("--quantized-dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="dtype of the 4-bit checkpoint's scales and other weights; auto: float32 on a CPU, float16 on a GPU")
    p.add_argument("--out", type=Path, help="also write the JSON here, updated after every checkpoint")
    args = p.parse_args()
    shapes = args.shape or ["270M"]
    if args.include_1_1b and "1_1B" not in shapes:
        shapes.append("1_1B")
    qdtype = bench.random_checkpoint_dtype(args.quantized_dtype, quantize=4)

    out = {
        "command": " ".join(["python", *sys.argv]),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "seconds": 0.0,
        "results": [],
    }
    tic = time.perf_counter()
    for shape in shapes:
        for name in args.checkpoint or list(CHECKPOINTS):
            stored, bits = CHECKPOINTS[name]
            out["results"].append(compare(shape, stored or qdtype, bits, args))
            out["seconds"] = round(time.perf_counter() - tic, 1)
            print(summary_line(out["results"][-1]), file=sys.stderr, flush=True)
            if args.out:
                tmp = args.out.with_name(args.out.name + ".partial")
                tmp.write_text(json.dumps(out, indent=2) + "\n")
                os.replace(tmp, args.out)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

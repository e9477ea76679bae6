"""Ours vs mlx-lm's OpenELM, same weights, same run: prompt and decode speed and peak memory.

Random weights at the real shapes (no download), a 512-token prompt and 128 generated tokens by
default, for a float16 checkpoint and a 4-bit one. Each gives two comparisons (see
``mlx_openelm/bench.py``):

- ``same_dtype``: ours and mlx-lm both on the checkpoint as stored (float16, or 4-bit with float16
  scales): the same MLX kernels, so the ratio measures the model code alone;
- ``defaults``: ours as our loader makes it (``dtype="auto"``: float32 on the CPU, quantized layers
  dequantized; the stored dtype on a GPU) vs mlx-lm at its defaults (the stored dtype).

Ratios are ours/mlx-lm (above 1 means ours is faster, or for memory, bigger). Prints JSON on
stdout and a short summary on stderr. Slow on a CPU: run it once, not in a loop.

    python benchmarks/bench_generate.py                  # 270M
    python benchmarks/bench_generate.py --include-1_1b   # 270M and 1.1B
    python benchmarks/bench_generate.py --shape tiny --prompt-tokens 32 --gen-tokens 8   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_openelm import bench

CHECKPOINTS = (("float16", None), ("float16", 4))


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
    args = p.parse_args()
    shapes = args.shape or ["270M"]
    if args.include_1_1b and "1_1B" not in shapes:
        shapes.append("1_1B")

    results = []
    tic = time.perf_counter()
    for shape in shapes:
        for stored, bits in CHECKPOINTS:
            results.append(compare(shape, stored, bits, args))
            print(summary_line(results[-1]), file=sys.stderr, flush=True)
    out = {
        "command": " ".join(["python", *sys.argv]),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - tic, 1),
        "results": results,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""``bench``: prompt/decode speed, first-token time, memory, and the RMSNorm study."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="MLX folder, apple/OpenELM-* folder or hub id."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Random weights at a released size's shapes: 270M, 450M, 1_1B, 3B, or tiny (no download)."),
    dtype: str = typer.Option("auto", "--dtype", help="Our compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16. With --shape a named dtype is also the stored one (else float16; float32 when quantizing on a CPU, where float16 quantized matmul is ~36x slower)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantize the checkpoint to 4 or 8 bits (group size 64)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p", min=1, help="Prompt length in tokens."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", "--generation-tokens", "-g", min=1, help="Tokens to generate (exactly; EOS is ignored)."),
    repeats: int = typer.Option(3, "--repeats", "--num-trials", "-n", min=1, help="Timed rounds, interleaved between contenders; medians are reported."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
    compare_mlx_lm: bool = typer.Option(False, "--compare-mlx-lm", help="Also run mlx-lm's OpenELM on the same weights: same dtype, and mlx-lm at its defaults."),
    rmsnorm_ablation: bool = typer.Option(False, "--rmsnorm-ablation", help="Fused vs naive RMSNorm, and the share of decode time spent in it."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart (with --rmsnorm-ablation the default is rmsnorm_ablation.png)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and the random prompt."),
):
    """Measure prompt and decode speed, time to first token and peak memory."""
    import json

    from rich.console import Console

    from ..bench.core import run_bench

    if plot is None and rmsnorm_ablation:
        plot = Path("rmsnorm_ablation.png")
    # run_bench reports no progress of its own: a live spinner with the elapsed time shows it is working
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    what = f"OpenELM-{shape} shapes" if shape else model
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True, highlight=False), transient=True) as bar:
        bar.add_task(f"benchmarking {what}: building the model, then {repeats} timed round(s) of "
                     f"{prompt_tokens}+{gen_tokens} tokens (minutes at released sizes)", total=None)
        result = run_bench(
            model=model, shape=shape, dtype=dtype, quantize=quantize, seed=seed, plot=plot, prompt_tokens=prompt_tokens,
            gen_tokens=gen_tokens, repeats=repeats, compare_mlx_lm=compare_mlx_lm, rmsnorm_ablation=rmsnorm_ablation,
        )
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        _print_bench(result, Console(highlight=False, width=None if sys.stdout.isatty() else 120))


def _print_bench(r: dict, console) -> None:
    from rich.table import Table

    from ..bench.core import contender_runs, weights_label

    console.print(f"{r['model']} | {r['device']} ({r['device_name']}) | BLAS: {r['blas']}")
    console.print(f"{r['prompt_tokens']}-token prompt, {r['gen_tokens']} generated, median of {r['repeats']} rounds")
    table = Table("run", "weights", "prompt tok/s", "decode tok/s", "first token s", "peak memory GB")
    for name, s in contender_runs(r):
        table.add_row(name, weights_label(s), f"{s['prompt_tps']:.1f}", f"{s['generation_tps']:.1f}", f"{s['ttft_s']:.3f}",
                      f"{s['peak_memory_gb']:.3f}")
    console.print(table)
    cmp, abl = r.get("mlx_lm"), r.get("rmsnorm_ablation")
    if cmp:
        for mode, title in (("same_dtype", "same dtype, same kernels"), ("defaults", "each at its defaults")):
            x, ours, theirs = cmp[mode]["ratio"], cmp[mode]["ours"], cmp[mode]["mlx_lm"]
            console.print(f"ours/mlx-lm, {title} ({weights_label(ours)} vs {weights_label(theirs)}): prompt "
                          f"x{x['prompt_tps']:.2f}, decode x{x['generation_tps']:.2f}, peak memory x{x['peak_memory_gb']:.2f}")
    if abl:
        for v in ("fused", "naive"):
            a = abl[v]
            console.print(f"RMSNorm {v}: {a['norm_ms_per_token']:.2f} ms of a {a['decode_step_ms']:.2f} ms decode step "
                          f"({a['norm_share']:.1%}, {abl['norm_calls_per_token']} calls)")
        console.print(f"fused/naive decode speed: x{abl['generation_speedup_fused_over_naive']:.3f}")
    if r.get("plot"):
        console.print(f"chart: {r['plot']}")


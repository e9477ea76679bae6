"""``memorization`` and ``plot``: LLM360-style openness (Analysis360's memorization across
checkpoints; training curves of our runs and of CoreNet's published logs)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..eval.memorization import MemorizationConfig

_D = MemorizationConfig()


def memorization(
    checkpoints: List[str] = typer.Option(..., "--checkpoints", "-c", help="Models to score, in training order: MLX/HF folders, hub ids "
                                          "or CoreNet .pt files (Apple's checkpoint_epoch_0_iter_*.pt). Several may follow one "
                                          "--checkpoints: --checkpoints C1 C2 C3."),
    more: Optional[List[str]] = typer.Argument(None, metavar="[C2 C3 ...]", help="More checkpoints (after --checkpoints C1).", show_default=False),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL of {\"token_ids\"} or {\"text\"} rows, or a folder of such files "
                              "(each one data chunk, as LLM360's train_000.jsonl ...)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (per-checkpoint scores.csv/.jsonl/summary.json, summary.json, PNG figures)."),
    adapter_path: Optional[List[str]] = typer.Option(None, "--adapter-path", help="Adapter folder, repeatable: one per checkpoint, or several "
                                                     "(or a trainer run / checkpoints/ folder, expanded to its step_N) on one base checkpoint."),
    prompt_len: int = typer.Option(_D.prompt_len, "--prompt-len", "-k", help="Prompt tokens k."),
    continuation_len: int = typer.Option(_D.continuation_len, "--continuation-len", "-l", help="Continuation tokens l compared with the data."),
    num_sequences: int = typer.Option(_D.num_sequences, "--num-sequences", "-n", help="Sequences per chunk (first N after the seeded shuffle)."),
    seed: int = typer.Option(_D.seed, "--seed", help="Shuffle seed (Analysis360: 42)."),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", "-b", help="Sequences decoded together."),
    through_eos: bool = typer.Option(False, "--through-eos", help="Keep decoding after EOS (Pythia); default stops at EOS as Analysis360."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer for checkpoints that ship none (CoreNet .pt): "
                                            "a tokenizer.model, a folder with one, or a hub repo (default: meta-llama/Llama-2-7b-hf)."),
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip the PNG figures (no matplotlib needed)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Memorization score of each checkpoint on training data (LLM360 Analysis360): greedy continuation of k tokens, token and full match."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from ..eval.memorization import make_checkpoints, run_memorization
    from ._common import _progress_callback

    config = MemorizationConfig(prompt_len, continuation_len, num_sequences, seed, batch_size, stop_at_eos=not through_eos)
    ckpts = make_checkpoints(list(checkpoints) + list(more or []), list(adapter_path or []))
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        result = run_memorization(ckpts, data, output, config, dtype=dtype, tokenizer=tokenizer, figures=not no_figures, force=force,
                                  progress=_progress_callback(bar))
    table = Table(title=f"memorization (k={prompt_len}, l={continuation_len}): {data}")
    for col in ("checkpoint", "sequences", "token match", "full match", "median"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right", overflow="fold")
    for s in result["checkpoints"]:
        table.add_row(s["label"], str(s["sequences"]), f"{s['token_match']:.4f}", f"{s['full_match']:.4f}", f"{s['quantiles']['0.5']:.4f}")
    console = Console(soft_wrap=True, highlight=False)
    console.print(table)
    console.print(f"[green]Saved[/green] {escape(str(output))}")


def plot(
    metrics: Path = typer.Argument(..., help="A trainer's metrics.jsonl, or CoreNet's training_logs.txt (Apple's published OpenELM logs)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: curves.png next to the input)."),
    title: Optional[str] = typer.Option(None, "--title", help="Figure title (default: the file name)."),
):
    """Draw training curves (loss, lr, grad norm, tokens/s, memory) from metrics.jsonl or a CoreNet training log."""
    from rich.console import Console
    from rich.markup import escape

    from ..eval.training_plot import plot_training

    out = out or metrics.with_name("curves.png")
    info = plot_training(metrics, out, title=title)
    Console(soft_wrap=True, highlight=False).print(
        f"[green]Saved[/green] {escape(info['out'])} ({info['kind']}: {info['points']} points; {', '.join(info['panels'])})")

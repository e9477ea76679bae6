"""``convert``: an OpenELM checkpoint (Hugging Face or CoreNet) becomes an MLX model folder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer


def convert_command(
    hf: Annotated[Optional[str], typer.Option("--hf", "--hf-path", help="Hugging Face repo id (apple/OpenELM-270M) or local folder.")] = None,
    mlx_path: Annotated[Optional[Path], typer.Option("--mlx-path", help="Output folder (default: mlx_model/<name>).")] = None,
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32 (use bfloat16 for 3B).")] = "float16",
    quantize: Annotated[bool, typer.Option("-q", "--quantize", help="Quantize linear layers and the embedding.")] = False,
    q_bits: Annotated[int, typer.Option("--q-bits", help="Bits per weight: 4 or 8 (2, 3, 5, 6 also work).")] = 4,
    q_group_size: Annotated[int, typer.Option("--q-group-size", help="Quantization group size: 32, 64 or 128.")] = 64,
    tokenizer: Annotated[Optional[str], typer.Option(help="tokenizer.model, a folder with one, or a hub repo (default: the source's, else meta-llama/Llama-2-7b-hf, else its public copy hf-internal-testing/llama-tokenizer if its sha256 matches).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    corenet: Annotated[Optional[Path], typer.Option(help="CoreNet checkpoint (.pt, e.g. Apple's checkpoint_epoch_0_iter_49999.pt; of a training checkpoint only the model part is read) instead of --hf.")] = None,
    corenet_config: Annotated[Optional[Path], typer.Option("--corenet-config", help="The CoreNet training YAML of --corenet (optional: the published sizes and any OpenELM shape are recognized).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder that an earlier conversion wrote (never anything else).")] = False,
):
    """Convert an OpenELM checkpoint (Hugging Face or CoreNet) into an MLX model folder."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..io.convert import convert

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with warnings.catch_warnings(), Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *a, **k: bar.console.print(f"[yellow]warning:[/yellow] {escape(str(message))}")
        task = bar.add_task("converting", total=None)
        out = convert(
            hf,
            mlx_path,
            dtype=dtype,
            quantize=quantize,
            q_bits=q_bits,
            q_group_size=q_group_size,
            tokenizer=tokenizer,
            revision=revision,
            corenet=corenet,
            corenet_config=corenet_config,
            force=force,
            progress=lambda name, i, n: bar.update(task, completed=i, total=n, description=name),
        )
    Console(soft_wrap=True, highlight=False).print(f"[green]Saved[/green] {escape(str(out))}")
    origin = _tokenizer_origin(out)
    if origin and origin != "source" and tokenizer is None:
        err.print(f"tokenizer: tokenizer.model of {escape(origin)}")


def _tokenizer_origin(folder: Path):
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("mlx_openelm", {}).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None

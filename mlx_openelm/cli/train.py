"""``lora`` and ``fuse``: adapter training and folding adapters into the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ModelOpt


class _LoraProgress:
    """Rich progress bar for ``lora.trainer.train`` (loss, tokens/s, ETA) plus val/save lines."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def on_start(self, info):
        self.console.print(
            f"training {info['trainable_parameters']:,} adapter parameters on {info['train_records']:,} records "
            f"({info['val_records']:,} held out for validation), {info['total_steps']:,} steps"
            + (f", resuming after step {info['start_step']}" if info["start_step"] else "")
            + (f", {info['world_size']} processes" if info["world_size"] > 1 else ""),
            highlight=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("lora", total=info["total_steps"], completed=info["start_step"], loss="-", tps="-", lr="-")

    def on_step(self, m):
        self.progress.update(self.task, completed=m["step"], loss=f"{m['loss']:.3f}", tps=f"{m['tokens_per_sec']:,.0f}", lr=f"{m['lr']:.2e}")

    def on_val(self, m):
        self.progress.console.print(f"step {m['step']}: val loss {m['val_loss']:.4f} ({m['val_tokens']:,} tokens, {m['val_seconds']:.1f} s)", highlight=False)

    def on_save(self, path):
        self.progress.console.print(f"saved {path}", highlight=False, style="dim")

    def close(self):
        self.progress.stop()


def lora(
    model: str = ModelOpt,
    data: str = typer.Option(..., "--data", "-d", help="'commonsense' (Commonsense-170k from the Hub) or a .json/.jsonl file or folder of LLM-Adapters records (instruction, input, output)."),
    adapter_path: Path = typer.Option(Path("adapters"), "--adapter-path", "-o", help="Output folder: adapters.safetensors, adapter_config.json, metrics.jsonl, checkpoints/."),
    rank: int = typer.Option(32, "--rank", "-r", help="LoRA rank r (CoreNet 32; LLM-Adapters 32)."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha; the update is scaled by alpha/r (CoreNet 32; LLM-Adapters 64)."),
    dropout: float = typer.Option(0.1, "--dropout", help="Dropout on the adapter input (CoreNet 0.1; LLM-Adapters 0.05)."),
    dora: bool = typer.Option(False, "--dora", help="DoRA: learn a magnitude per output feature as well (Liu et al. 2024)."),
    targets: str = typer.Option("qkv_proj,out_proj,proj_1,proj_2", "--targets", help="Comma-separated linear layers to adapt in every block."),
    adapt_embeddings: bool = typer.Option(False, "--adapt-embeddings", help="Also adapt token_embeddings (tied output layer), as CoreNet does; LoRA only."),
    lr: float = typer.Option(3e-4, "--lr", help="Peak learning rate after warmup (CoreNet and LLM-Adapters: 3e-4)."),
    min_lr: float = typer.Option(3e-5, "--min-lr", help="Learning rate at the end of the cosine decay (CoreNet: 3e-5)."),
    warmup: float = typer.Option(100, "--warmup", help="Linear warmup steps from 1e-6; a value below 1 is a fraction of all steps (LLM-Adapters 100; CoreNet 1000 of 4375)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Sequences per micro-batch, over all processes (LLM-Adapters' micro batch: 4)."),
    grad_accum: int = typer.Option(4, "--grad-accum", help="Micro-batches per optimizer step: 4 x 4 = LLM-Adapters' 16 sequences per update."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps to train (overrides --epochs)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over the training records (LLM-Adapters and CoreNet: 3)."),
    cutoff_len: int = typer.Option(256, "--cutoff-len", help="Truncate each prompt + answer to this many tokens (LLM-Adapters 256; CoreNet 2048)."),
    train_on_inputs: bool = typer.Option(True, "--train-on-inputs/--no-train-on-inputs", help="Loss on the whole prompt (LLM-Adapters, CoreNet) or only on the answer."),
    val_size: int = typer.Option(120, "--val-size", help="Records held out (seed 42) for the validation loss; 0 disables (LLM-Adapters 120)."),
    steps_per_eval: int = typer.Option(80, "--steps-per-eval", help="Validation loss every N steps and at the end (LLM-Adapters 80)."),
    save_every: int = typer.Option(80, "--save-every", help="Checkpoint every N steps into ADAPTER_PATH/checkpoints (the last 3 are kept)."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the global gradient norm (CoreNet 1.0); 0 disables."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute block activations in the backward pass: less memory, about 1/3 more time."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in ADAPTER_PATH with the same settings."),
    seed: int = typer.Option(0, "--seed", help="Seed for adapter init, data order and dropout."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype of the frozen base: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
):
    """Fine-tune LoRA or DoRA adapters on instruction data in the LLM-Adapters format.

    Defaults follow CoreNet's OpenELM PEFT recipe (rank 32, alpha 32, dropout 0.1 on qkv_proj, out_proj, proj_1, proj_2; AdamW betas 0.9/0.95, no weight decay, clipping 1.0; cosine 3e-4 -> 3e-5). Where CoreNet's multi-GPU setup does not fit one machine they take LLM-Adapters' commonsense run: 3 epochs of 16 sequences per update, 256-token cutoff, 100 warmup steps, 120 held-out records. CoreNet also adapts the token embeddings (--adapt-embeddings). The loss is the mean cross-entropy over all trained tokens of an update.

    A quantized model trains as QLoRA/QDoRA: its base weights stay quantized. Checkpoints hold the optimizer, data position and random state, so --resume continues with the losses of an uninterrupted run.

    Data parallel over several processes or Macs (--batch-size is split between them): mlx.launch -n 2 --backend ring --python $(which python) -m mlx_openelm.cli lora ...
    """
    import mlx.core as mx
    from rich.console import Console

    from ..adapters import LoRAConfig
    from ..data import load_train_data, split_train_val
    from ..io.load import load
    from ..train.loop import TrainingArgs, train

    world = mx.distributed.init()
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, use_dora=dora, adapt_embeddings=adapt_embeddings,
                        targets=tuple(t.strip() for t in targets.split(",") if t.strip()))
    args = TrainingArgs(
        output_dir=str(adapter_path), adapter=config, learning_rate=lr, min_learning_rate=min_lr, warmup=warmup,
        batch_size=batch_size, grad_accum=grad_accum, iters=iters, epochs=epochs, cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs, val_size=val_size, steps_per_eval=steps_per_eval, save_every=save_every,
        max_grad_norm=max_grad_norm, grad_checkpoint=grad_checkpoint, resume=resume, seed=seed,
    )
    args.validate(world.size())
    train_set, val_set = split_train_val(load_train_data(data), val_size)
    m, tok = load(model, dtype=dtype, keep_quantized=True)  # a quantized base stays quantized: QLoRA
    console = Console(stderr=True, highlight=False, quiet=world.rank() != 0)
    progress = _LoraProgress(console)
    try:
        result = train(m, tok, train_set, val_set, args, callback=progress)
    finally:
        progress.close()
    console.print(f"adapters: {adapter_path}/adapters.safetensors ({result['steps']} steps, loss {result['loss']:.4f}"
                  + (f", val loss {result['val_loss']:.4f})" if val_set else ")"))


def fuse(
    model: str = ModelOpt,
    adapter_path: Path = typer.Option(..., "--adapter-path", help="LoRA/DoRA adapters folder (adapters.safetensors, adapter_config.json)."),
    save_path: Path = typer.Option(..., "--save-path", help="Output folder for the fused model."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights instead of re-quantizing a quantized base."),
    export_hf: bool = typer.Option(False, "--export-hf", help="Write the apple/OpenELM (Hugging Face) layout with float weights, for PyTorch tools."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Fold LoRA/DoRA adapters into the base weights: a standalone model in the base's dtype and quantization."""
    from rich.console import Console
    from rich.markup import escape

    from ..io.fuse import fuse as fuse_model

    out = fuse_model(model, adapter_path, save_path, dequantize=dequantize, export_hf=export_hf, force=force)
    Console(soft_wrap=True, highlight=False).print(f"[green]Saved[/green] {escape(str(out))}")


"""``lora`` and ``fuse``: adapter training and folding adapters into the weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..utils import read_recipe
from ._common import ModelOpt, parameter_source_is_default


from ..adapters import LoRAConfig
from ..train.sft import TrainingArgs

_A, _C = TrainingArgs(), LoRAConfig()  # CLI defaults come from the library's dataclasses
DEFAULT_VAL_SIZE = 120  # LLM-Adapters' held-out records


class TrainProgress:
    """Rich progress bar for ``train.loop.train`` (loss, tokens/s, lr, ETA) plus val/save lines; used by
    every training command (lora, dpo)."""

    def __init__(self, console, what: str = "training", unit: str = "records"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console, self.what, self.unit = console, what, unit
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TextColumn("lr {task.fields[lr]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.last_step = 0

    def on_start(self, info):
        self.console.print(
            f"{self.what}: {info['trainable_parameters']:,} trainable parameters, {info['train_batches']:,} micro-batches "
            f"per epoch, {info['total_steps']:,} steps"
            + (f", resuming after step {info['start_step']}" if info["start_step"] else "")
            + (f", {info['world_size']} processes" if info["world_size"] > 1 else ""),
            highlight=False,
        )
        self.last_step = info["start_step"]
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"], loss="-", tps="-", lr="-")

    def on_step(self, m):
        self.last_step = m["step"]
        self.progress.update(self.task, completed=m["step"], loss=f"{m['loss']:.3f}", tps=f"{m['tokens_per_sec']:,.0f}", lr=f"{m['lr']:.2e}")

    def on_val(self, m):
        extra = "".join(f", {k[4:]} {v:.3f}" for k, v in m.items() if k.startswith("val_") and k not in ("val_loss", "val_count", "val_seconds"))
        self.progress.console.print(f"step {m['step']}: val loss {m['val_loss']:.4f}{extra} ({m['val_seconds']:.1f} s)", highlight=False)

    def on_save(self, path):
        self.progress.console.print(f"saved {path}", highlight=False, style="dim")

    def close(self):
        self.progress.stop()


def apply_recipe(ctx: typer.Context, values: dict, recipe_path: Optional[Path]) -> dict:
    """``values`` with the recipe's settings where the user gave no flag (flags win)."""
    if recipe_path is None:
        return values
    out = dict(values)
    for key, value in read_recipe(recipe_path, values).items():
        if parameter_source_is_default(ctx, key):
            out[key] = value
    return out


def lora(
    ctx: typer.Context,
    model: str = ModelOpt,
    data: str = typer.Option(..., "--data", "-d", help="'commonsense' (Commonsense-170k from the Hub) or a .json/.jsonl file or folder of LLM-Adapters records (instruction, input, output)."),
    adapter_path: Path = typer.Option(Path(_A.output_dir), "--adapter-path", "-o", help="Output folder: adapters.safetensors, adapter_config.json, metrics.jsonl, data_order.jsonl, checkpoints/."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A recipe YAML (recipes/corenet-openelm-lora.yaml, recipes/llm-adapters-commonsense.yaml); flags given on the command line win."),
    rank: int = typer.Option(_C.rank, "--rank", "-r", help="LoRA rank r (CoreNet 32; LLM-Adapters 32)."),
    alpha: float = typer.Option(_C.alpha, "--alpha", help="LoRA alpha; the update is scaled by alpha/r (CoreNet 32; LLM-Adapters 64)."),
    dropout: float = typer.Option(_C.dropout, "--dropout", help="Dropout on the adapter input (CoreNet 0.1; LLM-Adapters 0.05)."),
    dora: bool = typer.Option(_C.use_dora, "--dora", help="DoRA: learn a magnitude per output feature as well (Liu et al. 2024)."),
    targets: str = typer.Option(",".join(_C.targets), "--targets", help="Comma-separated linear layers to adapt in every block."),
    adapt_embeddings: bool = typer.Option(_C.adapt_embeddings, "--adapt-embeddings", help="Also adapt token_embeddings (input only; the tied output layer keeps the base table, as CoreNet does); LoRA only."),
    learning_rate: float = typer.Option(_A.learning_rate, "--learning-rate", "--lr", help="Peak learning rate after warmup (CoreNet and LLM-Adapters: 3e-4)."),
    min_learning_rate: float = typer.Option(_A.min_learning_rate, "--min-learning-rate", "--min-lr", help="Learning rate at the end of the cosine decay (CoreNet: 3e-5)."),
    warmup: float = typer.Option(_A.warmup, "--warmup", help="Linear warmup steps from 1e-6; a value below 1 is a fraction of all steps (LLM-Adapters 100; CoreNet 1000 of 4375)."),
    batch_size: int = typer.Option(_A.batch_size, "--batch-size", "-b", help="Sequences per micro-batch, over all processes (LLM-Adapters' micro batch: 4)."),
    grad_accum: int = typer.Option(_A.grad_accum, "--grad-accum", "--gradient-accumulation-steps", help="Micro-batches per optimizer step: 4 x 4 = LLM-Adapters' 16 sequences per update."),
    iters: Optional[int] = typer.Option(_A.iters, "--iters", help="Optimizer steps to train (overrides --epochs)."),
    epochs: float = typer.Option(_A.epochs, "--epochs", help="Passes over the training records (LLM-Adapters and CoreNet: 3)."),
    cutoff_len: int = typer.Option(_A.cutoff_len, "--cutoff-len", "--max-seq-length", help="Truncate each prompt + answer to this many tokens (LLM-Adapters 256; CoreNet 2048; at most the model's 2048 context)."),
    train_on_inputs: bool = typer.Option(_A.train_on_inputs, "--train-on-inputs/--no-train-on-inputs", help="Loss on the whole prompt (LLM-Adapters, CoreNet) or only on the answer."),
    z_loss: float = typer.Option(_A.z_loss, "--z-loss", help="CoreNet's z-loss coefficient (its OpenELM PEFT recipe: 1e-4); 0 disables."),
    group_by_length: bool = typer.Option(_A.group_by_length, "--group-by-length", help="Batch examples of similar length (faster; LLM-Adapters and CoreNet shuffle uniformly)."),
    val_size: int = typer.Option(DEFAULT_VAL_SIZE, "--val-size", help="Records held out (seed 42) for the validation loss; 0 disables (LLM-Adapters 120)."),
    steps_per_eval: int = typer.Option(_A.steps_per_eval, "--steps-per-eval", help="Validation loss every N steps and at the end (LLM-Adapters 80)."),
    save_every: int = typer.Option(_A.save_every, "--save-every", help="Checkpoint every N steps into ADAPTER_PATH/checkpoints (the last 3 are kept)."),
    max_grad_norm: float = typer.Option(_A.max_grad_norm, "--max-grad-norm", help="Clip the global gradient norm (CoreNet 1.0); 0 disables."),
    grad_checkpoint: bool = typer.Option(_A.grad_checkpoint, "--grad-checkpoint", help="Recompute block activations in the backward pass: less memory, about 1/3 more time."),
    resume: bool = typer.Option(_A.resume, "--resume", help="Continue from the newest checkpoint in ADAPTER_PATH with the same settings."),
    seed: int = typer.Option(_A.seed, "--seed", help="Seed for adapter init, data order and dropout."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype of the frozen base: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
):
    """Fine-tune LoRA or DoRA adapters on instruction data in the LLM-Adapters format.

    Defaults follow CoreNet's OpenELM PEFT recipe (rank 32, alpha 32, dropout 0.1 on qkv_proj, out_proj, proj_1, proj_2; PyTorch's AdamW with betas 0.9/0.95, no weight decay, clipping 1.0; cosine 3e-4 -> 3e-5). Where CoreNet's multi-GPU setup does not fit one machine they take LLM-Adapters' commonsense run: 3 epochs of 16 sequences per update, 256-token cutoff, 100 warmup steps, 120 held-out records, uniform shuffling. The exact recipes are in recipes/ (--config); CoreNet's adds z-loss and adapts the token embeddings. The loss is the mean cross-entropy over all trained tokens of an update.

    A quantized model trains as QLoRA/QDoRA: its base weights stay quantized. Checkpoints hold the optimizer, data position and random state, so --resume continues with the losses of an uninterrupted run; Ctrl-C saves a checkpoint of the last finished step and exits with code 130.

    Data parallel over several processes or Macs (--batch-size is split between them): mlx.launch -n 2 --backend ring --python $(which python) -m mlx_openelm.cli lora ...
    """
    import mlx.core as mx
    from rich.console import Console

    from ..data import load_train_data, split_train_val
    from ..io.load import load
    from ..train.loop import check_output, latest_checkpoint
    from ..train.sft import train

    v = apply_recipe(ctx, dict(locals_of(lora, locals())), config)
    world = mx.distributed.init()
    targets_v = v["targets"] if isinstance(v["targets"], (list, tuple)) else [t.strip() for t in str(v["targets"]).split(",") if t.strip()]
    adapter = LoRAConfig(rank=v["rank"], alpha=v["alpha"], dropout=v["dropout"], use_dora=v["dora"],
                         adapt_embeddings=v["adapt_embeddings"], targets=tuple(targets_v))
    args = TrainingArgs(
        output_dir=str(v["adapter_path"]), adapter=adapter, learning_rate=float(v["learning_rate"]), min_learning_rate=float(v["min_learning_rate"]),
        warmup=float(v["warmup"]), batch_size=v["batch_size"], grad_accum=v["grad_accum"], iters=v["iters"], epochs=float(v["epochs"]),
        cutoff_len=v["cutoff_len"], train_on_inputs=v["train_on_inputs"], z_loss=float(v["z_loss"]), group_by_length=v["group_by_length"],
        steps_per_eval=v["steps_per_eval"], save_every=v["save_every"], max_grad_norm=float(v["max_grad_norm"]),
        grad_checkpoint=v["grad_checkpoint"], resume=v["resume"], seed=v["seed"],
    )
    args.validate(world.size(), 2048)
    check_output(Path(args.output_dir), args.resume)  # before loading anything
    if v["val_size"] < 0:
        raise ValueError(f"val_size must be >= 0, got {v['val_size']}")
    train_set, val_set = split_train_val(load_train_data(v["data"]), v["val_size"])
    m, tok = load(v["model"], dtype=v["dtype"], keep_quantized=True)  # a quantized base stays quantized: QLoRA
    console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=world.rank() != 0)
    progress = TrainProgress(console, "lora")
    try:
        result = train(m, tok, train_set, val_set, args, callback=progress)
    except KeyboardInterrupt:
        progress.close()
        ckpt = latest_checkpoint(args.output_dir)
        where = f"checkpoint {ckpt.name} saved" if ckpt else "no checkpoint saved"
        console.print(f"interrupted ({where}); continue with the same command plus --resume", style="yellow")
        raise typer.Exit(130) from None
    finally:
        progress.close()
    console.print(f"adapters: {v['adapter_path']}/adapters.safetensors ({result['steps']} steps, loss {result['loss']:.4f}"
                  + (f", val loss {result['val_loss']:.4f})" if val_set else ")"))


def locals_of(func, scope: dict) -> dict:
    """The parameters of ``func`` (a command) as found in ``scope`` (its ``locals()``), minus the context."""
    import inspect

    return {k: scope[k] for k in inspect.signature(func).parameters if k not in ("ctx", "config")}


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


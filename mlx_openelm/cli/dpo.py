"""``dpo``: preference tuning (DPO / hinge / IPO) as OpenELM-Instruct was made."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ModelOpt


class _DPOProgress:
    """Rich bars for tokenization and the reference pass, then a step bar (loss, reward accuracy,
    tokens/s, ETA) with val/save lines."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console
        self.prep = Progress(TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), console=console)
        self.progress = Progress(
            TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("acc {task.fields[acc]}"), TextColumn("margin {task.fields[margin]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
        )
        self.bars = {}
        self.task = None

    def __call__(self, label, done, total):  # the library's progress(label, done, total)
        if not self.bars:
            self.prep.start()
        if label not in self.bars:
            self.bars[label] = self.prep.add_task(label, total=total)
        self.prep.update(self.bars[label], completed=done, total=total)

    def on_start(self, info):
        self.prep.stop()
        self.console.print(
            f"training {info.get('trainable_parameters', 0):,} parameters, {info['total_steps']:,} steps "
            f"({info.get('train_batches', 0):,} micro-batches of pairs per epoch, {info.get('val_batches', 0):,} held out)"
            + (f", resuming after step {info['start_step']}" if info.get("start_step") else "")
            + (f", {info['world_size']} processes" if info.get("world_size", 1) > 1 else ""), highlight=False)
        self.progress.start()
        self.task = self.progress.add_task("dpo", total=info["total_steps"], completed=info.get("start_step", 0),
                                           loss="-", acc="-", margin="-", tps="-")

    def on_step(self, m):
        self.progress.update(self.task, completed=m["step"], loss=f"{m['loss']:.4f}", acc=f"{m.get('rewards/accuracies', 0):.2f}",
                             margin=f"{m.get('rewards/margins', 0):.3f}", tps=f"{m.get('tokens_per_sec', 0):,.0f}")

    def on_val(self, m):
        self.progress.console.print(
            f"step {m['step']}: val loss {m['val_loss']:.4f}, reward accuracy {m.get('val_rewards/accuracies', float('nan')):.3f}, "
            f"margin {m.get('val_rewards/margins', float('nan')):.4f}", highlight=False)

    def on_save(self, path):
        self.progress.console.print(f"saved {path}", highlight=False, style="dim")

    def close(self):
        self.prep.stop()
        self.progress.stop()


def dpo(
    model: str = ModelOpt,
    data: str = typer.Option(..., "--data", "-d", help="'ultrafeedback' (csarron/argilla-ultrafeedback-binarized-preferences-cleaned, train split) or a .jsonl file / folder with train.jsonl of {prompt, chosen, rejected} (message lists or strings)."),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Held-out pairs (same formats); default: the test split of 'ultrafeedback', or test.jsonl next to a train.jsonl folder."),
    output: Path = typer.Option(Path("dpo"), "--output", "--adapter-path", "-o", help="Output folder: adapters (or model/ for --full), metrics.jsonl, checkpoints/."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Apple's per-size recipe: openelm-270M, openelm-450M, openelm-1_1B, openelm-3B (or a YAML file); explicit flags win."),
    loss: Optional[str] = typer.Option(None, "--loss", help="sigmoid (DPO), hinge (SLiC) or ipo. Default hinge (Apple's 270M/450M/3B)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="β; hinge margin is 1/β. Default 0.01 (Apple)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (the default without a recipe)."),
    dora_: bool = typer.Option(False, "--dora", help="Train DoRA adapters."),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning of every weight (Apple's recipes)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Prompt + response tokens (TRL max_length). Default 1024."),
    max_prompt_length: Optional[int] = typer.Option(None, "--max-prompt-length", help="Prompt tokens kept (keep-end) when too long. Default 512."),
    rank: int = typer.Option(32, "--rank", "-r", help="LoRA/DoRA rank."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA/DoRA alpha (update scaled by alpha/r)."),
    dropout: float = typer.Option(0.1, "--dropout", help="Dropout on the adapter input."),
    targets: str = typer.Option("qkv_proj,out_proj,proj_1,proj_2", "--targets", help="Comma-separated linear layers to adapt."),
    lr: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="Peak learning rate. Default 5e-5 (recipes: 2e-5 ... 1e-4)."),
    min_lr: Optional[float] = typer.Option(None, "--min-learning-rate", "--min-lr", help="Learning rate at the end of the cosine. Default 0."),
    warmup: Optional[float] = typer.Option(None, "--warmup", help="Warmup steps, or a fraction of all steps if < 1. Default 0.1."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Pairs per micro-batch over all processes. Default 8."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step. Default 2."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Optimizer steps (overrides --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the training pairs. Default 5."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training pairs."),
    val_limit: Optional[int] = typer.Option(None, "--val-limit", help="Use only the first N held-out pairs."),
    steps_per_eval: int = typer.Option(80, "--steps-per-eval", help="Held-out loss and rewards every N steps and at the end."),
    val_batches: Optional[int] = typer.Option(None, "--val-batches", help="Micro-batches of held-out pairs per evaluation (default all)."),
    save_every: int = typer.Option(80, "--save-every", help="Checkpoint every N steps into OUTPUT/checkpoints."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Clip the global gradient norm; 0 disables. Default 1.0."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute block activations in the backward pass (less memory)."),
    ref_batch_size: int = typer.Option(8, "--ref-batch-size", help="Pairs per forward pass of the one-off reference pass."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in OUTPUT with the same settings."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for adapter init, data order and dropout. Default 42."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
):
    """Preference-tune a model with TRL's DPO losses, reproducing how OpenELM-Instruct was made.

    The training text is exactly alignment-handbook's + TRL 0.8's: <s><|system|>\\n</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n{response}</s>\\n</s>, prompt tokens unscored, prompt cut keep-end to --max-prompt-length. Reference log-probs are computed once before training (cached under the mlx-openelm cache, keyed by model and data) from the model before adapters: no second model in memory. Logged per step and per evaluation: loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (TRL's definitions).

    Apple's recipe for a size: --recipe openelm-270M (hinge, β 0.01, 5 epochs, lr 2e-5, full). The result feeds fuse (adapters), chat and eval (OUTPUT/model for --full).

    Data parallel: mlx.launch -n 2 --backend ring --python $(which python) -m mlx_openelm.cli dpo ...
    """
    import mlx.core as mx
    from rich.console import Console

    from ..adapters import LoRAConfig
    from ..io.load import load, resolve_model_path
    from ..train.dpo import dpo_args, load_recipe, run_dpo
    from ..train.dpo_data import ULTRAFEEDBACK, load_preferences

    chosen = [name for name, on in (("lora", lora), ("dora", dora_), ("full", full)) if on]
    if len(chosen) > 1:
        raise ValueError(f"choose one of --lora, --dora, --full (got {', '.join('--' + c for c in chosen)})")
    settings = load_recipe(recipe) if recipe else {}
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(t.strip() for t in targets.split(",") if t.strip()))
    args = dpo_args(
        settings, method=chosen[0] if chosen else None, loss_type=loss, beta=beta, max_length=max_length,
        max_prompt_length=max_prompt_length, learning_rate=lr, min_learning_rate=min_lr, warmup=warmup, batch_size=batch_size,
        grad_accum=grad_accum, iters=iters, epochs=epochs, max_grad_norm=max_grad_norm, seed=seed, output_dir=str(output),
        steps_per_eval=steps_per_eval, val_batches=val_batches, save_every=save_every, grad_checkpoint=grad_checkpoint,
        resume=resume, ref_batch_size=ref_batch_size, adapter=config,
    )
    args.validate()
    train_pairs = load_preferences(data, "train", limit=limit)
    if val_data is not None:
        val_pairs = load_preferences(val_data, "test", limit=val_limit)
    elif data == ULTRAFEEDBACK or Path(data).is_dir() and (Path(data) / "test.jsonl").is_file():
        val_pairs = load_preferences(data, "test", limit=val_limit)
    else:
        val_pairs = []

    world = mx.distributed.init()
    folder = resolve_model_path(model)
    m, tok = load(folder, dtype=dtype, keep_quantized=args.method != "full")
    console = Console(stderr=True, highlight=False, soft_wrap=True, quiet=world.rank() != 0)
    progress = _DPOProgress(console)
    try:
        result = run_dpo(m, tok, train_pairs, val_pairs, args, model_source=folder, callback=progress, progress=progress)
    finally:
        progress.close()
    where = result.get("model_path") or f"{output}/adapters.safetensors"
    summary = f"{where} ({result['steps']} steps, loss {result['loss']:.4f}"
    extras = result.get("val") or {}
    if val_pairs and result.get("val_loss") is not None:
        summary += f", val loss {result['val_loss']:.4f}, val reward accuracy {extras.get('rewards/accuracies', float('nan')):.3f}"
    console.print(summary + ")" + ("; reference log-probs from the cache" if result.get("reference_cache_hit") else ""))

"""The ``mlx-openelm`` command line: parses options, calls one library function, formats.

Heavy modules are imported inside each command so ``--help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

import mlx_openelm  # noqa: F401  (makes OpenBLAS visible before mlx loads)

app = typer.Typer(
    help="Run, fine-tune and study Apple's OpenELM language models with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DEFAULT_CHAT_MODEL = "apple/OpenELM-270M-Instruct"

ModelOpt = typer.Option(..., "--model", "-m", help="MLX folder, apple/OpenELM-* folder or hub id (converted on first use).")


def err(message: str) -> None:
    """One red line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", markup=True)


def _load(model: str, dtype: str = "auto", adapter_path: Optional[Path] = None):
    from .loading import load

    return load(model, dtype=dtype, adapter_path=adapter_path)


def _describe(model) -> str:
    info = getattr(model, "compute_info", {}) or {}
    return ", ".join(f"{k}={v}" for k, v in info.items())


def _sampling_options(temp, top_p, top_k, min_p, repetition_penalty, seed, max_tokens):
    return dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)


def _stats_line(r, console) -> None:
    console.print(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
        f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
        f"peak memory: {r.peak_memory:.2f} GB | finish: {r.finish_reason}",
        highlight=False,
    )


@app.command()
def generate(
    model: str = ModelOpt,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most tokens to generate (stops earlier at EOS or the 2048-token context)."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling mass (0 disables)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 disables)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 disables)."),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Penalty for recent tokens; the model card uses 1.2."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Wrap the prompt in the -Instruct chat template."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="A smaller OpenELM that drafts tokens (speculative decoding)."),
    num_draft_tokens: int = typer.Option(3, "--num-draft-tokens", help="Tokens the draft model proposes per step."),
    prompt_lookup: int = typer.Option(0, "--prompt-lookup", help="Prompt-lookup decoding: draft N tokens copied from the context (the model card uses 10)."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report speed, memory, device, dtype and BLAS."),
):
    """Generate text from a prompt, streaming it to stdout."""
    from rich.console import Console

    from .generation import stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    m, tok = _load(model, dtype, adapter_path)
    draft = _load(draft_model, dtype)[0] if draft_model else None
    if chat_template:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    out = Console(stderr=True, highlight=False, soft_wrap=True)
    last, drafted = None, 0
    for r in stream_generate(
        m, tok, prompt, draft_model=draft, num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup,
        **_sampling_options(temp, top_p, top_k, min_p, repetition_penalty, seed, max_tokens),
    ):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last, drafted = r, drafted + bool(r.from_draft)
    sys.stdout.write("\n")
    if verbose and last is not None:
        _stats_line(last, out)
        if draft is not None or prompt_lookup:
            share = drafted / max(last.generation_tokens, 1)
            out.print(f"tokens accepted from drafts: {drafted}/{last.generation_tokens} ({share:.0%})", highlight=False)
        out.print(f"compute: {_describe(m)}", highlight=False)


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_CHAT_MODEL, "--model", "-m", help="An -Instruct model: MLX folder or hub id."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens per answer."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.0, "--top-p", help="Nucleus sampling mass (0 disables)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 disables)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability (0 disables)."),
    repetition_penalty: Optional[float] = typer.Option(1.2, "--repetition-penalty", help="Penalty for recent tokens; the model card's 1.2 by default."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report speed, memory and how much of the history came from the cache."),
):
    """Chat with an -Instruct model. /reset clears the history, /exit quits, Ctrl-C stops an answer.

    Reads one message per line, so it also works with stdin piped in."""
    from rich.console import Console

    from .generation import ChatSession

    m, tok = _load(model, dtype, adapter_path)
    session = ChatSession(m, tok, system=system)
    interactive = sys.stdin.isatty()
    info = Console(stderr=True, highlight=False, soft_wrap=True)
    if interactive:
        info.print(f"[bold]{model}[/] — /reset clears the history, /exit quits, Ctrl-C stops an answer.")
    opts = _sampling_options(temp, top_p, top_k, min_p, repetition_penalty, seed, max_tokens)
    while True:
        try:
            line = input(">> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            info.print("(history cleared)")
            continue
        last = None
        try:
            for r in session.reply(line, **opts):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:  # context full: say so and keep the REPL
            err(str(e))
        sys.stdout.write("\n")
        sys.stdout.flush()
        if verbose and last is not None:
            _stats_line(last, info)
            info.print(f"reused from cache: {last.cached_tokens} tokens", highlight=False)


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="MLX folder, apple/OpenELM-* folder or hub id."),
    shape: Optional[str] = typer.Option(None, "--shape", help="Random weights at a released size's shapes: 270M, 450M, 1_1B, 3B, or tiny (no download)."),
    dtype: str = typer.Option("auto", "--dtype", help="Our compute dtype: auto (float32 on CPU, stored dtype on GPU), float32, float16, bfloat16. With --shape a named dtype is also the stored one (else float16; float32 when quantizing on a CPU, where float16 quantized matmul is ~36x slower)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="Quantize the checkpoint to 4 or 8 bits (group size 64)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", help="Prompt length in tokens."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens to generate (exactly; EOS is ignored)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed rounds, interleaved between contenders; medians are reported."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
    compare_mlx_lm: bool = typer.Option(False, "--compare-mlx-lm", help="Also run mlx-lm's OpenELM on the same weights: same dtype, and mlx-lm at its defaults."),
    rmsnorm_ablation: bool = typer.Option(False, "--rmsnorm-ablation", help="Fused vs naive RMSNorm, and the share of decode time spent in it."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart (with --rmsnorm-ablation the default is rmsnorm_ablation.png)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and the random prompt."),
):
    """Measure prompt and decode speed, time to first token and peak memory."""
    import json

    from rich.console import Console

    from .bench import run_bench

    if plot is None and rmsnorm_ablation:
        plot = Path("rmsnorm_ablation.png")
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

    from .bench import contender_runs, weights_label

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


@app.command()
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

    from .loading import load
    from .lora.adapters import LoRAConfig
    from .lora.data import load_train_data, split_train_val
    from .lora.trainer import TrainingArgs, train

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


@app.command()
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

    from .lora.fuse import fuse as fuse_model

    out = fuse_model(model, adapter_path, save_path, dequantize=dequantize, export_hf=export_hf, force=force)
    Console(soft_wrap=True, highlight=False).print(f"[green]Saved[/green] {escape(str(out))}")


from .convert import convert_command  # noqa: E402  (imports mlx.core only; the rest loads inside)

app.command("convert")(convert_command)


def _progress_callback(progress):
    """A ``progress(name, done, total)`` callback driving one rich bar per name."""
    bars = {}

    def update(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = progress.add_task(name, total=total)
        progress.update(bars[name], completed=done, total=total)

    return update


def _fmt(v, stderr=None) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" + (f" ± {100 * stderr:.2f}" if stderr else "")


def _delta(v) -> str:
    return "" if v is None else f"[{'green' if v >= 0 else 'red'}]{v:+.2f}[/]"


def _harness_table(model: str, report: dict):
    from rich.table import Table

    from .paper import compare

    cmp = compare(report["results"], model)
    paper = f"OpenELM-{cmp['paper_model']}" if cmp["paper_model"] else None
    table = Table(title=f"lm-eval: {model}" + (f"  (paper row: {paper})" if paper else ""),
                  caption="percent; 'Ours' is the compared metric (acc_norm for ARC-c/ARC-e/HellaSwag, acc otherwise: "
                  "see mlx_openelm/paper.py)" if paper else "percent")
    for col, just in [("Task", "left"), ("n", "right"), ("Metric", "left"), ("Ours", "right"), ("Paper", "right"),
                      ("Δ", "right"), ("acc", "right"), ("acc_norm", "right")]:
        table.add_column(col, justify=just)
    for r in cmp["rows"]:
        res = report["results"][r["task"]]
        table.add_row(r["column"], str(report["n_samples"].get(r["task"], "")), r["metric"],
                      _fmt(r["ours"], res.get(f"{r['metric']}_stderr")), _fmt(r["paper"]), _delta(r["delta"]),
                      _fmt(r["acc"]), _fmt(r["acc_norm"]))
    avg = cmp["average"]
    table.add_section()
    table.add_row("Average", "", "", _fmt(avg["ours"]), _fmt(avg["paper"]), _delta(avg["delta"]), "", "")
    return table, cmp


def _commonsense_table(model: str, results: dict, protocol: str):
    from rich.table import Table

    table = Table(title=f"commonsense ({protocol}): {model}")
    metrics = ["acc", "acc_norm"] if protocol == "loglikelihood" else ["acc"]
    for col in ["Task", "n", *metrics]:
        table.add_column(col, justify="left" if col == "Task" else "right")
    for task, res in results.items():
        if task != "average":
            table.add_row(task, str(res.get("n", "")), *[_fmt(100 * res[m]) for m in metrics])
    table.add_section()
    table.add_row("Average", "", *[_fmt(100 * results["average"][m]) for m in metrics])
    return table


@app.command("eval")
def eval_(
    model: str = ModelOpt,
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated tasks: lm-eval task names (default: "
                                        "the paper's arc_challenge,arc_easy,boolq,hellaswag,piqa,sciq,winogrande), or with "
                                        "--data the commonsense tasks (default: all 8)."),
    data: Optional[str] = typer.Option(None, "--data", help="Run the commonsense evaluation instead of lm-eval: "
                                       "'commonsense' (test sets from the Hub) or LLM-Adapters' dataset/ folder."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="lm-eval few-shot examples (default: each task's own; 0 for the paper's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate at most N examples per task (for quick checks)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write all numbers to this JSON file."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="With --data: loglikelihood (CoreNet's, default) or generate (LLM-Adapters')."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAML files."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
):
    """Evaluate zero-shot accuracy: lm-eval tasks (the paper's table by default) or, with --data, the 8 commonsense tasks."""
    import importlib.util
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .paper import PAPER_TASKS, write_json

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    if data is None:
        if protocol is not None:
            raise ValueError("--protocol applies to the commonsense evaluation (--data); lm-eval tasks choose their own")
        if importlib.util.find_spec("lm_eval") is None:
            raise ImportError("lm-eval is not installed: pip install 'mlx-openelm[eval]'")
        if include_path is not None and not include_path.is_dir():
            raise FileNotFoundError(f"--include-path {include_path} is not a folder")
        os.environ.setdefault("TQDM_DISABLE", "1")  # our bar replaces lm-eval's and datasets' tqdm bars
    else:
        if num_fewshot is not None or include_path is not None:
            raise ValueError("--num-fewshot and --include-path apply to lm-eval tasks, not to --data")
        protocol = protocol or "loglikelihood"
    m, tok = _load(model, dtype, adapter_path)
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        update = _progress_callback(progress)
        if data is None:
            from .harness import run_tasks

            task_list = task_list or list(PAPER_TASKS)
            report = run_tasks(m, tok, task_list, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                               include_path=str(include_path) if include_path else None, progress=update)
        else:
            from mlx_openelm.lora.evaluate import TASKS, evaluate, load_eval_sets

            records = load_eval_sets(data, task_list or list(TASKS))
            results = evaluate(m, tok, records, protocol, limit=limit, batch_size=batch_size, progress=update)
    if data is None:
        table, cmp = _harness_table(model, report)
        summary = {"suite": "lm-eval", "model": model, "adapter_path": adapter_path, "tasks": task_list,
                   "num_fewshot": num_fewshot, "limit": limit, **report, "comparison": cmp}
    else:
        table = _commonsense_table(model, results, protocol)
        summary = {"suite": "commonsense", "model": model, "adapter_path": adapter_path, "data": data,
                   "protocol": protocol, "limit": limit, "results": results}
    console.print(table)
    if output is not None:
        write_json(output, summary)
        Console(stderr=True).print(f"wrote {output}", highlight=False)


def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: user errors become one red line and exit code 1."""
    import click

    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError, ImportError) as e:
        err(str(e).splitlines()[0] if str(e) else type(e).__name__)
        sys.exit(1)
    return 0


if __name__ == "__main__":
    main()

"""``eval``: the paper's zero-shot lm-eval table, or the 8 commonsense tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import ModelOpt, PromptPrecisionOpt, TokenizerOpt, _load, _progress_callback


def _fmt(v, stderr=None) -> str:
    if v is None:
        return ""
    return f"{v:.2f}" + (f" ± {100 * stderr:.2f}" if stderr else "")


def _delta(v) -> str:
    return "" if v is None else f"[{'green' if v >= 0 else 'red'}]{v:+.2f}[/]"


def _harness_table(model: str, report: dict):
    from rich.table import Table

    from ..eval.paper import compare

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


def eval_(
    model: str = ModelOpt,
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated tasks: lm-eval task names (default: "
                                        "the paper's arc_challenge,arc_easy,boolq,hellaswag,piqa,sciq,winogrande), or with "
                                        "--data the commonsense tasks (default: all 8)."),
    data: Optional[str] = typer.Option(None, "--data", help="Run the commonsense evaluation instead of lm-eval: "
                                       "'commonsense' (test sets from the Hub) or LLM-Adapters' dataset/ folder."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", "--num-shots", min=0, help="lm-eval few-shot examples (default: each task's own; 0 for the paper's)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate at most N examples per task (for quick checks)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Sequences per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write all numbers to this JSON file."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="With --data: loglikelihood (CoreNet's, default) or generate (LLM-Adapters')."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAML files."),
    adapter_path: Optional[Path] = typer.Option(None, "--adapter-path", help="LoRA/DoRA adapters folder to apply."),
    tokenizer: Optional[str] = TokenizerOpt,
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
    prompt_precision: str = PromptPrecisionOpt,
):
    """Evaluate zero-shot accuracy: lm-eval tasks (the paper's table by default) or, with --data, the 8 commonsense tasks."""
    import importlib.util
    import os

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..eval.paper import PAPER_TASKS
    from ..utils import write_json

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
    m, tok = _load(model, dtype, adapter_path, tokenizer, prompt_precision)
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        update = _progress_callback(progress)
        if data is None:
            from ..eval.harness import run_tasks

            task_list = task_list or list(PAPER_TASKS)
            report = run_tasks(m, tok, task_list, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                               include_path=str(include_path) if include_path else None, progress=update)
        else:
            from ..eval.commonsense import TASKS, evaluate, load_eval_sets

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
    # how the numbers were computed (dtype, kernels, prompt precision): scoring with bfloat16 activations differs
    summary.update(prompt_precision=prompt_precision, compute=getattr(m, "compute_info", None))
    console.print(table)
    if output is not None:
        write_json(output, summary)
        Console(stderr=True).print(f"wrote {output}", highlight=False)


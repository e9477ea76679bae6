"""``passuntil`` (sample-until-pass measurement) and ``scaling`` (task scaling-law fits and predictions)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..eval.passuntil import PassUntilConfig
from ._common import ModelOpt, _load

_D = PassUntilConfig()


def _help(name: str) -> str:
    return PassUntilConfig.__dataclass_fields__[name].metadata["help"]


def passuntil(
    model: str = ModelOpt,
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated lm-eval tasks (generate_until or "
                                        "loglikelihood ones, e.g. arithmetic_3da,anagrams1); needs the [eval] extra."),
    data: Optional[Path] = typer.Option(None, "--data", help='JSONL items: {"id", "prompt", "targets": [...], "stop": [...]}.'),
    output: Path = typer.Option(..., "--output", "-o", help="Results JSONL, one row per item (appended as items finish)."),
    r: int = typer.Option(_D.r, "--r", help=_help("r")),
    max_samples: int = typer.Option(_D.max_samples, "--max-samples", help=_help("max_samples")),
    batch_size: int = typer.Option(_D.batch_size, "--batch-size", "-b", help=_help("batch_size")),
    temperature: float = typer.Option(_D.temperature, "--temperature", help=_help("temperature")),
    seed: int = typer.Option(_D.seed, "--seed", help=_help("seed")),
    confidence: float = typer.Option(_D.confidence, "--confidence", help=_help("confidence")),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per task (or from --data)."),
    no_sampling: bool = typer.Option(False, "--no-sampling", help="Only the teacher-forced p_exact (one forward pass per item)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip the items already in --output."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAML files."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto, float32, float16, bfloat16."),
):
    """PassUntil: per item, p_exact and samples until r pass (or the cap), with PU estimates and intervals."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..eval.passuntil import read_items, run, task_items

    if (tasks is None) == (data is None):
        raise typer.BadParameter("give exactly one of --tasks and --data")
    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be >= 1")
    if output.exists() and not resume:
        raise ValueError(f"{output} exists; pass --resume to continue it or choose another --output")
    config = PassUntilConfig(r=r, max_samples=max_samples, batch_size=batch_size, temperature=temperature, seed=seed,
                             sampling=not no_sampling, confidence=confidence)
    if data is not None:
        items = read_items(data)[:limit] if limit else read_items(data)
    else:
        import importlib.util
        import os

        if importlib.util.find_spec("lm_eval") is None:
            raise ImportError("lm-eval is not installed: pip install 'mlx-openelm[eval]'")
        os.environ.setdefault("TQDM_DISABLE", "1")
        items = task_items([t.strip() for t in tasks.split(",") if t.strip()], limit=limit,
                           include_path=str(include_path) if include_path else None)
    if not items:
        raise ValueError("no items to measure")
    m, tok = _load(model, dtype)
    err = Console(stderr=True, highlight=False)
    state = {"samples": 0, "censored": 0}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task_id = bar.add_task("items", total=len(items))

        def update(label: str, done: int, total: int) -> None:
            if label == "items":
                bar.update(task_id, completed=done, total=total)
            else:
                state[label] = done
            bar.update(task_id, description=f"items | samples {state['samples']:,} | censored {state['censored']}")

        rows = run(m, tok, items, config, output, model_name=model, resume=resume, progress=update)
    _summary(rows, config, err)
    err.print(f"wrote {output}")


def _summary(rows, config, console) -> None:
    from collections import defaultdict

    from rich.table import Table

    by_task = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    table = Table(title=f"PassUntil (r={config.r}, cap {config.max_samples:,}, T={config.temperature})")
    for col in ("Task", "items", "guessable", "censored", "samples", "samples/s", "mean PU", "mean r/K", "mean p_exact",
                "planned samples"):
        table.add_column(col, justify="left" if col == "Task" else "right")
    for task, rs in by_task.items():
        sampled = [x for x in rs if x.get("pu") is not None]

        def mean(key, rows_=sampled):
            return f"{sum(x[key] for x in rows_) / len(rows_):.4g}" if rows_ else "-"

        table.add_row(task, str(len(rs)), str(sum(bool(x.get("guessable")) for x in rs)),
                      str(sum(bool(x.get("censored")) for x in rs)), f"{sum(int(x.get('samples') or 0) for x in rs):,}",
                      f"{sum(int(x.get('samples') or 0) for x in rs) / max(sum(x.get('seconds') or 0 for x in rs), 1e-9):,.0f}",
                      mean("pu"), mean("pu_mle"), mean("p_exact", rs),
                      f"{sum(min(config.r / max(x['p_exact'], 1e-300), config.max_samples) for x in rs):,.0f}")
    table.caption = ("planned samples: sum over items of min(r / p_exact, max_samples), the budget sample-until-pass "
                     "needs with these settings (p_exact <= PU, so an upper estimate)")
    console.print(table)


def scaling(
    results: List[Path] = typer.Option(..., "--results", help="PassUntil result files of several model sizes "
                                       "(--results a.jsonl b.jsonl c.jsonl)."),
    more: Optional[List[Path]] = typer.Argument(None, help="More result files.", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="Write the fits, predictions and table to this JSON file."),
    predict: Optional[str] = typer.Option(None, "--predict", help="Released size to predict: 270M, 450M, 1.1B or 3B."),
    predict_n: Optional[float] = typer.Option(None, "--predict-n", help="Parameter count to predict (default: the largest "
                                              "measured size, held out)."),
    size: str = typer.Option("total", "--size", help="N for the fits: total or nonembedding parameters (from each model's config)."),
    estimator: str = typer.Option("pu", "--estimator", help="pu (unbiased (r-1)/(K-1)), pu_log (exp(psi(r))/K: "
                                    "unbiased log p), pu_mle (r/K) or p_exact (teacher-forced, no sampling noise)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates (instances and sampling noise)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Level of the intervals."),
    include_guessable: bool = typer.Option(False, "--include-guessable", help="Keep items random guessing can pass."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw log(-log PU) against log N per task (PNG; needs matplotlib)."),
):
    """Fit log(-log PU) = log c - alpha log N per instance, with a shared slope and on the mean, and predict a larger model."""
    import importlib.util

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..eval.scaling import fit, load_runs
    from ..eval.scaling import plot as draw
    from ..utils import write_json
    from ._common import _progress_callback

    if predict is not None and predict_n is not None:
        raise typer.BadParameter("give --predict or --predict-n, not both")
    if size not in ("total", "nonembedding"):
        raise typer.BadParameter("--size must be total or nonembedding")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise ImportError("matplotlib is not installed: pip install 'mlx-openelm[plot]'")
    files = list(results) + list(more or [])
    runs = load_runs(files)
    err = Console(stderr=True, highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        report = fit(runs, predict_n=predict_n, predict_name=predict, size_key="n_params" if size == "total" else "n_params_nonembedding",
                     estimator=estimator, bootstrap=bootstrap, confidence=confidence, include_guessable=include_guessable,
                     seed=seed, progress=_progress_callback(bar))
    report["files"] = [str(f) for f in files]
    console = Console()
    target = report["target"]
    title = (f"predicted PU at N = {target['n']:,.0f} ({report['size_key']}; {report['estimator']}); "
             f"fit span {report['fit_span_decades']:.2f} decades, extrapolating {report['extrapolation_decades']:.2f}")
    table = Table(title=title, caption="predicted: for sampled PU bias-corrected by the bootstrap (2 x plug-in - bootstrap mean, in "
                  "log(-log PU)); interval: basic bootstrap over instances and sampling noise; alpha: per-instance median")
    for col in ("Task", "method", "instances", "alpha", "predicted", f"{100 * confidence:g}% interval", "plug-in", "measured", "rel. error"):
        table.add_column(col, justify="left" if col in ("Task", "method") else "right")
    for task, res in report["tasks"].items():
        for name, m in res["methods"].items():
            iv = m["interval"]
            table.add_row(task, name, str(m["instances"]), "-" if m["alpha"] is None else f"{m['alpha']:.3f}",
                          "-" if m["pu"] is None else f"{m['pu']:.4g}", f"[{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "-",
                          "-" if m["pu_plugin"] is None else f"{m['pu_plugin']:.4g}",
                          "-" if m["measured"] is None else f"{m['measured']:.4g}",
                          "-" if not m["measured"] or m["pu"] is None else f"{m['pu'] / m['measured'] - 1:+.1%}")
        table.add_section()
    console.print(table)
    for task, res in report["tasks"].items():
        c = res["censored"]
        bound = (f"task mean PU bound [{c['task_pu_lower']:.4g}, {c['task_pu_upper']:.4g}]" if c["task_pu_lower"] is not None
                 else "no instance could be fitted")
        console.print(f"{task}: {c['instances_excluded']} of {res['instances']} instances without a per-instance fit "
                      f"(censored or < 2 usable sizes); {bound}; {res['guessable_dropped']} guessable dropped", highlight=False)
        if "curvature" in res:
            cv = res["curvature"]
            iv = cv["interval"]
            console.print(f"{task}: F(N) is {cv['shape']} ({cv['meaning']}): quadratic coefficient {cv['quadratic_coef']:.4g}"
                          + (f", {100 * confidence:g}% interval [{iv[0]:.3g}, {iv[1]:.3g}], P(convex) {cv['p_convex']:.2f}" if iv else ""),
                          highlight=False)
    write_json(output, report)
    err.print(f"wrote {output}")
    if plot is not None:
        draw(report, plot)
        err.print(f"wrote {plot}")

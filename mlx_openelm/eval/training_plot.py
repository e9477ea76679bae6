"""Training curves from our trainers' ``metrics.jsonl`` or CoreNet's ``training_logs.txt``.

``metrics.jsonl`` (``train.loop``): one JSON object per optimizer step (``step``, ``loss``,
``lr``, ``grad_norm``, ``tokens_per_sec``, ``peak_memory_gb``, ...) and validation lines
(``step``, ``val_loss``, ...).

CoreNet's log (the ``training_logs.txt`` Apple published for each OpenELM size) is stdout of
``corenet-train``. Its iteration summaries (``corenet/metrics/stats.py``
``Statistics.iter_summary``, printed through ``corenet/utils/logger.py`` ``log``) read::

    2024-04-12 10:00:00 - LOGS    - Epoch:   0 [   50001/  350000], loss: {'total_loss': 2.4512, 'z_loss': 0.0123}, LR: [0.005263, 0.005263], Avg. batch load time: 0.002, Elapsed time: 91234.56

(``LOGS`` wrapped in ANSI colour codes; ``loss`` a number or a dict; ``LR`` one float with 6
decimals or a list; ``[iterations/max_iterations]``; every ``common.log_freq`` = 500 iterations
for OpenELM). The logged metrics are CoreNet ``AverageMetric`` values: the running mean since the
start of the epoch (for OpenELM, of the run or of the last resume), rounded to 4 decimals, not
the recent loss. ``read_corenet_log`` therefore also derives the mean over each logging interval,
``(A_t n_t - A_p n_p) / (n_t - n_p)`` with ``n`` the iterations since the segment began (exact up
to the 4-decimal rounding, which at 350k iterations and 500-iteration intervals is ±0.07 at worst);
a segment restarts where the elapsed time or the iteration goes down (a resumed run).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..data import read_json_records

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EPOCH = re.compile(r"Epoch:\s*(\d+)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
# "name: value" where value is a dict, a list or a number
FIELD = re.compile(r"(?:^|,\s*)([A-Za-z][\w .-]*?):\s*(\{[^}]*\}|\[[^\]]*\]|[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))")
NUMPY_SCALAR = re.compile(r"np\.\w+\(([^()]*)\)")
METRIC_PANELS = (
    ("loss", ("loss", "val_loss"), "loss"),
    ("lr", ("lr",), "learning rate"),
    ("grad_norm", ("grad_norm",), "grad norm (before clipping)"),
    ("tokens_per_sec", ("tokens_per_sec",), "tokens / s"),
    ("peak_memory_gb", ("peak_memory_gb",), "peak memory (GB)"),
)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("figures need matplotlib: pip install 'mlx-openelm[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Union[str, Path]) -> Dict[str, List[List[float]]]:
    """Series ``{name: [[step, value], ...]}`` of every numeric field of a ``metrics.jsonl``;
    validation fields keep their ``val_`` names. A repeated step (a resumed run) keeps its last value."""
    path = Path(path)
    series: Dict[str, Dict[float, float]] = {}
    for n, row in read_json_records(path, jsonl=True):
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path.name} line {n} has no step; is it a metrics.jsonl?")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, {})[float(row["step"])] = float(v)
    if not series:
        raise ValueError(f"{path.name} holds no metrics")
    return {k: [[s, v] for s, v in sorted(d.items())] for k, d in series.items()}


def _value(text: str):
    text = NUMPY_SCALAR.sub(r"\1", text.strip())  # np.float64(2.5) -> 2.5 (logs written with numpy >= 2)
    if text in ("nan", "inf"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def parse_corenet_line(line: str) -> Optional[Dict[str, Any]]:
    """One iteration summary of a CoreNet log as ``{"epoch", "iteration", "max_iterations",
    "loss", "loss_parts", "lr", "batch_load_time", "elapsed"}``; None for other lines."""
    line = ANSI.sub("", line)
    m = EPOCH.search(line)
    if not m:
        return None
    rec: Dict[str, Any] = {"epoch": int(m.group(1)), "iteration": int(m.group(2)), "max_iterations": int(m.group(3))}
    for name, text in FIELD.findall(line[m.end():]):
        value = _value(text)
        name = name.strip()
        if name == "loss":
            if isinstance(value, dict):
                rec["loss_parts"] = {k: float(v) for k, v in value.items()}
                value = value.get("total_loss", next(iter(value.values()), None))
            rec["loss"] = None if value is None else float(value)
        elif name == "LR":
            rec["lr"] = float(value[0]) if isinstance(value, (list, tuple)) and value else (float(value) if value is not None else None)
        elif name == "Avg. batch load time":
            rec["batch_load_time"] = float(value)
        elif name == "Elapsed time":
            rec["elapsed"] = float(value)
        elif isinstance(value, (int, float)):
            rec[name] = float(value)
        elif isinstance(value, dict):
            rec[name] = {k: float(v) for k, v in value.items()}
    return rec


def read_corenet_log(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Every iteration summary of a CoreNet log, with ``interval_loss`` (the mean loss since the
    previous summary of the same segment, see the module doc) and ``segment``."""
    path = Path(path)
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            rec = parse_corenet_line(line)
            if rec is not None:
                records.append(rec)
    if not records:
        raise ValueError(f"{path.name} has no CoreNet iteration summaries ('Epoch: N [iter/max], loss: ...')")
    segment, start, prev = 0, records[0]["iteration"], None
    for rec in records:
        if prev is not None and (rec["iteration"] <= prev["iteration"] or rec.get("elapsed", math.inf) < prev.get("elapsed", -math.inf)):
            segment, start, prev = segment + 1, rec["iteration"], None
        rec["segment"] = segment
        n = rec["iteration"] - start + 1
        if prev is None or rec.get("loss") is None or prev.get("loss") is None:
            rec["interval_loss"] = rec.get("loss") if prev is None else None
        else:
            n_p = prev["iteration"] - start + 1
            rec["interval_loss"] = (rec["loss"] * n - prev["loss"] * n_p) / (n - n_p)
        prev = rec
    return records


def _kind(path: Path) -> str:
    with open(path, errors="replace") as f:
        for line in f:
            if line.strip():
                return "metrics" if line.lstrip().startswith("{") else "corenet"
    raise ValueError(f"{path.name} is empty")


def plot_training(path: Union[str, Path], out: Union[str, Path], *, title: Optional[str] = None) -> Dict[str, Any]:
    """Draw the training curves of ``path`` (a ``metrics.jsonl`` or a CoreNet log) into the PNG
    ``out``; returns ``{"kind", "out", "panels", "points"}``."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if out.suffix.lower() != ".png":
        raise ValueError(f"out must be a .png file, got {out.name}")
    kind = _kind(path)
    plt = _pyplot()
    panels: List[tuple] = []  # (ylabel, [(label, xs, ys, style)], logy)
    if kind == "metrics":
        series = read_metrics(path)
        xlabel = "step"
        for _, names, ylabel in METRIC_PANELS:
            lines = [(n, [p[0] for p in series[n]], [p[1] for p in series[n]], "-o" if n.startswith("val_") else "-") for n in names if n in series]
            if lines:
                panels.append((ylabel, lines, False))
        shown = {n for _, names, _ in METRIC_PANELS for n in names}
        for n in sorted(set(series) - shown - {"epoch", "tokens"}):
            panels.append((n, [(n, [p[0] for p in series[n]], [p[1] for p in series[n]], "-")], False))
        points = max(len(v) for v in series.values())
    else:
        recs = read_corenet_log(path)
        xlabel = "iteration"
        xs = [r["iteration"] for r in recs]
        loss_lines = [("running mean since epoch start (as logged)", xs, [r.get("loss") for r in recs], "-")]
        iv = [(r["iteration"], r["interval_loss"]) for r in recs if r.get("interval_loss") is not None]
        if iv:
            loss_lines.append(("mean over each logging interval (derived)", [a for a, _ in iv], [b for _, b in iv], "-"))
        panels.append(("loss", loss_lines, False))
        if any(r.get("lr") is not None for r in recs):
            panels.append(("learning rate", [("LR", xs, [r.get("lr") for r in recs], "-")], False))
        speed = [(b["iteration"], (b["elapsed"] - a["elapsed"]) / (b["iteration"] - a["iteration"]))
                 for a, b in zip(recs, recs[1:]) if a["segment"] == b["segment"] and "elapsed" in a and "elapsed" in b]
        if speed:
            panels.append(("seconds / iteration", [("s/it", [a for a, _ in speed], [b for _, b in speed], "-")], False))
        points = len(recs)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, lines, logy) in zip(axes[:, 0], panels):
        for label, x, y, style in lines:
            pts = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
            ax.plot([a for a, _ in pts], [b for _, b in pts], style, markersize=3, linewidth=1.2, label=label)
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        if len(lines) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title or path.name)
    fig.tight_layout()
    from ..utils import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return {"kind": kind, "out": str(out), "panels": [p[0] for p in panels], "points": points}

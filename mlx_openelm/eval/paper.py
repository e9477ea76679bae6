"""The OpenELM paper's zero-shot table as data, and our lm-eval numbers laid out beside it.

Numbers: the "Zero-Shot" table of the apple/OpenELM model cards (arXiv 2404.14619), produced
with lm-evaluation-harness (commit dc90fec), 0-shot, ``add_bos_token=True``, batch size 1.

Which lm-eval metric each column holds is not stated by the card or the paper; we read it off
the numbers. HellaSwag can only be ``acc_norm`` (e.g. 72.44 for 3B; ``acc`` of models this size
is near 50-55), SciQ can only be ``acc`` (``acc_norm`` of small models is 5-10 points lower), and
ARC-e fits ``acc_norm`` (``acc`` of a 270M model trained on 1.5T tokens is well above 45.08).
So we compare ``acc_norm`` for ARC-c, ARC-e and HellaSwag -- the Open LLM Leaderboard
convention that the card's other tables follow -- and ``acc`` for BoolQ, PIQA, SciQ and
WinoGrande. Both metrics are always reported, so another reading stays one glance away.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
COLUMN = {
    "arc_challenge": "ARC-c", "arc_easy": "ARC-e", "boolq": "BoolQ", "hellaswag": "HellaSwag",
    "piqa": "PIQA", "sciq": "SciQ", "winogrande": "WinoGrande",
}
PAPER_METRIC = {
    "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm",
    "piqa": "acc", "sciq": "acc", "winogrande": "acc",
}

# Percent, in PAPER_TASKS order, then the average.
ZERO_SHOT = {
    "270M": (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91, 54.37),
    "270M-Instruct": (30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72, 55.11),
    "450M": (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01, 57.56),
    "450M-Instruct": (30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96, 59.95),
    "1_1B": (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72, 63.44),
    "1_1B-Instruct": (37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75, 65.50),
    "3B": (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51, 67.39),
    "3B-Instruct": (39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85, 69.15),
}

_NAME = re.compile(r"OpenELM-(270M|450M|1[_.]1B|3B)(-Instruct)?(?![0-9A-Za-z])", re.IGNORECASE)


def paper_model(name: str) -> Optional[str]:
    """The ``ZERO_SHOT`` key for a model id or folder name that names a released OpenELM
    (``apple/OpenELM-1_1B-Instruct``, ``.../OpenELM-270M-4bit``), else None."""
    m = _NAME.search(str(name))
    if not m:
        return None
    size = m.group(1).upper().replace(".", "_")
    return size + ("-Instruct" if m.group(2) else "")


def paper_row(name: str) -> Optional[Dict[str, float]]:
    """``{task: percent, ..., "average": percent}`` from the paper for ``name``, else None."""
    key = paper_model(name)
    if key is None:
        return None
    values = ZERO_SHOT[key]
    return {**dict(zip(PAPER_TASKS, values)), "average": values[-1]}


def primary_metric(task: str, metrics: Dict[str, float]) -> Optional[str]:
    """The metric compared with the paper (``PAPER_METRIC``), else ``acc``, else the first one."""
    for m in (PAPER_METRIC.get(task), "acc"):
        if m and m in metrics:
            return m
    names = [k for k in metrics if not k.endswith("_stderr")]
    return names[0] if names else None


def compare(results: Dict[str, Dict[str, float]], model_name: str) -> Dict[str, Any]:
    """Our numbers (percent) beside the paper's, one row per task in paper order first.

    Returns ``{"paper_model": key or None, "rows": [{"task", "column", "metric", "acc",
    "acc_norm", "ours", "paper", "delta"}...], "average": {"ours", "paper", "delta"}}``. The
    average of ours is the mean of the compared metric and is shown against the paper's only
    when all seven paper tasks were run."""
    paper = paper_row(model_name)
    tasks = [t for t in PAPER_TASKS if t in results] + [t for t in results if t not in PAPER_TASKS]
    rows: List[Dict[str, Any]] = []
    for t in tasks:
        metrics = results[t]
        metric = primary_metric(t, metrics)
        if metric is None:
            continue
        ours = 100 * metrics[metric]
        ref = paper.get(t) if paper and metric == PAPER_METRIC.get(t) else None
        rows.append({
            "task": t, "column": COLUMN.get(t, t), "metric": metric,
            "acc": _pct(metrics.get("acc")), "acc_norm": _pct(metrics.get("acc_norm")),
            "ours": ours, "paper": ref, "delta": None if ref is None else ours - ref,
        })
    ours_avg = sum(r["ours"] for r in rows) / len(rows) if rows else None
    complete = paper is not None and all(t in results for t in PAPER_TASKS)
    if complete:
        paper_rows = [r for r in rows if r["task"] in PAPER_TASKS]
        ours_avg = sum(r["ours"] for r in paper_rows) / len(paper_rows)
    ref_avg = paper["average"] if complete else None
    return {
        "paper_model": paper_model(model_name),
        "rows": rows,
        "average": {"ours": ours_avg, "paper": ref_avg, "delta": None if ref_avg is None or ours_avg is None else ours_avg - ref_avg},
    }


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100 * v

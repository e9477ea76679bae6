"""The open training record: curves from ``metrics.jsonl`` and from CoreNet's ``training_logs.txt``.

The CoreNet excerpt is produced here with CoreNet's own format strings (``corenet/metrics/stats.py``
``Statistics.iter_summary``: ``"Epoch: {:3d} [{:8d}/{:8d}]"``, ``"loss: {dict}"``, ``"LR: [...]"``
(rounded to 6), ``"Avg. batch load time: {:1.3f}"``, ``"Elapsed time: {:5.2f}"``, joined by ", ";
``corenet/utils/logger.py`` ``log``: ``"{time} - {blue bold}LOGS   {end} - {message}"``) from a
simulated loss whose running mean is computed as CoreNet's ``AverageMetric`` does (sum / count
since the epoch start, rounded to 4 decimals): the parsed values and the derived per-interval
means are checked against the simulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_openelm.eval.training_plot import parse_corenet_line, plot_training, read_corenet_log, read_metrics

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
LOGS = "\033[34m\033[1mLOGS   \033[0m"


def _corenet_log(path: Path, max_iterations=350000, log_freq=500, n_logs=12, resume_at=None, seed=0) -> dict:
    """A CoreNet training log of a run whose per-iteration loss is known; returns the truth."""
    rng = np.random.default_rng(seed)
    iters = n_logs * log_freq + 1
    loss = 10.0 * np.exp(-np.arange(iters) / 1500.0) + 2.0 + 0.05 * rng.standard_normal(iters)
    lines = ["2024-04-10 08:00:00 - \033[32m\033[1mINFO   \033[0m - Trainable parameters: ['token_embeddings.weight', ...]"]
    truth = {"iteration": [], "interval_mean": [], "lr": []}
    total = count = 0.0
    start = 0
    elapsed0 = 0.0
    for it in range(iters):
        if resume_at is not None and it == resume_at:  # a resumed run: a fresh Statistics and epoch timer
            total = count = 0.0
            start = it
            elapsed0 = 0.0
            lines.append("2024-04-11 09:00:00 - " + LOGS + " - Loaded checkpoint from training_checkpoint_last.pt")
        total += loss[it] * 16  # AverageMetric.update: value * batch_size
        count += 16
        batch_id = it - start
        if batch_id % log_freq == 0:
            lr = [round(0.0053 * min(1.0, (it + 1) / 5000), 6)] * 2
            avg = {"total_loss": round(float(total / count), 4), "z_loss": round(float(1e-4 * total / count), 4)}
            parts = [
                "Epoch: {:3d} [{:8d}/{:8d}]".format(0, it + 1, max_iterations),
                "loss: {}".format(avg),
                "LR: {}".format(lr),
                "Avg. batch load time: {:1.3f}".format(0.0021),
                "Elapsed time: {:5.2f}".format(elapsed0 + 0.61 * (batch_id + 1)),
            ]
            lines.append("2024-04-10 08:{:02d}:00 - {} - {}".format(len(lines) % 60, LOGS, ", ".join(parts)))
            prev = truth["iteration"][-1] if truth["iteration"] and batch_id else None
            truth["iteration"].append(it + 1)
            truth["interval_mean"].append(None if prev is None else float(loss[prev: it + 1].mean()))
            truth["lr"].append(lr[0])
    path.write_text("\n".join(lines) + "\n")
    return truth


def test_corenet_line_format_parses():
    line = ("2024-04-10 08:00:00 - " + LOGS + " - Epoch:   0 [  349501/  350000], loss: {'total_loss': 2.4512, 'z_loss': 0.0123}, "
            "LR: [0.00053, 0.00053], Avg. batch load time: 0.002, Elapsed time: 91234.56")
    rec = parse_corenet_line(line)
    assert rec == {"epoch": 0, "iteration": 349501, "max_iterations": 350000, "loss": 2.4512,
                   "loss_parts": {"total_loss": 2.4512, "z_loss": 0.0123}, "lr": 0.00053, "batch_load_time": 0.002, "elapsed": 91234.56}
    scalar = parse_corenet_line("2024-04-10 08:00:00 - LOGS    - Epoch:   3 [     501/    1000], loss: 5.25, grad_norm: 0.8, "
                                "LR: 0.000100, Avg. batch load time: 0.010, Elapsed time:  12.00")
    assert scalar["loss"] == 5.25 and scalar["lr"] == 0.0001 and scalar["grad_norm"] == 0.8 and scalar["epoch"] == 3
    assert parse_corenet_line("2024-04-10 08:00:00 - LOGS    - Checkpoint saved") is None
    numpy2 = parse_corenet_line("x - LOGS    - Epoch:   0 [  1/  9], loss: {'total_loss': np.float64(3.5)}, LR: [0.1], Elapsed time: 1.00")
    assert numpy2["loss"] == 3.5 and numpy2["lr"] == 0.1


@pytest.mark.parametrize("resume_at", [None, 3000])
def test_corenet_log_running_mean_becomes_interval_means(tmp_path, resume_at):
    truth = _corenet_log(tmp_path / "training_logs.txt", resume_at=resume_at)
    recs = read_corenet_log(tmp_path / "training_logs.txt")
    assert [r["iteration"] for r in recs] == truth["iteration"]
    assert [r["lr"] for r in recs] == truth["lr"]
    assert {r["segment"] for r in recs} == ({0} if resume_at is None else {0, 1})
    for r, want in zip(recs, truth["interval_mean"]):
        if want is None:  # the first summary of a segment
            continue
        # exact up to the 4-decimal rounding of two running means: |err| <= 0.5e-4 (n_t + n_p) / (n_t - n_p)
        assert r["interval_loss"] == pytest.approx(want, abs=0.5e-4 * 2 * 12 + 1e-9)


def test_plot_renders_a_png_from_a_corenet_log_and_from_metrics(tmp_path):
    _corenet_log(tmp_path / "training_logs.txt")
    info = plot_training(tmp_path / "training_logs.txt", tmp_path / "corenet.png")
    assert info["kind"] == "corenet" and info["panels"] == ["loss", "learning rate", "seconds / iteration"] and info["points"] == 13
    assert (tmp_path / "corenet.png").read_bytes()[:8] == PNG

    rows = [{"step": s, "epoch": 0, "tokens": 512 * s, "loss": 5 / s, "lr": 1e-4, "grad_norm": 1 / s, "tokens_per_sec": 900.0,
             "peak_memory_gb": 0.5} for s in range(1, 21)]
    rows.insert(10, {"step": 10, "val_loss": 0.7})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = read_metrics(tmp_path / "metrics.jsonl")
    assert series["val_loss"] == [[10.0, 0.7]] and series["loss"][1] == [2.0, 2.5] and len(series["grad_norm"]) == 20
    info = plot_training(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert info["panels"] == ["loss", "learning rate", "grad norm (before clipping)", "tokens / s", "peak memory (GB)"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_plot_command_and_its_errors(tmp_path):
    _corenet_log(tmp_path / "training_logs.txt", n_logs=3)
    r = _cli("plot", str(tmp_path / "training_logs.txt"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG and "Saved" in r.stdout
    (tmp_path / "notes.txt").write_text("nothing to see\n")
    r = _cli("plot", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 1 and "no CoreNet iteration summaries" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()
    r = _cli("plot", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and "no such file" in r.stderr

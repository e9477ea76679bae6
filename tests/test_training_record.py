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


# ---------------------------------------------------------------- the data-order manifest replays


def test_data_order_replays_the_batches_and_losses_of_each_step(tmp_path, sp_model_path, monkeypatch):
    """A real SFT run (``train.sft`` over ``train.loop``), 3 epochs: for every step k the records
    ``data_order.jsonl`` lists, re-read from the dataset file and re-encoded, are exactly the rows the
    step consumed (seen by wrapping the batch source), the data manifest's sha256 is the file's, and
    the loss of those rows under checkpoint step k-1 is the loss ``metrics.jsonl`` logged for step k."""
    from conftest import tiny_args
    from mlx_openelm.adapters import LoRAConfig, load_adapters
    from mlx_openelm.data import encode_record, pad_batch
    from mlx_openelm.model import Model, init_weights
    from mlx_openelm.tokenizer import Tokenizer
    from mlx_openelm.train import sft

    words = "the cat sat on mat dog runs fast red blue green tree river city light".split()
    rng = np.random.default_rng(0)
    records = [{"instruction": " ".join(rng.choice(words, size=int(rng.integers(3, 12)))), "input": "",
                "output": " ".join(rng.choice(words, size=int(rng.integers(1, 6))))} for _ in range(8)]
    data_file = tmp_path / "train.json"
    data_file.write_text(json.dumps(records))
    tok = Tokenizer(sp_model_path)
    seen = []  # (record ids, (inputs, targets, mask)) of every micro-batch the loop pulled, in order
    original = sft.EncodedBatches.batches

    def observed(self, epoch, start=0):
        for ids, arrays in original(self, epoch, start):
            if self.shuffle:  # the training source (validation is unshuffled)
                seen.append((list(ids), [np.array(a) for a in arrays]))
            yield ids, arrays

    monkeypatch.setattr(sft.EncodedBatches, "batches", observed)  # observes, changes nothing
    out = tmp_path / "run"
    args = sft.TrainingArgs(output_dir=str(out), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.0), learning_rate=3e-3,
                            warmup=0, batch_size=2, grad_accum=2, iters=6, save_every=1, keep_checkpoints=0,
                            steps_per_eval=0, seed=5, cutoff_len=64)
    sft.train(init_weights(Model(tiny_args()), seed=1), tok, records, [], args)

    order = [json.loads(x) for x in (out / "data_order.jsonl").read_text().splitlines()]
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m}
    manifest = json.loads((out / "data_manifest.json").read_text())
    reread = json.loads(data_file.read_text())
    assert manifest["seed"] == 5 and manifest["dataset_sha256"] == sft.records_sha256(reread) and manifest["records"] == 8
    assert [o["step"] for o in order] == [1, 2, 3, 4, 5, 6]
    encoded = [encode_record(tok, r, 64, True) for r in reread]
    for o in order:
        k = o["step"]
        micro = seen[(k - 1) * 2:k * 2]
        assert o["records"] == [i for ids, _ in micro for i in ids]
        # the replayed batch: re-read records -> encode -> pad, micro-batch by micro-batch
        for ids, arrays in micro:
            for got, want in zip(arrays, pad_batch(encoded, ids)):
                np.testing.assert_array_equal(got, np.array(want))
        if k == 1:
            continue
        model = init_weights(Model(tiny_args()), seed=1)
        load_adapters(model, out / "checkpoints" / f"step_{k - 1}")
        s = n = 0.0
        ids = o["records"]
        for j in range(0, len(ids), 2):
            si, ni, _ = sft.token_loss()(model, *pad_batch(encoded, ids[j:j + 2]))
            s, n = s + si.item(), n + ni.item()
        assert s / n == pytest.approx(metrics[k]["loss"], rel=1e-5)
    assert sorted({i for o in order[:2] for i in o["records"]}) == list(range(8))  # 2 steps = one epoch, each record once
    assert order[0]["records"] != order[2]["records"]  # epochs are reshuffled

"""Data-parallel training: ``mlx.launch -n 2 --backend ring`` running ``mlx-openelm lora`` on this
machine gives the loss curve, validation losses and adapters of one process with the same global
batch; only rank 0 writes, and checkpoints hold one PRNG key per rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from conftest import tiny_args, write_hf_checkpoint
from mlx_openelm.io.load import load
from mlx_openelm.adapters import LoRAConfig
from mlx_openelm.data import load_train_data, split_train_val
from mlx_openelm.train.sft import TrainingArgs, train
from conftest import colour_task, free_port_pair

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"




def lora_cli(model: Path, data: Path, out: Path) -> list:
    return ["-m", "mlx_openelm.cli", "lora", "--model", str(model), "--data", str(data), "--adapter-path", str(out),
            "--rank", "4", "--alpha", "8", "--dropout", "0", "--batch-size", "4", "--grad-accum", "2", "--iters", "4",
            "--warmup", "0", "--lr", "1e-2", "--val-size", "4", "--steps-per-eval", "2", "--save-every", "2", "--seed", "0"]


def read_metrics(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x], [x for x in lines if "val_loss" in x]


def test_two_processes_match_one(tmp_path, task_spm_path):
    if not LAUNCH.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed next to this Python (pip install mlx)")
    launch = str(LAUNCH if LAUNCH.exists() else shutil.which("mlx.launch"))
    model = tmp_path / "OpenELM-tiny"
    write_hf_checkpoint(model, tiny_args(num_transformer_layers=2), seed=0, tokenizer=task_spm_path)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(colour_task(n_train_per_word=5, n_test_per_word=1)[0]))  # 20 records, 4 held out
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "cache")}

    # One process, in this interpreter, with the settings the flags below spell out.
    records = load_train_data(str(data))
    train_set, val_set = split_train_val(records, 4)
    base, tok = load(model)
    args = TrainingArgs(output_dir=str(tmp_path / "one"), adapter=LoRAConfig(rank=4, alpha=8, dropout=0.0), batch_size=4,
                        grad_accum=2, iters=4, warmup=0, learning_rate=1e-2, steps_per_eval=2, save_every=2, seed=0)
    train(base, tok, train_set, val_set, args)
    two = subprocess.run(
        [launch, "-n", "2", "--backend", "ring", "--starting-port", str(free_port_pair()), "--python", sys.executable,
         "--", *lora_cli(model, data, tmp_path / "two")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert two.returncode == 0 and (tmp_path / "two" / "adapters.safetensors").exists(), two.stdout + two.stderr
    assert "2 processes" in two.stdout + two.stderr  # rank 0 reported the data-parallel run

    steps1, vals1 = read_metrics(tmp_path / "one")
    steps2, vals2 = read_metrics(tmp_path / "two")
    assert [s["step"] for s in steps2] == [1, 2, 3, 4] and [v["step"] for v in vals2] == [2, 4]  # written once
    assert [s["tokens"] for s in steps1] == [s["tokens"] for s in steps2]
    np.testing.assert_allclose([s["loss"] for s in steps2], [s["loss"] for s in steps1], rtol=1e-4)
    np.testing.assert_allclose([s["grad_norm"] for s in steps2], [s["grad_norm"] for s in steps1], rtol=1e-3)
    np.testing.assert_allclose([v["val_loss"] for v in vals2], [v["val_loss"] for v in vals1], rtol=1e-4)
    assert [v["val_count"] for v in vals1] == [v["val_count"] for v in vals2]
    w1 = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    w2 = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        np.testing.assert_allclose(np.array(w2[k]), np.array(w1[k]), rtol=1e-3, atol=1e-5)

    state = json.loads((tmp_path / "two" / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["random_keys"]) == 2 and state["random_keys"][0] != state["random_keys"][1]

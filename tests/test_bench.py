"""The throughput benchmark and the RMSNorm study on tiny shapes (seconds, not minutes)."""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_openelm.bench import core as bench
from mlx_openelm.model import Model, RMSNorm
from mlx_openelm.weights import compute_plan

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb")
SMALL = dict(prompt_tokens=12, gen_tokens=4, repeats=3)


def cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "bench", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def check_run(s, repeats):
    for k in TIMED:
        assert math.isfinite(s[k]) and s[k] > 0, k
        assert len(s["samples"][k]) == repeats
        assert s[k] == pytest.approx(statistics.median(s["samples"][k]))
    assert s["ttft_s"] * s["prompt_tps"] == pytest.approx(SMALL["prompt_tokens"])
    assert s["peak_memory_gb"] >= s["weights_gb"] > 0


def test_cli_json_has_every_field_and_writes_the_chart(tmp_path):
    png = tmp_path / "chart.png"
    r = cli("--shape", "tiny", "--json", "--compare-mlx-lm", "--rmsnorm-ablation", "--plot", str(png),
            "--prompt-tokens", "12", "--gen-tokens", "4", "--repeats", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("model", "device", "device_name", "blas", "dtype", "quantization", "checkpoint", "prompt_tokens",
                "gen_tokens", "repeats", *TIMED, "mlx_lm", "rmsnorm_ablation", "plot"):
        assert key in out, key
    assert out["blas"] == mlx_openelm._backend.BLAS
    plan = compute_plan("auto", stored_quantized=False, stored_dtype="float16")  # THE device policy
    expect = plan.dtype or "float16"
    if plan.matrices:  # the CPU kernels read float16 matrices, the rest computes in float32
        expect = f"float32 ({plan.matrices} matrices)"
    assert out["device"] == plan.device and out["dtype"] == expect
    assert out["checkpoint"]["dtype"] == "float16"
    check_run(out, 3)

    cmp = out["mlx_lm"]
    same, defaults = cmp["same_dtype"], cmp["defaults"]
    assert same["ours"]["dtype"] == same["mlx_lm"]["dtype"] == "float16"
    assert defaults["ours"]["dtype"] == expect and defaults["mlx_lm"]["dtype"] == "float16"
    assert not cmp["same_dtype_is_defaults"]
    for mode in (same, defaults):
        check_run(mode["ours"], 3)
        check_run(mode["mlx_lm"], 3)
        assert set(mode["ratio"]) == set(TIMED)
        assert all(v > 0 for v in mode["ratio"].values())
    assert defaults["ours"]["generation_tps"] == out["generation_tps"]

    abl = out["rmsnorm_ablation"]
    assert abl["norm_calls_per_token"] == 4 * 4 + 1  # attn, ffn, q and k norms in 4 layers, and the final norm
    for v in ("fused", "naive"):
        assert abl[v]["generation_tps"] > 0 and 0 < abl[v]["norm_share"] < 1
        assert abl[v]["norm_ms_per_token"] < abl[v]["decode_step_ms"]
    # both sides run layers op by op (the CPU kernels' layer fusion folds the norms into the products)
    assert "Measured" in abl["method"] and "op by op" in abl["method"]

    assert out["plot"] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob(".*partial"))


def main(capsys, *args):
    from mlx_openelm.cli import main as cli_main

    try:
        code = cli_main(["bench", *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_cli_table_and_default_chart_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out = main(capsys, "--shape", "tiny", "-q", "8", "--dtype", "float16", "--rmsnorm-ablation",
                     "--prompt-tokens", "8", "--gen-tokens", "3", "--repeats", "1")
    assert code == 0, out.err
    assert "float16, 8-bit" in out.out and "decode tok/s" in out.out and "RMSNorm naive" in out.out
    assert (tmp_path / "rmsnorm_ablation.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["--shape", "9B"], "unknown --shape"),
    ([], "either --model or --shape"),
    (["--shape", "tiny", "-q", "7"], "bits=7"),
    (["--shape", "tiny", "--prompt-tokens", "2040", "--gen-tokens", "20"], "2048-token context"),
])
def test_cli_bad_input_is_one_line(args, message, capsys):
    code, out = main(capsys, *args)
    assert code == 1
    assert message in out.err and len(out.err.strip().splitlines()) == 1 and not out.out


def test_timing_arithmetic():
    def run():
        time.sleep(0.05)  # "prompt"
        yield 0
        for t in range(3):
            time.sleep(0.02)
            yield t

    s = bench.time_generation(run, n_prompt=10, weights_gb=1.0)
    assert 0.05 <= s["ttft_s"] < 0.5
    assert s["prompt_tps"] == pytest.approx(10 / s["ttft_s"])
    assert 3 / 0.5 < s["generation_tps"] <= 3 / 0.06  # 3 intervals after the first token
    assert s["peak_memory_gb"] >= 1.0


def test_mlx_lm_twin_shares_weights_and_computes_the_same():
    """The comparison is fair only if mlx-lm runs the very same weights: same arrays, same logits."""
    ours = bench.random_model("tiny", "float32", seed=3)
    theirs = bench.share_weights(ours, bench.mlx_lm_model(ours.args))
    mine = dict(tree_flatten(ours.parameters()))
    for k, v in tree_flatten(theirs.parameters()):
        assert v is mine[k]
    tokens = mx.array([bench.prompt_ids(9, ours.args.vocab_size, seed=1)])
    assert mx.allclose(ours(tokens), theirs(tokens), atol=1e-4).item()

    bench.quantize_model(ours, 4)
    theirs = bench.share_weights(ours, bench.mlx_lm_model(ours.args))
    assert isinstance(theirs.transformer.layers[0].ffn.proj_1, nn.QuantizedLinear)
    assert mx.allclose(ours(tokens), theirs(tokens), atol=1e-4).item()


@pytest.mark.parametrize("bits", [None, 4])
def test_as_loaded_follows_the_compute_plan(bits):
    """Random-weight runs get what ``weights.compute_plan`` (the loader's policy) decides."""
    ckpt = bench.random_model("tiny", "float16", quantize=bits, seed=2)
    for dtype in ("auto", "float16", "bfloat16", "float32"):
        plan = compute_plan(dtype, bits is not None, keep_quantized=dtype != "auto", stored_dtype="float16")
        got = bench.describe(bench.as_loaded(ckpt, dtype))
        expect = (f"float32 ({plan.matrices} matrices)" if plan.matrices else
                  "float32 (float16 scales)" if plan.affine_kept else (plan.dtype or "float16"))
        assert got["dtype"] == expect, dtype
        assert (got["quantization"] is None) == (bits is None or plan.dequantize), dtype
    assert bench.as_loaded(ckpt, "float16") is ckpt  # nothing to change: the same weights


def test_random_checkpoint_dtype():
    assert bench.random_checkpoint_dtype("auto") == "float16"
    on_cpu = compute_plan("auto", True).device == "cpu"  # on a CPU float16 quantized matmul is slow
    assert bench.random_checkpoint_dtype("auto", 4) == ("float32" if on_cpu else "float16")
    assert bench.random_checkpoint_dtype("bfloat16", 4) == "bfloat16"


def test_benchmark_library_numbers_are_consistent():
    model = bench.random_model("tiny", "float32", seed=0)
    r = bench.benchmark(model, compare_mlx_lm=True, rmsnorm_ablation=True, **SMALL)
    check_run(r, SMALL["repeats"])
    cmp = r["mlx_lm"]
    assert cmp["same_dtype_is_defaults"] and cmp["same_dtype"] == cmp["defaults"]
    ratio = cmp["same_dtype"]["ratio"]
    per_round = [a / b for a, b in zip(r["samples"]["generation_tps"], cmp["same_dtype"]["mlx_lm"]["samples"]["generation_tps"])]
    assert ratio["generation_tps"] == pytest.approx(statistics.median(per_round))
    abl = r["rmsnorm_ablation"]
    for v in ("fused", "naive"):
        a = abl[v]
        assert a["decode_ms_per_token"] == pytest.approx(1e3 / a["generation_tps"])
        assert 0 < a["norm_share"] < 1 and 0 < a["norm_ms_per_token"] < a["decode_step_ms"]
    assert abl["norm_ms_saved_by_fusion"] == pytest.approx(abl["naive"]["norm_ms_per_token"] - abl["fused"]["norm_ms_per_token"])
    assert all(m.fused for _, m in model.named_modules() if isinstance(m, RMSNorm))  # left as found
    assert RMSNorm.__call__.__name__ == "__call__"  # the recording hook is gone


def test_naive_and_fused_rmsnorm_agree():
    """The ablation compares two implementations of the same function."""
    model = bench.random_model("tiny", "float32", seed=1)
    tokens = mx.array([[1, 7, 42, 300, 5]])
    fused = model(tokens)
    assert bench.set_fused_norms(model, False) == 17
    assert mx.allclose(fused, model(tokens), atol=1e-4).item()
    bench.set_fused_norms(model, True)


def test_bench_on_a_model_folder(tmp_path, sp_model_path):
    from conftest import tiny_args
    from mlx_openelm.io.folder import save_model
    from mlx_openelm.model import init_weights

    folder = save_model(tmp_path / "tiny-mlx", init_weights(Model(tiny_args()), 0), {}, sp_model_path)
    r = bench.run_bench(model=str(folder), compare_mlx_lm=True, **SMALL)
    assert r["model"] == str(folder) and r["checkpoint"]["dtype"] == "float32"
    check_run(r["mlx_lm"]["same_dtype"]["mlx_lm"], SMALL["repeats"])

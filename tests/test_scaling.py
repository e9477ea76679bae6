"""Task scaling law: fits on synthetic PassUntil results drawn from known laws (with sampling noise and
censoring), the curvature test on convex / linear / concave families, and the CLI end to end on tiny
models of three sizes (passuntil -> three result files -> scaling -> JSON + PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx

from conftest import tiny_args
from mlx_openelm.eval import passuntil as P
from mlx_openelm.eval import scaling as S

ROOT = Path(__file__).resolve().parents[1]


def sampled_row(rng, p, r, cap, task, i, n):
    """One PassUntil row for true pass probability p, drawn as the sampling plan would (geometric gaps)."""
    times = np.cumsum(rng.geometric(p, size=r)) if p > 1e-12 else np.full(r, cap + 1)  # (no pass in reach: no overflow)
    censored = bool(times[-1] > cap)
    k = cap if censored else int(times[-1])
    m = int((times <= cap).sum()) if censored else r
    return {"task": task, "id": str(i), "model": f"m{n}", "n_params": int(n), "n_params_nonembedding": int(n * 0.9), "r": r,
            "max_samples": cap, "samples": k, "passes": m, "censored": censored, "guessable": False, "p_exact": p,
            **P.estimate(m, k, r, censored)}


def law_results(sizes, a, alpha, r=4, cap=20000, seed=0, task="law"):
    """Rows per size for instances following z_s = a_s - alpha_s log N exactly (plus sampling noise)."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in sizes:
        p = np.exp(-np.exp(a - alpha * math.log(n)))
        runs.append([sampled_row(rng, float(pi), r, cap, task, i, n) for i, pi in enumerate(p)])
    return runs


def test_fit_recovers_a_known_law_and_predicts_a_held_out_size():
    rng = np.random.default_rng(1)
    sizes = [1e7, 3e7, 1e8, 3e8]
    target = 1e9
    alpha = 0.35
    a = rng.normal(7.3, 0.3, 60)  # PU from ~5e-4 at the smallest size to ~0.4 at the target
    a[:6] += 1.5  # a few hard instances: no pass within the cap at the small sizes
    runs = law_results(sizes + [target], a, np.full(60, alpha), r=4, cap=20000, seed=2)
    report = S.fit(runs, predict_n=target, bootstrap=300, seed=0)
    res = report["tasks"]["law"]
    assert [s["role"] for s in report["sizes"]] == ["fit"] * 4 + ["target"]
    assert res["censored"]["instances_excluded"] >= 3  # censored runs do not enter the per-instance fits
    shared, inst = res["methods"]["shared"], res["methods"]["instance"]
    assert shared["alpha_interval"][0] <= alpha <= shared["alpha_interval"][1]
    assert shared["alpha"] == pytest.approx(alpha, abs=0.05)
    assert inst["alpha"] == pytest.approx(alpha, abs=0.1)
    fit_ids = [f["id"] for f in res["instance_fits"] if f["fitted"]]
    a_hat = {f["id"]: f["a"] for f in res["instance_fits"]}
    err = [a_hat[i] - a[int(i)] for i in fit_ids]
    assert abs(np.median(err)) < 0.3  # log c recovered
    for name in ("instance", "shared"):
        m = res["methods"][name]
        assert m["interval"][0] <= m["measured"] <= m["interval"][1], (name, m)
        truth = np.exp(-np.exp(a - alpha * math.log(target)))
        used = [int(f["id"]) for f in res["instance_fits"] if (f["fitted"] if name == "instance" else f["shared_a"] is not None)]
        assert len(used) == m["instances"]
        assert m["interval"][0] <= truth[used].mean() <= m["interval"][1], (name, m, truth[used].mean())
        assert m["pu"] == pytest.approx(truth[used].mean(), rel=0.1)  # bias-corrected
    # the bound brackets the truth over all instances
    truth_all = np.exp(-np.exp(a - alpha * math.log(target))).mean()
    assert res["censored"]["task_pu_lower"] <= truth_all <= res["censored"]["task_pu_upper"]
    assert {"task", "method", "predicted", "low", "high", "measured", "rel_error"} <= set(report["table"][0])


def test_p_exact_fit_is_exact_on_noise_free_data():
    sizes = [1e7, 1e8, 1e9]
    a = np.array([6.0, 7.0, 8.0])
    runs = [[{"task": "t", "id": str(i), "model": "m", "n_params": int(n), "p_exact": float(np.exp(-np.exp(ai - 0.3 * math.log(n))))}
             for i, ai in enumerate(a)] for n in sizes]
    report = S.fit(runs, predict_n=1e10, estimator="p_exact", bootstrap=20)
    m = report["tasks"]["t"]["methods"]
    truth = np.exp(-np.exp(a - 0.3 * math.log(1e10))).mean()
    assert m["instance"]["pu"] == pytest.approx(truth, rel=1e-9) and m["shared"]["pu"] == pytest.approx(truth, rel=1e-9)
    assert m["instance"]["alpha"] == pytest.approx(0.3, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 model sizes"):
        S.fit(runs[:1], predict_n=1e10, estimator="p_exact")


@pytest.mark.parametrize("shape", ["convex", "linear", "concave"])
def test_curvature_classifies_synthetic_families(shape):
    rng = np.random.default_rng({"convex": 3, "linear": 4, "concave": 5}[shape])
    sizes = np.geomspace(1e7, 1e10, 5)
    x = np.log(sizes)
    n_inst = 80
    jitter = rng.normal(0, 0.2, n_inst)[:, None]
    if shape == "linear":
        z = 2.0 - 0.25 * (x - x[0])[None, :] + jitter
        p = np.exp(-np.exp(z))
    elif shape == "convex":  # two steps must both succeed: F = log(c1 N^-a1 + c2 N^-a2) (Theorem 2)
        p = np.exp(-(np.exp(2.2 - 0.9 * (x - x[0]))[None, :] + np.exp(0.3 - 0.05 * (x - x[0]))[None, :]) * np.exp(jitter))
    else:  # two circuits, the better one wins: F = min of two lines (Theorem 3)
        z1 = 1.6 - 0.05 * (x - x[0])
        z2 = 3.5 - 0.9 * (x - x[0])
        p = np.exp(-np.exp(np.minimum(z1, z2)[None, :] + jitter))
    runs = [[sampled_row(rng, float(p[i, j]), 8, 100000, shape, i, n) for i in range(n_inst)] for j, n in enumerate(sizes)]
    report = S.fit(runs, predict_n=3e10, bootstrap=200, seed=1)
    cv = report["tasks"][shape]["curvature"]
    assert cv["shape"] == shape, cv


def test_plot_and_named_sizes(tmp_path):
    assert S.named_size("3B") == 3036647424 and S.named_size("1.1B", "n_params_nonembedding") == 1014355456
    runs = law_results([1e7, 1e8, 1e9], np.array([5.0, 6.0, 7.0]), np.full(3, 0.3), r=4, cap=100000, seed=3)
    report = S.fit(runs, predict_name="3B", bootstrap=30)
    assert report["target"]["n"] == 3036647424 and not report["target"]["measured"]
    out = S.plot(report, tmp_path / "fit.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- CLI end to end


def _save_tiny(folder, tok_path, dim, layers, scale, seed):
    from mlx_openelm.io.folder import save_model
    from mlx_openelm.model import Model, init_weights
    from mlx_openelm.tokenizer import Tokenizer

    tok = Tokenizer(tok_path)
    answer = tok.encode(" answer", add_bos=False)[-1]
    model = init_weights(Model(tiny_args(model_dim=dim, num_transformer_layers=layers)), seed)
    # peaked: the next token is mostly the last one, and EOS is as likely as 'answer' after 'answer'
    w = model.transformer.token_embeddings.weight * scale
    w[tok.eos_id] = w[answer]
    model.transformer.token_embeddings.weight = w
    mx.eval(model.parameters())
    save_model(folder, model, {}, tok_path)
    return model


def _cli(capsys, *args):
    """Run one command in-process through the CLI's own entry (error policy included): (exit code, stdout, stderr)."""
    from mlx_openelm.cli import run

    capsys.readouterr()
    try:
        code = run(args[0], list(args[1:]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_passuntil_then_scaling(tmp_path, sp_model_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{k}", "prompt": "The correct answer", "targets": [" answer" * k], "stop": []}) + "\n"
                            for k in (1, 2, 3)))
    results = []
    for name, dim, layers, scale in (("small", 64, 2, 3.0), ("medium", 64, 4, 4.0), ("large", 128, 2, 4.0)):
        folder = tmp_path / name
        _save_tiny(folder, sp_model_path, dim, layers, scale, seed=1)
        out = tmp_path / f"{name}.jsonl"
        code, out_, err = _cli(capsys, "passuntil", "--model", str(folder), "--data", str(data), "--r", "3", "--max-samples", "400",
                 "--batch-size", "32", "--seed", "1", "--output", str(out))
        assert code == 0, err
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 3 and all(not row["censored"] and row["pu"] > 0 for row in rows)
        assert "PassUntil" in err and "wrote" in err
        results.append(out)
    code, _, err = _cli(capsys, "passuntil", "--model", str(tmp_path / "small"), "--data", str(data), "--output", str(results[0]))
    assert code == 1 and "--resume" in err and "Traceback" not in err
    fit_json, png = tmp_path / "fit.json", tmp_path / "fit.png"
    code, out_, err = _cli(capsys, "scaling", "--results", *map(str, results), "--predict-n", "5e5", "--bootstrap", "50",
             "--output", str(fit_json), "--plot", str(png))
    assert code == 0, err
    report = json.loads(fit_json.read_text())
    assert len(report["sizes"]) == 3 and report["target"]["n"] == 5e5
    sizes = sorted(s["n"] for s in report["sizes"])
    assert sizes[0] < sizes[1] < sizes[2]
    assert set(report["tasks"]["data"]["methods"]) == {"instance", "shared", "dataset"}
    assert "predicted PU" in out_ and "instance" in out_
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, _, err = _cli(capsys, "scaling", "--results", str(results[0]), "--predict-n", "5e5", "--output", str(tmp_path / "x.json"))
    assert code == 1 and "at least 2 model sizes" in err and not (tmp_path / "x.json").exists()


def test_point_estimates_for_the_fits():
    from scipy.special import digamma

    r = np.array([1, 2, 3, 8])
    assert np.allclose(S.digamma_int(r), digamma(r))
    # pu_log = exp(psi(r))/K is unbiased for log p at small p (K p ~ Gamma(r)); pu = (r-1)/(K-1) is not
    rng = np.random.default_rng(0)
    p, rr, n = 1e-3, 2, 40000
    k = np.cumsum(rng.geometric(p, size=(n, rr)), 1)[:, -1].astype(float)
    for kind, biased in (("pu_log", False), ("pu", True)):
        logs = np.log(S.point_estimate(kind, rr, k))
        se = logs.std() / math.sqrt(n)
        assert (abs(logs.mean() - math.log(p)) > 5 * se) == biased, (kind, logs.mean() - math.log(p))
    assert S.point_estimate("pu_mle", 2, 4) == 0.5 and S.point_estimate("pu", 2, 2) == 0.75  # all passed: 1 - 1/(2K)


def test_r2_fit_recovers_the_slope():
    rng = np.random.default_rng(11)
    a = rng.normal(7.2, 0.3, 60)
    runs = law_results([271527168, 457179136, 1079891456], a, np.full(60, 0.35), r=2, cap=10000, seed=12)
    report = S.fit(runs, predict_name="3B", bootstrap=200, seed=0)
    shared = report["tasks"]["law"]["methods"]["shared"]
    truth = np.exp(-np.exp(a - 0.35 * math.log(S.named_size("3B")))).mean()
    assert shared["alpha_interval"][0] <= 0.35 <= shared["alpha_interval"][1]
    assert shared["interval"][0] <= truth <= shared["interval"][1]
    assert report["fit_span_decades"] == pytest.approx(0.60, abs=0.01) and report["extrapolation_decades"] == pytest.approx(0.45, abs=0.01)

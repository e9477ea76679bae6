"""PassUntil measurement: the estimators on simulated sampling runs with known p, p_exact against a float64
softmax of the model's own logits, sampling-until-pass against p_exact, grading, the shared-prefill batch
and resuming a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx

from conftest import tiny_args
from mlx_openelm.eval import passuntil as P
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------- simulation


def simulate(rng, p, r, n, cap=None):
    """n runs of 'sample until r passes' at pass probability p: (K, passes, censored). Exact: the
    positions of the passes are cumulative sums of geometric gaps; a cap censors the runs past it."""
    times = np.cumsum(rng.geometric(p, size=(n, r)), axis=1)
    k = times[:, -1]
    if cap is None:
        return k, np.full(n, r), np.zeros(n, bool)
    censored = k > cap
    return np.where(censored, cap, k), np.where(censored, (times <= cap).sum(1), r), censored


def expected_r_over_k(p, r):
    """E[r/K] for K ~ negative binomial (r-th success at trial K), summed term by term in float64."""
    from math import lgamma

    k = np.arange(r, int(60 * r / p) + 10, dtype=np.float64)
    log_pmf = (np.array([lgamma(v) for v in k]) - lgamma(r) - np.array([lgamma(v - r + 1) for v in k])
               + r * math.log(p) + (k - r) * math.log1p(-p))
    return float(np.sum(r / k * np.exp(log_pmf)))


@pytest.mark.parametrize("p,r,cap", [(0.2, 2, None), (0.01, 1, None), (0.01, 2, None), (1e-3, 2, None), (1e-3, 4, None), (1e-3, 2, 1500)])
def test_unbiased_estimator_and_mle_bias(p, r, cap):
    rng = np.random.default_rng(int(p * 1e4) + r)
    n = 20000
    k, m, c = simulate(rng, p, r, n, cap)
    est = [P.estimate(int(mi), int(ki), r, bool(ci), interval=False) for ki, mi, ci in zip(k, m, c)]
    pu = np.array([e["pu"] for e in est])
    se = pu.std() / math.sqrt(n)
    assert abs(pu.mean() - p) < 4 * se, (pu.mean(), p, se)  # (r-1)/(K-1), with m/K_max when censored
    if cap is None:
        mle = np.array([e["pu_mle"] for e in est])
        se_mle = mle.std() / math.sqrt(n)
        theory = expected_r_over_k(p, r)
        assert abs(mle.mean() - theory) < 4 * se_mle, (mle.mean(), theory)
        assert mle.mean() - p > 4 * se_mle  # biased upwards, as theory says
        if p <= 1e-3:  # small p: E[r/K] -> r/(r-1) p
            assert theory / p == pytest.approx(r / (r - 1), rel=0.02)
    else:
        assert 0.2 < c.mean() < 0.8  # a real mix of censored and finished runs


def test_r1_mle_bias_matches_closed_form():
    # E[1/K] = -p ln p / (1 - p) for a geometric K: about 6.9 x p at 1e-3
    p = 1e-3
    assert expected_r_over_k(p, 1) == pytest.approx(-p * math.log(p) / (1 - p), rel=1e-6)


@pytest.mark.parametrize("p,r,cap", [(0.05, 2, None), (1e-3, 3, None), (1e-3, 2, 1200)])
def test_interval_coverage_near_nominal(p, r, cap):
    rng = np.random.default_rng(7 + r)
    n = 1500
    k, m, c = simulate(rng, p, r, n, cap)
    cover = 0
    for ki, mi, ci in zip(k, m, c):
        e = P.estimate(int(mi), int(ki), r, bool(ci), confidence=0.9)
        cover += e["pu_low"] <= p <= e["pu_high"]
    cov = cover / n
    assert 0.87 <= cov <= 0.97, cov  # exact intervals: nominal or a little above


def test_intervals_are_beta_quantiles():
    from scipy.stats import beta

    lo, hi = P.nb_interval(2, 5000, 0.95)
    assert lo == pytest.approx(beta.ppf(0.025, 2, 4999), rel=1e-6) and hi == pytest.approx(beta.ppf(0.975, 2, 4998), rel=1e-6)
    lo, hi = P.binom_interval(3, 10000, 0.95)
    assert lo == pytest.approx(beta.ppf(0.025, 3, 9998), rel=1e-6) and hi == pytest.approx(beta.ppf(0.975, 4, 9997), rel=1e-6)
    e = P.estimate(0, 10000, 2, True)
    assert e["pu"] == 0 and e["pu_high"] == pytest.approx(1 - 0.025 ** (1 / 10000), rel=1e-6)  # about 3.7 / K
    with pytest.raises(ValueError, match="passes == r"):
        P.estimate(1, 10, 2, False)


# ----------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


ANSWER = 296  # '▁answer' in the test tokenizer (checked below)


def peaked_model(tok, scale=4.0, seed=0):
    """A tiny random model whose next token is mostly the last one (embeddings x scale) and whose EOS
    shares the embedding of '▁answer' (so after 'answer', EOS and 'answer' are equally likely)."""
    model = init_weights(Model(tiny_args()), seed)
    w = model.transformer.token_embeddings.weight * scale
    w[tok.eos_id] = w[ANSWER]
    model.transformer.token_embeddings.weight = w
    mx.eval(model.parameters())
    return model


def test_the_tokenizer_has_the_answer_piece(tok):
    assert tok.convert_ids_to_tokens([ANSWER]) == ["▁answer"]


def softmax64(logits, temperature):
    x = np.asarray(logits, dtype=np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_p_exact_is_the_product_of_token_probabilities(tok, temperature):
    model = init_weights(Model(tiny_args()), 3)
    prompt, target = "The dog sat on", " the red mat"
    item = P.Item(id="a", prompt=prompt, targets=[target], stop=["\n"])
    got = P.p_exact(model, tok, item, temperature)
    # reference: tokens as lm-eval splits them, logits of the whole sequence, float64 softmax
    whole = tok.encode(prompt + target)
    ctx = tok.encode(prompt)
    cont = whole[len(ctx):]
    assert len(cont) >= 3 and whole[:len(ctx)] == ctx
    probs = softmax64(np.array(model(mx.array(whole)[None])[0].astype(mx.float32)), temperature)
    newline = [i for i in range(tok.vocab_size) if tok.convert_ids_to_tokens([i])[0] == "<0x0A>"]
    assert sorted(P.stop_token_ids(tok, ["\n"])) == sorted([tok.eos_id, *newline])
    ref = np.prod([probs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)])
    ref *= probs[len(whole) - 1, tok.eos_id] + probs[len(whole) - 1, newline].sum()
    assert got["target_tokens"] == [len(cont)]
    assert got["p_exact"] == pytest.approx(ref, rel=1e-4)
    # two targets: disjoint events, the probabilities add
    two = P.p_exact(model, tok, P.Item(id="b", prompt=prompt, targets=[target, " the mat"], stop=["\n"]), temperature)
    one = P.p_exact(model, tok, P.Item(id="c", prompt=prompt, targets=[" the mat"], stop=["\n"]), temperature)
    assert two["p_exact"] == pytest.approx(got["p_exact"] + one["p_exact"], rel=1e-9)


def test_sampling_until_pass_agrees_with_p_exact(tok):
    model = peaked_model(tok)
    # only ' answer answer' then EOS passes (no stop string; other tokenisations are negligible here)
    item = P.Item(id="x", prompt="The correct answer", targets=[" answer answer"], stop=[])
    exact = P.p_exact(model, tok, item, 1.0)["p_exact"]
    assert 0.05 < exact < 0.3
    cfg = P.PassUntilConfig(r=40, max_samples=3000, batch_size=64, temperature=1.0, seed=1)
    row = P.measure_item(model, tok, item, cfg)
    assert not row["censored"] and row["passes"] == 40
    assert row["pu_low"] <= exact <= row["pu_high"], (row, exact)
    assert row["p_exact"] == pytest.approx(exact)


def test_repeated_prompt_cache_equals_tiled_prefill(tok):
    model = init_weights(Model(tiny_args()), 5)
    ids = mx.array(tok.encode("The cat sat on the mat"))
    cache = model.make_cache()
    model(ids[None], cache=cache)
    batch = P._repeat_cache(cache, 3)
    nxt = mx.array([[7], [9], [11]])
    a = model(nxt, cache=batch)[:, -1]
    tiled = model.make_cache()
    model(mx.broadcast_to(ids[None], (3, ids.size)), cache=tiled)
    b = model(nxt, cache=tiled)[:, -1]
    assert mx.abs(a - b).max().item() < 1e-4


def test_grading_as_lm_eval_exact_match():
    item = P.Item(id="1", prompt="Q: 2+2?\nA:", targets=[" 4"], stop=["\n", "Q:"])
    assert P.passes(" 4\nQ: next", item) and P.passes("4 ", item) and not P.passes(" 45", item)
    assert P.passes(" 4Q:", item) and not P.passes("\n4", item)
    loose = P.Item(id="2", prompt="Name it.", targets=["Paris!"], stop=["\n"], ignore_case=True, ignore_punctuation=True)
    assert P.passes(" paris\n", loose)
    assert P._can_still_pass(" 4", item) and P._can_still_pass("  ", item) and not P._can_still_pass(" 5", item)
    # random guessing can pass when the answer is listed in the prompt
    assert P.Item(id="3", prompt="Options: (A) red, (B) blue. Answer:", targets=["blue"]).guessable
    assert not P.Item(id="4", prompt="What is 12 plus 30?", targets=[" 42"]).guessable


def test_read_items_and_errors(tmp_path):
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "p", "targets": ["x"], "stop": ["\n"]}) + "\n"
                 + json.dumps({"prompt": "q", "target": "y"}) + "\n")
    items = P.read_items(f)
    assert [i.id for i in items] == ["a", "1"] and items[1].targets == ["y"] and items[1].stop == ["\n"]
    f.write_text(json.dumps({"id": "a", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="lacks targets"):
        P.read_items(f)
    with pytest.raises(FileNotFoundError):
        P.read_items(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="temperature"):
        P.PassUntilConfig(temperature=0)


def test_run_writes_rows_and_resumes(tok, tmp_path):
    model = peaked_model(tok)
    items = [P.Item(id=str(i), prompt="The correct answer", targets=[" answer" * (i + 1)], stop=[]) for i in range(3)]
    cfg = P.PassUntilConfig(r=2, max_samples=200, batch_size=16, seed=3)
    out = tmp_path / "res.jsonl"
    seen = []
    rows = P.run(model, tok, items, cfg, out, model_name="tiny", progress=lambda *a: seen.append(a))
    assert [r["id"] for r in rows] == ["0", "1", "2"]
    assert ("items", 3, 3) in seen and any(s[0] == "samples" and s[1] > 0 for s in seen)
    for row in rows:
        assert {"id", "model", "n_params", "n_params_nonembedding", "r", "samples", "passes", "censored", "pu", "pu_mle",
                "pu_low", "pu_high", "p_exact"} <= set(row)
        assert row["n_params"] == model.args.num_parameters()
    with pytest.raises(ValueError, match="resume"):
        P.run(model, tok, items, cfg, out, model_name="tiny")
    # a run killed after the first item, half-way through writing the second
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:20])
    again = P.run(model, tok, items, cfg, out, model_name="tiny", resume=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in again] == [strip(r) for r in rows]  # each item's random stream depends on (seed, id) only
    assert len(P.read_results(out)) == 3
    with pytest.raises(ValueError, match="its r is 2"):
        P.run(model, tok, items, P.PassUntilConfig(r=3, max_samples=200), out, model_name="tiny", resume=True)


def test_items_from_local_lm_eval_tasks(tmp_path, monkeypatch):
    """lm-eval task YAMLs over a local JSON file (no network): a generate_until task with its stop strings and
    exact_match options, and a loglikelihood task (arithmetic-style: the continuation is the target, '\\n' ends it)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Question: What is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}",
                                        "options": "red, blue" if i == 2 else ""}) + "\n" for i in range(1, 5)))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {docs}\nvalidation_split: validation\n"
    (tmp_path / "gen.yaml").write_text(
        "task: pu_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{context}}{{options}}'\n"
        "doc_to_target: '{{completion}}'\ngeneration_kwargs:\n  until: [\"\\n\", \"Question:\"]\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n")
    (tmp_path / "ll.yaml").write_text(
        "task: pu_ll\n" + common + "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{completion}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    items = P.task_items(["pu_gen", "pu_ll"], limit=3, include_path=str(tmp_path))
    gen = [i for i in items if i.task == "pu_gen"]
    ll = [i for i in items if i.task == "pu_ll"]
    assert len(gen) == 3 and len(ll) == 3
    assert gen[0].prompt == "Question: What is 1 plus 1?\nAnswer:" and gen[0].targets == [" 2"]
    assert gen[0].stop == ["\n", "Question:"] and gen[0].ignore_case and gen[0].max_tokens == 12
    assert ll[2].targets == [" 6"] and ll[2].stop == ["\n"] and ll[2].max_tokens is None
    assert not gen[0].guessable and not gen[2].guessable
    assert P.passes(" 6\nQuestion: next", ll[2])

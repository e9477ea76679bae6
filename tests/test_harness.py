"""The lm-eval backend against direct computations with the model, and `mlx-openelm eval` end to end
on a local lm-eval task (YAML + JSONL written here, no network)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from conftest import tiny_args, write_hf_checkpoint
from mlx_openelm.generate.stream import generate
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'mlx-openelm[eval]')")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from mlx_openelm.eval import paper  # noqa: E402
from mlx_openelm.eval.harness import OpenELMLM, encode_pair, score_tokens  # noqa: E402


@pytest.fixture(scope="module")
def model_tok(sp_model_path):
    return init_weights(Model(tiny_args()), seed=3), Tokenizer(sp_model_path)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def direct(model, ctx, cont):
    """Sum of log p(cont | ctx) and greedy-ness from one unbatched forward pass, in float64."""
    logits = np.array(model(mx.array([list(ctx) + list(cont)]))[0], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    pos = [len(ctx) - 1 + j for j in range(len(cont))]  # position p predicts token p + 1
    total = sum(logp[p, t] for p, t in zip(pos, cont))
    return total, all(int(np.argmax(logits[p])) == t for p, t in zip(pos, cont))


class LmEvalSplit(TemplateLM):
    """lm-eval's own context/continuation split (TemplateLM.loglikelihood + _encode_pair) with an
    HF-style tok_encode (add_bos_token=True), as the reference for ours."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    @property
    def prefix_token_id(self):
        return self.tok.bos_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        add = (not string.startswith("<s>")) if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, add_bos=add)

    def _loglikelihood_tokens(self, requests, **kwargs):
        return [(ctx, cont) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


PAIRS = [
    ("The cat", " sat on the mat"),
    ("The cat ", "sat on the mat"),  # trailing space moves to the continuation
    ("The ca", "t sat"),  # the first continuation token straddles the boundary
    ("Question: is the sky blue?\nAnswer:", " true"),
    ("red  ", " blue"),
    ("", "the dog runs fast"),  # empty context: BOS alone
]


def test_encode_pair_is_lm_evals_split(model_tok):
    _, tok = model_tok
    ref = LmEvalSplit(tok).loglikelihood([req("loglikelihood", c, x) for c, x in PAIRS])
    ours = [encode_pair(tok, c, x) for c, x in PAIRS]
    assert ours == [(list(a), list(b)) for a, b in ref]
    assert ours[0] == ours[1]
    ctx, cont = ours[2]  # "The ca|t sat": the split is at the context's token count of the whole
    assert ctx == tok.encode("The ca") and cont == tok.encode("The cat sat")[len(ctx):]
    assert ours[5][0] == [tok.bos_id] and all(o[0][0] == tok.bos_id for o in ours)


def test_loglikelihood_matches_direct_batched_and_one_by_one(model_tok):
    model, tok = model_tok
    requests = [req("loglikelihood", c, x) for c, x in PAIRS]
    seen = []
    batched = OpenELMLM(model=model, tokenizer=tok, batch_size=4, progress=lambda *a: seen.append(a)).loglikelihood(requests)
    assert seen == [("loglikelihood", 0, 6), ("loglikelihood", 4, 6), ("loglikelihood", 6, 6)]
    single = OpenELMLM(model=model, tokenizer=tok, batch_size=1).loglikelihood(requests)
    for (c, x), b, s in zip(PAIRS, batched, single):
        want, greedy = direct(model, *encode_pair(tok, c, x))
        assert b[0] == pytest.approx(want, rel=1e-4, abs=1e-3)
        assert s[0] == pytest.approx(want, rel=1e-4, abs=1e-3)
        assert b[1] == s[1] == greedy


def test_is_greedy_and_left_truncation(model_tok):
    model, tok = model_tok
    ctx = tok.encode("the small red dog")
    greedy = []
    for _ in range(4):
        logits = model(mx.array([ctx + greedy]))[0, -1]
        greedy.append(int(mx.argmax(logits).item()))
    other = greedy[:2] + [(greedy[2] + 1) % tok.vocab_size] + greedy[3:]
    (lp_g, is_g), (lp_o, is_o) = score_tokens(model, [(ctx, greedy), (ctx, other)], batch_size=2)
    assert is_g and not is_o
    assert lp_g == pytest.approx(direct(model, ctx, greedy)[0], rel=1e-4, abs=1e-3)
    assert lp_o < lp_g
    # A sequence longer than max_length + 1 keeps its last max_length + 1 tokens (HFLM).
    long_ctx = tok.encode("the cat sat on the mat and the dog runs fast on the blue river")
    cont = tok.encode("red light", add_bos=False)
    (lp, _), = score_tokens(model, [(long_ctx, cont)], max_length=8)
    kept = (long_ctx + cont)[-9:]
    assert lp == pytest.approx(direct(model, kept[:-len(cont)], cont)[0], rel=1e-4, abs=1e-3)


def test_loglikelihood_rolling(model_tok):
    model, tok = model_tok
    text = "The cat sat on the mat. The dog runs fast on the blue river near the city."
    ids = tok.encode(text, add_bos=False)
    lm = OpenELMLM(model=model, tokenizer=tok, batch_size=3)
    (whole,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert whole == pytest.approx(direct(model, [tok.bos_id], ids)[0], rel=1e-4, abs=1e-3)
    # Short windows: every token scored once, each window from its own forward pass.
    small = OpenELMLM(model=model, tokenizer=tok, batch_size=3, max_length=8)
    (windowed,) = small.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.bos_id, 8, 1)]
    assert sum(len(p) for _, p in windows) == len(ids) and len(windows) > 2
    assert windowed == pytest.approx(sum(direct(model, c, p)[0] for c, p in windows), rel=1e-4, abs=1e-3)


def test_generate_until_honours_request_kwargs(model_tok):
    model, tok = model_tok
    lm = OpenELMLM(model=model, tokenizer=tok)
    prompt = "the cat sat on"
    ref = generate(model, tok, prompt, max_tokens=12)
    assert len(ref) > 4
    stop = ref[2:4]
    outs = lm.generate_until([
        req("generate_until", prompt, {"until": ["\u2603never"], "max_gen_toks": 12, "do_sample": False}),
        req("generate_until", prompt, {"until": [stop], "max_gen_toks": 12, "temperature": 0.0}),
        req("generate_until", prompt, {"until": [], "max_gen_toks": 3}),
    ])
    assert outs[0] == ref
    assert outs[1] == ref[:ref.find(stop)]
    assert outs[2] == generate(model, tok, prompt, max_tokens=3)
    # Sampling follows the request (seeded per call, so repeatable); unknown options are refused.
    sampled = [req("generate_until", prompt, {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 5.0})] * 3
    first, second = lm.generate_until(sampled), lm.generate_until(sampled)
    assert first == second and any(s != ref for s in first)
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([req("generate_until", prompt, {"until": [], "num_beams": 4})])
    # The context is left-truncated to leave room for max_gen_toks.
    short = OpenELMLM(model=model, tokenizer=tok, max_length=10)
    long_prompt = "the cat sat on the mat and the dog runs fast on the river"
    (out,) = short.generate_until([req("generate_until", long_prompt, {"until": [], "max_gen_toks": 4})])
    assert out == generate(model, tok, tok.encode(long_prompt)[-6:], max_tokens=4)


def test_paper_rows_and_comparison(tmp_path):
    assert paper.paper_model("apple/OpenELM-1_1B-Instruct") == "1_1B-Instruct"
    assert paper.paper_model("/models/mlx-community--OpenELM-270M-4bit") == "270M"
    assert paper.paper_model("OpenELM-3B") == "3B" and paper.paper_model("OpenELM-tiny") is None
    row = paper.paper_row("apple/OpenELM-270M")
    assert row["hellaswag"] == 46.71 and row["average"] == 54.37
    assert math.isclose(sum(row[t] for t in paper.PAPER_TASKS) / 7, row["average"], abs_tol=0.01)
    results = {t: {"acc": 0.5, "acc_norm": 0.6, "acc_stderr": 0.01} for t in paper.PAPER_TASKS}
    for t in ("boolq", "winogrande"):
        del results[t]["acc_norm"]
    cmp = paper.compare(results, "apple/OpenELM-270M")
    by = {r["task"]: r for r in cmp["rows"]}
    assert by["hellaswag"]["metric"] == "acc_norm" and by["hellaswag"]["ours"] == pytest.approx(60.0)
    assert by["hellaswag"]["delta"] == pytest.approx(60.0 - 46.71)
    assert by["sciq"]["metric"] == "acc" and by["sciq"]["paper"] == 84.70
    assert cmp["average"]["ours"] == pytest.approx((3 * 60 + 4 * 50) / 7)
    assert cmp["average"]["paper"] == 54.37
    partial = paper.compare({"boolq": {"acc": 0.5}}, "apple/OpenELM-270M")
    assert partial["average"]["paper"] is None and partial["rows"][0]["paper"] == 53.98
    from mlx_openelm.utils import write_json

    out = write_json(tmp_path / "sub" / "r.json", {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and [p.name for p in out.parent.iterdir()] == ["r.json"]


TASK_YAML = """task: mytask
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""

# With the seed-5 tiny model and the fixture tokenizer these labels win only per character, so
# acc (0.0) and acc_norm (1.0) differ and a swap of the two would show.
DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "question answer true false"], "label": 1},
    {"question": "Please choose the correct answer: red or", "choices": ["dark", "green"], "label": 1},
]


def test_eval_command_runs_a_local_lm_eval_task(tmp_path, sp_model_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what the command sets, undone after the test
    folder = tmp_path / "OpenELM-tiny"
    model = write_hf_checkpoint(folder, tiny_args(), seed=5, tokenizer=sp_model_path)
    try:
        from mlx_openelm.io.load import load

        load(folder)
    except ImportError as e:
        pytest.skip(f"mlx_openelm.io.load cannot load a model folder yet ({e})")
    tok = Tokenizer(sp_model_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mytask.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf-cache"))
    out = tmp_path / "results.json"

    from mlx_openelm.cli import main

    main(["eval", "--model", str(folder), "--tasks", "mytask", "--include-path", str(tasks),
          "--batch-size", "3", "--output", str(out)])
    assert "mytask" in capsys.readouterr().out
    report = json.loads(out.read_text())

    hits = {"acc": [], "acc_norm": []}
    for d in DOCS:  # lm-eval's multiple choice: context = text, continuation = " " + choice
        ctx = tok.encode(d["question"])
        lls = [direct(model, ctx, tok.encode(d["question"] + " " + c)[len(ctx):])[0] for c in d["choices"]]
        hits["acc"].append(int(np.argmax(lls)) == d["label"])
        hits["acc_norm"].append(int(np.argmax([ll / len(c) for ll, c in zip(lls, d["choices"])])) == d["label"])
    res = report["results"]["mytask"]
    assert res["acc"] == pytest.approx(np.mean(hits["acc"]))
    assert res["acc_norm"] == pytest.approx(np.mean(hits["acc_norm"]))
    assert res["acc"] != res["acc_norm"], "pick DOCS labels on which the two metrics differ"
    assert report["n_samples"]["mytask"] == 2 and report["suite"] == "lm-eval"
    assert report["prompt_precision"] == "bfloat16" and "kernels" in report["compute"]  # how it was computed (default)
    assert report["comparison"]["paper_model"] is None


@pytest.mark.parametrize("args, message", [
    (["--protocol", "generate"], "--protocol applies"),
    (["--data", "commonsense", "--num-fewshot", "5"], "--num-fewshot"),
])
def test_eval_rejects_options_of_the_other_suite(args, message, capsys):
    from mlx_openelm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "/no/such/model", *args])
    assert e.value.code == 1
    assert message in capsys.readouterr().err


def test_registered_and_missing_lm_eval_message(monkeypatch, capsys):
    import importlib.util

    from lm_eval.api.registry import get_model

    from mlx_openelm.cli import main

    assert get_model("mlx-openelm") is OpenELMLM
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SystemExit):
        main(["eval", "--model", "/no/such/model"])
    assert "pip install 'mlx-openelm[eval]'" in capsys.readouterr().err

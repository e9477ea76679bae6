"""Commonsense evaluation: answer extraction, both protocols against one-sequence-at-a-time
references on a tiny random OpenELM, and the test sets rebuilt from (offline) Hub parquet files."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx
from conftest import EVAL_NO_INPUT, TRAIN_NO_INPUT, fake_hub_cache, tiny_args

from mlx_openelm.eval import commonsense as E
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer


# -- answer extraction ------------------------------------------------------------------------


def test_extract_answer_follows_llm_adapters():
    ex = E.extract_answer
    assert ex("ARC-Easy", "the correct answer is answer3, not answer1") == "answer3"  # first match
    assert ex("ARC-Easy", "I do not know") == ""
    assert ex("boolq", "True") == ""  # case-sensitive
    assert ex("boolq", "it is false, so true") == "false"
    # findall scans inside words: "answers1" holds no "answer<digit>", "solution12" holds "solution1"
    assert ex("openbookqa", "answers1") == ""
    assert ex("piqa", "solution12") == "solution1"
    assert ex("hellaswag", "ending5 ending4") == "ending4"
    assert ex("winogrande", "Option1 option2") == "option2"
    # a full decoded sequence: only the part after the first "### Response:" (and before a second)
    full = EVAL_NO_INPUT.replace("INS", "Answer format: answer1/answer2") + "the correct answer is answer2\n### Response: answer1"
    assert ex("social_i_qa", full) == "answer2"
    with pytest.raises(ValueError, match="unknown task"):
        ex("mmlu", "x")


def test_generation_accuracy_on_hand_made_outputs():
    recs = [{"answer": a} for a in ("answer2", "answer1", "answer3", "answer4")]
    texts = [
        "### Response:\n                the correct answer is answer2",  # right
        "answer1 or maybe answer2",  # right (first match)
        "the correct answer is Answer3",  # wrong: case
        "",  # wrong: nothing
    ]
    acc, preds = E.generation_accuracy("ARC-Challenge", texts, recs)
    assert preds == ["answer2", "answer1", "", ""] and acc == 0.5


def test_answer_candidates():
    assert E.answer_candidates("q?\n\nAnswer format: true/false") == ["true", "false"]
    assert E.answer_candidates("s\n\nOption1: Sarah Option2: Maria Answer format: option1/option2") == ["option1", "option2"]
    assert E.answer_candidates("q\n\nAnswer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3/answer4/answer5")[-1] == "answer5"
    with pytest.raises(ValueError, match="Answer format"):
        E.answer_candidates("Answer format: true/false\nno format here")


# -- tiny model fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return init_weights(Model(tiny_args()), seed=3)


@pytest.fixture(scope="module")
def tok(sp_model_path):
    """conftest's tokenizer keeps every space, like Llama's, so the 16-space indentation of the
    prompts survives."""
    return Tokenizer(sp_model_path)


def test_tokenizer_boundary_of_the_continuation(tok):
    """The context's trailing whitespace belongs to the continuation (lm-eval's rule): encoding
    the whole context would split its last space from "the" ("▁t" is one piece here)."""
    context = TRAIN_NO_INPUT.replace("INS", "q?\n\nAnswer format: true/false").replace("OUT", "")
    ctx, cont = E.encode_choice(tok, "q?\n\nAnswer format: true/false", "true")
    whole, n_ctx = ctx + cont, len(ctx)
    assert whole == tok.encode(context + "the correct answer is true", add_bos=True)
    assert whole[:n_ctx] == tok.encode(context.rstrip(), add_bos=True)
    assert tok.decode(whole[n_ctx:]) == "\n                the correct answer is true"
    assert whole[: len(tok.encode(context, add_bos=True))] != tok.encode(context, add_bos=True)


def _mc(task_word, question, n, answer):
    if task_word == "true":
        ins = f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false"
    else:
        opts = " ".join(f"{task_word.capitalize()}{i}: {w}" for i, w in enumerate(["red cat", "blue dog", "green tree", "dark river"][:n], 1))
        ins = f"Please choose the correct answer to the question: {question}\n\n{opts}\n\nAnswer format: " + "/".join(f"{task_word}{i}" for i in range(1, n + 1))
    return {"instruction": ins, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def reference_loglik(model, tok, instruction, cand):
    """One sequence, full forward, log-softmax, summed over the continuation positions.
    Context tokens: those of the training prompt (output "") without its trailing whitespace."""
    context = TRAIN_NO_INPUT.replace("INS", instruction).replace("OUT", "")
    n_ctx = len(tok.encode(context.rstrip(), add_bos=True))
    whole = tok.encode(context + "the correct answer is " + cand, add_bos=True)
    assert whole[:n_ctx] == tok.encode(context.rstrip(), add_bos=True)  # boundary falls between tokens here
    logits = model(mx.array([whole]))[0].astype(mx.float32)
    logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return float(sum(logp[p - 1, whole[p]] for p in range(n_ctx, len(whole))))


def test_loglikelihood_protocol_matches_reference(model, tok):
    boolq = [_mc("true", q, 2, "true") for q in ("is the cat red", "does the dog run fast", "is the river dark")]
    piqa = [_mc("solution", "How to open the light", 2, "solution1"), _mc("answer", "Which tree is small", 4, "answer1")]
    ref = {
        "boolq": [[reference_loglik(model, tok, r["instruction"], c) for c in ("true", "false")] for r in boolq],
        "piqa": [[reference_loglik(model, tok, r["instruction"], c) for c in E.answer_candidates(r["instruction"])] for r in piqa],
    }
    # Choose labels so the accuracy is known by construction: boolq records 0, 1 get their best
    # candidate, record 2 its worst; piqa record 0 its best, record 1 its worst.
    def label(r, sc, best):
        cands = E.answer_candidates(r["instruction"])
        r["answer"] = cands[int(np.argmax(sc) if best else np.argmin(sc))]

    for r, sc, best in zip(boolq, ref["boolq"], (True, True, False)):
        label(r, sc, best)
    for r, sc, best in zip(piqa, ref["piqa"], (True, False)):
        label(r, sc, best)
    # acc_norm by hand: continuation lengths are 26 ("...true") and 27 ("...false").
    norm_pred = ["true" if sc[0] / 26 >= sc[1] / 27 else "false" for sc in ref["boolq"]]
    boolq_norm = sum(p == r["answer"] for p, r in zip(norm_pred, boolq)) / 3

    scores = E.choice_scores(model, tok, boolq + piqa, batch_size=3)
    np.testing.assert_allclose(np.concatenate(scores), np.concatenate(ref["boolq"] + ref["piqa"]), rtol=1e-4, atol=1e-3)

    calls = []
    res = E.evaluate(model, tok, {"boolq": boolq, "piqa": piqa}, "loglikelihood", batch_size=4, progress=lambda *a: calls.append(a))
    assert res["boolq"]["acc"] == pytest.approx(2 / 3) and res["boolq"]["n"] == 3
    assert res["boolq"]["acc_norm"] == pytest.approx(boolq_norm)
    assert res["piqa"]["acc"] == pytest.approx(1 / 2)
    assert res["piqa"]["acc_norm"] == pytest.approx(1 / 2)  # equal continuation lengths
    assert res["average"]["acc"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert calls[-1] == ("piqa", 2, 2) and ("boolq", 3, 3) in calls
    assert [c[1] for c in calls if c[0] == "boolq"] == sorted(c[1] for c in calls if c[0] == "boolq")

    limited = E.evaluate(model, tok, {"boolq": boolq}, "loglikelihood", limit=2)
    assert limited["boolq"]["n"] == 2


def test_choice_accuracy_hand_values():
    recs = [_mc("true", "q", 2, "true"), _mc("true", "q", 2, "false"), _mc("answer", "q", 3, "answer3")]
    # raw argmax: true, true, answer3; per char: -26/26=-1 vs -26.5/27=-0.98 -> false
    scores = [[-26.0, -26.5], [-10.0, -20.0], [-3.0, -2.0, -1.0]]
    acc, acc_norm, preds, preds_norm = E.choice_accuracy(recs, scores)
    assert preds == ["true", "true", "answer3"] and preds_norm == ["false", "true", "answer3"]
    assert acc == pytest.approx(2 / 3) and acc_norm == pytest.approx(1 / 3)


def reference_greedy(model, prompt, max_new, eos):
    out = []
    for _ in range(max_new):
        t = int(mx.argmax(model(mx.array([prompt + out]))[0, -1]))
        if t == eos:
            break
        out.append(t)
    return out


def test_batched_greedy_matches_one_at_a_time(model, tok):
    questions = ["is the cat red", "Please choose the correct answer about the small apple tree near the river", "a", "does the dog run fast on the mat", "b c"]
    recs = [_mc("true", q, 2, "true") for q in questions]
    prompts = [tok.encode(EVAL_NO_INPUT.replace("INS", r["instruction"]), add_bos=True) for r in recs]
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ: real padding
    # Use a token that some prompt j greedily produces after k >= 1 other tokens as "EOS", so
    # that one row stops early while others go on.
    free = [reference_greedy(model, p, 6, -1) for p in prompts]
    eos, j, k = next((f[k], j, k) for j, f in enumerate(free) for k in range(1, 6) if f[k] not in f[:k])
    refs = [reference_greedy(model, p, 6, eos) for p in prompts]
    assert len(refs[j]) == k and any(len(r) == 6 for r in refs)
    assert E.greedy_generate(model, prompts, 6, eos) == refs
    assert E.greedy_generate(model, prompts[1:4], 6, eos) == refs[1:4]

    res = E.evaluate(model, tok, {"boolq": recs}, "generate", batch_size=2, max_new_tokens=6, details=True)
    plain = [f[: f.index(tok.eos_id)] if tok.eos_id in f else f for f in free]  # stop at the real EOS
    texts = [tok.decode(p + g) for p, g in zip(prompts, plain)]
    assert res["boolq"]["outputs"] == [t.split("### Response:")[1].strip() for t in texts]
    assert res["boolq"]["predictions"] == [E.extract_answer("boolq", t) for t in texts]
    assert res["boolq"]["acc"] == sum(p == "true" for p in res["boolq"]["predictions"]) / 5
    assert "acc_norm" not in res["boolq"] and set(res["average"]) == {"acc"}
    with pytest.raises(ValueError, match="protocol"):
        E.evaluate(model, tok, {"boolq": recs}, "beam")


# -- test sets ----------------------------------------------------------------------------------

HUB_ROWS = {
    "boolq": {"question": "does ethanol take more energy make that produces", "answer": False, "passage": "p"},
    "piqa": {
        "goal": "How do I ready a guinea pig cage for it's new occupants?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.",
        "label": 0,
    },
    "social_i_qa": {
        "context": "Tracy didn't go home that evening and resisted Riley's attacks.",
        "question": "What does Tracy need to do before this?",
        "answerA": "make a new plan", "answerB": "Go home and see Riley", "answerC": "Find somewhere to go", "label": "3",
    },
    "hellaswag": {
        "activity_label": "Playing drums", "ctx": "People are standing behind large drums. A man", "ctx_a": "x", "ctx_b": "y",
        "endings": ["is playing a bag pipe.", "starts to play around the drums.", "begins playing a drum set.", "begins playing the drums."],
        "label": "3",
    },
    "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"},
    "ARC-Easy": {
        "question": "When a rock is placed in a graduated cylinder containing water, the height of the water will",
        "choices": {"text": ["decrease", "increase", "remain the same"], "label": ["1", "2", "3"]}, "answerKey": "2",
    },
    "ARC-Challenge": {
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.", "Planetary days will become shorter.", "Planetary gravity will become stronger."], "label": ["A", "B", "C", "D"]},
        "answerKey": "C",
    },
    "openbookqa": {
        "question_stem": "There is most likely going to be fog around:",
        "choices": {"text": ["a marsh", "a tundra", "the plains", "a desert"], "label": ["A", "B", "C", "D"]}, "answerKey": "A",
    },
}

# Instructions as they stand in LLM-Adapters' dataset/<task>/test.json (hellaswag from a
# published LLM-Adapters evaluation example).
EXPECTED = {
    "boolq": ("Please answer the following question with true or false, question: does ethanol take more energy make that produces?\n\nAnswer format: true/false", "false"),
    "piqa": ("Please choose the correct solution to the question: How do I ready a guinea pig cage for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.\n\nSolution2: Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.\n\nAnswer format: solution1/solution2", "solution1"),
    "social_i_qa": ("Please choose the correct answer to the question: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?\n\nAnswer1: make a new plan Answer2: Go home and see Riley Answer3: Find somewhere to go\n\nAnswer format: answer1/answer2/answer3", "answer3"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: Playing drums: People are standing behind large drums. A man\n\nEnding1: is playing a bag pipe. Ending2: starts to play around the drums. Ending3: begins playing a drum set. Ending4: begins playing the drums.\n\nAnswer format: ending1/ending2/ending3/ending4", "ending4"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: Sarah was a much better surgeon than Maria so _ always got the easier cases.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2", "option2"),
    "ARC-Easy": ("Please choose the correct answer to the question: When a rock is placed in a graduated cylinder containing water, the height of the water will\n\nAnswer1: decrease Answer2: increase Answer3: remain the same\n\nAnswer format: answer1/answer2/answer3", "answer2"),
    "ARC-Challenge": ("Please choose the correct answer to the question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?\n\nAnswer1: Planetary density will decrease. Answer2: Planetary years will become longer. Answer3: Planetary days will become shorter. Answer4: Planetary gravity will become stronger.\n\nAnswer format: answer1/answer2/answer3/answer4", "answer3"),
    "openbookqa": ("Please choose the correct answer to the question: There is most likely going to be fog around:\n\nAnswer1: a marsh Answer2: a tundra Answer3: the plains Answer4: a desert\n\nAnswer format: answer1/answer2/answer3/answer4", "answer1"),
}


def _write_hub_parquets(cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_repo = {}
    for task, (repo, revision, filename) in E.HUB_SOURCES.items():
        by_repo.setdefault((repo, revision), {})[filename] = task
    for (repo, revision), files in by_repo.items():
        contents = {}
        for filename, task in files.items():
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist([HUB_ROWS[task]]), sink)
            contents[filename] = sink.getvalue().to_pybytes()
        fake_hub_cache(cache, repo, contents, revision=revision)


def test_hub_test_sets_in_llm_adapters_format(offline_hub):
    pytest.importorskip("pyarrow")
    with pytest.raises(FileNotFoundError, match="pass --data FOLDER"):
        E.build_hub_test_set("boolq")
    _write_hub_parquets(offline_hub)
    sets = E.load_eval_sets("commonsense")
    assert list(sets) == list(E.TASKS)
    for task, (instruction, answer) in EXPECTED.items():
        assert sets[task] == [{"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}], task
        assert E.answer_candidates(instruction)[-1].endswith(instruction[-1])


def test_missing_pyarrow_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        E.build_hub_test_set("piqa")


def test_load_eval_sets_from_folder(tmp_path):
    for task in ("boolq", "winogrande"):
        (tmp_path / task).mkdir()
        instruction, answer = EXPECTED[task]
        (tmp_path / task / "test.json").write_text(json.dumps([{"instruction": instruction, "input": "", "output": "o", "answer": answer}], indent=4))
    sets = E.load_eval_sets(tmp_path, ["boolq", "winogrande"])
    assert sets["winogrande"][0]["answer"] == "option2"
    with pytest.raises(FileNotFoundError, match="piqa/test.json"):
        E.load_eval_sets(tmp_path, ["boolq", "piqa"])
    with pytest.raises(ValueError, match="unknown task"):
        E.load_eval_sets(tmp_path, ["mmlu"])
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([{"instruction": "x", "input": ""}]))
    with pytest.raises(ValueError, match=r"boolq/test.json:1: record has no 'answer' field"):
        E.load_eval_sets(tmp_path, ["boolq"])

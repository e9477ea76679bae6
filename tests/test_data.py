"""LLM-Adapters data handling: template bytes, loading and its errors, the Hub download path
(offline, through a real cache layout), tokenisation and padded batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_openelm  # noqa: F401
from conftest import EVAL_NO_INPUT, TRAIN_NO_INPUT, fake_hub_cache
from mlx_openelm import data as D
from mlx_openelm.tokenizer import Tokenizer

# Literal copies of LLM-Adapters (commit 8166572) finetune.py / commonsense_evaluate.py prompts.
TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                INS\n"
    "                \n"
    "                ### Input:\n"
    "                INP\n"
    "                \n"
    "                ### Response:\n"
    "                OUT"
)


def test_templates_are_byte_exact():
    rec = {"instruction": "INS", "input": "", "output": "OUT", "answer": "x"}
    assert D.generate_prompt(rec, train=True) == TRAIN_NO_INPUT
    assert D.generate_prompt({**rec, "input": "INP"}, train=True) == TRAIN_WITH_INPUT
    assert D.generate_prompt(rec, train=False) == EVAL_NO_INPUT
    # braces in user text are not format fields
    assert "{x}" in D.generate_prompt({**rec, "instruction": "{x}"}, train=True)


def _rec(i, **kw):
    return {"instruction": f"question {i}", "input": "", "output": f"the correct answer is answer{i}", "answer": f"answer{i}", **kw}


def test_load_json_jsonl_and_folders(tmp_path):
    recs = [_rec(1), _rec(2)]
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=4))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert D.load_records(tmp_path / "a.json") == recs
    assert D.load_records(tmp_path / "a.jsonl") == recs
    # input is optional; missing answer becomes ""
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "i", "output": "o"}))
    assert D.load_records(tmp_path / "b.jsonl") == [{"instruction": "i", "input": "", "output": "o", "answer": ""}]

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "train.json").write_text(json.dumps(recs))
    (flat / "test.json").write_text(json.dumps(recs[:1]))
    assert D.load_records(flat) == recs
    assert D.load_records(flat, split="test", required=D.EVAL_FIELDS) == recs[:1]

    tasks = tmp_path / "tasks"
    for name, r in (("piqa", _rec(2)), ("boolq", _rec(1))):
        (tasks / name).mkdir(parents=True)
        (tasks / name / "test.json").write_text(json.dumps([r]))
    assert D.load_records(tasks, split="test") == recs  # boolq before piqa
    with pytest.raises(FileNotFoundError, match="train.json"):
        D.load_records(tasks, split="train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_records(tmp_path / "nope.json")


def test_malformed_records_name_file_and_line(tmp_path):
    recs = [_rec(1), _rec(2), {"instruction": "no output here", "input": ""}, _rec(4)]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(recs, indent=4))
    # the third object opens on line 14 (1 "[" + 2 x 6 lines per 4-field record, then "{")
    assert f.read_text().splitlines()[13].strip() == "{"
    with pytest.raises(ValueError, match=rf"^{f}:14: record has no 'output' field"):
        D.load_records(f)
    assert len(D.load_records(f, required=("instruction",))) == 4

    f2 = tmp_path / "bad.jsonl"
    f2.write_text(json.dumps(_rec(1)) + "\n\n" + '{"instruction": "x", "output": 3}\n')
    with pytest.raises(ValueError, match=rf"^{f2}:3: field 'output' must be a string"):
        D.load_records(f2)
    f3 = tmp_path / "broken.jsonl"
    f3.write_text(json.dumps(_rec(1)) + "\n" + '{"instruction": "x",\n')
    with pytest.raises(ValueError, match=rf"^{f3}:2: invalid JSON"):
        D.load_records(f3)
    f4 = tmp_path / "broken.json"
    f4.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(ValueError, match=rf"^{f4}:3: invalid JSON"):
        D.load_records(f4)
    f5 = tmp_path / "notalist.json"
    f5.write_text('{"instruction": "a"}')
    with pytest.raises(ValueError, match=rf"^{f5}:1: expected a JSON list"):
        D.load_records(f5)
    f6 = tmp_path / "scalar.json"
    f6.write_text('[\n {"instruction": "a", "output": "b"},\n 7\n]')
    with pytest.raises(ValueError, match=rf"^{f6}:3: a record must be a JSON object"):
        D.load_records(f6)


def test_fetch_commonsense_170k_offline(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"LLM-Adapters/tree/main/ft-training_set and pass --data PATH") as e:
        D.fetch_commonsense_170k()
    assert "\n" not in str(e.value)

    recs = [_rec(1), _rec(2), _rec(3)]
    fake_hub_cache(offline_hub, D.COMMONSENSE_REPO, {D.COMMONSENSE_FILE: json.dumps(recs).encode()})
    path = D.fetch_commonsense_170k()
    assert path.name == D.COMMONSENSE_FILE and str(offline_hub) in str(path)
    assert D.load_train_data("commonsense") == recs


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


def test_encode_record_as_llm_adapters(tok):
    rec = {"instruction": "Please choose the correct solution\n\nAnswer format: solution1/solution2", "input": "", "output": "the correct answer is solution2", "answer": "solution2"}
    full = tok.encode(TRAIN_NO_INPUT.replace("INS", rec["instruction"]).replace("OUT", rec["output"]), add_bos=True)
    user = tok.encode(TRAIN_NO_INPUT.replace("INS", rec["instruction"]).replace("OUT", ""), add_bos=True)
    assert full[0] == tok.bos_id and full[-1] != tok.eos_id

    ids, mask = D.encode_record(tok, rec, cutoff_len=256)
    assert ids == full + [tok.eos_id] and mask == [1] * len(ids)
    ids, mask = D.encode_record(tok, rec, cutoff_len=256, train_on_inputs=False)
    assert ids == full + [tok.eos_id]
    assert mask == [0] * len(user) + [1] * (len(ids) - len(user))
    # As LLM-Adapters, the mask covers len(tokens of the prompt alone); with Llama-style whitespace the
    # prompt's trailing indentation may tokenize differently inside the full text, so no prefix claim.

    # truncated: exactly cutoff_len tokens and no EOS; also when equal to cutoff_len
    ids, mask = D.encode_record(tok, rec, cutoff_len=20)
    assert ids == full[:20] and len(mask) == 20
    ids, _ = D.encode_record(tok, rec, cutoff_len=len(full))
    assert ids == full
    ids, mask = D.encode_record(tok, rec, cutoff_len=len(full) + 1)
    assert ids == full + [tok.eos_id]
    # prompt longer than cutoff: everything masked
    _, mask = D.encode_record(tok, rec, cutoff_len=10, train_on_inputs=False)
    assert mask == [0] * 10


def test_split_train_val():
    recs = list(range(50))
    tr, va = D.split_train_val(recs, 12, seed=3)
    assert len(va) == 12 and len(tr) == 38 and sorted(tr + va) == recs
    assert D.split_train_val(recs, 12, seed=3) == (tr, va)
    assert D.split_train_val(recs, 12, seed=4)[1] != va
    assert D.split_train_val(recs, 0) == (recs, [])
    with pytest.raises(ValueError, match="val_size"):
        D.split_train_val(recs, 50)


def _encoded(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(2, 40))
        ids = [1] + [int(x) for x in rng.integers(3, 300, L - 1)]
        mask = [int(x) for x in rng.integers(0, 2, L)]
        out.append((ids, mask))
    return out


def test_iterate_batches_padding_and_coverage():
    enc = _encoded(37)
    seen = []
    for inputs, targets, mask in D.iterate_batches(enc, 8, shuffle=True, seed=1, epoch=0):
        inputs, targets, mask = np.array(inputs), np.array(targets), np.array(mask)
        assert inputs.dtype == np.int32 and targets.dtype == np.int32 and inputs.shape == targets.shape == mask.shape
        for row in range(inputs.shape[0]):
            n = int((inputs[row] != 0).sum())  # ids are never 0 in this fixture
            match = [k for k, (ids, m) in enumerate(enc) if ids[:-1] == inputs[row, :n].tolist()]
            k = match[0]
            ids, m = enc[k]
            assert targets[row, :n].tolist() == ids[1:]
            assert mask[row, :n].tolist() == m[1:]
            assert not inputs[row, n:].any() and not targets[row, n:].any() and not mask[row, n:].any()
            seen.append(k)
        assert inputs.shape[1] == max(len(enc[k][0]) for k in seen[-inputs.shape[0]:]) - 1
    assert sorted(seen) == list(range(37))


def test_batch_order_is_explicit_and_resumable():
    lengths = [len(ids) for ids, _ in _encoded(100)]
    a = D.batch_indices(lengths, 8, shuffle=True, seed=5, epoch=2)
    b = D.batch_indices(lengths, 8, shuffle=True, seed=5, epoch=2)
    c = D.batch_indices(lengths, 8, shuffle=True, seed=5, epoch=3)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == 13
    assert any((x != y).any() for x, y in zip(a, c) if len(x) == len(y))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    # the default is uniform shuffling (LLM-Adapters group_by_length=False, CoreNet): consecutive slices of
    # one numpy permutation seeded by (seed, epoch), written out here independently
    perm = np.random.default_rng((5, 2)).permutation(100)
    assert [x.tolist() for x in a] == [perm[i:i + 8].tolist() for i in range(0, 100, 8)]
    # length grouping (opt-in): with one window the batches are cut from length-sorted examples
    bucketed = D.batch_indices(lengths, 8, shuffle=True, seed=5, epoch=2, bucket=True)
    spread = [max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in bucketed]
    spread_plain = [max(lengths[i] for i in x) - min(lengths[i] for i in x) for x in a]
    assert sum(spread) < sum(spread_plain) / 3
    # unshuffled, unbucketed: dataset order
    assert np.concatenate(D.batch_indices(lengths, 8, shuffle=False, bucket=False)).tolist() == list(range(100))

    enc = _encoded(30)
    full = [np.array(x[0]) for x in D.iterate_batches(enc, 4, shuffle=True, seed=9, epoch=1)]
    tail = [np.array(x[0]) for x in D.iterate_batches(enc, 4, shuffle=True, seed=9, epoch=1, start=3)]
    assert len(tail) == len(full) - 3 and all((x == y).all() for x, y in zip(full[3:], tail))

"""Commonsense evaluation (8 tasks of LLM-Adapters) for any causal LM ``model(tokens, cache, mask)``.

Two protocols:

- ``"generate"`` (LLM-Adapters ``commonsense_evaluate.py``): the evaluation prompt, up to 32 new
  tokens, the decoded text split on ``"### Response:"`` and the first match of a per-task regex
  compared with ``answer``. LLM-Adapters decodes with 4-beam search; **we decode greedily**, so
  numbers can differ slightly from theirs.
- ``"loglikelihood"`` (CoreNet ``main_eval_llmadapters.py``, multiple-choice mode, the one Apple
  reports for OpenELM): every candidate of the instruction's ``Answer format:`` line is scored as
  the continuation ``"the correct answer is <cand>"`` of the *training* prompt with ``output=""``.
  ``acc`` takes the highest summed log-probability, ``acc_norm`` the highest log-probability per
  character of that continuation string.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from ..io.hub import dataset_file
from ..data import EVAL_FIELDS, PAD_ID, generate_prompt, load_records
from ..scoring import encode_pair, score_tokens

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
PROTOCOLS = ("loglikelihood", "generate")

_ANSWER_N = "answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS = {
    "boolq": "true|false",
    "piqa": "solution1|solution2",
    "social_i_qa": _ANSWER_N,
    "hellaswag": "ending1|ending2|ending3|ending4",
    "winogrande": "option1|option2",
    "ARC-Easy": _ANSWER_N,
    "ARC-Challenge": _ANSWER_N,
    "openbookqa": _ANSWER_N,
}
RESPONSE_MARK = "### Response:"
MAX_NEW_TOKENS = 32
LIMIT_SHUFFLE_SEED = 83652  # CoreNet shuffles with random.seed(83652) before applying --limit


def extract_answer(task: str, text: str) -> str:
    """The predicted label in a generation, as LLM-Adapters' ``extract_answer``.

    If ``text`` holds ``"### Response:"`` (a full decoded prompt + generation) only the part
    between its first and second occurrence is searched (LLM-Adapters takes ``split(...)[1]``;
    NVlabs' copy takes ``[-1]``). The first match of the case-sensitive ``re.findall`` wins and
    no match gives ``""`` (wrong). ``findall`` matches inside words too: ``"answers1"`` holds
    no ``answer1`` but ``"solution12"`` yields ``"solution1"``."""
    if task not in ANSWER_PATTERNS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if RESPONSE_MARK in text:
        text = text.split(RESPONSE_MARK)[1]
    found = re.findall(ANSWER_PATTERNS[task], text.strip())
    return found[0] if found else ""


def answer_candidates(instruction: str) -> List[str]:
    """Labels listed on the instruction's last line, ``... Answer format: a/b/c``.

    CoreNet matches ``true/false`` or ``<word><N>`` at the line end and enumerates
    ``<word>1..<word>N``; splitting on "/" gives the same list on LLM-Adapters data."""
    last = instruction.split("\n")[-1]
    m = re.search(r"Answer format: (.*)$", last)
    if not m:
        raise ValueError(f"instruction does not end with an 'Answer format: a/b' line: {last[-80:]!r}")
    return [c.strip() for c in m.group(1).split("/") if c.strip()]


# -- generate protocol --------------------------------------------------------------------------


def greedy_generate(model, prompts: Sequence[List[int]], max_new_tokens: int, eos_id: int) -> List[List[int]]:
    """Greedy continuations of a batch of token-id prompts (each stops after EOS, EOS excluded).

    Prompts are left-padded with id 0 into mlx-lm's ``BatchKVCache``: its per-row offsets
    start at ``-padding`` so every row's real tokens get RoPE positions 0, 1, ... (``mx.fast.rope``
    takes a per-row offset vector), and its mask hides the pad keys in every step."""
    L = max(len(p) for p in prompts)
    left = [L - len(p) for p in prompts]
    tokens = mx.array([[PAD_ID] * pad + list(p) for pad, p in zip(left, prompts)], dtype=mx.int32)
    cache = [BatchKVCache(left) for _ in model.layers]
    out: List[List[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        mask = cache[0].make_mask(tokens.shape[1])
        logits = model(tokens, cache=cache, mask=mask)[:, -1]
        tokens = mx.argmax(logits, axis=-1).astype(mx.int32)[:, None]
        for row, t in enumerate(np.array(tokens)[:, 0].tolist()):
            if not done[row]:
                if t == eos_id:
                    done[row] = True
                else:
                    out[row].append(t)
        if done.all():
            break
    return out


def _generate_task(model, tokenizer, records, batch_size, max_new_tokens, tick) -> List[str]:
    prompts = [tokenizer.encode(generate_prompt(r, train=False), add_bos=True) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    texts = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        gen = greedy_generate(model, [prompts[i] for i in idx], max_new_tokens, tokenizer.eos_id)
        for i, g in zip(idx, gen):
            texts[i] = tokenizer.decode(prompts[i] + g)
        tick(len(idx))
    return texts


def generation_accuracy(task: str, texts: Sequence[str], records: Sequence[Dict[str, str]]) -> Tuple[float, List[str]]:
    """Accuracy of decoded generations against ``records[i]["answer"]``, and the predictions."""
    preds = [extract_answer(task, t) for t in texts]
    correct = sum(p == r["answer"] for p, r in zip(preds, records))
    return correct / max(len(records), 1), preds


# -- loglikelihood protocol -----------------------------------------------------------------------


def _continuation(cand: str) -> str:
    return f"the correct answer is {cand}"


def encode_choice(tokenizer, instruction: str, cand: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) of one candidate, split as lm-eval's ``_encode_pair`` (which
    CoreNet uses): the context is the training template with an empty output; its trailing
    whitespace ("\\n" + 16 spaces after "### Response:") moves to the continuation."""
    context = generate_prompt({"instruction": instruction, "input": "", "output": ""}, train=True)
    return encode_pair(tokenizer, context, _continuation(cand))


def choice_scores(model, tokenizer, records: Sequence[Dict[str, str]], batch_size: int = 8, tick=None) -> List[List[float]]:
    """Log-likelihood of every answer candidate of every record (``answer_candidates`` order)."""
    cands = [answer_candidates(r["instruction"]) for r in records]
    seqs, owner = [], []
    for k, (r, cs) in enumerate(zip(records, cands)):
        for c in cs:
            seqs.append(encode_choice(tokenizer, r["instruction"], c))
            owner.append(k)
    remaining = [len(cs) for cs in cands]

    def count(idx):  # report a record once all of its candidates are scored
        finished = 0
        for i in idx:
            remaining[owner[i]] -= 1
            finished += remaining[owner[i]] == 0
        if tick and finished:
            tick(finished)

    flat = [logp for logp, _ in score_tokens(model, seqs, batch_size, tick=count)]
    out, pos = [], 0
    for cs in cands:
        out.append(flat[pos : pos + len(cs)])
        pos += len(cs)
    return out


def choice_accuracy(records: Sequence[Dict[str, str]], scores: Sequence[Sequence[float]]) -> Tuple[float, float, List[str], List[str]]:
    """``acc``, ``acc_norm`` and both predictions from per-candidate log-likelihoods (first
    maximum wins, as ``np.argmax``); ``acc_norm`` divides by ``len("the correct answer is <cand>")``."""
    preds, preds_norm = [], []
    for r, sc in zip(records, scores):
        cands = answer_candidates(r["instruction"])
        preds.append(cands[int(np.argmax(sc))])
        preds_norm.append(cands[int(np.argmax([s / len(_continuation(c)) for s, c in zip(sc, cands)]))])
    n = max(len(records), 1)
    acc = sum(p == r["answer"] for p, r in zip(preds, records)) / n
    acc_norm = sum(p == r["answer"] for p, r in zip(preds_norm, records)) / n
    return acc, acc_norm, preds, preds_norm


# -- driver -------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    records_by_task: Dict[str, List[Dict[str, str]]],
    protocol: str = "loglikelihood",
    limit: Optional[int] = None,
    batch_size: int = 8,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Optional[Callable[[str, int, int], None]] = None,
    details: bool = False,
) -> Dict[str, dict]:
    """Accuracy per task and on average: ``{task: {"acc", "acc_norm" (loglikelihood only), "n"},
    "average": {...}}``. With ``limit`` each task is shuffled with CoreNet's seed (83652) and
    cut to ``limit`` records. ``progress(task, done, total)`` is called as records finish;
    ``details`` adds ``"predictions"`` (and ``"outputs"`` for generate) per task."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    results: Dict[str, dict] = {}
    for task, records in records_by_task.items():
        if task not in ANSWER_PATTERNS:
            raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        records = list(records)
        if limit is not None:
            random.Random(LIMIT_SHUFFLE_SEED).shuffle(records)
            records = records[:limit]
        done = [0]

        def tick(k, task=task, total=len(records)):
            done[0] += k
            if progress:
                progress(task, done[0], total)

        if protocol == "generate":
            texts = _generate_task(model, tokenizer, records, batch_size, max_new_tokens, tick)
            acc, preds = generation_accuracy(task, texts, records)
            res = {"acc": acc, "n": len(records)}
            if details:
                res.update(predictions=preds, outputs=[t.split(RESPONSE_MARK)[1].strip() if RESPONSE_MARK in t else t for t in texts])
        else:
            scores = choice_scores(model, tokenizer, records, batch_size, tick)
            acc, acc_norm, preds, preds_norm = choice_accuracy(records, scores)
            res = {"acc": acc, "acc_norm": acc_norm, "n": len(records)}
            if details:
                res.update(predictions=preds, predictions_norm=preds_norm, scores=scores)
        results[task] = res
    metrics = ("acc", "acc_norm") if protocol == "loglikelihood" else ("acc",)
    tasks = [t for t in results]
    results["average"] = {m: float(np.mean([results[t][m] for t in tasks])) if tasks else 0.0 for m in metrics}
    return results


# -- test sets ----------------------------------------------------------------------------------

# Hub sources of the 8 test sets (LLM-Adapters used the same splits: BoolQ/PIQA/SIQA/HellaSwag/
# WinoGrande validation, ARC and OpenBookQA test). (repo, revision, file). ybisk/piqa and
# allenai/social_i_qa are loading scripts, so PIQA comes from the lm-eval mirror baber/piqa and
# SIQA from the Hub's own parquet conversion branch.
HUB_SOURCES = {
    "boolq": ("google/boolq", "main", "data/validation-00000-of-00001.parquet"),
    "piqa": ("baber/piqa", "main", "piqa_validation.parquet"),
    "social_i_qa": ("allenai/social_i_qa", "refs/convert/parquet", "default/validation/0000.parquet"),
    "hellaswag": ("Rowan/hellaswag", "main", "data/validation-00000-of-00001.parquet"),
    "winogrande": ("allenai/winogrande", "main", "winogrande_xl/validation-00000-of-00001.parquet"),
    "ARC-Easy": ("allenai/ai2_arc", "main", "ARC-Easy/test-00000-of-00001.parquet"),
    "ARC-Challenge": ("allenai/ai2_arc", "main", "ARC-Challenge/test-00000-of-00001.parquet"),
    "openbookqa": ("allenai/openbookqa", "main", "main/test-00000-of-00001.parquet"),
}


_BLANK = "\n\n"


def _record(instruction: str, label: str) -> Dict[str, str]:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {label}", "answer": label}


def _numbered(word: str, texts: Sequence[str], sep: str) -> str:
    return sep.join(f"{word.capitalize()}{i}: {t}" for i, t in enumerate(texts, 1))


def _fmt(word: str, n: int) -> str:
    return "Answer format: " + "/".join(f"{word}{i}" for i in range(1, n + 1))


def _keyed(question: str, choices: dict, key: str) -> Dict[str, str]:
    # ARC / OpenBookQA: choices {"text": [...], "label": ["A", ...] or ["1", ...]}, answerKey.
    texts, labels = list(choices["text"]), list(choices["label"])
    body = f"Please choose the correct answer to the question: {question}\n\n{_numbered('answer', texts, ' ')}\n\n{_fmt('answer', len(texts))}"
    return _record(body, f"answer{labels.index(key) + 1}")


ROW_FORMATS = {
    "boolq": lambda r: _record(
        f"Please answer the following question with true or false, question: {r['question']}?\n\nAnswer format: true/false",
        "true" if r["answer"] else "false",
    ),
    "piqa": lambda r: _record(
        f"Please choose the correct solution to the question: {r['goal']}\n\n{_numbered('solution', [r['sol1'], r['sol2']], _BLANK)}\n\n{_fmt('solution', 2)}",
        f"solution{int(r['label']) + 1}",
    ),
    "social_i_qa": lambda r: _record(
        f"Please choose the correct answer to the question: {r['context']} {r['question']}\n\n"
        f"{_numbered('answer', [r['answerA'], r['answerB'], r['answerC']], ' ')}\n\n{_fmt('answer', 3)}",
        f"answer{int(r['label'])}",
    ),
    "hellaswag": lambda r: _record(
        f"Please choose the correct ending to complete the given sentence: {r['activity_label']}: {r['ctx']}\n\n"
        f"{_numbered('ending', list(r['endings']), ' ')}\n\n{_fmt('ending', len(r['endings']))}",
        f"ending{int(r['label']) + 1}",
    ),
    "winogrande": lambda r: _record(
        f"Please choose the correct answer to fill in the blank to complete the given sentence: {r['sentence']}\n\n"
        f"{_numbered('option', [r['option1'], r['option2']], ' ')} {_fmt('option', 2)}",
        f"option{int(r['answer'])}",
    ),
    "ARC-Easy": lambda r: _keyed(r["question"], r["choices"], r["answerKey"]),
    "ARC-Challenge": lambda r: _keyed(r["question"], r["choices"], r["answerKey"]),
    "openbookqa": lambda r: _keyed(r["question_stem"], r["choices"], r["answerKey"]),
}


def build_hub_test_set(task: str, cache_dir: Optional[str] = None) -> List[Dict[str, str]]:
    """One test set rebuilt from its Hub source (``HUB_SOURCES``) in the LLM-Adapters
    instruction format, through ``hf_hub_download`` (so ``HF_HUB_OFFLINE`` and the cache apply)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the Hub test sets needs pyarrow: pip install pyarrow (or pip install 'mlx-openelm[eval]')") from None
    repo, revision, filename = HUB_SOURCES[task]
    path = dataset_file(repo, filename, task, "download LLM-Adapters' dataset/ folder from GitHub and pass --data FOLDER",
                        revision=revision, cache_dir=cache_dir)
    return [ROW_FORMATS[task](row) for row in pq.read_table(path).to_pylist()]


def load_eval_sets(data, tasks: Optional[Sequence[str]] = None, cache_dir: Optional[str] = None) -> Dict[str, List[Dict[str, str]]]:
    """Test records per task from ``"commonsense"`` (rebuilt from the Hub) or a folder in
    LLM-Adapters' ``dataset/`` layout (``<task>/test.json``)."""
    tasks = list(tasks or TASKS)
    unknown = [t for t in tasks if t not in ANSWER_PATTERNS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; use {', '.join(TASKS)}")
    if str(data) == "commonsense":
        return {t: build_hub_test_set(t, cache_dir) for t in tasks}
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass LLM-Adapters' dataset/ folder (<task>/test.json) or --data commonsense")
    missing = [t for t in tasks if not (folder / t / "test.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(f'{t}/test.json' for t in missing)}; add them or choose tasks with --tasks")
    return {t: load_records(folder / t / "test.json", required=EVAL_FIELDS) for t in tasks}

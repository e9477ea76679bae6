"""Instruction data in the LLM-Adapters format: prompt templates, loading, tokenisation, batches.

Every record has the four LLM-Adapters fields ``instruction``, ``input`` (may be empty),
``output`` (``"the correct answer is <label>"``) and ``answer`` (``<label>``). The templates
below are byte-for-byte those of LLM-Adapters (commit 8166572): training prompts come from
``finetune.py:generate_prompt``, evaluation prompts from ``commonsense_evaluate.py:generate_prompt``.
They differ in whitespace (two spaces after "request." and 16-space blank lines in training).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .io.hub import dataset_file

if TYPE_CHECKING:
    import mlx.core as mx

TRAIN_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
TRAIN_TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "                \n"
    "                ### Input:\n"
    "                {input}\n"
    "                \n"
    "                ### Response:\n"
    "                {output}"
)
EVAL_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Response:\n"
    "                "
)
EVAL_TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "                ### Instruction:\n"
    "                {instruction}\n"
    "\n"
    "                ### Input:\n"
    "                {input}\n"
    "\n"
    "                ### Response:\n"
    "                "
)

FIELDS = ("instruction", "input", "output", "answer")
TRAIN_FIELDS = ("instruction", "output")
EVAL_FIELDS = ("instruction", "answer")

# The Commonsense-170k training set (LLM-Adapters ft-training_set/commonsense_170k.json) as
# mirrored, unchanged, on the Hugging Face Hub.
COMMONSENSE_REPO = "Lohse/commonsense"
COMMONSENSE_FILE = "commonsense_170k.json"
COMMONSENSE_GITHUB = "https://github.com/AGI-Edgerunners/LLM-Adapters/tree/main/ft-training_set"

PAD_ID = 0  # LLM-Adapters pads with id 0 (<unk>), never with EOS


def generate_prompt(record: Dict[str, str], train: bool = True) -> str:
    """The LLM-Adapters prompt of ``record``: the training prompt ends with ``record["output"]``,
    the evaluation prompt ends after "### Response:\\n" plus 16 spaces. A non-empty ``input``
    selects the with-input variant of each template (empty in all commonsense records)."""
    has_input = bool(record.get("input"))
    if train:
        template = TRAIN_TEMPLATE_INPUT if has_input else TRAIN_TEMPLATE
        return template.format(instruction=record["instruction"], input=record.get("input", ""), output=record.get("output", ""))
    template = EVAL_TEMPLATE_INPUT if has_input else EVAL_TEMPLATE
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


# -- loading ---------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _scan_json_array(text: str, file: Path) -> List[Tuple[int, object]]:
    """Parse a JSON array element by element, returning (line number, element) pairs."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if i >= len(text) or text[i] != "[":
        line = text.count("\n", 0, i) + 1
        raise ValueError(f"{file}:{line}: expected a JSON list of records; give a .json list, a .jsonl file or a folder")
    items, line, last = [], 1, 0
    i = _WS.match(text, i + 1).end()
    if i < len(text) and text[i] == "]":
        return items
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}: invalid JSON ({e.msg}); fix the file") from None
        line += text.count("\n", last, i)
        last = i
        items.append((line, obj))
        i = _WS.match(text, end).end()
        if i < len(text) and text[i] == ",":
            i = _WS.match(text, i + 1).end()
            continue
        if i < len(text) and text[i] == "]":
            return items
        at = text.count("\n", 0, i) + 1
        raise ValueError(f"{file}:{at}: invalid JSON (expected ',' or ']'); fix the file")


def read_json_records(file: Path, jsonl: Optional[bool] = None) -> List[Tuple[int, object]]:
    """``(line number, record)`` of a JSON list or of a JSON-lines file (``jsonl``; default: by the
    ``.jsonl`` suffix); a malformed line raises ``ValueError("<file>:<line>: invalid JSON ...")``."""
    file = Path(file)
    text = file.read_text(encoding="utf-8")
    if jsonl if jsonl is not None else file.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{n}: invalid JSON ({e.msg}); fix the line") from None
        return items
    return _scan_json_array(text, file)


def _validate(item: object, file: Path, line: int, required: Sequence[str]) -> Dict[str, str]:
    if not isinstance(item, dict):
        raise ValueError(f"{file}:{line}: a record must be a JSON object with fields {', '.join(FIELDS)}")
    for key in required:
        if key not in item:
            raise ValueError(f"{file}:{line}: record has no {key!r} field; records need {', '.join(required)} (LLM-Adapters format)")
    record = {}
    for key in FIELDS:
        value = item.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"{file}:{line}: field {key!r} must be a string, got {type(value).__name__}")
        record[key] = value
    return record


def _split_file(folder: Path, split: str) -> Optional[Path]:
    for suffix in (".json", ".jsonl"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def load_records(path, split: str = "train", required: Sequence[str] = TRAIN_FIELDS) -> List[Dict[str, str]]:
    """Records from a ``.json`` list, a ``.jsonl`` file, or a folder holding ``<split>.json(l)``
    or per-task subfolders ``<task>/<split>.json(l)`` (concatenated in name order).

    Each record is returned with all four fields as strings (missing optional ones ``""``).
    A malformed record raises ``ValueError("<file>:<line>: ...")``."""
    path = Path(path)
    if path.is_dir():
        direct = _split_file(path, split)
        files = [direct] if direct else [f for d in sorted(path.iterdir()) if d.is_dir() for f in [_split_file(d, split)] if f]
        if not files:
            raise FileNotFoundError(f"no {split}.json or <task>/{split}.json in {path}; pass a .json/.jsonl file or such a folder")
    elif path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"{path}: unsupported data file; use a .json list, a .jsonl file or a folder")
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist; pass a .json/.jsonl file, a folder, or --data commonsense")
    records = [_validate(item, f, line, required) for f in files for line, item in read_json_records(f)]
    if not records:
        raise ValueError(f"{path} holds no records; give a file with at least one {{{', '.join(required)}}} record")
    return records


def fetch_commonsense_170k(cache_dir: Optional[str] = None) -> Path:
    """Path of ``commonsense_170k.json`` in the Hugging Face cache, downloading it if needed, from the
    dataset repo ``Lohse/commonsense`` (``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` apply)."""
    return dataset_file(COMMONSENSE_REPO, COMMONSENSE_FILE, COMMONSENSE_FILE,
                        f"download it from {COMMONSENSE_GITHUB} and pass --data PATH", cache_dir=cache_dir)


def load_train_data(data: str) -> List[Dict[str, str]]:
    """Training records from ``data``: ``"commonsense"`` (Commonsense-170k from the Hub) or a path."""
    path = fetch_commonsense_170k() if data == "commonsense" else Path(data)
    return load_records(path, split="train", required=TRAIN_FIELDS)


def split_train_val(records: Sequence, val_size: int, seed: int = 42) -> Tuple[list, list]:
    """Hold out ``val_size`` randomly chosen records (as LLM-Adapters' ``train_test_split``,
    seed 42 by default; the permutation is numpy's, not the datasets library's)."""
    n = len(records)
    if n == 0:
        raise ValueError("there are no records to split")
    if val_size <= 0:
        return list(records), []
    if val_size >= n:
        raise ValueError(f"val_size {val_size} must be smaller than the {n} records; lower it")
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(perm[:val_size].tolist())
    train = sorted(perm[val_size:].tolist())
    return [records[i] for i in train], [records[i] for i in val]


# -- tokenisation and batches ------------------------------------------------------------------


def encode_record(tokenizer, record: Dict[str, str], cutoff_len: int = 256, train_on_inputs: bool = True) -> Tuple[List[int], List[int]]:
    """Token ids and per-token loss mask of a training record, as LLM-Adapters' ``tokenize``:
    BOS + prompt truncated to ``cutoff_len`` tokens, EOS appended only when shorter than
    ``cutoff_len``. With ``train_on_inputs=False`` the mask is 0 on the tokens of the prompt
    rendered with ``output=""`` (same truncation, no EOS) and 1 elsewhere."""
    ids = tokenizer.encode(generate_prompt(record, train=True), add_bos=True)[:cutoff_len]
    if (not ids or ids[-1] != tokenizer.eos_id) and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_id)
    mask = [1] * len(ids)
    if not train_on_inputs:
        n_prompt = len(tokenizer.encode(generate_prompt({**record, "output": ""}, train=True), add_bos=True)[:cutoff_len])
        mask[:n_prompt] = [0] * min(n_prompt, len(ids))
    return ids, mask


BUCKET_WINDOW = 64  # batches per window whose examples are sorted by length together


def batch_indices(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, bucket: bool = False) -> List[np.ndarray]:
    """Example indices of every batch of one epoch, a pure function of its arguments.

    Shuffled: a uniform permutation from ``np.random.default_rng((seed, epoch))`` (LLM-Adapters'
    ``group_by_length=False``, CoreNet's uniform shuffling); with ``bucket`` (length grouping) each
    window of ``BUCKET_WINDOW * batch_size`` examples is sorted by length before being cut
    into batches, and the batch order is permuted again. Unshuffled: dataset order, or sorted
    by length with ``bucket``. The last batch may be smaller."""
    n = len(lengths)
    lengths = np.asarray(lengths)
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket:
        window = BUCKET_WINDOW * batch_size if shuffle else max(n, 1)
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")] for chunk in np.split(order, range(window, n, window))]) if n else order
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if shuffle and bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def pad_batch(encoded: Sequence[Tuple[List[int], List[int]]], idx: Sequence[int]) -> Tuple["mx.array", "mx.array", "mx.array"]:
    """``(inputs, targets, loss_mask)`` of the examples ``idx``: ``inputs = ids[:-1]``, ``targets = ids[1:]``,
    ``loss_mask = mask[1:]`` (the mask of each target token), right-padded with id 0 and mask 0 to the
    longest example; int32 inputs/targets, float32 mask, each [B, L]."""
    import mlx.core as mx

    width = max(len(encoded[i][0]) for i in idx) - 1
    inputs = np.full((len(idx), width), PAD_ID, np.int32)
    targets = np.full((len(idx), width), PAD_ID, np.int32)
    mask = np.zeros((len(idx), width), np.float32)
    for row, i in enumerate(idx):
        ids, m = encoded[i]
        n = len(ids) - 1
        inputs[row, :n] = ids[:-1]
        targets[row, :n] = ids[1:]
        mask[row, :n] = m[1:]
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def iterate_batches(encoded: Sequence[Tuple[List[int], List[int]]], batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, start: int = 0, bucket: bool = False) -> Iterator[Tuple["mx.array", "mx.array", "mx.array"]]:
    """Padded batches ``(inputs, targets, loss_mask)`` of ``encoded`` (``encode_record`` pairs; see
    ``pad_batch``). The batches of an epoch depend only on ``(seed, epoch)`` (see ``batch_indices``),
    so a trainer resumes exactly by saving the epoch and the number of batches done and passing them
    back as ``epoch`` and ``start``."""
    lengths = [len(ids) for ids, _ in encoded]
    if any(n < 2 for n in lengths):
        raise ValueError("every example needs at least 2 tokens; raise cutoff_len")
    for idx in batch_indices(lengths, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, bucket=bucket)[start:]:
        yield pad_batch(encoded, idx)

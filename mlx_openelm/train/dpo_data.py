"""Preference data for DPO: UltraFeedback (cleaned) or JSONL, and the exact training text of the
OpenELM-Instruct recipe (alignment-handbook @70769f9 + TRL 0.8 ``DPOTrainer.tokenize_row``).

A record has ``prompt`` and ``chosen`` / ``rejected``, each either a list of ``{"role", "content"}``
messages whose last one is the assistant answer (the dataset's format) or a plain string (the
answer; the prompt string is then the one user turn). As alignment-handbook does, the prompt
turns are ``chosen[:-1]`` with an empty system turn inserted first, rendered with OpenELM's
template without a generation prompt; the completion is the template over the final assistant
turn alone, so the token sequence is

    <s><|system|>\\n</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n{response}</s>\\n</s>

(BOS prepended to the prompt, the extra EOS appended to the response, prompt tokens unscored).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..data import read_json_records
from ..tokenizer import with_system_turn

ULTRAFEEDBACK = "ultrafeedback"
ULTRAFEEDBACK_REPO = "csarron/argilla-ultrafeedback-binarized-preferences-cleaned"
SPLITS = ("train", "test")

Messages = List[Dict[str, str]]


@dataclass
class PreferencePair:
    """One preference example, ready for tokenization: the prompt turns (system turn included)
    and the two final assistant answers."""

    prompt: Messages
    chosen: str
    rejected: str


@dataclass
class EncodedPair:
    """Token ids of the two sequences (prompt + response) and where each one's response starts
    (tokens before it are the prompt: not scored)."""

    chosen: List[int]
    chosen_start: int
    rejected: List[int]
    rejected_start: int

    @property
    def length(self) -> int:
        return max(len(self.chosen), len(self.rejected))


# -- records -----------------------------------------------------------------------------------


def _messages(value: Any, where: str, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages or a string")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: every message of {field!r} needs string 'role' and 'content' fields")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: unknown role {m['role']!r} in {field!r}; use system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message of {field!r} must be the assistant's answer")
    return out


def to_pair(item: Any, where: str = "record") -> PreferencePair:
    """A ``PreferencePair`` from a record (message lists or strings); ``ValueError`` naming ``where``."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a preference record must be a JSON object with prompt, chosen and rejected")
    for key in ("chosen", "rejected"):
        if key not in item:
            raise ValueError(f"{where}: record has no {key!r} field; records need prompt, chosen and rejected")
    chosen, rejected = item["chosen"], item["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = item.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: with string answers the record needs a string 'prompt'")
        turns: Messages = [{"role": "user", "content": prompt}]
        answers = chosen, rejected
    else:
        c, r = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        turns = c[:-1]
        if not turns:  # only the answer given: the prompt field is the user turn
            prompt = item.get("prompt")
            if not isinstance(prompt, str):
                raise ValueError(f"{where}: 'chosen' holds only the answer and there is no string 'prompt'")
            turns = [{"role": "user", "content": prompt}]
        answers = c[-1]["content"], r[-1]["content"]
    turns = with_system_turn(turns)  # alignment-handbook's maybe_insert_system_message
    return PreferencePair(turns, answers[0], answers[1])


def read_jsonl(path: Union[str, Path]) -> List[PreferencePair]:
    """Preference pairs from a ``.jsonl`` file (one record a line) or a ``.json`` list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a .jsonl file of preference records or 'ultrafeedback'")
    # a .json list, anything else one record a line
    return [to_pair(item, f"{path}:{n}") for n, item in read_json_records(path, jsonl=path.suffix != ".json")]


def _read_parquet(path: Path) -> List[Dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading the UltraFeedback parquet files needs pyarrow: pip install pyarrow") from e
    return pq.read_table(path, columns=["prompt", "chosen", "rejected"]).to_pylist()


def _split_files(folder: Path, split: str) -> List[Path]:
    files = sorted(p for p in folder.rglob("*.parquet") if p.name.startswith(f"{split}-") or p.parent.name == split)
    return files or sorted(p for p in folder.rglob("*.parquet") if split in p.name)


def fetch_ultrafeedback(revision: Optional[str] = None) -> Path:
    """The parquet files of the cleaned UltraFeedback preferences (HF cache; HF_HUB_OFFLINE applies)."""
    from ..io.hub import download

    return download(ULTRAFEEDBACK_REPO, revision=revision, patterns=("*.parquet",), repo_type="dataset")


def load_preferences(data: Union[str, Path], split: str = "train", limit: Optional[int] = None) -> List[PreferencePair]:
    """Pairs of ``data``: ``"ultrafeedback"`` (the Hub dataset's ``split``: train 60,917 rows, test
    2,000), a ``.jsonl``/``.json`` file, or a folder with ``<split>.jsonl``. ``limit`` keeps the first rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if str(data) == ULTRAFEEDBACK:
        folder = fetch_ultrafeedback()
        files = _split_files(folder, split)
        if not files:
            raise FileNotFoundError(f"no {split} parquet file in the {ULTRAFEEDBACK_REPO} snapshot at {folder}")
        rows = [row for f in files for row in _read_parquet(f)]
        if limit is not None:
            rows = rows[:limit]
        return [to_pair(row, f"{ULTRAFEEDBACK_REPO} {split} row {i}") for i, row in enumerate(rows)]
    path = Path(data)
    if path.is_dir():
        found = [path / f"{split}{s}" for s in (".jsonl", ".json") if (path / f"{split}{s}").is_file()]
        if not found:
            raise FileNotFoundError(f"no {split}.jsonl in {path}; pass a .jsonl file, such a folder or 'ultrafeedback'")
        path = found[0]
    pairs = read_jsonl(path)
    return pairs[:limit] if limit is not None else pairs


# -- tokenization (TRL 0.8 DPOTrainer.tokenize_row) ----------------------------------------------


def training_text(tokenizer, pair: PreferencePair) -> Tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) as alignment-handbook renders them."""
    # pair.prompt already holds the (possibly empty) system turn; the answer is rendered alone.
    render = lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=False, add_empty_system=False)
    prompt = render(pair.prompt)
    answer = lambda text: render([{"role": "assistant", "content": text}])
    return prompt, answer(pair.chosen), answer(pair.rejected)


def _split_answer(tokenizer, prompt: str, answer: str) -> Tuple[List[int], List[int]]:
    """TRL's ``build_tokenized_answer``: tokenize prompt + answer together and cut where the prompt's
    own tokens end (one token earlier if the tokenizer merged across the boundary)."""
    prompt_ids = tokenizer.encode(prompt, add_bos=False)
    full = tokenizer.encode(prompt + answer, add_bos=False)
    start = len(prompt_ids)
    if full[:start] != prompt_ids:
        start -= 1
    return full[:start], full[start:]


def encode_pair(tokenizer, pair: PreferencePair, max_length: int = 1024, max_prompt_length: int = 512) -> EncodedPair:
    """Token ids of both sequences exactly as TRL 0.8 ``tokenize_row`` builds them: BOS + prompt
    (without special tokens), response + EOS; when prompt + the longer response exceed
    ``max_length`` the prompt keeps its last ``max_prompt_length`` tokens (BOS prepended before this
    cut, as TRL 0.8 does, so a cut prompt loses it), and if still too long each response keeps its
    first ``max_length - max_prompt_length`` tokens."""
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    prompt_text, chosen_text, rejected_text = training_text(tokenizer, pair)
    prompt_c, chosen = _split_answer(tokenizer, prompt_text, chosen_text)
    prompt_r, rejected = _split_answer(tokenizer, prompt_text, rejected_text)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    prompt_c, prompt_r = [bos] + prompt_c, [bos] + prompt_r
    chosen, rejected = chosen + [eos], rejected + [eos]
    longer = max(len(chosen), len(rejected))
    prompts = []
    for p in (prompt_c, prompt_r):
        if len(p) + longer > max_length:
            p = p[-max_prompt_length:]  # keep_end
        prompts.append(p)
    answers = []
    for p, a in zip(prompts, (chosen, rejected)):
        if len(p) + longer > max_length:
            a = a[: max_length - max_prompt_length]
        answers.append(a)
    (pc, pr), (ac, ar) = prompts, answers
    return EncodedPair(pc + ac, len(pc), pr + ar, len(pr))


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int = 1024, max_prompt_length: int = 512,
                 progress=None) -> List[EncodedPair]:
    out = []
    for i, pair in enumerate(pairs):
        out.append(encode_pair(tokenizer, pair, max_length, max_prompt_length))
        if progress is not None and ((i + 1) % 256 == 0 or i + 1 == len(pairs)):
            progress("tokenize", i + 1, len(pairs))
    return out


def data_hash(encoded: Sequence[EncodedPair]) -> str:
    """sha256 of every pair's token ids and response starts: the data half of the reference-cache key."""
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.chosen, e.chosen_start, e.rejected, e.rejected_start], separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()

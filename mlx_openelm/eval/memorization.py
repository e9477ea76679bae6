"""Memorization across checkpoints: LLM360's Analysis360 procedure (and Pythia's), on MLX.

For each sequence s of the data: greedy-decode ``l`` tokens after its first ``k`` tokens and
compare them with ``s[k:k+l]``. Per sequence, ``token_match`` = the fraction of the ``l``
positions where the greedy token equals the data token, ``full_match`` = all ``l`` equal
(``k``-extractable). The memorization score of a set of sequences is the mean token_match,
``Σ_seqs Σ_i 1[ĝ_{k+i} = s_{k+i}] / (l · #seqs)`` (Analysis360
``analysis/memorization/single_ckpt_memorization_eval.py``; Biderman et al. 2023).

Data (Analysis360's sampling): a JSONL of ``{"token_ids": [...]}`` rows (LLM360's AmberDatasets
layout), a JSONL of ``{"text": ...}`` rows (tokenized with the model's tokenizer, BOS first, as
training did), or a folder of such files, each file one data chunk (LLM360's ``train_000.jsonl``
...). Each chunk is shuffled with ``seed`` exactly as ``datasets.Dataset.shuffle(seed=seed)``
(``np.random.default_rng(seed).permutation``) and its first ``num_sequences`` rows are kept;
rows shorter than ``k + l`` tokens are skipped (the next rows of the permutation replace them).
Files are read twice as text (count, then only the chosen lines), never held in memory whole.

Greedy decoding is batched: every prompt has exactly ``k`` tokens, so no padding is needed. As
Analysis360's ``model.generate`` (HF, ``eos_token_id`` set), a sequence stops at its first EOS
and later positions count as mismatches (``stop_at_eos``); Pythia instead forbids EOS
(``min_length``): ``stop_at_eos=False`` decodes through it.

Outputs (``run_memorization``): per checkpoint ``<label>/scores.csv`` and ``scores.jsonl``
(per sequence), ``<label>/summary.json``; ``summary.json`` over all; and LLM360's figures
(Figs. 7-9): ``score_distribution.png``, ``chunk_scores.png`` (several chunks),
``score_correlation.png`` (several checkpoints).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..utils import Progress, atomic_folder, check_destination, write_json

DATA_SUFFIXES = (".jsonl", ".json")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass
class MemorizationConfig:
    """Analysis360's defaults: k = l = 32, 1000 sequences per chunk, seed 42."""

    prompt_len: int = 32  # k
    continuation_len: int = 32  # l
    num_sequences: int = 1000  # per chunk
    seed: int = 42
    batch_size: int = 64
    stop_at_eos: bool = True

    def validate(self) -> None:
        for name in ("prompt_len", "continuation_len", "num_sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Chunk:
    """The sampled sequences of one data file: ``tokens[i]`` (k + l tokens) is row ``rows[i]``."""

    name: str
    rows: List[int]
    tokens: np.ndarray  # [N, k + l] int32


@dataclass
class Checkpoint:
    """One model to score: a model (folder, hub id, CoreNet .pt) and optionally an adapter folder."""

    label: str
    model: str
    adapter_path: Optional[str] = None


# ---------------------------------------------------------------- data


def _data_files(data: Path) -> List[Path]:
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{data} holds no .jsonl data chunks")
        return files
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file or folder")
    return [data]


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _read_lines(path: Path, wanted: set) -> Dict[int, str]:
    out = {}
    with open(path, "rb") as f:
        i = 0
        for line in f:
            if not line.strip():
                continue
            if i in wanted:
                out[i] = line.decode("utf-8")
            i += 1
    return out


def _row_tokens(line: str, where: str, encode: Optional[Callable[[str], List[int]]]) -> List[int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg})") from e
    if isinstance(row, dict) and "token_ids" in row:
        ids = row["token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{where}: token_ids must be a list of integers")
        return ids
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        if encode is None:
            raise ValueError(f"{where} has text rows; tokenizing them needs the model's tokenizer")
        return list(encode(row["text"]))
    raise ValueError(f'{where} has neither "token_ids" nor "text"')


def sample_chunk(path: Path, config: MemorizationConfig, encode: Optional[Callable[[str], List[int]]] = None) -> Chunk:
    """Analysis360's sample of one chunk file: shuffle with the seed, keep the first N rows
    with at least k + l tokens, cut to k + l tokens."""
    need = config.prompt_len + config.continuation_len
    n_rows = _count_rows(path)
    order = np.random.default_rng(config.seed).permutation(n_rows)
    rows: List[int] = []
    tokens: List[List[int]] = []
    pos = 0
    while len(rows) < config.num_sequences and pos < n_rows:
        take = [int(i) for i in order[pos:pos + config.num_sequences - len(rows)]]
        pos += len(take)
        lines = _read_lines(path, set(take))
        for i in take:
            ids = _row_tokens(lines[i], f"{path.name} row {i}", encode)
            if len(ids) >= need:
                rows.append(i)
                tokens.append(ids[:need])
    if not rows:
        raise ValueError(f"{path.name} has no row with at least prompt_len + continuation_len = {need} tokens")
    return Chunk(path.stem, rows, np.array(tokens, dtype=np.int32))


def load_data(data: Union[str, Path], config: MemorizationConfig, encode: Optional[Callable[[str], List[int]]] = None) -> List[Chunk]:
    """The sampled chunks of ``data`` (a JSONL file or a folder of them, see the module doc)."""
    config.validate()
    return [sample_chunk(f, config, encode) for f in _data_files(Path(data))]


# ---------------------------------------------------------------- scoring


def greedy_continuations(model, prompts: np.ndarray, length: int, eos_token_id: Optional[int] = None) -> np.ndarray:
    """Greedy ``length`` tokens after each row of ``prompts`` [B, k] (one batch, KV cache).
    With ``eos_token_id``, positions after a row's first EOS are -1 (HF generate pads them)."""
    cache = model.make_cache()
    y = mx.argmax(model(mx.array(prompts), cache=cache)[:, -1, :], axis=-1)
    out = [y]
    for _ in range(length - 1):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(y)
        out.append(y)
    gen = np.array(mx.stack(out, axis=1)).astype(np.int64)
    return gen if eos_token_id is None else _after_eos(gen, eos_token_id)


def _after_eos(gen: np.ndarray, eos_token_id: int) -> np.ndarray:
    """-1 at every position strictly after a row's first EOS (what HF generate pads)."""
    is_eos = gen == eos_token_id
    gen = gen.copy()
    gen[np.cumsum(is_eos, axis=1) - is_eos > 0] = -1
    return gen


def match_scores(generated: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per sequence: (token_match = fraction of equal positions, full_match = all equal)."""
    eq = np.asarray(generated) == np.asarray(truth)
    return eq.mean(axis=1), eq.all(axis=1)


def score_chunks(
    model,
    chunks: Sequence[Chunk],
    config: MemorizationConfig,
    eos_token_id: Optional[int] = None,
    progress: Optional[Progress] = None,
    label: str = "scoring",
) -> List[Dict[str, Any]]:
    """Per-sequence records ``{chunk, row, token_match, full_match, generated}`` of every chunk."""
    k, l, bs = config.prompt_len, config.continuation_len, config.batch_size
    eos = eos_token_id if config.stop_at_eos else None
    total = sum(len(c.rows) for c in chunks)
    done = 0
    records = []
    if progress:
        progress(label, 0, total)
    for chunk in chunks:
        for start in range(0, len(chunk.rows), bs):
            batch = chunk.tokens[start:start + bs]
            gen = greedy_continuations(model, batch[:, :k], l, eos)
            token_match, full_match = match_scores(gen, batch[:, k:k + l])
            for j in range(len(batch)):
                records.append({
                    "chunk": chunk.name, "row": chunk.rows[start + j], "token_match": float(token_match[j]),
                    "full_match": bool(full_match[j]), "generated": [int(t) for t in gen[j]],
                })
            done += len(batch)
            if progress:
                progress(label, done, total)
    return records


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Memorization score (mean token_match), full-match rate, quantiles, per-chunk means."""
    tm = np.array([r["token_match"] for r in records], dtype=np.float64)
    fm = np.array([r["full_match"] for r in records], dtype=np.float64)
    chunks: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(r["chunk"] for r in records):
        sel = np.array([r["chunk"] == name for r in records])
        chunks[name] = {"sequences": int(sel.sum()), "token_match": float(tm[sel].mean()), "full_match": float(fm[sel].mean())}
    return {
        "sequences": len(records),
        "token_match": float(tm.mean()),
        "full_match": float(fm.mean()),
        "quantiles": {str(q): float(np.quantile(tm, q)) for q in QUANTILES},
        "chunks": chunks,
    }


def pearson_matrix(scores: Sequence[np.ndarray]) -> List[List[Optional[float]]]:
    """Pearson correlation of per-sequence scores between checkpoints (None where a score is constant)."""
    out = []
    for a in scores:
        row = []
        for b in scores:
            sa, sb = float(np.std(a)), float(np.std(b))
            row.append(None if sa == 0 or sb == 0 else float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)))
        out.append(row)
    return out


# ---------------------------------------------------------------- checkpoints


def _label_of(model: str, adapter: Optional[str]) -> str:
    base = Path(adapter if adapter else model.rstrip("/"))
    name = base.stem if base.suffix == ".pt" else base.name
    return re.sub(r"[^\w.-]+", "_", name) or "checkpoint"


def adapter_checkpoints(path: Union[str, Path]) -> List[Path]:
    """An adapter folder as given, or every ``step_N`` of a trainer's ``checkpoints/`` folder (or
    of a run folder holding one) in step order, then the run's final adapters if present."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such adapter folder")
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)), key=lambda p: int(p.name[5:]))
    if not steps:
        return [path]
    run = root.parent
    final = [run] if (run / "adapters.safetensors").is_file() else []
    return steps + final


def make_checkpoints(checkpoints: Sequence[str], adapter_paths: Sequence[str] = ()) -> List[Checkpoint]:
    """The models to score. ``checkpoints`` alone: each a full model. With ``adapter_paths``:
    one per checkpoint (paired in order), or one base checkpoint with any number of adapter
    paths; each adapter path may be a trainer ``checkpoints/`` (or run) folder, expanded to its
    ``step_N`` checkpoints."""
    if not checkpoints:
        raise ValueError("checkpoints is empty; give at least one model (folder, hub id or CoreNet .pt)")
    pairs: List[Tuple[str, Optional[str]]]
    if not adapter_paths:
        pairs = [(str(c), None) for c in checkpoints]
    elif len(checkpoints) == 1:
        pairs = [(str(checkpoints[0]), str(a)) for p in adapter_paths for a in adapter_checkpoints(p)]
    elif len(checkpoints) == len(adapter_paths):
        pairs = [(str(c), str(a)) for c, a in zip(checkpoints, adapter_paths)]
    else:
        raise ValueError(f"{len(adapter_paths)} adapter paths for {len(checkpoints)} checkpoints; give one base checkpoint, or one adapter path per checkpoint")
    out, seen = [], {}
    for model, adapter in pairs:
        label = _label_of(model, adapter)
        seen[label] = seen.get(label, 0) + 1
        out.append(Checkpoint(label if seen[label] == 1 else f"{label}-{seen[label]}", model, adapter))
    return out


def _load_checkpoint(ckpt: Checkpoint, dtype: str, tokenizer: Optional[str] = None):
    from ..adapters import ADAPTERS_FILE, CONFIG_FILE
    from ..io.load import load

    adapter = ckpt.adapter_path
    if adapter is not None and not (Path(adapter) / CONFIG_FILE).is_file():
        # a trainer checkpoint whose adapter_config.json lives in the run folder
        run = Path(adapter).parent.parent
        if (run / CONFIG_FILE).is_file() and (Path(adapter) / ADAPTERS_FILE).is_file():
            model, tok = load(ckpt.model, dtype=dtype, tokenizer=tokenizer)
            _load_adapters_with_config(model, Path(adapter), run / CONFIG_FILE)
            return model, tok
    return load(ckpt.model, dtype=dtype, adapter_path=adapter, tokenizer=tokenizer)


def _load_adapters_with_config(model, folder: Path, config_file: Path) -> None:
    import shutil
    import tempfile

    from ..adapters import ADAPTERS_FILE, CONFIG_FILE, load_adapters

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(config_file, Path(tmp) / CONFIG_FILE)
        shutil.copy(folder / ADAPTERS_FILE, Path(tmp) / ADAPTERS_FILE)
        load_adapters(model, tmp)


# ---------------------------------------------------------------- the whole run


def _write_scores(folder: Path, records: Sequence[Dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "chunk", "row", "token_match", "full_match"])
        for i, r in enumerate(records):
            w.writerow([i, r["chunk"], r["row"], f"{r['token_match']:.6g}", int(r["full_match"])])
    with open(folder / "scores.jsonl", "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"idx": i, **r}) + "\n")


def run_memorization(
    checkpoints: Sequence[Checkpoint],
    data: Union[str, Path],
    output: Union[str, Path],
    config: Optional[MemorizationConfig] = None,
    *,
    dtype: str = "auto",
    tokenizer: Optional[str] = None,
    figures: bool = True,
    force: bool = False,
    progress: Optional[Progress] = None,
    loader: Optional[Callable[[Checkpoint], Tuple[Any, Any]]] = None,
) -> Dict[str, Any]:
    """Score every checkpoint on the same sampled data and write ``output`` (see the module doc);
    returns the overall summary. ``tokenizer`` is passed to ``load`` for checkpoints converted on
    first use (a CoreNet ``.pt`` ships none). ``loader(checkpoint) -> (model, tokenizer)`` replaces
    ``io.load.load`` (e.g. for models already in memory). Nothing is left on failure."""
    config = config or MemorizationConfig()
    config.validate()
    if not checkpoints:
        raise ValueError("checkpoints is empty")
    output = Path(output)
    check_destination(output, force)
    _data_files(Path(data))  # a missing data path fails before any model is loaded
    if figures:
        from .training_plot import _pyplot

        _pyplot()  # fail before any model is scored when matplotlib is missing
    load_fn = loader or (lambda c: _load_checkpoint(c, dtype, tokenizer))
    chunks: Optional[List[Chunk]] = None
    per_ckpt: List[Dict[str, Any]] = []
    all_records: List[List[Dict[str, Any]]] = []
    with atomic_folder(output, force) as tmp:
        for n, ckpt in enumerate(checkpoints):
            model, tok = load_fn(ckpt)
            if chunks is None:  # text rows are tokenized once, with the first checkpoint's tokenizer
                chunks = load_data(data, config, encode=lambda text: tok.encode(text, add_bos=True))
            eos = getattr(getattr(model, "args", None), "eos_token_id", None)
            records = score_chunks(model, chunks, config, eos, progress, f"{ckpt.label} ({n + 1}/{len(checkpoints)})")
            del model
            summary = {"label": ckpt.label, "model": ckpt.model, "adapter_path": ckpt.adapter_path, **summarize(records)}
            _write_scores(tmp / ckpt.label, records)
            write_json(tmp / ckpt.label / "summary.json", summary)
            per_ckpt.append(summary)
            all_records.append(records)
        labels = [c.label for c in checkpoints]
        scores = [np.array([r["token_match"] for r in recs]) for recs in all_records]
        result = {
            "config": dataclasses.asdict(config),
            "data": str(data),
            "chunks": [{"name": c.name, "sequences": len(c.rows)} for c in chunks or []],
            "checkpoints": per_ckpt,
            "chunk_scores": {s["label"]: {k: v["token_match"] for k, v in s["chunks"].items()} for s in per_ckpt},
            "correlation": {"labels": labels, "pearson": pearson_matrix(scores)},
        }
        if figures:
            result["figures"] = _figures(tmp, labels, scores, per_ckpt)
        write_json(tmp / "summary.json", result)
    return result


# ---------------------------------------------------------------- figures (LLM360 Figs. 7-9)


def _figures(folder: Path, labels: List[str], scores: List[np.ndarray], per_ckpt: List[Dict[str, Any]]) -> List[str]:
    plt = _pyplot_module()
    written = []
    # Fig. 7: distribution of the per-sequence score at each checkpoint
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 21)
    for label, s in zip(labels, scores):
        ax.hist(s, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (mean {s.mean():.3f})")
    ax.set_xlabel("memorization score (token match)")
    ax.set_ylabel("sequences")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Score distribution per checkpoint")
    written.append(_save(fig, folder / "score_distribution.png", plt))
    chunk_names = list(per_ckpt[0]["chunks"]) if per_ckpt else []
    if len(chunk_names) > 1:  # Fig. 8: mean score of each data chunk at each checkpoint
        fig, ax = plt.subplots(figsize=(7, 4))
        x = np.arange(len(chunk_names))
        for s in per_ckpt:
            ax.plot(x, [s["chunks"][c]["token_match"] for c in chunk_names], marker="o", label=s["label"])
        ax.set_xticks(x, chunk_names, rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("data chunk")
        ax.set_ylabel("mean memorization score")
        ax.legend(fontsize=7)
        ax.set_title("Mean score of each chunk at each checkpoint")
        written.append(_save(fig, folder / "chunk_scores.png", plt))
    if len(labels) > 1:  # Fig. 9: correlation of per-sequence scores between checkpoints
        corr = np.array([[np.nan if v is None else v for v in row] for row in pearson_matrix(scores)], dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
        im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if not math.isnan(corr[i, j]):
                    ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax)
        ax.set_title("Score correlation between checkpoints")
        written.append(_save(fig, folder / "score_correlation.png", plt))
    return written


def _pyplot_module():
    from .training_plot import _pyplot

    return _pyplot()


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


__all__ = [
    "MemorizationConfig", "Chunk", "Checkpoint", "load_data", "sample_chunk", "greedy_continuations", "match_scores",
    "score_chunks", "summarize", "pearson_matrix", "make_checkpoints", "adapter_checkpoints", "run_memorization",
]

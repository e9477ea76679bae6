"""PassUntil (Hu et al., ICLR 2024): measure an item's pass probability with "infinite resolution".

For every item (a prompt, the strings that pass, the stop strings):

- ``p_exact``: the teacher-forced probability of emitting a target's canonical tokens and then a
  token that ends the answer (EOS, or a token whose text is only whitespace before a stop string),
  under the sampling temperature; summed over the targets. One forward pass, no sampling. It is
  what the task scaling law models and a lower bound on the pass rate (other tokenisations and
  whitespace variants also pass).
- sample-until-pass: ancestral samples at ``temperature`` in batches that share one prompt prefill
  (the batch-1 KV cache repeated along the batch axis), graded as lm-eval's ``generate_until`` +
  ``exact_match`` do (cut at the first stop string, strip, optional case/punctuation/regex rules),
  until ``r`` samples pass or ``max_samples`` are drawn (right-censored). Both condition on the prompt
  tokenised as lm-eval's loglikelihood requests split it (trailing whitespace moves to the answer), so
  the sampled and the teacher-forced probabilities are of the same event.

Estimators (``estimate``): ``pu = (r-1)/(K-1)``, the unbiased one (with a censored run's ``m/K_max``
the whole sampling plan stays unbiased: Girshick, Mosteller & Savage 1946), ``pu_mle = r/K`` (the
paper's Eq. 2, biased up: about ``r/(r-1)`` times p for small p, unbounded for r = 1), and an exact
interval (negative-binomial for a finished run, Clopper-Pearson for a censored one).

Rows are appended to a JSONL file one item at a time, so a run can ``resume``.
"""

from __future__ import annotations

import json
import math
import re
import string
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data import read_json_records
from ..utils import Progress, write_text

if TYPE_CHECKING:  # the tokenizer module imports mlx-lm (slow): the CLI reads this module's defaults first
    from ..tokenizer import Tokenizer


def encode_pair(tokenizer, context: str, continuation: str):
    """(context ids, continuation ids) split as lm-eval's HFLM does (``scoring.encode_pair``)."""
    from ..scoring import encode_pair as split

    return split(tokenizer, context, continuation)

DEFAULT_STOP = ("\n",)  # for loglikelihood-style tasks (arithmetic): the answer ends at the line


@dataclass
class Item:
    """One test instance: ``prompt`` then any of ``targets`` (exact match after grading) then a stop."""

    id: str
    prompt: str
    targets: List[str]
    stop: List[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    task: str = "data"
    guessable: bool = False  # random guessing can pass (listed options, ...): the paper drops these
    max_tokens: Optional[int] = None  # sampled tokens per try (default: 2 x the longest target + 8)
    ignore_case: bool = False
    ignore_punctuation: bool = False
    ignore_numbers: bool = False
    regexes_to_ignore: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.id = str(self.id)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [str(t) for t in self.targets]
        if not self.targets or not any(t.strip() for t in self.targets):
            raise ValueError(f"item {self.id!r}: targets must hold at least one non-empty string")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if not self.guessable:
            self.guessable = guessable(self.prompt, self.targets)


@dataclass
class PassUntilConfig:
    """How items are measured."""

    r: int = field(default=2, metadata={"help": "Passes to wait for per item (>= 2 for the unbiased (r-1)/(K-1))."})
    max_samples: int = field(default=10000, metadata={"help": "Cap on samples per item; a run that hits it is censored."})
    batch_size: int = field(default=64, metadata={"help": "Samples decoded together from one prompt prefill."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used for p_exact)."})
    seed: int = field(default=0, metadata={"help": "Random seed (each item's stream is derived from it and the item id)."})
    sampling: bool = field(default=True, metadata={"help": "Sample until pass; False computes p_exact only."})
    confidence: float = field(default=0.95, metadata={"help": "Two-sided level of the interval on PU."})

    def __post_init__(self):
        checks = [("r", self.r >= 1, "must be >= 1"), ("max_samples", self.max_samples >= self.r, "must be >= r"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"), ("temperature", self.temperature > 0, "must be > 0"),
                  ("confidence", 0 < self.confidence < 1, "must be in (0, 1)")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")


# ----------------------------------------------------------------------------------- items


def guessable(prompt: str, targets: Sequence[str]) -> bool:
    """True when a target is written in the prompt as a whole word or line (listed options, true/false):
    copying it is a random guess that passes."""
    low = prompt.lower()
    for t in targets:
        t = t.strip().lower()
        if t and re.search(r"(?<![\w])" + re.escape(t) + r"(?![\w])", low):
            return True
    return False


def read_items(path) -> List[Item]:
    """Items from a JSONL file of ``{"id", "prompt", "targets": [...], "stop": [...]}`` (``target`` for
    one string; optional ``task``, ``guessable``, ``max_tokens``, ``ignore_case``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    names = set(Item.__dataclass_fields__)
    items = []
    for n, rec in read_json_records(path, jsonl=True):
        if "target" in rec and "targets" not in rec:
            rec["targets"] = [rec.pop("target")]
        missing = [k for k in ("prompt", "targets") if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n} lacks {', '.join(missing)}")
        rec.setdefault("id", str(n - 1))
        items.append(Item(**{k: v for k, v in rec.items() if k in names}))
    _check_unique(items)
    return items


def _check_unique(items: Sequence[Item]) -> None:
    seen = set()
    for it in items:
        key = (it.task, it.id)
        if key in seen:
            raise ValueError(f"item id {it.id!r} occurs twice in task {it.task!r}")
        seen.add(key)


def task_items(tasks: Sequence[str], limit: Optional[int] = None, include_path: Optional[str] = None) -> List[Item]:
    """Zero-shot items of lm-eval tasks: each document's prompt, target and stop strings, with the
    ``exact_match`` options of the task. ``loglikelihood`` tasks (arithmetic) become items whose
    target is the continuation and whose answer ends at a newline; multiple-choice tasks are refused."""
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = None
    if include_path:
        try:  # scanning lm-eval's own few thousand task files takes seconds: try the folder alone first
            local = TaskManager(include_path=str(include_path), include_defaults=False)
            manager = local if all(t in local.all_tasks for t in tasks) else None
        except TypeError:  # lm-eval without include_defaults
            manager = None
    manager = manager or (TaskManager(include_path=str(include_path)) if include_path else TaskManager())
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval has no task {', '.join(unknown)}; see `lm-eval ls tasks`")
    items: List[Item] = []
    loaded = manager.load(list(tasks))["tasks"] if hasattr(manager, "load") else dict(_flatten(get_task_dict(list(tasks), manager)))
    for name, task in loaded.items():
        kind = task.OUTPUT_TYPE
        if kind not in ("generate_until", "loglikelihood"):
            raise ValueError(f"task {name} is {kind}: PassUntil needs generated answers (generate_until or loglikelihood tasks)")
        cfg = task.config
        gen = dict(cfg.generation_kwargs or {})
        until = gen.get("until")
        stop = ([until] if isinstance(until, str) else list(until)) if until else list(DEFAULT_STOP)
        em = next((m for m in (cfg.metric_list or []) if m.get("metric") == "exact_match"), {})
        docs = task.eval_docs
        n = len(docs) if limit is None else min(limit, len(docs))
        for i in range(n):
            doc = docs[i]
            prompt = task.fewshot_context(doc, 0) if kind == "generate_until" else task.doc_to_text(doc)
            target = task.doc_to_target(doc)
            if kind == "loglikelihood":
                targets = [str(cfg.target_delimiter or "") + str(target)]
            else:
                targets = [str(t) for t in target] if isinstance(target, list) else [str(target)]
            max_gen = gen.get("max_gen_toks")
            items.append(Item(
                id=str(i), prompt=str(prompt), targets=targets, stop=stop, task=name,
                max_tokens=None if max_gen is None else int(max_gen),
                ignore_case=bool(em.get("ignore_case", False)), ignore_punctuation=bool(em.get("ignore_punctuation", False)),
                ignore_numbers=bool(em.get("ignore_numbers", False)), regexes_to_ignore=list(em.get("regexes_to_ignore") or []),
            ))
    _check_unique(items)
    return items


def _flatten(task_dict) -> Iterable:
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _flatten(value)
        else:
            yield (key if isinstance(key, str) else getattr(key, "group_name", str(key))), value


# ----------------------------------------------------------------------------------- grading


def cut_at_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def normalize(text: str, item: Item) -> str:
    """lm-eval's ``exact_match`` preprocessing (regexes removed, case, punctuation), then strip."""
    for pattern in item.regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if item.ignore_case:
        text = text.lower()
    if item.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if item.ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text.strip()


def passes(text: str, item: Item) -> bool:
    """Does a generated ``text`` (cut at its first stop string) match a target exactly?"""
    cut = cut_at_stop(text, item.stop)
    got = normalize(text if cut is None else text[:cut], item)
    return any(got == normalize(t, item) for t in item.targets)


def _can_still_pass(text: str, item: Item) -> bool:
    """False once no continuation of ``text`` can pass (plain exact match only; otherwise True)."""
    if item.regexes_to_ignore or item.ignore_punctuation or item.ignore_numbers:
        return True
    u = text.rstrip("\ufffd").lstrip().rstrip()  # an unfinished UTF-8 character decodes as U+FFFD
    if item.ignore_case:
        u = u.lower()
    return any((t.lower() if item.ignore_case else t).strip().startswith(u) for t in item.targets)


# ----------------------------------------------------------------------------------- estimators


def _log_binom_pmf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1:
        return 0.0 if k == n else -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed over the (few) terms j <= k."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(j, n, p)) for j in range(k + 1)))


def _solve(f, target: float) -> float:
    """p in [0, 1] with f(p) = target for a decreasing f, by bisection (on log p below 1e-3)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2 if hi - lo > 1e-3 * hi else math.sqrt(max(lo, 1e-300) * hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def nb_interval(r: int, k: int, confidence: float = 0.95) -> tuple:
    """Exact interval for p after the r-th pass came at sample k (inverse sampling):
    P(K <= k | p_lo) = a/2 and P(K >= k | p_hi) = a/2, with P(K <= k) = P(Bin(k, p) >= r)."""
    a = 1 - confidence
    lo = _solve(lambda p: binom_cdf(r - 1, k, p), 1 - a / 2)  # P(Bin(k,p) >= r) = a/2
    hi = 1.0 if k == r else _solve(lambda p: binom_cdf(r - 1, k - 1, p), a / 2)  # P(Bin(k-1,p) <= r-1) = a/2
    return lo, hi


def binom_interval(m: int, n: int, confidence: float = 0.95) -> tuple:
    """Clopper-Pearson interval for m passes in n samples (a censored run)."""
    a = 1 - confidence
    lo = 0.0 if m == 0 else _solve(lambda p: binom_cdf(m - 1, n, p), 1 - a / 2)
    hi = 1.0 if m == n else _solve(lambda p: binom_cdf(m, n, p), a / 2)
    return lo, hi


def estimate(passes: int, samples: int, r: int, censored: bool, confidence: float = 0.95, interval: bool = True) -> Dict[str, Any]:
    """``pu`` (unbiased), ``pu_mle`` and the interval ``pu_low``/``pu_high`` of one sampling run.

    A finished run (``passes == r`` at sample ``K``): ``(r-1)/(K-1)``, ``r/K`` and the exact negative-
    binomial interval. A censored run (``passes < r`` after ``K = max_samples``): ``m/K`` for both and the
    Clopper-Pearson interval (with no pass, ``pu_high`` is the bound: about 3.7/K at 95%). For r = 1 the
    unbiased estimate is 1 if the first sample passed, else 0: use r >= 2."""
    if censored:
        lo, hi = binom_interval(passes, samples, confidence) if interval else (None, None)
        pu = passes / samples
        return {"pu": pu, "pu_mle": pu, "pu_low": lo, "pu_high": hi}
    if passes != r or samples < r:
        raise ValueError(f"a finished run has passes == r (got passes={passes}, r={r}, samples={samples})")
    pu = 1.0 if samples == 1 else (r - 1) / (samples - 1)
    lo, hi = nb_interval(r, samples, confidence) if interval else (None, None)
    return {"pu": pu, "pu_mle": r / samples, "pu_low": lo, "pu_high": hi}


# ----------------------------------------------------------------------------------- model side


def model_size(model: nn.Module) -> Dict[str, int]:
    """Total and non-embedding (total minus the token embedding) parameter counts from the config."""
    args = model.args
    embedding = args.vocab_size * args.model_dim
    total = int(args.num_parameters()) + (0 if args.share_input_output_layers else embedding)  # + an untied head
    return {"n_params": total, "n_params_nonembedding": total - embedding * (1 if args.share_input_output_layers else 2)}


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {"texts": [...], stop tuple: ids}


def token_texts(tokenizer: "Tokenizer") -> List[str]:
    """The text each token adds after some text (its leading space kept); cached per tokenizer."""
    cache = _CACHE.setdefault(tokenizer, {})
    if "texts" not in cache:
        prefix = tokenizer.encode("a", add_bos=False)
        base = tokenizer.decode(prefix)
        cache["texts"] = [tokenizer.decode(prefix + [i])[len(base):] for i in range(tokenizer.vocab_size)]
    return cache["texts"]


def stop_token_ids(tokenizer: "Tokenizer", stop: Sequence[str]) -> List[int]:
    """Tokens that end an answer that is complete: EOS, and tokens whose text is a stop string
    preceded by whitespace only."""
    cache = _CACHE.setdefault(tokenizer, {})
    key = tuple(stop)
    if key not in cache:
        ids = {tokenizer.eos_id}
        for i, text in enumerate(token_texts(tokenizer) if stop else []):
            cut = cut_at_stop(text, stop)
            if cut is not None and not text[:cut].strip():
                ids.add(i)
        cache[key] = sorted(ids)
    return list(cache[key])


def _log_softmax64(logits: mx.array, temperature: float) -> np.ndarray:
    x = np.asarray(logits.astype(mx.float32), dtype=np.float64) / temperature
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def p_exact(model: nn.Module, tokenizer: "Tokenizer", item: Item, temperature: float = 1.0) -> Dict[str, Any]:
    """Teacher-forced probability of each target's tokens followed by a stop token, at ``temperature``
    (float64 softmax of the model's logits). Returns ``{"p_exact": sum, "per_target": [...], "target_tokens": [...]}``."""
    stops = stop_token_ids(tokenizer, item.stop)
    per, lengths = [], []
    for target in dict.fromkeys(item.targets):
        ctx, cont = encode_pair(tokenizer, item.prompt, target)
        logits = model(mx.array(ctx + cont)[None])[0, len(ctx) - 1:]
        logp = _log_softmax64(logits, temperature)
        lp = float(sum(logp[i, t] for i, t in enumerate(cont)))
        last = logp[len(cont)]
        lp += float(np.log(np.exp(last[stops]).sum()))
        per.append(math.exp(lp))
        lengths.append(len(cont))
    return {"p_exact": float(sum(per)), "per_target": per, "target_tokens": lengths}


def _repeat_cache(cache, n: int):
    from mlx_lm.models.cache import KVCache

    out = []
    for c in cache:
        nc = KVCache()
        nc.keys, nc.values, nc.offset = mx.repeat(c.keys, n, axis=0), mx.repeat(c.values, n, axis=0), c.offset
        out.append(nc)
    return out


def item_seed(seed: int, item: Item) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{item.task}/{item.id}".encode())) % (2**32)


def _max_tokens(tokenizer: "Tokenizer", item: Item) -> int:
    if item.max_tokens is not None:
        return int(item.max_tokens)
    longest = max(len(tokenizer.encode(t, add_bos=False)) for t in item.targets)
    return 2 * longest + 8


def sample_batch(model: nn.Module, tokenizer: "Tokenizer", item: Item, prompt_cache, last_logits: mx.array, n: int,
                 sampler, max_tokens: int) -> List[bool]:
    """Draw ``n`` samples from a prefilled prompt (its batch-1 ``prompt_cache`` and last logits) and
    grade them; each row stops at EOS, at a stop string, or as soon as it can no longer pass."""
    cache = _repeat_cache(prompt_cache, n)
    logits = mx.broadcast_to(last_logits, (n, last_logits.shape[-1]))
    rows: List[List[int]] = [[] for _ in range(n)]
    result: List[Optional[bool]] = [None] * n
    live = list(range(n))  # the sample each batch row holds; finished rows leave the batch
    eos = tokenizer.eos_id
    for step in range(max_tokens):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = sampler(logprobs)
        keep = []
        for pos, (j, t) in enumerate(zip(live, tokens.tolist())):
            if t == eos:
                result[j] = passes(tokenizer.decode(rows[j]), item)
                continue
            rows[j].append(t)
            text = tokenizer.decode(rows[j])
            if cut_at_stop(text, item.stop) is not None:
                result[j] = passes(text, item)
            elif not _can_still_pass(text, item):
                result[j] = False
            else:
                keep.append(pos)
        if not keep or step == max_tokens - 1:
            break  # out of tokens: an answer without its stop (or EOS) does not pass
        if len(keep) < len(live):
            index = mx.array(keep)
            for c in cache:
                c.keys, c.values = c.keys[index], c.values[index]
            tokens = tokens[index]
            live = [live[pos] for pos in keep]
        logits = model(tokens[:, None], cache=cache)[:, -1, :].astype(mx.float32)
    return [bool(r) for r in result]


def sample_until_pass(model: nn.Module, tokenizer: "Tokenizer", item: Item, config: PassUntilConfig,
                      on_batch=None) -> Dict[str, Any]:
    """Sample ``item`` in batches sharing one prefill until ``config.r`` passes or ``config.max_samples``.
    Returns ``{"samples": K, "passes": m, "censored": bool}``. ``on_batch(n)`` is told of each batch."""
    from ..generate.sampling import SamplingConfig

    mx.random.seed(item_seed(config.seed, item))
    sampler = SamplingConfig(temp=config.temperature).sampler()
    ctx = encode_pair(tokenizer, item.prompt, item.targets[0])[0]
    cache = model.make_cache()
    last = model(mx.array(ctx)[None], cache=cache)[:, -1, :].astype(mx.float32)
    mx.eval(last, [c.state[:2] for c in cache])
    max_tokens = _max_tokens(tokenizer, item)
    drawn = found = 0
    while drawn < config.max_samples:
        n = min(config.batch_size, config.max_samples - drawn)
        results = sample_batch(model, tokenizer, item, cache, last, n, sampler, max_tokens)
        for ok in results:  # samples are exchangeable: the batch's order is the sampling order
            drawn += 1
            found += ok
            if found == config.r:
                break
        if on_batch:
            on_batch(drawn)
        if found == config.r:
            return {"samples": drawn, "passes": found, "censored": False}
    return {"samples": drawn, "passes": found, "censored": True}


def measure_item(model: nn.Module, tokenizer: "Tokenizer", item: Item, config: PassUntilConfig, on_batch=None) -> Dict[str, Any]:
    """One result row (without the model fields): p_exact, and the sampling run with its estimates."""
    t0 = time.perf_counter()
    exact = p_exact(model, tokenizer, item, config.temperature)
    row: Dict[str, Any] = {"task": item.task, "id": item.id, "guessable": item.guessable, "r": config.r,
                           "max_samples": config.max_samples, "temperature": config.temperature, "sampling": config.sampling,
                           "p_exact": exact["p_exact"], "target_tokens": exact["target_tokens"]}
    if config.sampling:
        run = sample_until_pass(model, tokenizer, item, config, on_batch)
        row.update(run)
        row.update(estimate(run["passes"], run["samples"], config.r, run["censored"], config.confidence))
        row["confidence"] = config.confidence
    else:
        row.update({"samples": 0, "passes": 0, "censored": None, "pu": None, "pu_mle": None, "pu_low": None, "pu_high": None})
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return row


# ----------------------------------------------------------------------------------- runs and files

_RUN_KEYS = ("model", "r", "max_samples", "temperature", "sampling")


def read_results(path) -> List[Dict[str, Any]]:
    """Rows of a results file; an unfinished last line (a killed run) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n} is not valid JSON: {e.msg}") from e
    return rows


def run(
    model: nn.Module,
    tokenizer: "Tokenizer",
    items: Sequence[Item],
    config: PassUntilConfig,
    output,
    *,
    model_name: str = "",
    resume: bool = False,
    progress: Optional[Progress] = None,
) -> List[Dict[str, Any]]:
    """Measure ``items`` and append one JSON row per item to ``output``; returns all rows.

    Rows carry ``model``, ``n_params`` and ``n_params_nonembedding``. With ``resume`` the items already
    in ``output`` (same model, r, max_samples and temperature) are skipped; without it an existing
    ``output`` is refused. ``progress`` gets ``("items", done, total)``, ``("samples", drawn, 0)`` and
    ``("censored", count, done)``."""
    output = Path(output)
    sizes = model_size(model)
    fixed = {"model": model_name, "r": config.r, "max_samples": config.max_samples, "temperature": config.temperature,
             "sampling": config.sampling}
    rows: List[Dict[str, Any]] = []
    if output.exists():
        if not resume:
            raise ValueError(f"output {output} exists; pass resume=True to continue it or choose another path")
        rows = read_results(output)
        for row in rows:
            bad = [k for k in _RUN_KEYS if row.get(k) != fixed[k]]
            if bad:
                raise ValueError(f"cannot resume {output}: its {bad[0]} is {row.get(bad[0])!r}, this run's is {fixed[bad[0]]!r}")
        write_text(output, "".join(json.dumps(r) + "\n" for r in rows))  # drop a half-written last line
    done = {(r.get("task"), str(r.get("id"))) for r in rows}
    todo = [it for it in items if (it.task, it.id) not in done]
    total = len(items)
    drawn = sum(int(r.get("samples") or 0) for r in rows)
    censored = sum(bool(r.get("censored")) for r in rows)
    n_done = total - len(todo)

    def report():
        if progress:
            progress("items", n_done, total)
            progress("samples", drawn, 0)
            progress("censored", censored, n_done)

    report()
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as f:
        for item in todo:
            base = drawn

            def on_batch(k, base=base):
                nonlocal drawn
                drawn = base + k
                if progress:
                    progress("samples", drawn, 0)

            row = {**fixed, **sizes, **measure_item(model, tokenizer, item, config, on_batch)}
            f.write(json.dumps(row) + "\n")
            f.flush()
            rows.append(row)
            n_done += 1
            censored += bool(row.get("censored"))
            report()
    return rows


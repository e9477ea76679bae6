"""lm-evaluation-harness backend for OpenELM on MLX, registered as ``mlx-openelm``.

Requests are tokenised and scored as lm-eval's Hugging Face backend (HFLM) does them with the
model card's setup (``add_bos_token=True``, context 2048):

- ``loglikelihood``: trailing whitespace of the context moves to the continuation; context and
  context+continuation are encoded with BOS and the continuation is what the whole has beyond
  the context's token count. An empty context is BOS alone. Sequences longer than 2048 + 1
  tokens lose tokens on the left.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows over the text's tokens with BOS
  as the prefix token, so every token is predicted exactly once. (HFLM with add_bos_token also
  puts a BOS inside the scored text, scoring P(BOS | BOS); we do not.)
- ``generate_until``: each request's own ``until``/``max_gen_toks``/``temperature``/``do_sample``/
  ``top_p``/``top_k``; the context is left-truncated to leave room for ``max_gen_toks``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..generate.sampling import SamplingConfig
from ..generate.stream import stream_generate
from ..scoring import context_length, encode_pair, score_tokens, tok_encode
from ..tokenizer import Tokenizer

Progress = Callable[[str, int, int], None]  # (request type, done, total)

DEFAULT_MAX_GEN_TOKS = 256
# Generation options that change nothing when left at these values (HF generate's names).
_NEUTRAL_GEN_KWARGS = {"num_beams": 1, "num_return_sequences": 1, "use_cache": True, "early_stopping": False}


def cut_at_stop(text: str, until: Sequence[str]) -> Optional[int]:
    """Index of the earliest occurrence of any stop string in ``text`` (None if none occurs)."""
    found = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return min(found) if found else None


@register_model("mlx-openelm")
class OpenELMLM(LM):
    """An OpenELM model (``mlx_openelm.load``) as an lm-eval ``LM``.

    Give either ``pretrained`` (folder or hub id, with optional ``adapter_path``/``dtype``) or
    an already loaded ``model`` and ``tokenizer``. ``progress(request type, done, total)`` is
    called as requests finish."""

    def __init__(
        self,
        pretrained: Optional[str] = None,
        model: Optional[nn.Module] = None,
        tokenizer: Optional[Tokenizer] = None,
        batch_size: Any = 8,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        adapter_path: Optional[str] = None,
        dtype: str = "auto",
        seed: int = 1234,
        progress: Optional[Progress] = None,
        device: Optional[str] = None,  # passed by lm-eval; MLX picks its own device
        max_batch_size: Optional[int] = None,  # passed by lm-eval; no automatic batch sizing
    ):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("give pretrained=<model folder or hub id> (or a loaded model and tokenizer)")
            from ..io.load import load

            model, tokenizer = load(pretrained, dtype=dtype, adapter_path=adapter_path)
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or context_length(model))
        self.max_gen_toks = int(max_gen_toks)
        self.seed = seed
        self.progress = progress

    def _ticker(self, kind: str, total: int) -> Callable[[List[int]], None]:
        done = [0]

        def tick(indices) -> None:
            done[0] += len(indices)
            if self.progress:
                self.progress(kind, done[0], total)

        tick([])
        return tick

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        out = score_tokens(self.model, pairs, self.batch_size, self.max_length, self._ticker("loglikelihood", len(pairs)))
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0], add_bos=False)
            for w in get_rolling_token_windows(ids, self.tokenizer.bos_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        tick = self._ticker("loglikelihood_rolling windows", len(windows))
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, score_tokens(self.model, windows, self.batch_size, self.max_length, tick)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        mx.random.seed(self.seed)
        tick = self._ticker("generate_until", len(requests))
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.generate(context, gen_kwargs)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
            tick([req])
        return out

    def generate(self, context: str, gen_kwargs: Optional[Dict[str, Any]] = None) -> str:
        """The continuation of ``context`` under lm-eval generation kwargs, cut before the first
        stop string (generation also ends at EOS and after ``max_gen_toks`` tokens)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sampling = SamplingConfig.from_hf(kwargs)  # consumes the keys it reads
        unknown = [k for k, v in kwargs.items() if _NEUTRAL_GEN_KWARGS.get(k, object()) != v]
        if unknown:
            raise ValueError(f"generation option(s) {', '.join(unknown)} are not supported by mlx-openelm")
        room = self.max_length - max_gen
        if room < 1:
            raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in {self.max_length} tokens")
        ids = tok_encode(self.tokenizer, context)[-room:]
        text = ""
        for r in stream_generate(self.model, self.tokenizer, ids, max_tokens=max_gen, sampling=sampling):
            text += r.text
            cut = cut_at_stop(text, until)
            if cut is not None:
                return text[:cut]
        return text


def _task_manager(tasks: Sequence[str], include_path: Optional[str]):
    from lm_eval.tasks import TaskManager

    if include_path:
        try:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
        except TypeError:  # lm-eval without include_defaults
            local = None
        if local is not None and all(t in local.all_tasks for t in tasks):
            return local  # scanning lm-eval's own few thousand task files takes seconds
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def _clean(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """``{"acc,none": .., "alias": ..}`` -> ``{"acc": ..}`` (the default filter's suffix dropped)."""
    out = {}
    for key, value in metrics.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else key] = float(value)
    return out


def run_tasks(
    model: nn.Module,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 8,
    include_path: Optional[str] = None,
    progress: Optional[Progress] = None,
    seed: int = 1234,
) -> Dict[str, Any]:
    """Evaluate ``model`` on lm-eval ``tasks`` (names, or names from YAML files under
    ``include_path``). Returns ``{"results": {task: {"acc": .., "acc_stderr": .., ...}},
    "n_samples": {task: n}, "n_shot": {task: k}, "versions": {...}, "lm_eval": version}``."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate

    tasks = list(tasks)
    manager = _task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under {include_path})" if include_path else ""
        raise ValueError(f"lm-eval has no task {', '.join(unknown)}{where}; see `lm-eval ls tasks` or pass --include-path")
    lm = OpenELMLM(model=model, tokenizer=tokenizer, batch_size=batch_size, seed=seed, progress=progress)
    out = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return {
        "results": {t: _clean(m) for t, m in out["results"].items()},
        "n_samples": {t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()},
        "n_shot": dict(out.get("n-shot", {})),
        "versions": {t: v for t, v in out.get("versions", {}).items()},
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
    }

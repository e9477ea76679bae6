"""Batched generation: one worker thread decodes every live sequence together (continuous
batching on mlx-lm's ``BatchGenerator`` and ``BatchKVCache``).

Requests arrive from any thread (``BatchEngine.submit``); their tokens go back through a
``sink(event)`` callable, one ``TokenEvent`` per generated token and one with ``finish_reason``
per choice. ``n > 1`` choices share one prefill of the prompt: the prompt's KV cache is computed
once and copied into each choice. All MLX work (decoding, prompt scoring via ``BatchEngine.call``)
runs on the worker thread, so requests never race on the device.
"""

from __future__ import annotations

import itertools
import queue
from collections import deque
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator, speculative_generate_step
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..tokenizer import Tokenizer
from .sampling import SamplingConfig

__all__ = ["TokenEvent", "BatchEngine", "Handle", "EngineStats", "batch_generate"]


@dataclass
class TokenEvent:
    """One step of one choice: a generated ``token`` (None on the closing event), its log-prob and
    the ``top_logprobs`` ``[(token, logprob), ...]`` when asked for; ``finish_reason`` ("stop",
    "length", "cancelled" or "error") on a choice's last event; ``error`` says what failed. A
    choice that stops at EOS closes with ``eos_token`` set (and its log-probs, when asked for)."""

    index: int
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    eos_token: Optional[int] = None


@dataclass
class EngineStats:
    requests: int = 0
    generated_tokens: int = 0
    active_sequences: int = 0
    peak_batch: int = 0
    cancelled: int = 0


class _BatchModel(nn.Module):
    """Our ``Model`` with the attention mask a ``BatchKVCache`` asks for (left padding), as
    mlx-lm's own models build it; for a plain cache it is the usual causal mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    @property
    def layers(self):
        return self.inner.layers

    def make_cache(self) -> List[KVCache]:
        return self.inner.make_cache()

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, **_: Any) -> mx.array:
        mask = create_attention_mask(inputs, cache[0] if cache else None)
        return self.inner(inputs, cache=cache, mask=mask)


def _seeded(sampler: Callable[[mx.array], mx.array], seed: int) -> Callable[[mx.array], mx.array]:
    """``sampler`` drawing from its own reproducible stream: step t reseeds the generator from
    (seed, t), so a seeded request gives the same tokens whatever else is in the batch."""
    steps = itertools.count()

    def sample(logprobs: mx.array) -> mx.array:
        mx.random.seed((seed * 1_000_003 + next(steps)) % (2**63))
        return sampler(logprobs)

    return sample


class Handle:
    """A submitted request: ``cancel()`` stops all its choices (e.g. the client went away)."""

    def __init__(self, engine: "BatchEngine", n: int):
        self._engine = engine
        self.n = n
        self.cancelled = False
        self.cancelled_choices: set = set()

    def cancel(self, index: Optional[int] = None) -> None:
        """Stop every choice, or only choice ``index`` (e.g. it reached a stop string)."""
        if index is None:
            self.cancelled = True
        else:
            self.cancelled_choices.add(index)
        self._engine._commands.put(("cancel", self, index))

    def stopped(self, index: int) -> bool:
        return self.cancelled or index in self.cancelled_choices


@dataclass
class _Seq:
    handle: Handle
    index: int
    sink: Callable[[TokenEvent], None]
    top_logprobs: Optional[int]
    uid: int = -1
    extra: Dict[str, Any] = field(default_factory=dict)


class BatchEngine:
    """Continuous batching over one model.

    ``max_batch`` sequences decode together (the rest wait), ``prefill_batch`` prompts are
    prefilled together. Start the worker with ``start()`` (or use the engine as a context
    manager); ``close()`` stops it."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, max_batch: int = 32, prefill_batch: int = 8,
                 prefill_step: int = 512, draft_model: Optional[nn.Module] = None, num_draft_tokens: int = 3):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
            raise ValueError("draft_model must share the model's tokenizer (vocab sizes differ)")
        self.model = model
        # With a draft model, requests are decoded one at a time by speculative decoding (lower
        # latency per stream) instead of being batched.
        self.draft_model = draft_model
        self.num_draft_tokens = num_draft_tokens
        self._speculative: "deque[tuple]" = deque()
        self.tokenizer = tokenizer
        self.context_length = getattr(getattr(model, "args", None), "max_context_length", 2048)
        self._batch_model = _BatchModel(model)
        self._gen = BatchGenerator(
            self._batch_model, max_tokens=256, stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=max_batch, prefill_batch_size=min(prefill_batch, max_batch), prefill_step_size=prefill_step,
        )
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self._live: Dict[int, _Seq] = {}
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.stats = EngineStats()

    # -- lifecycle
    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mlx-openelm-batch", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._commands.put(("close",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
            # MLX (0.32, CPU) can abort the process ("terminate called without an active
            # exception") when it exits right after a thread that drew random numbers ended.
            time.sleep(0.2)

    def __enter__(self) -> "BatchEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- API (any thread)
    def submit(self, prompt: Sequence[int], *, max_tokens: int, sampling: Optional[SamplingConfig] = None, n: int = 1,
               top_logprobs: Optional[int] = None, sink: Callable[[TokenEvent], None]) -> Handle:
        """Generate ``n`` continuations of the token ids ``prompt``; events go to ``sink`` from the
        worker thread. ``top_logprobs``: None = no log-probs, 0 = the sampled token's, k = also the
        k most likely. Raises ``ValueError`` (naming the parameter) before anything is queued."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty")
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(prompt) >= self.context_length:
            raise ValueError(f"prompt needs {len(prompt)} tokens but the context is {self.context_length}")
        if self._closed:
            raise RuntimeError("the batch engine is closed")
        max_tokens = min(max_tokens, self.context_length - len(prompt))
        handle = Handle(self, n)
        self._commands.put(("submit", handle, prompt, max_tokens, sampling or SamplingConfig(), top_logprobs, sink))
        return handle

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread (between decoding steps); its result comes back as a Future."""
        fut: Future = Future()
        if self._closed:
            fut.set_exception(RuntimeError("the batch engine is closed"))
            return fut
        self._commands.put(("call", fn, fut))
        return fut

    # -- worker
    def _loop(self) -> None:
        while True:
            if self._live or self._speculative:  # busy: take what is queued, then decode
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            else:  # idle: wait for work
                cmd = self._commands.get()
            while cmd is not None:
                if cmd[0] == "close":
                    self._fail_all("cancelled", None)
                    mx.synchronize(self._gen.stream)  # nothing left in flight on the device
                    self._gen.close()
                    return
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if self._speculative:
                self._run_speculative(*self._speculative.popleft())
            elif self._live:
                self._step()

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "call":
            _, fn, fut = cmd
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(e)
        elif kind == "cancel":
            _, handle, index = cmd
            uids = [uid for uid, s in self._live.items() if s.handle is handle and index in (None, s.index)]
            if uids:
                self._gen.remove(uids)
                for uid in uids:
                    seq = self._live.pop(uid)
                    self.stats.cancelled += 1
                    seq.sink(TokenEvent(seq.index, finish_reason="cancelled"))
            self.stats.active_sequences = len(self._live)
        elif kind == "submit":
            _, handle, prompt, max_tokens, sampling, top_logprobs, sink = cmd
            if handle.cancelled:
                return
            try:
                self._insert(handle, prompt, max_tokens, sampling, top_logprobs, sink)
            except Exception as e:  # noqa: BLE001 - only this request fails
                for i in range(handle.n):
                    sink(TokenEvent(i, finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def _insert(self, handle: Handle, prompt: List[int], max_tokens: int, sampling: SamplingConfig,
                top_logprobs: Optional[int], sink) -> None:
        n = handle.n
        if self.draft_model is not None:
            self._speculative.append((handle, prompt, max_tokens, sampling, top_logprobs, sink))
            self.stats.requests += 1
            return
        processors = sampling.logits_processors()
        if sampling.greedy:
            samplers = [None] * n  # the generator's shared greedy sampler: one batched argmax
        elif sampling.seed is not None:
            samplers = [_seeded(sampling.sampler(), sampling.seed * 7919 + i) for i in range(n)]
        else:
            samplers = [sampling.sampler() for _ in range(n)]
        if n > 1 and len(prompt) > 1:
            # one prefill for all choices: the cache of prompt[:-1], copied into each choice
            cache = self.model.make_cache()
            for s in range(0, len(prompt) - 1, 512):
                self.model(mx.array(prompt[s:min(s + 512, len(prompt) - 1)])[None], cache=cache)
                mx.eval([c.state for c in cache])
            caches = [[_copy_cache(c) for c in cache] for _ in range(n)]
            prompts, history = [prompt[-1:]] * n, [list(prompt[:-1]) for _ in range(n)]
        else:
            caches, prompts, history = None, [prompt] * n, None
        uids = self._gen.insert(
            prompts, max_tokens=[max_tokens] * n, caches=caches, all_tokens=history, samplers=samplers,
            logits_processors=[processors] * n,
        )
        for i, uid in enumerate(uids):
            self._live[uid] = _Seq(handle, i, sink, top_logprobs, uid)
        self.stats.requests += 1
        self.stats.active_sequences = len(self._live)
        self.stats.peak_batch = max(self.stats.peak_batch, len(self._live))

    def _step(self) -> None:
        try:
            responses = self._gen.next_generated()
        except Exception as e:  # noqa: BLE001 - fail the live requests, keep serving
            self._fail_all("error", f"{type(e).__name__}: {e}")
            self._gen = BatchGenerator(
                self._batch_model, max_tokens=256, stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
                completion_batch_size=self._gen.completion_batch_size, prefill_batch_size=self._gen.prefill_batch_size,
                prefill_step_size=self._gen.prefill_step_size,
            )
            return
        eos = self.tokenizer.eos_token_ids
        for r in responses:
            seq = self._live.get(r.uid)
            if seq is None:
                continue
            self.stats.generated_tokens += 1
            lp = top = None
            if seq.top_logprobs is not None:
                lp, top = _logprobs_of(r.logprobs, r.token, seq.top_logprobs)
            if r.token in eos:
                self._live.pop(r.uid, None)
                seq.sink(TokenEvent(seq.index, finish_reason="stop", eos_token=int(r.token), logprob=lp, top_logprobs=top))
                continue
            seq.sink(TokenEvent(seq.index, token=int(r.token), logprob=lp, top_logprobs=top))
            if r.finish_reason is not None:
                self._live.pop(r.uid, None)
                seq.sink(TokenEvent(seq.index, finish_reason=r.finish_reason))
        self.stats.active_sequences = len(self._live)

    def _run_speculative(self, handle: Handle, prompt: List[int], max_tokens: int, sampling: SamplingConfig,
                         top_logprobs: Optional[int], sink) -> None:
        """Each choice in turn with mlx-lm's speculative decoding (the draft proposes, the model verifies)."""
        eos = self.tokenizer.eos_token_ids
        for i in range(handle.n):
            if handle.stopped(i):
                self.stats.cancelled += 1
                sink(TokenEvent(i, finish_reason="cancelled"))
                continue
            sampler = sampling.sampler()
            if not sampling.greedy and sampling.seed is not None:
                sampler = _seeded(sampler, sampling.seed * 7919 + i)
            steps = speculative_generate_step(
                mx.array(prompt, mx.uint32), self.model, self.draft_model, num_draft_tokens=self.num_draft_tokens,
                max_tokens=max_tokens, sampler=sampler, logits_processors=sampling.logits_processors(),
            )
            self.stats.active_sequences = 1
            finish, count = "length", 0
            try:
                for token, logprobs, _ in steps:
                    if handle.stopped(i):
                        finish = "cancelled"
                        self.stats.cancelled += 1
                        break
                    token, count = int(token), count + 1
                    self.stats.generated_tokens += 1
                    lp = top = None
                    if top_logprobs is not None:
                        lp, top = _logprobs_of(logprobs, token, top_logprobs)
                    if token in eos:
                        sink(TokenEvent(i, finish_reason="stop", eos_token=token, logprob=lp, top_logprobs=top))
                        finish = None
                        break
                    sink(TokenEvent(i, token=token, logprob=lp, top_logprobs=top))
                    if count >= max_tokens:
                        break
            except Exception as e:  # noqa: BLE001 - only this request fails
                sink(TokenEvent(i, finish_reason="error", error=f"{type(e).__name__}: {e}"))
                finish = None
            if finish is not None:
                sink(TokenEvent(i, finish_reason=finish))
        self.stats.active_sequences = len(self._live)

    def _fail_all(self, reason: str, error: Optional[str]) -> None:
        live, self._live = self._live, {}
        if live and reason != "error":
            self._gen.remove(list(live))
        for seq in live.values():
            seq.sink(TokenEvent(seq.index, finish_reason=reason, error=error))
        self.stats.active_sequences = 0


def _copy_cache(c: KVCache) -> KVCache:
    new = KVCache()
    if c.keys is not None:
        new.keys, new.values = c.keys[..., :c.offset, :], c.values[..., :c.offset, :]
        new.offset = c.offset
    return new


def _logprobs_of(logprobs: mx.array, token: int, k: int) -> Tuple[float, List[Tuple[int, float]]]:
    """The token's log-prob and the k most likely ``(token, logprob)``, best first."""
    logprobs = logprobs.astype(mx.float32).reshape(-1)
    if k <= 0:
        return float(logprobs[token].item()), []
    top = mx.argpartition(-logprobs, kth=k - 1)[:k]
    vals = logprobs[top]
    order = mx.argsort(-vals)
    top, vals = top[order].tolist(), vals[order].tolist()
    return float(logprobs[token].item()), list(zip(top, vals))


def batch_generate(engine: BatchEngine, prompts: Sequence[Sequence[int]], *, max_tokens: int = 256,
                   sampling: Optional[SamplingConfig] = None, n: int = 1, timeout: float = 600.0) -> List[List[List[int]]]:
    """Token ids generated for each prompt (``n`` lists each), all prompts decoded together."""
    results = [[[] for _ in range(n)] for _ in prompts]
    done = queue.Queue()
    for p, prompt in enumerate(prompts):
        def sink(ev: TokenEvent, p=p) -> None:
            if ev.token is not None:
                results[p][ev.index].append(ev.token)
            if ev.finish_reason is not None:
                done.put((p, ev))
        engine.submit(prompt, max_tokens=max_tokens, sampling=sampling, n=n, sink=sink)
    deadline = time.monotonic() + timeout
    for _ in range(len(prompts) * n):
        p, ev = done.get(timeout=max(deadline - time.monotonic(), 0.001))
        if ev.finish_reason == "error":
            raise RuntimeError(f"generation of prompt {p} failed: {ev.error}")
    return results

"""The served model: its batch engine, prompt log-probs (``echo``) and the per-choice text state
(incremental detokenizing, stop strings, log-probs) that both endpoints stream from."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..generate.batch import BatchEngine, Handle, TokenEvent
from ..tokenizer import Tokenizer
from .schemas import APIError, token_bytes


class ServedModel:
    """One model under a name (and aliases), with its own ``BatchEngine``."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Tokenizer, *, aliases: Sequence[str] = (),
                 max_concurrency: int = 32, draft_model: Optional[nn.Module] = None, num_draft_tokens: int = 3):
        self.name = name
        self.aliases = {name, *[a for a in aliases if a]}
        self.model = model
        self.tokenizer = tokenizer
        self.engine = BatchEngine(model, tokenizer, max_batch=max_concurrency, draft_model=draft_model,
                                  num_draft_tokens=num_draft_tokens)
        self.context_length = self.engine.context_length
        self.pieces = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
        self.specials = (tokenizer.bos_id, tokenizer.eos_id)
        self.created = int(time.time())

    def token_text(self, token: int) -> str:
        """A token as text; a lone byte of a multi-byte character reads ``bytes:\\xNN`` (as OpenAI's)."""
        b = token_bytes(self.pieces, token, self.specials)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in b)

    def encode_prompt(self, prompt: Any, param: str = "prompt") -> List[int]:
        """Token ids of a text (with BOS, as ``generate``) or checked ids; 413 when it does not fit."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = self.tokenizer.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{param} has token id {bad[0]} outside the vocabulary [0, {vocab})", param, "invalid_value")
            ids = list(prompt)
        if not ids:
            raise APIError(400, f"{param} is empty", param, "invalid_value")
        if len(ids) >= self.context_length:
            raise APIError(413, f"{param} has {len(ids)} tokens; the model's context is {self.context_length} "
                                "(prompt plus at least one generated token)", param, "context_length_exceeded")
        return ids

    def prompt_logprobs(self, ids: Sequence[int], k: int) -> Tuple[List[Optional[float]], List[Optional[List[Tuple[int, float]]]]]:
        """log p(ids[i] | ids[:i]) for every prompt token (None for the first) and the k most likely
        tokens at each position, from one forward pass. Runs on the engine's worker thread."""
        logits = self.model(mx.array(ids)[None])[0, :-1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1)[:, 0]
        if k > 0:
            top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            vals = mx.take_along_axis(logprobs, top, axis=-1)
            order = mx.argsort(-vals, axis=-1)
            top, vals = mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
            mx.eval(target, top, vals)
            tops = [list(zip(t, v)) for t, v in zip(top.tolist(), vals.tolist())]
        else:
            mx.eval(target)
            tops = [[] for _ in range(len(ids) - 1)]
        return [None] + target.tolist(), [None] + tops


@dataclass
class Choice:
    """One choice's text as tokens arrive: stop strings cut it, ``delta()`` gives what may be
    sent now (a stop string's possible beginning is held back while streaming)."""

    index: int
    served: ServedModel
    stops: List[str]
    want_logprobs: bool
    keep_eos: bool = False  # list a closing EOS among the log-probs (echo: lm-eval reads all but the last)
    detok: Any = None
    text: str = ""
    sent: int = 0
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    lp_sent: int = 0

    def __post_init__(self) -> None:
        self.detok = self.served.tokenizer.detokenizer
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, ev: TokenEvent) -> bool:
        """Take one engine event; True when a stop string just ended this choice."""
        if self.done:
            return False
        before = len(self.text)
        if ev.token is not None:
            self.detok.add_token(ev.token)
            self.text += self.detok.last_segment
            self._record(ev.token, ev)
        if ev.finish_reason is not None:
            self.detok.finalize()
            self.text += self.detok.last_segment
            if ev.eos_token is not None and self.want_logprobs and self.keep_eos:
                self._record(ev.eos_token, ev)
        if self.stops:
            start = max(0, before - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.finish_reason = "stop"
                return ev.finish_reason is None
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            self.error = ev.error
        return False

    def _record(self, token: int, ev: TokenEvent) -> None:
        self.tokens.append(token)
        if self.want_logprobs:
            self.logprobs.append(ev.logprob)
            self.top_logprobs.append(ev.top_logprobs or [])

    def delta(self) -> str:
        end = len(self.text) if self.done else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def new_logprobs(self) -> Tuple[List[int], List[float], List[List[Tuple[int, float]]]]:
        a, self.lp_sent = self.lp_sent, len(self.logprobs)
        return self.tokens[a:self.lp_sent], self.logprobs[a:self.lp_sent], self.top_logprobs[a:self.lp_sent]


class Generation:
    """The choices of one request (prompts x n) fed from the engine through an asyncio queue."""

    def __init__(self, served: ServedModel, prompts: List[List[int]], *, n: int, max_tokens: int, sampling,
                 stops: List[str], top_logprobs: Optional[int], keep_eos: bool = False):
        self.served = served
        self.loop = asyncio.get_running_loop()
        self.queue: "asyncio.Queue[Tuple[int, TokenEvent]]" = asyncio.Queue()
        self.choices = [Choice(p * n + j, served, stops, top_logprobs is not None, keep_eos)
                        for p in range(len(prompts)) for j in range(n)]
        self.handles: List[Handle] = []
        self.n = n
        for p, ids in enumerate(prompts):
            sink = (lambda ev, p=p: self.loop.call_soon_threadsafe(self.queue.put_nowait, (p, ev)))
            self.handles.append(served.engine.submit(ids, max_tokens=max_tokens, sampling=sampling, n=n,
                                                     top_logprobs=top_logprobs, sink=sink))

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    async def next(self, timeout: float = 0.5) -> Optional[Choice]:
        """Apply the next event; the choice it changed (None on timeout)."""
        try:
            p, ev = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None
        choice = self.choices[p * self.n + ev.index]
        if choice.add(ev):
            self.handles[p].cancel(ev.index)
        return choice

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    def failed(self) -> Optional[str]:
        errors = [c.error or "generation failed" for c in self.choices if c.finish_reason == "error"]
        return errors[0] if errors else None

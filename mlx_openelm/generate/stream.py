"""Streaming generation: mlx-lm's token loops (plain and speculative) plus prompt-lookup
decoding, with OpenELM's tokenizer, context limit and multi-turn cache reuse."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from .. import kernels
from ..tokenizer import Tokenizer
from .sampling import SamplingConfig

__all__ = ["GenerationResponse", "stream_generate", "generate", "find_draft", "prompt_lookup_generate_step"]


@dataclass
class GenerationResponse:
    """One streamed step, with mlx-lm's ``GenerationResponse`` fields: ``text`` (the new text segment,
    possibly empty), ``token``, ``logprobs`` (vector), ``from_draft``, ``prompt_tokens``, ``prompt_tps``,
    ``generation_tokens``, ``generation_tps``, ``peak_memory`` (GB) and, on the last one,
    ``finish_reason`` ("stop", "length" or "context")."""

    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 2048,
) -> Iterator[tuple]:
    """Yield ``(token, logprobs)`` for up to ``max_tokens`` tokens after ``prompt`` (1-D ids).

    The same loop as mlx-lm's ``generate_step`` (which lives in a module that imports
    transformers): all prompt tokens but the last are prefilled in chunks of
    ``prefill_step_size``, then each step feeds one token, applies the logits processors to the
    token history and samples from the log-probabilities; step n+1 is queued
    (``mx.async_eval``) before token n is handed out."""
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    history = None  # the tokens fed so far, for the logits processors

    def remember(tokens: mx.array) -> None:
        nonlocal history
        if logits_processors:
            history = tokens if history is None else mx.concatenate([history, tokens])

    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        model(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        remember(prompt[:n])
        prompt = prompt[n:]

    def step(tokens: mx.array):
        logits = model(tokens[None], cache=cache)[:, -1, :]
        remember(tokens)
        for processor in logits_processors or ():
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    y, logprobs = step(prompt)
    mx.async_eval(y, logprobs)
    n = 0
    while True:
        if n != max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        if n == max_tokens:
            break
        yield y.item(), logprobs
        y, logprobs = next_y, next_logprobs
        n += 1


def _context_length(model: nn.Module) -> int:
    return getattr(getattr(model, "args", None), "max_context_length", 2048)


def find_draft(history: Sequence[int], ngram_max: int, num_draft: int) -> List[int]:
    """Prompt-lookup drafting: the tokens that followed the latest earlier occurrence of the
    longest suffix n-gram (n = ngram_max..1) of ``history``."""
    n_hist = len(history)
    for n in range(min(ngram_max, n_hist - 1), 0, -1):
        tail = list(history[n_hist - n:])
        for start in range(n_hist - n - 1, -1, -1):
            if list(history[start:start + n]) == tail:
                follow = list(history[start + n:start + n + num_draft])
                if follow:
                    return follow
    return []


def prompt_lookup_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    num_draft_tokens: int = 10,
    ngram_max: int = 3,
    max_tokens: int = 256,
    sampler=None,
    logits_processors=None,
    prompt_cache: Optional[List[Any]] = None,
    prefill_step_size: int = 512,
) -> Iterator[tuple]:
    """Prompt-lookup decoding: drafts copied from the context are verified in one forward pass.
    Every emitted token is sampled from the model's own distribution, so at temperature 0 the
    output equals plain greedy decoding. Yields ``(token, logprobs, from_draft)``."""
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    history = [int(t) for t in prompt.tolist()]
    y = prompt
    while y.size > 1:  # prefill all but the last prompt token
        n = min(prefill_step_size, y.size - 1)
        model(y[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        y = y[n:]

    def sample_at(logits_row: mx.array, upto: int):
        for proc in logits_processors or []:
            logits_row = proc(mx.array(history[:upto]), logits_row)
        logprobs = logits_row - mx.logsumexp(logits_row, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    ntoks = 0
    pending = [int(t) for t in y.tolist()]  # tokens not yet in the cache
    while ntoks < max_tokens:
        draft = find_draft(history, ngram_max, min(num_draft_tokens, max_tokens - ntoks - 1))
        feed = pending + draft
        logits = model(mx.array(feed)[None], cache=cache)[0, len(pending) - 1:]
        base = len(history)
        accepted = 0
        for i in range(len(draft) + 1):
            tok, logprobs = sample_at(logits[i:i + 1], base + i)
            tok = int(tok.item())
            from_draft = i < len(draft) and tok == draft[i]
            history.append(tok)
            ntoks += 1
            yield tok, logprobs.squeeze(0), from_draft
            if not from_draft or ntoks >= max_tokens:
                break
            accepted += 1
        # The cache holds feed; keep the accepted drafts, the last token is fed next round.
        trim_prompt_cache(cache, len(draft) - accepted)
        pending = [history[-1]]


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    max_tokens: int = 256,
    sampling: Optional[SamplingConfig] = None,
    prompt_cache: Optional[List[Any]] = None,
    draft_model: Optional[nn.Module] = None,
    num_draft_tokens: int = 3,
    prompt_lookup: int = 0,
    stop_at_eos: bool = True,
    **sampling_options: Any,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt`` (text, encoded with BOS, or token ids), yielding text segments.

    Sampling: a ``SamplingConfig`` or its fields as keywords (``temp=0`` greedy, ``top_p``, ``top_k``,
    ``min_p``, ``repetition_penalty`` — the model card uses 1.2 —, ``seed``, ...).
    Decoding: ``draft_model`` enables speculative decoding (same tokenizer), ``prompt_lookup=N``
    drafts N tokens from the context. ``prompt_cache`` (from ``model.make_cache()``) is extended in
    place, so a later call can continue after what this one saw.

    The context is ``max_context_length`` tokens (2048): a prompt that does not fit raises
    ``ValueError``; generation stops at the limit with ``finish_reason == "context"``.
    """
    if sampling is not None and sampling_options:
        raise ValueError("give either sampling=SamplingConfig(...) or its fields as keywords, not both")
    sampling = sampling or SamplingConfig(**sampling_options)
    if max_tokens <= 0:
        raise ValueError(f"max_tokens={max_tokens} must be positive")
    if prompt_lookup < 0:
        raise ValueError(f"prompt_lookup={prompt_lookup} must be >= 0 (the number of tokens to draft; 0 turns it off)")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
    if draft_model is not None and prompt_lookup:
        raise ValueError("choose either a draft model or prompt lookup, not both")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    limit = _context_length(model)
    cached = prompt_cache[0].offset if prompt_cache else 0
    if cached + len(ids) > limit:
        raise ValueError(
            f"the prompt needs {cached + len(ids)} tokens but OpenELM's context is {limit}; shorten it (or /reset the chat)"
        )
    budget = min(max_tokens, limit - cached - len(ids))
    if budget <= 0:
        raise ValueError(f"no room to generate: the context ({limit} tokens) is full; shorten the prompt (or /reset the chat)")
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = sampling.sampler()
    processors = sampling.logits_processors()
    prompt_arr = mx.array(ids, mx.uint32)

    if draft_model is not None:
        from mlx_lm.generate import speculative_generate_step  # imports transformers: only when drafting

        if prompt_cache is not None:
            raise ValueError("speculative decoding does not continue a chat cache")
        if draft_model.args.vocab_size != model.args.vocab_size:
            raise ValueError("the draft model must share the target's tokenizer (vocab sizes differ)")
        steps = speculative_generate_step(
            prompt_arr, model, draft_model, num_draft_tokens=num_draft_tokens, max_tokens=budget,
            sampler=sampler, logits_processors=processors,
        )
    elif prompt_lookup:
        steps = prompt_lookup_generate_step(
            prompt_arr, model, num_draft_tokens=prompt_lookup, max_tokens=budget, sampler=sampler,
            logits_processors=processors, prompt_cache=prompt_cache,
        )
    else:
        steps = ((t, lp, False) for t, lp in generate_step(
            prompt_arr, model, max_tokens=budget, sampler=sampler, logits_processors=processors, prompt_cache=prompt_cache,
        ))

    detok = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids if stop_at_eos else set()
    tic = time.perf_counter()
    prompt_tps, n, token, finish, logprobs, from_draft = 0.0, 0, None, None, None, False
    for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
        token = int(token)
        if n == 1:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in eos:
            finish = "stop"
            break
        detok.add_token(token)
        if n == budget:
            finish = "length" if budget == max_tokens else "context"
            break
        yield GenerationResponse(
            text=detok.last_segment, token=token, logprobs=logprobs, from_draft=from_draft,
            prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9), peak_memory=kernels.peak_memory() / 1e9,
        )
    detok.finalize()
    yield GenerationResponse(
        text=detok.last_segment, token=token, logprobs=logprobs, from_draft=from_draft,
        prompt_tokens=len(ids), prompt_tps=prompt_tps, generation_tokens=n,
        generation_tps=n / max(time.perf_counter() - tic, 1e-9), peak_memory=kernels.peak_memory() / 1e9,
        finish_reason=finish or "length",
    )


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: Union[str, Sequence[int]], **kwargs) -> str:
    """Generate and return the whole text; takes the options of :func:`stream_generate`."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))

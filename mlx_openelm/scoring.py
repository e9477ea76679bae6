"""Log-likelihood scoring shared by the lm-eval backend and the commonsense evaluation:
lm-eval's context/continuation split and batched, right-padded scoring."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .tokenizer import Tokenizer


def context_length(model: nn.Module) -> int:
    return getattr(getattr(model, "args", None), "max_context_length", 2048)


def tok_encode(tokenizer: Tokenizer, text: str) -> List[int]:
    """Ids of ``text`` with BOS in front, unless the text already starts with the BOS string."""
    bos_text = tokenizer.convert_ids_to_tokens([tokenizer.bos_id])[0]
    return tokenizer.encode(text, add_bos=not text.startswith(bos_text))


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) of a loglikelihood request, split as lm-eval's HFLM does."""
    if not context:
        cont = tokenizer.encode(continuation, add_bos=False)
        if cont and cont[0] == tokenizer.bos_id:
            return cont[:1], cont[1:]
        return [tokenizer.bos_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def score_tokens(
    model: nn.Module,
    pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: Optional[int] = None,
    tick: Optional[Callable[[List[int]], None]] = None,
) -> List[Tuple[float, bool]]:
    """``(sum of log p(continuation | context), continuation is the greedy one)`` per pair of
    (context ids, continuation ids).

    Longest first, in right-padded batches, one forward pass each: under the causal mask the
    padding after a row never reaches its scored positions. A row longer than ``max_length + 1``
    tokens loses tokens on the left. ``tick(indices)`` reports the pairs just scored."""
    max_length = max_length or context_length(model)
    inputs, conts = [], []
    for ctx, cont in pairs:
        cont = [int(t) for t in cont]
        if not ctx or not cont:
            raise ValueError("a loglikelihood request needs at least one context and one continuation token")
        if len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the {max_length}-token context")
        seq = ([int(t) for t in ctx] + cont)[-(max_length + 1):]
        inputs.append(seq[:-1])  # position p predicts seq[p + 1]
        conts.append(cont)
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(inputs[idx[0]])
        lo = min(len(inputs[i]) - len(conts[i]) for i in idx)  # first scored position in the batch
        tokens = np.zeros((len(idx), width), np.int32)
        targets = np.zeros((len(idx), width - lo), np.int32)
        scored = np.zeros((len(idx), width - lo), bool)
        for r, i in enumerate(idx):
            n, c = len(inputs[i]), conts[i]
            tokens[r, :n] = inputs[i]
            targets[r, n - len(c) - lo:n - lo] = c
            scored[r, n - len(c) - lo:n - lo] = True
        logits = model(mx.array(tokens))[:, lo:].astype(mx.float32)
        tgt = mx.array(targets)
        logp = mx.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
        hit = mx.argmax(logits, axis=-1) == tgt
        mask = mx.array(scored)
        sums = mx.where(mask, logp, 0.0).sum(axis=-1)
        greedy = mx.all(mx.logical_or(hit, mx.logical_not(mask)), axis=-1)
        mx.eval(sums, greedy)
        for r, i in enumerate(idx):
            results[i] = (float(sums[r].item()), bool(greedy[r].item()))
        if tick:
            tick(idx)
    return results

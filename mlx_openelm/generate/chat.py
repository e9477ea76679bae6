"""A multi-turn chat that keeps one KV cache across turns."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import mlx.nn as nn

from ..tokenizer import Tokenizer
from .stream import GenerationResponse, stream_generate


class ChatSession:
    """A multi-turn chat that keeps one KV cache across turns.

    Each turn renders the whole conversation with the -Instruct template, finds how many of its
    tokens the cache already holds, trims the cache to that common prefix and feeds only the rest,
    so earlier turns are never prefilled again. Without a ``system`` message the template gets
    the empty system turn the -Instruct models were trained with, unless ``add_empty_system=False``.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, system: Optional[str] = None, add_empty_system: bool = True):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.add_empty_system = add_empty_system
        self.reset()

    def reset(self) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.messages: List[Dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_prompt_cache(self.model)
        self.cache_tokens: List[int] = []

    def prompt_ids(self, messages: List[Dict[str, str]]) -> List[int]:
        """The token ids the model sees for ``messages`` (template, generation prompt, BOS)."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_empty_system=self.add_empty_system))

    def reply(self, user_message: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the assistant's answer to ``user_message``; the options of :func:`stream_generate`.

        A message that does not fit the context (with the conversation so far) raises ``ValueError``
        before anything changes, so the conversation goes on without it. If the consumer stops
        early (Ctrl-C), the partial answer is kept as the assistant's turn."""
        from mlx_lm.models.cache import trim_prompt_cache

        messages = self.messages + [{"role": "user", "content": user_message}]
        ids = self.prompt_ids(messages)
        limit = getattr(getattr(self.model, "args", None), "max_context_length", 2048)
        if len(ids) >= limit:
            alone = len(self.prompt_ids(messages[-1:] if not self.system else [self.messages[0], messages[-1]]))
            hint = "shorten it" if alone >= limit else "shorten it or /reset the history"
            raise ValueError(
                f"this message would make the conversation {len(ids)} tokens, beyond OpenELM's context of {limit} "
                f"(the message alone needs {alone}); it was not sent: {hint}"
            )
        common = 0
        for a, b in zip(self.cache_tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed
        trim_prompt_cache(self.cache, self.cache[0].offset - common)
        self.cache_tokens = self.cache_tokens[:common]
        new = ids[common:]
        stream = stream_generate(self.model, self.tokenizer, new, prompt_cache=self.cache, **kwargs)
        first = next(stream)  # option errors surface here, before the conversation changes
        self.messages = messages
        generated: List[int] = []
        text = []
        try:
            for r in _chain(first, stream):
                if r.token is not None:
                    generated.append(r.token)  # EOS included: the template renders it after the answer
                text.append(r.text)
                r.prompt_tokens = len(new)
                r.cached_tokens = common
                yield r
        finally:
            self.messages.append({"role": "assistant", "content": "".join(text)})
            self.cache_tokens = (ids + generated)[: self.cache[0].offset]


def _chain(first, rest):
    yield first
    yield from rest

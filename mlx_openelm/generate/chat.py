"""A multi-turn chat that keeps one KV cache across turns."""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import mlx.nn as nn
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from ..tokenizer import Tokenizer
from .stream import stream_generate


class ChatSession:
    """A multi-turn chat that keeps one KV cache across turns.

    Each turn renders the whole conversation with the -Instruct template, finds how many of its
    tokens the cache already holds, trims the cache to that common prefix and feeds only the rest,
    so earlier turns are never prefilled again.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, system: Optional[str] = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.reset()

    def reset(self) -> None:
        self.messages: List[Dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_prompt_cache(self.model)
        self.cache_tokens: List[int] = []

    def reply(self, user_message: str, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the assistant's answer to ``user_message``; the options of :func:`stream_generate`.
        If the consumer stops early (Ctrl-C), the partial answer is kept as the assistant's turn."""
        self.messages.append({"role": "user", "content": user_message})
        ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(self.messages))
        common = 0
        for a, b in zip(self.cache_tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed
        trim_prompt_cache(self.cache, self.cache[0].offset - common)
        new = ids[common:]
        generated: List[int] = []
        text = []
        try:
            for r in stream_generate(self.model, self.tokenizer, new, prompt_cache=self.cache, **kwargs):
                if r.token is not None:
                    generated.append(r.token)  # EOS included: the template renders it after the answer
                text.append(r.text)
                r.prompt_tokens = len(new)
                r.cached_tokens = common
                yield r
        finally:
            self.messages.append({"role": "assistant", "content": "".join(text)})
            self.cache_tokens = (ids + generated)[: self.cache[0].offset]

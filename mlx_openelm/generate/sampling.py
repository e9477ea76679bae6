"""THE sampling options: one ``SamplingConfig`` for generate, chat, lm-eval and the server.

It checks its ranges once, builds mlx-lm's sampler and logits processors, and reads the three
vocabularies users speak: our CLI/Python names, HF ``generate`` kwargs (lm-eval tasks) and
OpenAI request fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import mlx.core as mx


@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temp == 0`` is greedy; the filters apply when ``temp > 0``."""

    temp: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=0.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 0 or 1 disables."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k most likely tokens; 0 disables."})
    min_p: float = field(default=0.0, metadata={"help": "Drop tokens below min_p x the top probability; 0 disables."})
    repetition_penalty: Optional[float] = field(
        default=None, metadata={"help": "Divide the logits of recent tokens by this (> 0; the model card uses 1.2)."})
    repetition_context_size: int = field(default=20, metadata={"help": "How many recent tokens the penalties look at."})
    presence_penalty: float = field(default=0.0, metadata={"help": "Subtract this from the logits of tokens already present."})
    frequency_penalty: float = field(default=0.0, metadata={"help": "Subtract this times a token's count so far."})
    seed: Optional[int] = field(default=None, metadata={"help": "Random seed for sampling."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingConfig":
        """Raise ``ValueError`` naming the parameter whose value is out of range."""
        checks = [
            ("temp", self.temp >= 0, "must be >= 0"),
            ("top_p", 0 <= self.top_p <= 1, "must be in [0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty is None or self.repetition_penalty > 0, "must be > 0"),
            ("repetition_context_size", self.repetition_context_size >= 1, "must be >= 1"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def sampler(self) -> Callable[[mx.array], mx.array]:
        from mlx_lm.sample_utils import make_sampler

        top_p = self.top_p if 0 < self.top_p < 1 else 0.0
        return make_sampler(temp=self.temp, top_p=top_p, min_p=self.min_p, top_k=self.top_k)

    def logits_processors(self) -> List[Callable[[mx.array, mx.array], mx.array]]:
        from mlx_lm.sample_utils import make_logits_processors

        n = self.repetition_context_size
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty if self.repetition_penalty not in (None, 1.0) else None,
            repetition_context_size=n,
            presence_penalty=self.presence_penalty or None, presence_context_size=n,
            frequency_penalty=self.frequency_penalty or None, frequency_context_size=n,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "SamplingConfig":
        """From our own names; unknown keys raise ``TypeError`` as a dataclass does."""
        return cls(**kwargs)

    @classmethod
    def split(cls, kwargs: Dict[str, Any]) -> "tuple[SamplingConfig, Dict[str, Any]]":
        """Take the sampling fields out of ``kwargs``: (config, the other keys)."""
        names = {f.name for f in fields(cls)}
        mine = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**mine), rest

    @classmethod
    def from_hf(cls, gen_kwargs: Dict[str, Any]) -> "SamplingConfig":
        """From HF ``generate`` kwargs (lm-eval's ``generation_kwargs``); consumes the keys it reads.
        ``do_sample=False`` or temperature 0 is greedy; ``do_sample=True`` without a temperature
        samples at 1.0."""
        do_sample = gen_kwargs.pop("do_sample", None)
        temperature = float(gen_kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_p = float(gen_kwargs.pop("top_p", 1.0) or 1.0)
        top_k = int(gen_kwargs.pop("top_k", 0) or 0)
        min_p = float(gen_kwargs.pop("min_p", 0.0) or 0.0)
        repetition_penalty = gen_kwargs.pop("repetition_penalty", None)
        seed = gen_kwargs.pop("seed", None)
        if do_sample is False or temperature == 0.0:
            return cls(temp=0.0, repetition_penalty=repetition_penalty, seed=seed)
        return cls(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k, min_p=min_p,
                   repetition_penalty=repetition_penalty, seed=seed)

    @classmethod
    def from_openai(cls, body: Dict[str, Any], default_temp: float = 1.0) -> "SamplingConfig":
        """From an OpenAI request body (``temperature`` defaults to OpenAI's 1.0; ``top_p`` 1 = off).
        Extra fields other servers accept (``top_k``, ``min_p``, ``repetition_penalty``) are read too."""
        temp = body.get("temperature")
        top_p = body.get("top_p")
        return cls(
            temp=float(default_temp if temp is None else temp),
            top_p=float(0.0 if top_p is None else top_p),
            top_k=int(body.get("top_k") or 0),
            min_p=float(body.get("min_p") or 0.0),
            repetition_penalty=body.get("repetition_penalty"),
            presence_penalty=float(body.get("presence_penalty") or 0.0),
            frequency_penalty=float(body.get("frequency_penalty") or 0.0),
            seed=body.get("seed"),
        )

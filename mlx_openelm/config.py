"""OpenELM hyper-parameters and the layer-wise scaling rule (OpenELM paper, Sec. 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

Number = Union[int, float]


def make_divisible(v: float, divisor: int) -> int:
    """Round ``v`` to a multiple of ``divisor`` without losing more than 10% (CoreNet)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _linspace(lo: float, hi: float, n: int) -> List[float]:
    if n == 1:
        return [float(lo)]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _per_layer(spec: Union[Number, Sequence[Number]], n: int, name: str) -> List[float]:
    """A scalar applies to every layer; a pair (lo, hi) is spread linearly; a list is per layer."""
    if isinstance(spec, (int, float)):
        return [float(spec)] * n
    spec = list(spec)
    if len(spec) == 2 and n != 2:
        return [round(v, 2) for v in _linspace(spec[0], spec[1], n)]
    if len(spec) != n:
        raise ValueError(
            f"{name} has {len(spec)} entries but the model has {n} layers; "
            "give one value, a (min, max) pair or one value per layer"
        )
    return [float(v) for v in spec]


@dataclass
class ModelArgs:
    """OpenELM hyper-parameters; field names follow the Hugging Face ``config.json``.

    Pass-through fields (kept so a config round-trips, not read by the model): ``rope_max_length``
    (CoreNet's RoPE table size; MLX's RoPE needs none), ``bos_token_id``/``eos_token_id`` (the
    tokenizer's ids rule). ``ffn_with_glu``, ``activation_fn_name`` and ``normalization_layer_name``
    are checked: anything but OpenELM's values is refused rather than silently ignored."""

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    vocab_size: int = 32000
    num_gqa_groups: int = 4
    qkv_multipliers: Union[Number, List[Number]] = (0.5, 1.0)
    ffn_multipliers: Union[Number, List[Number]] = (0.5, 4.0)
    ffn_dim_divisor: int = 256
    num_query_heads: Optional[List[int]] = None
    num_kv_heads: Optional[List[int]] = None
    ffn_intermediate_sizes: Optional[List[int]] = field(default=None)
    max_context_length: int = 2048
    rope_freq_constant: float = 10000.0
    rope_max_length: int = 4096
    rms_norm_eps: float = 1e-6
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    ffn_with_glu: bool = True
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_type: str = "openelm"

    def __post_init__(self):
        for name in ("num_transformer_layers", "model_dim", "head_dim", "vocab_size", "num_gqa_groups", "ffn_dim_divisor",
                     "max_context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        n = self.num_transformer_layers
        if self.model_type != "openelm":
            raise ValueError(f"model_type is {self.model_type!r}, expected 'openelm'")
        if not self.ffn_with_glu:
            raise ValueError("ffn_with_glu=False is not an OpenELM configuration")
        if self.activation_fn_name not in ("swish", "silu"):
            raise ValueError(f"unsupported activation {self.activation_fn_name!r} (OpenELM uses swish)")
        if self.normalization_layer_name != "rms_norm":
            raise ValueError(f"unsupported normalization {self.normalization_layer_name!r}")

        # Layer-wise scaling: layer i gets qkv_m[i]*d of query width and ffn_m[i]*d of FFN width.
        if self.num_query_heads is None:
            qkv_m = _per_layer(self.qkv_multipliers, n, "qkv_multipliers")
            q_dims = [
                make_divisible(self.model_dim * m, self.head_dim * self.num_gqa_groups)
                for m in qkv_m
            ]
            self.num_query_heads = [q // self.head_dim for q in q_dims]
        if self.num_kv_heads is None:
            self.num_kv_heads = [q // self.num_gqa_groups for q in self.num_query_heads]
        if self.ffn_intermediate_sizes is None:
            ffn_m = _per_layer(self.ffn_multipliers, n, "ffn_multipliers")
            self.ffn_intermediate_sizes = [
                make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in ffn_m
            ]
        self.num_query_heads = [int(v) for v in self.num_query_heads]
        self.num_kv_heads = [int(v) for v in self.num_kv_heads]
        self.ffn_intermediate_sizes = [int(v) for v in self.ffn_intermediate_sizes]
        for name in ("num_query_heads", "num_kv_heads", "ffn_intermediate_sizes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have num_transformer_layers={n} entries")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if kv <= 0 or q % kv:
                raise ValueError(f"layer {i}: {q} query heads cannot share {kv} kv heads")

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from an HF/MLX ``config.json`` or a CoreNet ``general_gpt`` block; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names}
        if "model_type" not in config:
            kwargs["model_type"] = "openelm"
        missing = [k for k in ("num_transformer_layers", "model_dim", "head_dim") if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        return cls(**kwargs)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        """Architecture of a released size: '270M', '450M', '1_1B' or '3B' (with or without 'OpenELM-'),
        or 'tiny' (a test shape)."""
        key = name.removeprefix("OpenELM-").removesuffix("-Instruct").replace(".", "_").upper()
        if key not in PRESETS:
            raise ValueError(f"unknown OpenELM size {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["qkv_multipliers"] = list(d["qkv_multipliers"]) if not isinstance(d["qkv_multipliers"], (int, float)) else d["qkv_multipliers"]
        d["ffn_multipliers"] = list(d["ffn_multipliers"]) if not isinstance(d["ffn_multipliers"], (int, float)) else d["ffn_multipliers"]
        return d

    def num_parameters(self) -> int:
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d + d
        for q, kv, ffn in zip(self.num_query_heads, self.num_kv_heads, self.ffn_intermediate_sizes):
            total += (q + 2 * kv) * hd * d + q * hd * d + 2 * hd  # qkv, out, q/k norms
            total += 2 * ffn * d + ffn * d + 2 * d  # proj_1, proj_2, two layer norms
        return total


PRESETS: Dict[str, Dict[str, Any]] = {
    "270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64),
    "450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64),
    "1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64),
    "3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128),
    # for tests, examples and quick checks (widths multiples of 32: quantize with group size 32),
    # the vocabulary of the tokenizers the tests train on the fly
    "TINY": dict(num_transformer_layers=4, model_dim=128, head_dim=16, num_gqa_groups=4, ffn_dim_divisor=32, vocab_size=384),
}

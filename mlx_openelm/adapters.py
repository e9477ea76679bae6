"""LoRA and DoRA adapters for OpenELM, on float or quantized (QLoRA / QDoRA) base layers.

Shapes follow MLX (``y = x @ W.T`` with ``W`` of shape ``[out, in]``): ``lora_a`` is ``[in, r]``,
``lora_b`` is ``[r, out]``, so the update is ``delta_W = s * (lora_a @ lora_b).T`` with ``s = alpha / r``.
Base weights stay frozen; the trainable parameters are ``lora_a``, ``lora_b`` and (DoRA) ``m``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels
from .utils import atomic_write
from .weights import dequantized_weight

DEFAULT_TARGETS: Tuple[str, ...] = ("qkv_proj", "out_proj", "proj_1", "proj_2")
ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
_EMBEDDING_PATH = "transformer.token_embeddings"
_LAYERS_PATH = "transformer.layers"


def _is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def _dense_weight(layer: nn.Module, dtype: Optional[mx.Dtype] = None) -> mx.array:
    """The weight of a float or quantized Linear/Embedding, dequantized if needed (in ``dtype`` if given:
    half scales, as the CPU keeps them, would otherwise round the dequantized values)."""
    if _is_quantized(layer):
        return dequantized_weight(layer, dtype)
    return layer.weight


def _check_rank(rank: int, alpha: float, dropout: float) -> None:
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class _LinearAdapter(nn.Module):
    """Shared parts of LoRALinear and DoRALinear: frozen base, low-rank factors, dropout."""

    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0, dropout: float = 0.1):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"{type(self).__name__} wraps nn.Linear or nn.QuantizedLinear, got {type(base).__name__}")
        _check_rank(rank, alpha, dropout)
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits  # packed into uint32
        base.freeze()
        self.linear = base
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        # U(-1/sqrt(in), 1/sqrt(in)) is kaiming_uniform(a=sqrt(5)) for a fan-in of `in`.
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int = 32, alpha: float = 32.0, dropout: float = 0.1):
        """Wrap ``linear`` (nn.Linear or nn.QuantizedLinear); the output equals the base output at init."""
        return cls(linear, rank=rank, alpha=alpha, dropout=dropout)

    def _base_matmul(self, x: mx.array) -> mx.array:
        """``x @ W0.T`` without the bias."""
        lin = self.linear
        y = kernels.product(lin, x)  # the CPU fast paths where they apply
        if y is not None:
            return y
        if isinstance(lin, nn.QuantizedLinear):
            return mx.quantized_matmul(
                x, lin.weight, lin.scales, lin.get("biases"),
                transpose=True, group_size=lin.group_size, bits=lin.bits, mode=lin.mode,
            )
        return x @ lin.weight.T

    def _lora(self, x: mx.array) -> mx.array:
        """``s * B A x`` in the dtype of ``x``."""
        return (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def _delta_weight(self) -> mx.array:
        """``s * B A`` as an ``[out, in]`` float32 matrix."""
        return self.scale * (self.lora_a @ self.lora_b).T.astype(mx.float32)

    def _fused_layer(self, weight: mx.array, dequantize: bool) -> nn.Module:
        lin = self.linear
        out_dims, in_dims = weight.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in lin)
        fused.weight = weight
        if "bias" in lin:
            fused.bias = lin.bias
        if isinstance(lin, nn.QuantizedLinear) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
        return fused


class LoRALinear(_LinearAdapter):
    """``y = W0 x + b + s * B A drop(x)`` (Hu et al. 2021)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(self.linear, x) + self._lora(self.dropout(x))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer with ``W0 + s B A``; re-quantized with the base's bits/group size
        when the base was quantized, unless ``dequantize``."""
        w0 = _dense_weight(self.linear)
        return self._fused_layer((w0.astype(mx.float32) + self._delta_weight()).astype(w0.dtype), dequantize)


class DoRALinear(_LinearAdapter):
    """Weight-decomposed LoRA (Liu et al. 2024): ``W' = m * V / ||V||_row``, ``V = W0 + s B A``.

    One magnitude per output feature (the norm runs over the input axis of the ``[out, in]``
    weight); ``m`` starts at the row norms of ``W0`` (float32, dequantized first), so ``W' = W0``
    at init. The norm is detached (``stop_gradient``), as in Sec. 4.3 of the paper and in PEFT.
    With ``n = m / ||V||`` (a constant for autodiff) and bias ``b`` outside the rescaling:

    - eval mode or dropout 0: ``y = n * (W0 x + s B A x) + b``, i.e. exactly ``W' x + b``;
    - training with dropout p > 0 (PEFT / NVlabs): ``y = W0 x + (n - 1) * W0 drop(x) + n * s B A drop(x) + b``,
      the base output on the un-dropped ``x`` and the rescaling applied to the dropped one.
      This costs one extra base matmul per adapted layer.

    mlx-lm's ``DoRALinear`` instead computes ``n * (W0 x + s B A drop(x))`` in training, rescaling
    ``W0 x`` on the un-dropped ``x``. Both agree when dropout is off and differ in training when p > 0.
    """

    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0, dropout: float = 0.1):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.m = mx.linalg.norm(_dense_weight(self.linear, mx.float32), axis=1)

    def _norm_scale(self) -> mx.array:
        """``n = m / ||W0 + s B A||_row`` with the norm detached, float32 ``[out]``."""
        adapted = _dense_weight(self.linear, mx.float32) + self._delta_weight()
        return self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        n = self._norm_scale().astype(x.dtype)
        if self.training and self.dropout_p > 0:
            xd = self.dropout(x)
            y = self._base_matmul(x) + (n - 1) * self._base_matmul(xd) + n * self._lora(xd)
        else:
            y = n * (self._base_matmul(x) + self._lora(x))
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer with ``W' = m * V / ||V||_row``; re-quantized like the base unless ``dequantize``."""
        w0 = _dense_weight(self.linear)
        adapted = w0.astype(mx.float32) + self._delta_weight()
        weight = (self.m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted
        return self._fused_layer(weight.astype(w0.dtype), dequantize)


class LoRAEmbedding(nn.Module):
    """LoRA on a (float or quantized) token embedding that is also the tied output layer.

    The adapted table is ``E' = E + s * lora_a @ lora_b`` with ``lora_a [vocab, r]`` (zeros at init,
    indexed by token ids) and ``lora_b [r, dims]`` (N(0, 1) at init), the PEFT convention for
    embeddings. ``__call__(ids) = E'[ids]``. The output layer ``as_linear(x)`` is ``x @ E.T`` with
    the frozen base table, as in CoreNet (``general_gpt.py`` computes the logits from
    ``token_embeddings.weight``, which its LoRA wrapper leaves unchanged); ``adapt_output=True``
    uses ``x @ E'.T`` instead (the adapter then changes the output layer too). No dropout (PEFT's
    embedding adapter applies none). DoRA on embeddings is not supported (neither is it in CoreNet).
    """

    def __init__(self, base: nn.Module, rank: int = 32, alpha: float = 32.0, adapt_output: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Embedding, nn.QuantizedEmbedding)):
            raise ValueError(f"LoRAEmbedding wraps nn.Embedding or nn.QuantizedEmbedding, got {type(base).__name__}")
        _check_rank(rank, alpha, 0.0)
        vocab, dims = _dense_weight(base).shape
        base.freeze()
        self.embedding = base
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.adapt_output = bool(adapt_output)
        self.lora_a = mx.zeros((vocab, rank))
        self.lora_b = mx.random.normal((rank, dims))

    @classmethod
    def from_base(cls, embedding: nn.Module, rank: int = 32, alpha: float = 32.0, adapt_output: bool = False) -> "LoRAEmbedding":
        """Wrap ``embedding`` (nn.Embedding or nn.QuantizedEmbedding); outputs equal the base at init."""
        return cls(embedding, rank=rank, alpha=alpha, adapt_output=adapt_output)

    def __call__(self, ids: mx.array) -> mx.array:
        y = self.embedding(ids)
        return y + (self.scale * (self.lora_a[ids] @ self.lora_b)).astype(y.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        """Logits of the tied output layer: ``x @ E.T`` (CoreNet), or ``x @ E'.T`` with ``adapt_output``."""
        if not self.adapt_output:
            return self.embedding.as_linear(x)
        z = (x @ self.lora_b.T) @ self.lora_a.T
        return self.embedding.as_linear(x) + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain nn.Embedding with ``E'``; re-quantized like the base unless ``dequantize``.
        Without ``adapt_output`` the output layer must keep ``E``: see ``output_layer``."""
        e0 = _dense_weight(self.embedding)
        weight = e0.astype(mx.float32) + self.scale * (self.lora_a @ self.lora_b)
        fused = nn.Embedding(*e0.shape)
        fused.weight = weight.astype(e0.dtype)
        base = self.embedding
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(
                fused, group_size=base.group_size, bits=base.bits, mode=base.mode
            )
        return fused

    def output_layer(self, dequantize: bool = False) -> nn.Module:
        """The frozen base table as a separate output layer (``lm_head``: ``x @ E.T``), for a fused
        model whose input embedding is ``E'`` but whose logits use ``E`` (CoreNet)."""
        base = self.embedding
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            vocab, dims = self.lora_a.shape[0], self.lora_b.shape[1]
            head = nn.QuantizedLinear(dims, vocab, bias=False, group_size=base.group_size, bits=base.bits, mode=base.mode)
            head.weight, head.scales = base.weight, base.scales  # the same quantized table, used as x @ E.T
            if "biases" in base:
                head.biases = base.biases
            else:
                head.pop("biases", None)
            return head
        e0 = _dense_weight(base)
        head = nn.Linear(e0.shape[1], e0.shape[0], bias=False)
        head.weight = e0
        return head


ADAPTER_TYPES = (LoRALinear, DoRALinear, LoRAEmbedding)


@dataclass
class LoRAConfig:
    """Adapter hyper-parameters, as stored in ``adapter_config.json``. ``layers=None`` adapts every
    transformer layer; otherwise a list of layer indices (negative ones count from the end)."""

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    use_dora: bool = False
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    adapt_embeddings: bool = False
    layers: Optional[Tuple[int, ...]] = None
    adapt_output: bool = False  # with adapt_embeddings: the tied output layer uses E' (CoreNet: E)

    def __post_init__(self):
        _check_rank(self.rank, self.alpha, self.dropout)
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in DEFAULT_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"unknown LoRA target(s) {unknown or '(none given)'}; valid names: {', '.join(DEFAULT_TARGETS)} "
                "(use adapt_embeddings for token_embeddings)"
            )
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.use_dora and self.adapt_embeddings:
            raise ValueError(
                "DoRA is not supported on token embeddings (as in CoreNet); turn off adapt_embeddings or use_dora"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter config key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, leaf = path.split(".")
    obj = root
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    if isinstance(obj, list):
        obj[int(leaf)] = new
    else:
        setattr(obj, leaf, new)


def _build_adapters(model: nn.Module, config: LoRAConfig) -> List[Tuple[str, nn.Module]]:
    """``(module path, adapter)`` pairs for ``config``; the model is not modified."""
    if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
        raise ValueError("the model already has adapters; fuse them (fuse_adapters) or load a fresh model")
    layers = model.transformer.layers
    n = len(layers)
    indices = range(n) if config.layers is None else config.layers
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a model with {n} layers")
    cls = DoRALinear if config.use_dora else LoRALinear
    built = []
    for i in sorted({i % n for i in indices}):
        for name, mod in layers[i].named_modules():
            if name.rsplit(".", 1)[-1] in config.targets and isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
                adapter = cls.from_base(mod, rank=config.rank, alpha=config.alpha, dropout=config.dropout)
                built.append((f"{_LAYERS_PATH}.{i}.{name}", adapter))
    if config.adapt_embeddings:
        emb = LoRAEmbedding.from_base(model.transformer.token_embeddings, config.rank, config.alpha, config.adapt_output)
        built.append((_EMBEDDING_PATH, emb))
    for _, adapter in built:
        adapter.train(model.training)  # follow the model's train/eval mode (dropout)
    return built


def _attach(model: nn.Module, built: Sequence[Tuple[str, nn.Module]]) -> None:
    model.freeze()
    for path, adapter in built:
        _set_submodule(model, path, adapter)


def apply_adapters(
    model: nn.Module,
    *,
    rank: int = 32,
    alpha: float = 32.0,
    dropout: float = 0.1,
    use_dora: bool = False,
    targets: Sequence[str] = DEFAULT_TARGETS,
    adapt_embeddings: bool = False,
    layers: Optional[Sequence[int]] = None,
    adapt_output: bool = False,
) -> nn.Module:
    """Freeze ``model`` and wrap the ``targets`` linears of the chosen transformer ``layers`` (all by
    default) with LoRA or DoRA adapters, plus the token embedding if ``adapt_embeddings``.
    Modifies the model in place and returns it; only adapter parameters are trainable afterwards.
    The adapted embedding feeds the input only; the tied output layer keeps the base table (CoreNet)
    unless ``adapt_output``."""
    config = LoRAConfig(rank, alpha, dropout, use_dora, tuple(targets), adapt_embeddings, layers, adapt_output)
    _attach(model, _build_adapters(model, config))
    return model


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every adapter by its fused layer (in place); quantized bases are re-quantized
    unless ``dequantize``. An embedding adapter without ``adapt_output`` unties the model: the
    token embedding becomes ``E'`` and a new ``lm_head`` keeps ``E`` (``args.share_input_output_layers``
    becomes False), so the fused model computes what the adapted one did. Returns the model."""
    adapters = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]
    fused = [(name, m.fuse(dequantize)) for name, m in adapters]
    for name, m in adapters:
        if isinstance(m, LoRAEmbedding) and not m.adapt_output and getattr(model.args, "share_input_output_layers", False):
            # the input table becomes E' but the logits keep E: untie them into a separate lm_head
            fused.append(("lm_head", m.output_layer(dequantize)))
            model.args = dataclasses.replace(model.args, share_input_output_layers=False)
    for name, layer in fused:
        _set_submodule(model, name, layer)
    return model


def save_adapters(folder: Union[str, Path], model: nn.Module, config: LoRAConfig) -> Path:
    """Write the trainable parameters to ``folder/adapters.safetensors`` and ``config`` to
    ``folder/adapter_config.json``, each through a temporary file and a rename. Returns the folder."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    if not weights:
        raise ValueError("the model has no trainable adapter parameters; call apply_adapters first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTERS_FILE, lambda p: mx.save_safetensors(p, weights, metadata={"format": "mlx"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(text))
    return folder


def load_adapters(model: nn.Module, folder: Union[str, Path]) -> LoRAConfig:
    """Apply the adapters described in ``folder/adapter_config.json`` to ``model`` (in place) and
    load ``folder/adapters.safetensors`` into them. The weights must match the adapters exactly
    (names and shapes); on any error no adapter is attached. Returns the config."""
    folder = Path(folder)
    for name in (CONFIG_FILE, ADAPTERS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found; pass a folder written by save_adapters")
    try:
        stored = json.loads((folder / CONFIG_FILE).read_text())
        if isinstance(stored, dict) and stored.get("adapt_embeddings") and "adapt_output" not in stored:
            # written before adapt_output existed: those embedding adapters also fed the output layer
            stored = {**stored, "adapt_output": True}
        config = LoRAConfig.from_dict(stored)
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ValueError(f"{folder / CONFIG_FILE} is not a valid adapter config ({e})") from None
    weights = mx.load(str(folder / ADAPTERS_FILE))
    built = _build_adapters(model, config)
    expected = {
        f"{path}.{k}": v.shape for path, adapter in built for k, v in tree_flatten(adapter.trainable_parameters())
    }
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if tuple(weights[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise ValueError(f"{folder / ADAPTERS_FILE} does not match its config and this model: {'; '.join(parts)}")
    _attach(model, built)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.trainable_parameters())
    return config

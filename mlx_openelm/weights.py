"""Weight formats: dtypes, quantization facts, dequantize / cast / quantize, and THE compute-dtype policy.

``compute_plan`` is the one place that decides what a stored checkpoint becomes in memory
(loading, benchmarks and fuse all ask it); ``apply_plan`` carries the decision out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def quantization_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"group_size", "bits", "mode"}`` of the model's quantized layers, or None."""
    for _, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            return {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
    return None


def float_dtype_of(model: nn.Module) -> str:
    """Name of the dtype of the model's first floating-point parameter."""
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return DTYPE_NAMES.get(p.dtype, str(p.dtype))
    return "float32"


def matrix_weights(model: nn.Module) -> Dict[str, mx.array]:
    """``{name: weight}`` of the plain Linear and Embedding layers: what ``ComputePlan.matrices`` keeps."""
    return {f"{path}.weight": m.weight for path, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}


def affine_params(model: nn.Module) -> Dict[str, mx.array]:
    """``{name: array}`` of the quantized layers' scales and biases: what ``ComputePlan.affine_kept`` keeps."""
    return {f"{path}.{k}": m[k] for path, m in model.named_modules() if isinstance(m, QUANTIZED)
            for k in ("scales", "biases") if m.get(k) is not None}


def dtype_label(model: nn.Module) -> str:
    """``float_dtype_of``, or ``"float32 (float16 matrices)"`` / ``"float32 (float16 scales)"`` where the
    matrices (``ComputePlan.matrices``) or a quantized model's scales and biases (``ComputePlan.affine_kept``)
    stay in a half dtype and the rest (the compute dtype) is float32."""
    rest = {v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")}
    if rest == {mx.float32}:
        for kind, arrays in (("matrices", matrix_weights(model)), ("scales", affine_params(model))):
            kept = {w.dtype for w in arrays.values()}
            if len(kept) == 1 and kept != rest:
                return f"float32 ({DTYPE_NAMES.get(kept.pop())} {kind})"
    return float_dtype_of(model)


def dequantized_weight(m: nn.Module, dtype=None) -> mx.array:
    """The float weight of a quantized layer (in ``dtype``, else the scales' dtype)."""
    # in the target dtype: float32 represents every quantized value scale*q+bias exactly
    dt = dtype or m.scales.dtype
    biases = None if m.get("biases") is None else m.biases.astype(dt)
    return mx.dequantize(m.weight, m.scales.astype(dt), biases, m.group_size, m.bits, mode=m.mode)


def dequantize(model: nn.Module, dtype=None) -> nn.Module:
    """Replace quantized layers by float ones (in the scales' dtype unless ``dtype``), in place."""
    new = []
    for path, m in model.named_modules():
        if not isinstance(m, QUANTIZED):
            continue
        w = dequantized_weight(m, dtype)
        mx.eval(w)
        if isinstance(m, nn.QuantizedLinear):
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                layer.bias = m.bias
        else:
            layer = nn.Embedding(w.shape[0], w.shape[1])
        layer.weight = w
        new.append((path, layer))
    if new:
        model.update_modules(tree_unflatten(new))
    return model


def cast_parameters(model: nn.Module, dtype, skip=()) -> nn.Module:
    """Cast float parameters (but those named in ``skip``) one at a time, so old and new copies never coexist whole."""
    names = [k for k, v in tree_flatten(model.parameters())
             if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and k not in skip]
    for k in names:
        new = dict(tree_flatten(model.parameters()))[k].astype(dtype)
        mx.eval(new)
        model.update(tree_unflatten([(k, new)]))
    return model


def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """Quantize every Linear and the embedding in place (affine), as converters do."""
    if bits not in QUANT_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {', '.join(map(str, QUANT_BITS))} (4 or 8 usually)")
    if quantization_of(model) is not None:
        raise ValueError("the model is already quantized")
    nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def device_is_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def check_dtype(dtype: Optional[str]) -> None:
    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")


@dataclass(frozen=True)
class ComputePlan:
    """What a stored model becomes in memory: cast to ``dtype`` (None = keep), ``dequantize`` or not;
    ``matrices``: a dtype the weights of linear layers and the embedding keep instead (the CPU kernels
    read float16/bfloat16 matrices with float32 activations), None = they follow ``dtype``; ``affine_kept``:
    a quantized model's scales and biases keep their stored dtype (the CPU kernels widen them as they read);
    ``huge_pages``: the parameters move into memory backed by 2 MB pages (``kernels.use_huge_pages``)."""

    dtype: Optional[str]
    dequantize: bool
    device: str
    matrices: Optional[str] = None
    affine_kept: bool = False
    huge_pages: bool = False


def cpu_runs_quantized(quantization: Union[bool, Dict[str, Any], None]) -> bool:
    """Whether a model quantized like ``quantization`` (``quantization_of``'s dict, or True when
    unknown) runs faster kept quantized on the CPU: true where ``kernels`` loaded and the layers are
    4/8-bit affine (its packed products; dequantize-then-BLAS for prompts)."""
    from . import kernels

    if not quantization or not kernels.available():
        return False
    if isinstance(quantization, dict):
        return quantization.get("mode", "affine") == "affine" and quantization.get("bits") in kernels.QUANT_BITS
    return True


def compute_plan(requested: Optional[str], stored_quantized: Union[bool, Dict[str, Any], None], keep_quantized: bool = False,
                 cpu: Optional[bool] = None, stored_dtype: Optional[str] = None) -> ComputePlan:
    """THE compute-dtype policy.

    ``requested="auto"``: on the CPU compute in float32, because MLX's CPU float16 matmuls are many
    times slower than float32 BLAS; where the CPU kernels are built, a float16/bfloat16 model
    (``stored_dtype``) keeps its matrices in that dtype (half the memory and the bytes a decoding step
    reads; the kernels convert as they stream) and only the rest (norms) becomes float32, elsewhere
    everything is upcast; a 4/8-bit model stays quantized
    where the CPU kernels (``kernels``) are built (less memory and faster decoding; its scales and
    biases keep their stored dtype, which the kernels widen exactly as they read: a half model's take
    4 of the 36 bytes per 64 weights of a 4-bit layer instead of 8 of 40) and is dequantized otherwise,
    since MLX's own CPU quantized matmul is slower than float32 BLAS; ``keep_quantized`` (training)
    keeps any quantization, with float32 scales and biases for the adapters' float32 arithmetic. On a
    GPU keep the stored dtype and quantization. A named dtype casts every float parameter and keeps quantization unless
    on the CPU without ``keep_quantized`` (nor kernels for it). ``requested=None`` keeps the stored
    format on any device (for rewriting a model, e.g. fuse). ``stored_quantized``: the stored
    model's ``quantization_of`` (or a bool). On the CPU, any dtype, the parameters end in memory backed by
    2 MB pages where the kernels are built (``huge_pages``; decoding streams them every token).
    """
    from . import kernels

    check_dtype(requested)
    cpu = device_is_cpu() if cpu is None else cpu
    device = "cpu" if cpu else "gpu"
    if requested is None:
        return ComputePlan(None, False, device)
    target = "float32" if (requested == "auto" and cpu) else (None if requested == "auto" else requested)
    keep = keep_quantized or cpu_runs_quantized(stored_quantized)
    matrices = None
    if requested == "auto" and cpu and stored_dtype in ("float16", "bfloat16") and not stored_quantized:
        matrices = stored_dtype if kernels.available() else None
    affine_kept = bool(requested == "auto" and cpu and stored_quantized and not keep_quantized and keep)
    return ComputePlan(target, bool(stored_quantized and cpu and not keep), device, matrices, affine_kept,
                       huge_pages=cpu and kernels.huge_pages_on())


def apply_plan(model: nn.Module, plan: ComputePlan) -> nn.Module:
    """Carry out ``plan`` on ``model`` in place."""
    target = DTYPES[plan.dtype] if plan.dtype else None
    if plan.dequantize:
        dequantize(model, target)
    if target is not None:
        skip = set(matrix_weights(model)) if plan.matrices else set()
        if plan.affine_kept:
            skip |= set(affine_params(model))
        cast_parameters(model, target, skip=skip)
    mx.eval(model.parameters())
    if plan.huge_pages:
        from . import kernels

        kernels.use_huge_pages(model)
    return model

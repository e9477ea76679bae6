"""The CPU fast path: decoding and prompts of OpenELM on a Linux CPU at memory speed.

On a Linux CPU, MLX's own products lose most of the memory bandwidth at decode shapes: float32
``x @ W.T`` with 1-8 rows goes through ``cblas_sgemm`` (OpenBLAS packs the whole weight first),
float16 matmuls skip BLAS and ``mx.quantized_matmul`` runs at ~2.5 GFLOP/s; its CPU SDPA fallback
materialises every head's scores; and each of the ~20 small nodes of a decoder layer costs more to
dispatch than to compute. ``_ext`` (built from ``csrc/`` by ``pip install -e .`` on Linux, see
``_build.py``) adds MLX primitives with ``eval_cpu``:

- ``gemv`` (float32, bfloat16 or float16 weights) and ``qgemv`` (4/8-bit affine, MLX's packed layout):
  <= 8 rows, each weight streamed once by a small thread pool; one row of a 4-bit layer by exact
  integer dot products where the CPU has AVX-512 VNNI (x as three int8 parts, ``csrc/qgemv_vnni.h``);
  quantized layers' scales and biases are read as stored (float32, or float16/bfloat16: fewer bytes);
- ``fused_linear``: the same with an RMSNorm or SwiGLU prologue and a residual add, so a decoder layer
  is five nodes (``model.TransformerBlock._decode``);
- ``cached_attention``: q/k RMSNorm, RoPE, the KV-cache write and causal GQA attention;
- ``tiled_matmul`` / ``tiled_swiglu``: prompt-sized products. Half and 4/8-bit layers: where the CPU has
  AVX-512, the extension's own FMA kernel, the weight widened a panel of 32 rows at a time straight into
  the layout it reads (``csrc/f32_panel.h``); else widened a tile at a time into the process's
  ``cblas_sgemm``. Float32 layers: ``cblas_sgemm`` on the weight in place. With OpenBLAS the tiles run on
  the extension's threads, one single-threaded sgemm each (``no_pooled_tiles`` / ``no_f32_panel`` switch
  these off for comparisons); ``to_float32``, ``dequantize``. With
  ``prompt_precision("bfloat16")`` the prompt products of bfloat16 and 4/8-bit layers take x rounded to
  bfloat16 (as the model computes on a GPU, and llama.cpp on a CPU) and, where the CPU has AVX-512 BF16,
  run as bfloat16 dot products at twice the float32 rate (``csrc/bf16_gemm.h``); float32 sums throughout.
  The library's default is ``"float32"``; ``generate``/``chat``/``serve``/``eval`` default to ``"bfloat16"``.

Where it is not built (macOS, no compiler, another mlx version) or the default device is a GPU,
everything falls back to plain MLX. ``linear(layer, x)`` is the dispatch point for plain products;
``fused_linear``, ``cached_attention`` and ``swiglu_product`` are used by the model for inference
with a KV cache only (``fusion_on``; ``no_fusion`` turns them off for op-level studies). Results
agree with ``mx.matmul`` / ``mx.quantized_matmul`` / MLX's RoPE and SDPA up to float32 rounding (with the
bfloat16 prompt precision: with ``mx.matmul`` of the bfloat16-rounded x).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

MAX_ROWS = 8  # up to this many rows of activations the extension streams each weight once
QUANT_BITS = (4, 8)
FLOAT_WEIGHTS = (mx.float32, mx.bfloat16, mx.float16)  # weight dtypes gemv reads (activations float32)

# what x is rounded to in many-row products of bfloat16 and 4/8-bit layers; the first is the library's default
# (exact, also for training); the inference commands default to bfloat16 (cli._common.PromptPrecisionOpt)
PROMPT_PRECISIONS = ("float32", "bfloat16")

_lib = None
_STATUS = "not loaded"
_PROMPT_BF16 = False


def _load() -> None:
    global _lib, _STATUS
    _lib = None
    if os.environ.get("MLX_OPENELM_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        _STATUS = "off (MLX_OPENELM_KERNELS=0)"
        return
    try:
        from . import _ext as ext
    except ImportError as e:
        here = Path(__file__).resolve().parent
        built = any(here.glob("_ext*.so"))
        _STATUS = f"not available ({'failed to load: ' + str(e) if built else 'not built'})"
        return
    if ext.mlx_version != mx.__version__:
        _STATUS = (f"not used (built against mlx {ext.mlx_version}, running {mx.__version__}; "
                   "rebuild: pip install -e . --no-build-isolation)")
        return
    _lib = ext
    _STATUS = "available"


_load()


def available() -> bool:
    """Whether the compiled extension loaded (whatever the current device)."""
    return _lib is not None


def active() -> bool:
    """Whether products go through the extension now (it loaded and the default device is the CPU)."""
    return _lib is not None and mx.default_device().type == mx.DeviceType.cpu


def describe() -> str:
    """One line for ``--verbose``: which product kernels run."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return "MLX (GPU)"
    if _lib is None:
        return f"MLX built-in (CPU fast path {_STATUS})"
    vnni = ", 4-bit decode by VNNI integer dots" if _lib.has_vnni() else ""
    prompts = ""
    if _PROMPT_BF16:
        how = "AVX-512 BF16 dots" if _lib.has_bf16_dot() else "float32 products"
        prompts = f"; prompts of bfloat16/4/8-bit layers with bfloat16 inputs ({how})"
    if _lib.has_blas():
        pooled = _lib.pooled_tiles()
        how = "one single-threaded OpenBLAS sgemm per thread" if pooled else "the BLAS's threads"
        f32 = f"BLAS tiles ({how})" if pooled else "MLX's matmul"  # as product() routes them
        prompts += f"; prompt products: float32 layers by {f32}, half/4/8-bit layers "
        prompts += ("widened a panel at a time into AVX-512 FMA kernels" if _lib.f32_panel_on()
                    else f"widened a tile at a time into BLAS ({how})")
    held = held_outside_mlx()
    pages = f"; {held / 1e6:.0f} MB of parameters in memory advised for 2 MB pages" if held else ""
    return (f"mlx_openelm CPU kernels: products of <= {MAX_ROWS} rows (float32/bfloat16/float16 or 4/8-bit weights, "
            f"{_lib.num_threads()} threads{vnni}), cached attention{prompts}; MLX/BLAS otherwise{pages}")


def get_prompt_precision() -> str:
    """``"float32"`` (the library's default: prompt products as exact as decoding) or ``"bfloat16"`` (the
    default of the inference commands, set for the duration of one)."""
    return "bfloat16" if _PROMPT_BF16 else "float32"


def set_prompt_precision(name: str) -> str:
    """What x is rounded to in products of more than ``MAX_ROWS`` rows (prompts, scoring, large batches) with
    bfloat16 and 4/8-bit layers on the CPU: ``"float32"`` (not rounded) or ``"bfloat16"`` (rounded to nearest
    even, then bfloat16 dot products with float32 sums: about twice as fast where the CPU has AVX-512 BF16;
    float16 and float32 layers, and products of fewer rows, are not affected). Returns the previous setting."""
    global _PROMPT_BF16
    if name not in PROMPT_PRECISIONS:
        raise ValueError(f"prompt precision {name!r}: choose one of {', '.join(PROMPT_PRECISIONS)}")
    previous = get_prompt_precision()
    _PROMPT_BF16 = name == "bfloat16"
    return previous


@contextmanager
def prompt_precision(name: str):
    """Within the block, ``set_prompt_precision(name)``."""
    previous = set_prompt_precision(name)
    try:
        yield
    finally:
        set_prompt_precision(previous)


@contextmanager
def disabled():
    """Within the block, products use plain MLX (for before/after comparisons in one process)."""
    global _lib
    saved, _lib = _lib, None
    try:
        yield
    finally:
        _lib = saved


@contextmanager
def _switched_off(setter: str):
    """Within the block, the extension's on/off switch ``setter`` (``set_vnni``, ``set_bf16_dot``,
    ``set_pooled_tiles``) is off."""
    lib = _lib
    saved = getattr(lib, setter)(False) if lib is not None else None
    try:
        yield
    finally:
        if lib is not None:
            getattr(lib, setter)(saved)


def no_vnni():
    """Within the block, one-row 4-bit products take the float path (to compare the two in one process);
    the switch is read when a product runs, so evaluate inside the block."""
    return _switched_off("set_vnni")


def no_bf16_dot():
    """Products built within the block with the bfloat16 prompt precision take the path of CPUs without
    AVX-512 BF16 (x rounded to bfloat16, then float32 products): to compare the two in one process."""
    return _switched_off("set_bf16_dot")


def no_f32_panel():
    """Within the block, many-row products with half or 4/8-bit weights and float32 inputs run as widened tiles
    into sgemm instead of the extension's AVX-512 panel kernel (to compare the two in one process); read as a
    product runs, so evaluate inside the block."""
    return _switched_off("set_f32_panel")


def no_pooled_tiles():
    """Within the block, many-row products with half or 4/8-bit weights run each widened tile through one
    sgemm on the BLAS's own threads instead of one single-threaded sgemm per extension thread (to compare
    the two in one process); read as a product runs, so evaluate inside the block."""
    return _switched_off("set_pooled_tiles")


def set_threads(n: int) -> None:
    """Threads the extension uses from the next product on (0: one per available core)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if _lib is not None:
        _lib.set_threads(int(n))


def build_in_place() -> Path:
    """Build the extension next to this file against the running interpreter's mlx (needs cmake,
    a C++ compiler and nanobind); takes effect in a new process."""
    from . import _build

    return _build.build(Path(__file__).resolve().parent)


def gemv(x: mx.array, w: mx.array) -> mx.array:
    """``x[..., K] @ w[N, K].T`` (x float32; w float32, bfloat16 or float16) with the extension."""
    if _lib is None:
        raise RuntimeError(f"the CPU kernels are {_STATUS}")
    return _lib.gemv(x, w)


def qgemv(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """``x @ dequantize(w, scales, biases).T`` (MLX affine layout; float32 x; scales and biases float32, float16 or
    bfloat16 alike) with the extension."""
    if _lib is None:
        raise RuntimeError(f"the CPU kernels are {_STATUS}")
    return _lib.qgemv(x, w, scales, biases, group_size, bits)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """``mx.dequantize`` (affine, 4/8-bit) with the extension: float32 ``[N, K]`` (from float32, float16 or
    bfloat16 scales/biases alike: never rounded to them)."""
    if _lib is None:
        raise RuntimeError(f"the CPU kernels are {_STATUS}")
    return _lib.dequantize(w, scales, biases, group_size, bits)


def cached_attention(qkv: mx.array, q_norm: Optional[mx.array], k_norm: Optional[mx.array], k_cache: mx.array,
                     v_cache: mx.array, offset: int, n_heads: int, n_kv_heads: int, rope_base: float, eps: float,
                     scale: float, owned: bool = False) -> Tuple[mx.array, mx.array, mx.array]:
    """OpenELM attention after the fused qkv projection (``qkv[B, L, (H + 2 Hkv) D]``): RMSNorm of q and k
    over the head (``q_norm``/``k_norm`` weights, or None for none), RoPE at positions ``offset + l``, the
    new keys and values written **in place** into ``k_cache``/``v_cache`` (``[B, Hkv, C, D]``, both float32,
    float16 or bfloat16: computed in float32, rounded to nearest even as stored; evaluated, row-contiguous,
    owned by the caller) at rows ``[offset, offset + L)``, then causal softmax
    attention of each query head over its kv head's rows ``[0, offset + l]``. Returns the attention
    ``[B, L, H D]`` and the two caches as new arrays sharing the buffers: store those back, so that what reads
    the cache later depends on this node (MLX's graph does not see in-place writes). A cache still held
    elsewhere is copied first, unless ``owned``: the caller vouches that the caches are the arrays the last
    call returned for the same cache object, which has not been trimmed since (what the earlier calls' nodes
    still hold of them, they read below ``offset`` and before this write)."""
    if _lib is None:
        raise RuntimeError(f"the CPU kernels are {_STATUS}")
    return _lib.cached_attention(qkv, q_norm, k_norm, k_cache, v_cache, int(offset), int(n_heads), int(n_kv_heads),
                                 float(rope_base), float(eps), float(scale), owned=bool(owned))


def huge_pages_on() -> bool:
    """Whether loading on the CPU puts the parameters in 2 MB pages (``use_huge_pages``): where the extension
    loaded, unless ``MLX_OPENELM_HUGE_PAGES=0``."""
    return _lib is not None and os.environ.get("MLX_OPENELM_HUGE_PAGES", "1").lower() not in ("0", "false", "no")


def use_huge_pages(model: nn.Module, batch_bytes: int = 256 << 20) -> int:
    """Move ``model``'s evaluated parameters into memory backed by 2 MB pages (``huge_page_pack`` in the
    extension: decoding streams every weight each token, and 4 KB pages cost the hardware prefetchers and the
    TLB ~20% of that stream here), in the order the model reads them, ``batch_bytes`` at a time, each batch's
    old buffers handed back to the system before the next (so the extra memory is one batch); returns the
    bytes moved. That memory is outside MLX's allocator: ``held_outside_mlx`` counts it."""
    from mlx.utils import tree_flatten

    if _lib is None:
        return 0
    params = tree_flatten(model.parameters())  # layer by layer, as a forward pass reads them
    before, batch, size = held_outside_mlx(), [], 0
    for i, (name, value) in enumerate(params):
        batch.append((name, value))
        size += value.nbytes
        if size >= batch_bytes or i == len(params) - 1:
            packed = _lib.huge_page_pack([v for _, v in batch])  # views and unevaluated arrays come back as they are
            model.load_weights([(n, p) for (n, _), p in zip(batch, packed)], strict=False)
            batch, size = [], 0
            mx.clear_cache()
    return held_outside_mlx() - before


def held_outside_mlx() -> int:
    """Bytes of arrays in ``use_huge_pages`` memory now (``mx.get_active_memory``/``get_peak_memory`` miss them)."""
    return _lib.huge_page_bytes() if _lib is not None else 0


def peak_memory() -> int:
    """``mx.get_peak_memory()`` plus the parameters ``use_huge_pages`` holds outside MLX's allocator (loaded
    before, and kept through, whatever the peak measures): what ``--verbose`` and the trainer report."""
    return mx.get_peak_memory() + held_outside_mlx()


def cache_copies() -> int:
    """How many times ``cached_attention`` had to copy a cache rather than write into its buffer (a cache
    still referenced elsewhere, a view); decoding with an mlx-lm ``KVCache`` should add none."""
    return _lib.cache_copies() if _lib is not None else 0


def to_float32(w: mx.array) -> mx.array:
    """float16/bfloat16 -> float32 with the extension (multi-threaded; MLX's CPU ``astype`` is ~0.4 G values/s)."""
    if _lib is None:
        raise RuntimeError(f"the CPU kernels are {_STATUS}")
    return _lib.to_float32(w)


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 0


def _quant_ok(m) -> bool:
    # m["scales"]: parameters by item (nn.Module is a dict); m.scales goes through Module.__getattr__, which
    # costs ~0.4 us a time, and a decoding step asks ~500 times (these checks run every step)
    if m.mode != "affine" or m.bits not in QUANT_BITS or m.group_size % 32 or m.get("biases") is None:
        return False
    dt = m["scales"].dtype
    return dt in FLOAT_WEIGHTS and m["biases"].dtype == dt  # the kernels widen half scales/biases exactly


def embedding_rows(m: nn.Module, ids: mx.array) -> Optional[mx.array]:
    """The float32 rows ``ids`` of a 4/8-bit affine ``QuantizedEmbedding`` by the extension's dequantize (a
    gather of the rows' words, scales and biases, then one node; ``mx.dequantize`` on the CPU builds ~55 small
    nodes a call, each a few microseconds of every decoding step); None where ``m(ids)`` should run."""
    if (_lib is None or type(m) is not nn.QuantizedEmbedding or not _quant_ok(m)
            or mx.default_device().type != mx.DeviceType.cpu):
        return None
    flat = ids.reshape(-1)
    rows = _lib.dequantize(m["weight"][flat], m["scales"][flat], m["biases"][flat], m.group_size, m.bits)
    return rows.reshape(*ids.shape, rows.shape[-1])


def product(m: nn.Module, x: mx.array) -> Optional[mx.array]:
    """``x @ W.T`` for a Linear/QuantizedLinear (without bias) or an embedding used as the output
    layer, by the fastest CPU route; None where the module's own code should run (GPU, bias,
    adapters, other dtypes)."""
    if mx.default_device().type != mx.DeviceType.cpu or x.dtype != mx.float32 or "bias" in m:
        return None
    t = type(m)
    small = _rows(x) <= MAX_ROWS
    if t in (nn.Linear, nn.Embedding):
        if _lib is None or m.weight.dtype not in FLOAT_WEIGHTS:
            return None
        if small:
            return _lib.gemv(x, m.weight)
        if m.weight.dtype != mx.float32:  # half weights kept on the CPU: widened a tile at a time into BLAS
            if _lib.has_blas():
                return _lib.tiled_matmul(x, m.weight, None, None, 0, 0, bf16_inputs=_PROMPT_BF16)
            return x @ _lib.to_float32(m.weight).T
        if _lib.has_blas() and _lib.pooled_tiles():  # float32: its tiles on the extension's threads too
            return _lib.tiled_matmul(x, m.weight, None, None, 0, 0)
        return None
    if t in (nn.QuantizedLinear, nn.QuantizedEmbedding):
        if small:
            if _lib is not None and _quant_ok(m):
                return _lib.qgemv(x, m.weight, m.scales, m.biases, m.group_size, m.bits)
            return None
        if m.mode == "affine" and m.scales.dtype in FLOAT_WEIGHTS:
            # many rows: float32 weights, then BLAS (mx.quantized_matmul is ~2.5 GFLOP/s here, and
            # mx.dequantize on the CPU ~15 M values/s): a tile of rows at a time, or the whole layer at once
            if _lib is not None and _quant_ok(m) and _lib.has_blas():
                return _lib.tiled_matmul(x, m.weight, m.scales, m.biases, m.group_size, m.bits, bf16_inputs=_PROMPT_BF16)
            if _lib is not None and _quant_ok(m):
                w = _lib.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            else:  # in float32: dequantizing with half scales would round the weights
                b = m.get("biases")
                w = mx.dequantize(m.weight, m.scales.astype(mx.float32), None if b is None else b.astype(mx.float32),
                                  m.group_size, m.bits, mode=m.mode)
            return x @ w.T
    return None


_FUSION = True  # decode layers as fused kernel nodes (cached attention, fused_linear) where they apply


def fusion_on() -> bool:
    """Whether the model may run decode layers as fused kernel nodes (the kernels loaded, not ``no_fusion``)."""
    return _FUSION and active()


@contextmanager
def no_fusion():
    """Within the block, layers run op by op (norms, RoPE, SDPA as MLX nodes; products still by ``linear``):
    for studies of those ops, such as the RMSNorm ablation."""
    global _FUSION
    saved, _FUSION = _FUSION, False
    try:
        yield
    finally:
        _FUSION = saved


def fusable(m: nn.Module) -> bool:
    """Whether ``fused_linear`` takes this layer (on the CPU with the extension): a Linear without bias whose
    weight gemv reads, or a 4/8-bit affine QuantizedLinear (scales and biases float32, float16 or bfloat16)."""
    if _lib is None or "bias" in m:
        return False
    if type(m) is nn.Linear:
        return m["weight"].dtype in FLOAT_WEIGHTS
    return type(m) is nn.QuantizedLinear and _quant_ok(m)


def fused_linear(m: nn.Module, x: mx.array, *, norm: Optional[nn.Module] = None, swiglu: bool = False,
                 residual: Optional[mx.array] = None) -> mx.array:
    """``prologue(x) @ W.T (+ residual)`` in one node for <= ``MAX_ROWS`` float32 rows and a ``fusable`` layer:
    ``norm`` (an RMSNorm with ``weight`` and ``eps``) normalises x first; ``swiglu`` takes x as
    ``[gate | up]`` (twice the layer's input width) and feeds ``silu(gate) * up``. Inference only (no gradient)."""
    if swiglu and norm is not None:
        raise ValueError("fused_linear: give norm or swiglu, not both")
    prologue = "swiglu" if swiglu else ("rms_norm" if norm is not None else "none")
    quant = type(m) is nn.QuantizedLinear
    return _lib.fused_linear(x, m["weight"], m["scales"] if quant else None, m["biases"] if quant else None,
                             m.group_size if quant else 0, m.bits if quant else 0, prologue,
                             norm.weight if norm is not None else None, float(norm.eps) if norm is not None else 0.0,
                             residual)


def swiglu_product(m: nn.Module, x: mx.array) -> Optional[mx.array]:
    """``silu(gate) * up`` of a SwiGLU's fused first projection ``m`` (rows ``[gate; up]``) for many rows, a
    tile of hidden units at a time, never holding the full projection output (inference only: no gradient);
    None where it does not apply."""
    if not (fusion_on() and fusable(m) and _rows(x) > MAX_ROWS and x.dtype == mx.float32 and _lib.has_blas()):
        return None
    quant = type(m) is nn.QuantizedLinear
    return _lib.tiled_swiglu(x, m.weight, m.scales if quant else None, m.biases if quant else None,
                             m.group_size if quant else 0, m.bits if quant else 0, bf16_inputs=_PROMPT_BF16)


def linear(m: nn.Module, x: mx.array) -> mx.array:
    """``m(x)`` for a linear layer, by the fastest route on the current device."""
    y = product(m, x)
    return m(x) if y is None else y


def as_linear(m: nn.Module, x: mx.array) -> mx.array:
    """``m.as_linear(x)`` for an (optionally quantized) embedding used as the output layer."""
    y = product(m, x)
    return m.as_linear(x) if y is None else y

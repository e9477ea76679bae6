"""The CPU fast path (mlx_openelm.kernels): its products against float64 NumPy written out from
MLX's packed layout and against mx.matmul / mx.quantized_matmul; the model's decode against plain
MLX and mlx-lm's OpenELM; the fallback and the CPU quantization policy."""

from __future__ import annotations

import sys

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_lm.models.cache import KVCache as _KVCache

from mlx_openelm import kernels
from mlx_openelm.bench.core import mlx_lm_model, share_weights
from mlx_openelm.config import ModelArgs
from mlx_openelm.model import Model, init_weights
from mlx_openelm.weights import compute_plan, cpu_runs_quantized, dtype_label, quantize_model

needs_ext = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels: {kernels.describe()}")
pytestmark = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="CPU fast path")


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def unpack_affine(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> np.ndarray:
    """MLX's affine layout read independently: value j of a row sits in bits [bits*j, bits*(j+1))
    of the row's little-endian uint32 words; w = scale * q + bias per group of ``group_size``."""
    words = np.array(w).astype(np.uint64)  # [N, K*bits/32]
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint64) * bits)[None, None, :]
    q = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1).astype(np.float64)
    s = np.repeat(f64(scales), group_size, axis=1)
    b = np.repeat(f64(biases), group_size, axis=1)
    return s * q + b


def rel_err(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 4), (13,), (1, 1, 1)])
@pytest.mark.parametrize("K,N", [(256, 384), (200, 131)])  # 200: a tail after the 8-wide loop; 131 rows: odd blocks
def test_gemv_matches_float64_and_mx_matmul(shape, K, N):
    key = mx.random.key(sum(shape) * K + N)
    k1, k2 = mx.random.split(key)
    x = mx.random.normal(shape + (K,), key=k1)
    w = mx.random.normal((N, K), key=k2) * K**-0.5
    y = kernels.gemv(x, w)
    assert y.shape == shape + (N,) and y.dtype == mx.float32
    ref = f64(x) @ f64(w).T
    assert rel_err(y, ref) < 2e-6
    assert rel_err(y, f64(x @ w.T)) < 2e-6
    # a non-contiguous input (a transposed view) is read correctly
    xt = mx.random.normal((K, 5), key=k1).T
    assert rel_err(kernels.gemv(xt, w), f64(xt) @ f64(w).T) < 2e-6


@needs_ext
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_qgemv_matches_the_packed_layout_and_quantized_matmul(bits, group_size, rows):
    K, N = 384, 136
    k1, k2 = mx.random.split(mx.random.key(bits * 1000 + group_size + rows))
    x = mx.random.normal((1, rows, K), key=k1)
    wq, scales, biases = mx.quantize(mx.random.normal((N, K), key=k2) * K**-0.5, group_size, bits)
    y = kernels.qgemv(x, wq, scales, biases, group_size, bits)
    assert y.shape == (1, rows, N)
    ref = f64(x) @ unpack_affine(wq, scales, biases, group_size, bits).T
    assert rel_err(y, ref) < 3e-6
    theirs = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    assert rel_err(y, f64(theirs)) < 3e-6


needs_vnni = pytest.mark.skipif(not (kernels.available() and kernels._lib.has_vnni()), reason="no AVX-512 VNNI build")


@needs_vnni
@pytest.mark.parametrize("K,group_size", [(384, 32), (384, 64), (384, 128), (1280, 64), (640, 128),
                                          (192, 32), (192, 64)])  # 192: not whole 128-weight chunks: float path
def test_one_row_4_bit_integer_dots_match_float64_like_the_float_path(K, group_size):
    """The VNNI path writes x as three int8 parts per group (block floating point): its error must stay at
    the float path's level (both measured ~2-8e-7 of the largest output here), against float64 of MLX's layout."""
    N = 200
    k1, k2 = mx.random.split(mx.random.key(K + group_size))
    x = mx.random.normal((1, 1, K), key=k1) * mx.exp(mx.random.normal((1, 1, K), key=k2))  # spread magnitudes
    wq, scales, biases = mx.quantize(mx.random.normal((N, K), key=k2) * K**-0.5, group_size, 4)
    ref = f64(x) @ unpack_affine(wq, scales, biases, group_size, 4).T
    vnni = kernels.qgemv(x, wq, scales, biases, group_size, 4)
    with kernels.no_vnni():  # read when the product runs: evaluate inside the block
        plain = kernels.qgemv(x, wq, scales, biases, group_size, 4)
        mx.eval(plain)
    assert rel_err(vnni, ref) < 1.5e-6 and rel_err(plain, ref) < 1.5e-6
    assert rel_err(vnni, ref) < 4 * max(rel_err(plain, ref), 2.5e-7)


@needs_vnni
def test_integer_dots_carry_a_digit_of_128_and_keep_zero_and_wide_groups_close():
    """x0 = round(x / sx) leaves a remainder in [-1/2, 1/2]; times 256 that is 128 exactly for x = 3 + 127.5/256
    (sx = 1 beside a group maximum of 100): the digit 128 does not fit int8 and must carry into x0 (clamping it
    to 127 instead errs by 1.5e-5 a value, 4e-6 of the bound below). Then a group of zeros and one spanning
    1e-4..1e4, where block floating point errs relative to the group's largest value (measured 7e-7 of the
    bound, the float path 2e-7)."""
    K, N, gs = 256, 64, 64
    wq, scales, biases = mx.quantize(mx.random.normal((N, K), key=mx.random.key(3)) * 0.1, gs, 4)
    W = unpack_affine(wq, scales, biases, gs, 4)

    def err(xs):
        ref = xs.astype(np.float64) @ W.T
        bound = np.abs(xs.astype(np.float64)) @ np.abs(W).T  # the scale of float32 rounding in any order
        y = np.array(kernels.qgemv(mx.array(xs)[None], wq, scales, biases, gs, 4), dtype=np.float64)
        return (np.abs(y - ref) / bound).max()

    ties = np.full(K, 3 + 127.5 / 256, np.float32)
    ties[::64] = 100.0
    assert err(ties) < 1e-6  # measured 3e-7 (the float path 1e-7); without the carry 4e-6
    wide = ties.copy()
    wide[64:128] = 0.0
    wide[128:192] = np.geomspace(1e-4, 1e4, 64, dtype=np.float32) * np.where(np.arange(64) % 2, -1, 1)
    assert err(wide) < 1.5e-6


@needs_vnni
def test_integer_dots_leave_tiny_groups_to_the_float_path():
    """A group whose largest value is ~3e-37 would need lane scales sw * sx / 2^16 far below float32's normal
    range: such x goes to the float path, which keeps full relative precision."""
    K, N = 256, 16
    wq, scales, biases = mx.quantize(mx.random.normal((N, K), key=mx.random.key(7)), 64, 4)
    xs = np.array(mx.random.normal((K,), key=mx.random.key(8))) * np.float32(1e-37)
    y = np.array(kernels.qgemv(mx.array(xs)[None], wq, scales, biases, 64, 4), dtype=np.float64)
    ref = xs.astype(np.float64) @ unpack_affine(wq, scales, biases, 64, 4).T
    assert rel_err(y, ref) < 1.5e-6


@needs_vnni
def test_integer_dots_leave_inf_and_nan_to_the_float_path():
    K, N = 256, 8
    wq, scales, biases = mx.quantize(mx.random.normal((N, K), key=mx.random.key(5)), 64, 4)
    for bad in (np.inf, np.nan):
        xs = np.ones(K, np.float32)
        xs[70] = bad
        y = np.array(kernels.qgemv(mx.array(xs)[None], wq, scales, biases, 64, 4))
        with kernels.no_vnni():
            ref = np.array(kernels.qgemv(mx.array(xs)[None], wq, scales, biases, 64, 4))
        assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.array_equal(np.isinf(y), np.isinf(ref))
        assert not np.isfinite(y).any()


@needs_ext
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (4, 128)])
def test_dequantize_matches_the_packed_layout(bits, group_size):
    wq, scales, biases = mx.quantize(mx.random.normal((72, 256), key=mx.random.key(bits + group_size)), group_size, bits)
    ours = kernels.dequantize(wq, scales, biases, group_size, bits)
    assert ours.shape == (72, 256) and ours.dtype == mx.float32
    ref = unpack_affine(wq, scales, biases, group_size, bits)
    assert rel_err(ours, ref) < 1e-6
    assert rel_err(ours, f64(mx.dequantize(wq, scales, biases, group_size, bits))) < 1e-6


@needs_ext
def test_threads_do_not_change_results():
    x = mx.random.normal((3, 1280), key=mx.random.key(1))
    w = mx.random.normal((4096, 1280), key=mx.random.key(2))  # 21 MB: split among threads
    wq, s, b = mx.quantize(w, 64, 4)
    try:
        kernels.set_threads(1)
        one = [kernels.gemv(x, w), kernels.qgemv(x, wq, s, b, 64, 4)]
        mx.eval(one)
        kernels.set_threads(3)
        three = [kernels.gemv(x, w), kernels.qgemv(x, wq, s, b, 64, 4)]
        mx.eval(three)
    finally:
        kernels.set_threads(0)
    # each output is computed by one thread in the same order: bitwise equal
    assert all(mx.array_equal(a, c).item() for a, c in zip(one, three))


@needs_ext
def test_gradients_and_compile_match_matmul():
    x = mx.random.normal((2, 3, 64), key=mx.random.key(3))
    w = mx.random.normal((48, 64), key=mx.random.key(4))
    ours = mx.grad(lambda x, w: (kernels.gemv(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    ref = mx.grad(lambda x, w: ((x @ w.T) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        assert rel_err(a, f64(b)) < 1e-5
    wq, s, b = mx.quantize(w, 32, 8)
    gq = mx.grad(lambda x: kernels.qgemv(x, wq, s, b, 32, 8).sum())(x)
    gr = mx.grad(lambda x: mx.quantized_matmul(x, wq, s, b, True, 32, 8).sum())(x)
    assert rel_err(gq, f64(gr)) < 1e-5
    step = mx.compile(lambda x: nn.silu(kernels.gemv(x, w)))
    assert rel_err(step(x), f64(nn.silu(x @ w.T))) < 1e-5


@needs_ext
def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="float32"):
        kernels.gemv(mx.zeros((1, 8), dtype=mx.float16), mx.zeros((4, 8), dtype=mx.float16))
    with pytest.raises(ValueError, match="match"):
        kernels.gemv(mx.zeros((1, 8)), mx.zeros((4, 9)))
    wq, s, b = mx.quantize(mx.zeros((4, 64)), 64, 4)
    with pytest.raises(ValueError, match="bits"):
        kernels.qgemv(mx.zeros((1, 64)), wq, s, b, 64, 3)


def _tiny_model(quantize=None, seed=0) -> Model:
    m = Model(ModelArgs.from_name("tiny", ffn_dim_divisor=64))  # widths multiples of 64: group size 64
    init_weights(m, seed)
    if quantize:
        quantize_model(m, quantize, 64)
    return m


def _decode_logits(model, tokens, steps=3, cache=None):
    """Prompt, then ``steps`` one-token steps through a KV cache; every step's logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model) if cache is None else cache
    out = [model(mx.array([tokens]), cache=cache)[:, -1]]
    for t in range(steps):
        out.append(model(mx.array([[tokens[t] + 1]]), cache=cache)[:, -1])
    out = mx.concatenate(out)
    mx.eval(out)
    return out


@pytest.mark.parametrize("quantize", [None, 4, 8])
def test_model_decode_with_kernels_matches_plain_mlx_and_mlx_lm(quantize, monkeypatch):
    """Our decode path (kernels where built) against the same weights through plain MLX products
    (kernels off) and through mlx-lm's OpenELM (an independent implementation). A quantized model's KV cache
    is float16 with the kernels (model.kv_cache_dtype): with mlx-lm's cache rounding to float16 the same,
    and, with the cache kept in float32, exactly as before."""
    from mlx_openelm import model as model_module

    model = _tiny_model(quantize)
    tokens = [5, 17, 99, 3, 250, 7]
    ours = _decode_logits(model, tokens)
    theirs = share_weights(model, mlx_lm_model(model.args))
    ref = _decode_logits(theirs, tokens)
    scale = mx.abs(ref).max().item()
    if quantize and kernels.available():
        half_ref = _decode_logits(theirs, tokens, cache=[_Float16KV() for _ in theirs.layers])
        # float16 keys and values: 5.6-8.6e-4 from the float32 cache, 0.7-0.8e-4 from mlx-lm rounding the same
        # (a key computed in float32 by two implementations now and then rounds to neighbouring float16 values)
        assert max_diff(ref, half_ref) > 2e-4 * scale
        assert max_diff(ours, half_ref) < 2e-4 * scale
        monkeypatch.setattr(model_module, "kv_cache_dtype", lambda attn: mx.float32)
        ours = _decode_logits(model, tokens)
    assert max_diff(ours, ref) < 1e-5 * scale
    monkeypatch.setattr(kernels, "_lib", None)  # plain MLX products
    plain = _decode_logits(model, tokens)
    assert max_diff(ours, plain) < 1e-5 * scale


@needs_ext
@pytest.mark.parametrize("bits,scales_dtype", [(4, "float16"), (8, "bfloat16"), (4, "float32")])
def test_quantized_embedding_rows_match_float64(bits, scales_dtype):
    """kernels.embedding_rows: the rows of ids (any shape, repeats) against MLX's layout unpacked in NumPy
    and widened in float64, and what the model's embedding gives without the kernels."""
    emb = nn.QuantizedEmbedding(300, 128, group_size=64, bits=bits)
    emb.scales = emb.scales.astype(getattr(mx, scales_dtype))
    emb.biases = emb.biases.astype(getattr(mx, scales_dtype))
    ids = mx.array([[5, 299, 0, 5], [17, 17, 3, 250]])
    rows = kernels.embedding_rows(emb, ids)
    table = unpack_affine(emb.weight, emb.scales.astype(mx.float32), emb.biases.astype(mx.float32), 64, bits)
    assert rows.dtype == mx.float32 and rows.shape == (2, 4, 128)
    assert rel_err(rows, table[np.array(ids)]) < 1e-6
    from mlx_openelm.model import _embed

    with kernels.disabled():
        assert kernels.embedding_rows(emb, ids) is None
        plain = _embed(emb, ids, mx.float32)
    assert rel_err(rows, f64(plain)) < 1e-6
    assert kernels.embedding_rows(nn.Embedding(10, 64), ids) is None


def max_diff(a, b) -> float:
    return mx.abs(a - b).max().item()


class _Float16KV(_KVCache):
    """mlx-lm's KVCache storing float16 keys and values (rounded by MLX's astype): the reference for our
    float16 cache. A subclass, so our model takes its plain path with it."""

    def update_and_fetch(self, keys, values):
        return super().update_and_fetch(keys.astype(mx.float16), values.astype(mx.float16))


def test_many_rows_of_a_quantized_layer_go_through_dequantize_then_blas():
    layer = nn.QuantizedLinear(128, 96, bias=False, group_size=64, bits=4)
    x = mx.random.normal((2, 20, 128), key=mx.random.key(5))
    y = kernels.linear(layer, x)
    ref = f64(x) @ unpack_affine(layer.weight, layer.scales, layer.biases, 64, 4).T
    assert rel_err(y, ref) < 3e-6
    # a Linear with a bias, float16 activations or adapters: the layer's own code
    biased = nn.Linear(128, 96)
    assert kernels.product(biased, x) is None
    assert kernels.product(nn.Linear(128, 96, bias=False), x.astype(mx.float16)) is None


def test_cpu_policy_keeps_4_and_8_bit_models_quantized_only_with_the_kernels(monkeypatch):
    q4 = {"group_size": 64, "bits": 4, "mode": "affine"}
    q3 = {"group_size": 64, "bits": 3, "mode": "affine"}
    if kernels.available():
        assert not compute_plan("auto", q4, cpu=True).dequantize
        assert compute_plan("auto", q3, cpu=True).dequantize  # no packed kernel: float32 BLAS
        assert cpu_runs_quantized(True)
    monkeypatch.setattr(kernels, "_lib", None)
    assert compute_plan("auto", q4, cpu=True).dequantize
    assert not compute_plan("auto", q4, keep_quantized=True, cpu=True).dequantize
    assert not compute_plan("auto", q4, cpu=False).dequantize  # GPU: stored format
    assert compute_plan("auto", q4, cpu=True).dtype == "float32"


def test_switched_off_or_unbuilt_it_falls_back_to_plain_mlx(monkeypatch):
    model = _tiny_model()
    tokens = [5, 17, 99]
    before = _decode_logits(model, tokens)
    try:
        monkeypatch.setenv("MLX_OPENELM_KERNELS", "0")
        kernels._load()
        assert not kernels.available() and "MLX_OPENELM_KERNELS=0" in kernels.describe()
        monkeypatch.delenv("MLX_OPENELM_KERNELS")
        monkeypatch.setitem(sys.modules, "mlx_openelm.kernels._ext", None)  # as if it was never built
        monkeypatch.delattr(kernels, "_ext", raising=False)
        kernels._load()
        assert not kernels.available() and "not available" in kernels.describe()
        assert max_diff(_decode_logits(model, tokens), before) < 1e-5 * mx.abs(before).max().item()
    finally:
        monkeypatch.undo()
        kernels._load()


def test_the_build_is_optional_where_it_cannot_run(tmp_path, monkeypatch):
    """setup.py's builder raises a RuntimeError naming the cause (setup.py turns it into a warning)."""
    from mlx_openelm.kernels import _build

    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake on PATH
    monkeypatch.setitem(sys.modules, "cmake", None)  # nor the PyPI wheel
    with pytest.raises(RuntimeError, match="cmake"):
        _build.build(tmp_path / "out")
    monkeypatch.setenv("MLX_OPENELM_BUILD_KERNELS", "0")
    assert not _build.should_build()


# ---------------------------------------------------------------- the fused attention (kernels.cached_attention)

import copy  # noqa: E402

from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache, trim_prompt_cache  # noqa: E402

from mlx_openelm.bench.core import random_model  # noqa: E402

ROPE_BASE, EPS = 10000.0, 1e-6


def np_cached_attention(qkv, q_norm, k_norm, k_cache, v_cache, offset, H, Hkv, base, eps, scale, f32_angles=False,
                        keep_caches=False):
    """The kernel's contract written out in float64 NumPy: split the rows into H query, Hkv key and
    Hkv value heads of D; RMSNorm of q and k over D (when weights are given); RoPE "rotate halves"
    (x[i], x[i + D/2] rotated by theta = pos * base^(-2i/D), pos = offset + l); the new rows into copies of
    the caches; causal softmax(q . k_j * scale) over keys j <= offset + l, query head h on kv head
    h // (H / Hkv). ``f32_angles``: theta rounded as a float32 product pos * inv_freq (as mx.fast.rope and
    CoreNet's float32 rotary embedding compute it), everything else in float64. ``keep_caches``: the caches
    already hold the new rows (as a half-precision kernel stored them); only the queries are computed."""
    x = np.asarray(qkv, np.float64)
    B, L, _ = x.shape
    D = k_cache.shape[-1]
    x = x.reshape(B, L, H + 2 * Hkv, D)
    q, k, v = x[:, :, :H], x[:, :, H:H + Hkv], x[:, :, H + Hkv:]
    if q_norm is not None:
        q = q / np.sqrt((q * q).mean(-1, keepdims=True) + eps) * np.asarray(q_norm, np.float64)
        k = k / np.sqrt((k * k).mean(-1, keepdims=True) + eps) * np.asarray(k_norm, np.float64)
    half = D // 2
    pos = np.arange(offset, offset + L, dtype=np.float64)
    inv_freq = base ** (-2.0 * np.arange(half) / D)
    if f32_angles:
        theta = (pos.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]).astype(np.float64)
    else:
        theta = pos[:, None] * inv_freq[None, :]
    cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]

    def rope(t):
        a, b = t[..., :half], t[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    q, k = rope(q), rope(k)
    K = np.array(k_cache, np.float64)
    V = np.array(v_cache, np.float64)
    if not keep_caches:
        K[:, :, offset:offset + L] = k.transpose(0, 2, 1, 3)
        V[:, :, offset:offset + L] = v.transpose(0, 2, 1, 3)
    S = offset + L
    future = np.arange(S)[None, :] > (offset + np.arange(L))[:, None]  # [L, S]
    out = np.zeros((B, L, H, D))
    for h in range(H):
        g = h // (H // Hkv)
        scores = np.einsum("bld,bsd->bls", q[:, :, h], K[:, g, :S]) * scale
        scores = np.where(future[None], -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, h] = p @ V[:, g, :S]
    return out.reshape(B, L, H * D), K, V


def mlx_cached_attention(qkv, q_norm, k_norm, k_cache, v_cache, offset, H, Hkv, base, eps, scale):
    """The same with MLX's own ops, composed as the model's plain path does (second reference)."""
    B, L, _ = qkv.shape
    D = k_cache.shape[-1]
    x = qkv.reshape(B, L, H + 2 * Hkv, D).transpose(0, 2, 1, 3)
    q, k, v = mx.split(x, [H, H + Hkv], axis=1)
    if q_norm is not None:
        q, k = mx.fast.rms_norm(q, q_norm, eps), mx.fast.rms_norm(k, k_norm, eps)
    q = mx.fast.rope(q, D, traditional=False, base=base, scale=1.0, offset=offset)
    k = mx.fast.rope(k, D, traditional=False, base=base, scale=1.0, offset=offset)
    keys = mx.concatenate([k_cache[:, :, :offset], k], axis=2)
    values = mx.concatenate([v_cache[:, :, :offset], v], axis=2)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal")
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * D), k, v


def _attention_inputs(seed, B, L, offset, C, H, Hkv, D, norm):
    """float32 NumPy inputs: qkv ~ N(0, 2^2) (so scores spread over several units), caches pre-filled with
    random rows everywhere (the rows the kernel must leave alone are recognisable), norm weights ~ 1 +- 0.3."""
    rng = np.random.default_rng(seed)
    qkv = (2 * rng.standard_normal((B, L, (H + 2 * Hkv) * D))).astype(np.float32)
    kc = rng.standard_normal((B, Hkv, C, D)).astype(np.float32)
    vc = rng.standard_normal((B, Hkv, C, D)).astype(np.float32)
    qn = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32) if norm else None
    kn = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32) if norm else None
    return qkv, qn, kn, kc, vc


def _run_kernel(qkv, qn, kn, kc, vc, offset, H, Hkv, D):
    """cached_attention on fresh MLX copies of the inputs (evaluated caches: buffers of their own)."""
    k_cache, v_cache = mx.array(kc), mx.array(vc)
    mx.eval(k_cache, v_cache)
    out, k2, v2 = kernels.cached_attention(mx.array(qkv), None if qn is None else mx.array(qn),
                                           None if kn is None else mx.array(kn), k_cache, v_cache, offset, H, Hkv,
                                           ROPE_BASE, EPS, D**-0.5)
    mx.eval(out, k2, v2)
    return out, k2, v2, k_cache, v_cache


# (B, L, offset, C, H, Hkv, D, qk norm): decode (L=1) and chunks (1 < L < 64: one query row per work item),
# prefill from 0 with L >= 64 (blocks of 8 query rows; 70 and 67 leave a partial last block), a chunk of 100
# at offset 500 (blocks of 8 after an offset); D 16 and 64; GQA ratios 1, 3, 4; B = 2 throughout but one.
# With L >= 16 and D a multiple of 64 the register-blocked path runs (attend_block: blocks of 16 positions,
# query rows four at a time): the d64 cases with L >= 49, one of 17 rows x GQA 3 (a last group of 3 rows)
# and D = 128 (OpenELM-3B's head size). Fewer than 16 rows with D a multiple of 64 take attend_position (query
# heads four at a time): GQA 4, 3 (a last group of 3), 6 (4 + 2) and 1, 37 keys (not a multiple of 4), D 128.
ATTENTION_CASES = {
    "decode-gqa4-d64-norm": (2, 1, 300, 512, 8, 2, 64, True),
    "decode-gqa1-d16": (2, 1, 37, 64, 3, 3, 16, False),
    "decode-gqa3-d16-norm-last-row": (2, 1, 511, 512, 3, 1, 16, True),
    "chunk-gqa3-d16-norm": (2, 49, 251, 512, 6, 2, 16, True),
    "chunk-gqa4-d64": (2, 49, 251, 512, 4, 1, 64, False),
    "prefill-gqa1-d64": (2, 70, 0, 128, 4, 4, 64, False),
    "prefill-gqa3-d16-norm-full-cache": (1, 67, 0, 67, 3, 1, 16, True),
    "prefill-gqa4-d16-norm": (2, 96, 0, 256, 8, 2, 16, True),
    "chunk-at-500-gqa4-d64-norm": (2, 100, 500, 640, 4, 1, 64, True),
    "prefill-gqa3-d64-norm-partial-group": (2, 17, 0, 32, 6, 2, 64, True),
    "prefill-gqa5-d128-norm": (1, 40, 0, 64, 10, 2, 128, True),
    "decode-gqa3-d64-norm-37-keys": (2, 1, 36, 64, 6, 2, 64, True),
    "decode-gqa6-d128": (1, 1, 130, 256, 6, 1, 128, False),
    "chunk-gqa1-d64-norm": (2, 7, 20, 64, 2, 2, 64, True),
}


@needs_ext
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_cached_attention_matches_float64_numpy(case):
    B, L, offset, C, H, Hkv, D, norm = ATTENTION_CASES[case]
    qkv, qn, kn, kc, vc = _attention_inputs(len(case) * 7919 + L, B, L, offset, C, H, Hkv, D, norm)
    out, k2, v2, k_cache, v_cache = _run_kernel(qkv, qn, kn, kc, vc, offset, H, Hkv, D)
    assert out.shape == (B, L, H * D) and out.dtype == mx.float32
    assert k2.shape == v2.shape == (B, Hkv, C, D)
    new = slice(offset, offset + L)
    # Tolerances, relative to the largest magnitude of each reference. The angles theta = pos * inv_freq are
    # float32 in the kernel (as in mx.fast.rope); with theta rounded the same way the rest is float32 sums of
    # at most ~600 terms of O(1) values: ~1e-6 measured at most, 5e-6 asserted.
    ro, rk, rv = np_cached_attention(qkv, qn, kn, kc, vc, offset, H, Hkv, ROPE_BASE, EPS, D**-0.5, f32_angles=True)
    assert rel_err(out, ro) < 5e-6
    assert rel_err(np.array(k2)[:, :, new], rk[:, :, new]) < 5e-6
    # Against exact float64 angles, float32's rounding of theta itself (up to ~pos * 2^-24 rad, twice: the
    # product and inv_freq) rotates q and k by up to ~(offset + L) * 2^-23 rad, i.e. 7e-5 relative at pos 600
    # (measured: 1.3e-5 there); the attention mixes those errors without amplifying them (softmax weights are
    # Lipschitz in the scores with a constant <= 1, scores are O(10) here).
    tol = 4e-6 + (offset + L) * 2.0**-23
    ro, rk, rv = np_cached_attention(qkv, qn, kn, kc, vc, offset, H, Hkv, ROPE_BASE, EPS, D**-0.5)
    assert rel_err(out, ro) < tol
    assert rel_err(np.array(k2)[:, :, new], rk[:, :, new]) < tol
    # values are copied, and every row outside [offset, offset + L) is untouched: bitwise
    assert np.array_equal(np.array(v2), rv.astype(np.float32))
    rest = np.ones(C, bool)
    rest[new] = False
    assert np.array_equal(np.array(k2)[:, :, rest], kc[:, :, rest])
    assert np.array_equal(np.array(v2)[:, :, rest], vc[:, :, rest])
    # functional: the inputs, still held here, keep their old rows (the kernel wrote into copies)
    assert np.array_equal(np.array(k_cache), kc) and np.array_equal(np.array(v_cache), vc)


@needs_ext
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_cached_attention_matches_mlx_ops(case):
    """Second reference: mx.fast.rms_norm + mx.fast.rope + mx.fast.scaled_dot_product_attention (causal)."""
    B, L, offset, C, H, Hkv, D, norm = ATTENTION_CASES[case]
    qkv, qn, kn, kc, vc = _attention_inputs(len(case) * 104729 + L, B, L, offset, C, H, Hkv, D, norm)
    ref_out, ref_k, ref_v = mlx_cached_attention(mx.array(qkv), None if qn is None else mx.array(qn),
                                                 None if kn is None else mx.array(kn), mx.array(kc), mx.array(vc),
                                                 offset, H, Hkv, ROPE_BASE, EPS, D**-0.5)
    mx.eval(ref_out, ref_k, ref_v)
    out, k2, v2, _, _ = _run_kernel(qkv, qn, kn, kc, vc, offset, H, Hkv, D)
    new = slice(offset, offset + L)
    # both float32, but mx.fast.rope computes its float32 angles its own way: they differ from the kernel's by
    # up to a few float32 ulps of pos, as from exact angles (see the NumPy test): same bound (7.5e-6 measured
    # at positions up to 600, where the bound is 7.6e-5)
    tol = 4e-6 + (offset + L) * 2.0**-23
    assert rel_err(out, f64(ref_out)) < tol
    assert rel_err(np.array(k2)[:, :, new], f64(ref_k)) < tol
    assert np.array_equal(np.array(v2)[:, :, new], np.array(ref_v))


@needs_ext
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_cached_attention_with_half_caches(case, dtype):
    """float16 / bfloat16 caches: the new keys (float64 reference, then float32) and values (qkv's float32
    values) are stored as MLX's astype rounds them, rows outside [offset, offset + L) untouched, and the output
    is float64 attention over those stored caches."""
    dt = getattr(mx, dtype)
    B, L, offset, C, H, Hkv, D, norm = ATTENTION_CASES[case]
    qkv, qn, kn, kc, vc = _attention_inputs(len(case) * 31 + L, B, L, offset, C, H, Hkv, D, norm)
    k_cache, v_cache = mx.array(kc).astype(dt), mx.array(vc).astype(dt)
    mx.eval(k_cache, v_cache)
    kc, vc = np.array(k_cache.astype(mx.float32)), np.array(v_cache.astype(mx.float32))  # what they hold
    out, k2, v2 = kernels.cached_attention(mx.array(qkv), None if qn is None else mx.array(qn),
                                           None if kn is None else mx.array(kn), k_cache, v_cache, offset, H, Hkv,
                                           ROPE_BASE, EPS, D**-0.5)
    mx.eval(out, k2, v2)
    assert k2.dtype == v2.dtype == dt and out.dtype == mx.float32
    k2, v2 = np.array(k2.astype(mx.float32)), np.array(v2.astype(mx.float32))
    _, rk, rv = np_cached_attention(qkv, qn, kn, kc, vc, offset, H, Hkv, ROPE_BASE, EPS, D**-0.5, f32_angles=True)
    as_stored = lambda a: np.array(mx.array(a.astype(np.float32)).astype(dt).astype(mx.float32))
    new = slice(offset, offset + L)
    # values and the untouched rows: bitwise. Keys: the kernel's float32 key and the reference's differ by
    # ~1e-7 relative, so now and then (<= 1 in 1000 here) they round to neighbouring half values: one ulp
    assert np.array_equal(v2, as_stored(rv))
    rest = np.ones(C, bool)
    rest[new] = False
    assert np.array_equal(k2[:, :, rest], kc[:, :, rest])
    rkh = as_stored(rk)[:, :, new]
    ulp = 2.0 ** (-10 if dtype == "float16" else -7)
    assert (k2[:, :, new] == rkh).mean() >= 0.999
    assert np.all(np.abs(k2[:, :, new] - rkh) <= ulp * np.abs(rkh))
    # the output: float64 attention over the caches as stored (queries as the float64 reference's)
    ro, _, _ = np_cached_attention(qkv, qn, kn, k2, v2, offset, H, Hkv, ROPE_BASE, EPS, D**-0.5, f32_angles=True,
                                   keep_caches=True)
    assert rel_err(out, ro) < 5e-6


@needs_ext
def test_cached_attention_bad_inputs_raise():
    D, H, Hkv, C = 16, 4, 2, 32
    qkv = mx.zeros((2, 3, (H + 2 * Hkv) * D))
    kc, vc = mx.zeros((2, Hkv, C, D)), mx.zeros((2, Hkv, C, D))
    w = mx.ones((D,))
    mx.eval(kc, vc)

    def call(qkv=qkv, qn=None, kn=None, kc=kc, vc=vc, offset=0, H=H, Hkv=Hkv):
        return kernels.cached_attention(qkv, qn, kn, kc, vc, offset, H, Hkv, ROPE_BASE, EPS, D**-0.5)

    with pytest.raises(ValueError, match="float32"):
        call(qkv=qkv.astype(mx.float16))
    with pytest.raises(ValueError, match="float32"):
        call(kc=kc.astype(mx.float16))  # keys float16, values float32
    with pytest.raises(ValueError, match="float32"):
        call(kc=kc.astype(mx.int32), vc=vc.astype(mx.int32))
    with pytest.raises(ValueError, match="match"):
        call(qkv=mx.zeros((2, 3, (H + 2 * Hkv) * D + 16)))  # one head too many
    with pytest.raises(ValueError, match="match"):
        call(H=2)  # qkv's width says 4 query heads
    with pytest.raises(ValueError, match="match"):
        call(kc=mx.zeros((1, Hkv, C, D)), vc=mx.zeros((1, Hkv, C, D)))  # batch
    with pytest.raises(ValueError, match="match"):
        call(kc=mx.zeros((2, 1, C, D)), vc=mx.zeros((2, 1, C, D)), Hkv=2)  # kv heads
    with pytest.raises(ValueError, match=r"\[B, Hkv, C, D\]"):
        call(vc=mx.zeros((2, Hkv, C + 1, D)))  # k and v caches differ
    with pytest.raises(ValueError, match=r"\[B, Hkv, C, D\]"):
        call(qkv=qkv.reshape(6, -1))
    with pytest.raises(ValueError, match="multiple of 16"):  # head_dim
        kernels.cached_attention(mx.zeros((1, 1, 4 * 8)), None, None, mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)),
                                 0, 2, 1, ROPE_BASE, EPS, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        kernels.cached_attention(mx.zeros((2, 3, (3 + 4) * D)), None, None, kc, vc, 0, 3, 2, ROPE_BASE, EPS, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        call(H=0)
    with pytest.raises(ValueError, match="room"):
        call(offset=C - 2)  # offset + L = C + 1
    with pytest.raises(ValueError, match="room"):
        call(offset=-1)
    with pytest.raises(ValueError, match="both"):
        call(qn=w)
    with pytest.raises(ValueError, match="head_dim"):
        call(qn=mx.ones((D + 1,)), kn=mx.ones((D + 1,)))
    # rejected calls wrote nothing
    assert not mx.any(kc).item() and not mx.any(vc).item()
    call(offset=C - 3)  # the last rows: fine


@needs_ext
def test_cached_attention_copies_caches_it_cannot_write_into():
    """Like MLX's slice update, the new rows go into the input cache's buffer only when nothing else holds it;
    a broadcast, a strided or transposed view, a buffer still referenced elsewhere, or one array given as both
    k and v is copied first: the result is the same and the inputs keep their contents."""
    D, H, Hkv, C = 16, 4, 2, 32
    qkv = mx.random.normal((2, 3, (H + 2 * Hkv) * D), key=mx.random.key(11))
    row = mx.random.normal((1, 1, 1, D), key=mx.random.key(15))
    big = mx.random.normal((2, Hkv, 2 * C, D), key=mx.random.key(16))
    t = mx.random.normal((2, C, Hkv, D), key=mx.random.key(17))
    own = mx.random.normal((2, Hkv, C, D), key=mx.random.key(18))
    mx.eval(row, big, t, own)
    inputs = {
        "broadcast": mx.broadcast_to(row, (2, Hkv, C, D)),
        "rows of a larger cache": big[:, :, :C],
        "transposed": t.transpose(0, 2, 1, 3),
        "held elsewhere": own,
    }
    before = {k: np.array(v) for k, v in inputs.items()}
    for name, view in inputs.items():
        for offset in (0, 7):
            out, k2, v2 = kernels.cached_attention(qkv, None, None, view, view, offset, H, Hkv, ROPE_BASE, EPS, 0.25)
            mx.eval(out, k2, v2)
            dense = mx.array(before[name])
            ro, rk, rv = np_cached_attention(np.array(qkv), None, None, before[name], before[name], offset, H, Hkv,
                                             ROPE_BASE, EPS, 0.25)
            assert rel_err(out, ro) < 5e-6, name
            assert rel_err(k2, rk) < 5e-6 and np.array_equal(np.array(v2), rv.astype(np.float32)), name
            assert np.array_equal(np.array(view), before[name]) and np.array_equal(np.array(dense), before[name])
    assert np.array_equal(np.array(big), np.array(big))  # MLX goes on working


# ---------------------------------------------------------------- the model with the fused attention

_TINY = {}


def tiny_f32() -> Model:
    """``random_model("tiny", "float32")``: 4 layers, head_dim 16, 4-8 query heads on 1-2 kv heads (GQA 4)."""
    if "m" not in _TINY:
        _TINY["m"] = random_model("tiny", "float32", None, 0)
    return _TINY["m"]


def _tokens(n, seed, batch=1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, 384, size=(batch, n)))


def _feed(model, tokens, cuts, cache=None, lazy=False):
    """Feed ``tokens[:, cuts[i]:cuts[i+1]]`` call by call through one cache; every call's logits (evaluated
    after each call, or all at the end with ``lazy``) and the cache."""
    cache = make_prompt_cache(model) if cache is None else cache
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        outs.append(model(tokens[:, a:b], cache=cache))
        if not lazy:
            mx.eval(outs[-1])
    mx.eval(outs[::-1])  # lazy: the last call's graph first, so only the graph's edges order the cache writes
    return outs, cache


def _close(a, b, rel=1e-5) -> bool:
    return max_diff(a, b) <= rel * mx.abs(b).max().item()


def _same_with_and_without_kernels(run) -> None:
    """``run()`` (returning an array or a list of them) gives the plain MLX path's results with the kernels."""
    ours = run()
    with kernels.disabled():
        plain = run()
    if isinstance(ours, mx.array):
        ours, plain = [ours], [plain]
    assert all(_close(o, p) for o, p in zip(ours, plain))


# a 200-token prefill, three one-token steps, then a 60-token chunk crossing KVCache's 256-row growth boundary
CUTS = [0, 200, 201, 202, 203, 263]


@needs_ext
@pytest.mark.parametrize("lazy", [False, True], ids=["eval-each-call", "one-eval-at-the-end"])
def test_model_fused_attention_matches_plain_mlx_and_a_full_forward(lazy):
    model = tiny_f32()
    tokens = _tokens(CUTS[-1], 1, batch=2)
    ours, cache = _feed(model, tokens, CUTS, lazy=lazy)
    with kernels.disabled():
        plain, plain_cache = _feed(model, tokens, CUTS)
        full = model(tokens)  # no cache: one causal forward of the whole sequence
        mx.eval(full)
    for o, p, a, b in zip(ours, plain, CUTS[:-1], CUTS[1:]):
        assert o.shape == (2, b - a, 384)
        assert _close(o, p)
        assert _close(o, full[:, a:b])
    # the caches hold the same rotated keys and values as mlx-lm's KVCache filled by the plain path
    for c, pc in zip(cache, plain_cache):
        # (203 rows kept + 256 when the 60-row chunk did not fit, as KVCache.update_and_fetch grows)
        assert c.offset == pc.offset == CUTS[-1] and c.keys.shape == pc.keys.shape == (2, c.keys.shape[1], 459, 16)
        n = CUTS[-1]
        # (keys: RoPE angles rounded differently from mx.fast.rope's, see above; both: earlier layers' sums)
        assert _close(c.keys[:, :, :n], pc.keys[:, :, :n]) and _close(c.values[:, :, :n], pc.values[:, :, :n])


@needs_ext
def test_model_fused_attention_prefill_longer_than_a_growth_step():
    model = tiny_f32()
    tokens = _tokens(301, 2)
    cuts = [0, 300, 301]  # a 300-row prefill (capacity 512 at once), then one step
    ours, cache = _feed(model, tokens, cuts)
    with kernels.disabled():
        plain, _ = _feed(model, tokens, cuts)
        full = model(tokens)
    assert cache[0].keys.shape[2] == 512
    for o, p, a, b in zip(ours, plain, cuts[:-1], cuts[1:]):
        assert _close(o, p) and _close(o, full[:, a:b])


@needs_ext
def test_generate_step_evaluating_only_the_cache_state_gives_the_plain_tokens():
    """mlx-lm's generate_step: prefill chunks of which only ``[c.state for c in cache]`` is evaluated (the
    logits never are), then decoding with async evaluation: same greedy tokens and log-probs as plain MLX."""
    from mlx_lm.generate import generate_step

    model = tiny_f32()
    prompt = _tokens(300, 3)[0]

    def run():
        cache = make_prompt_cache(model)
        steps = list(generate_step(prompt, model, max_tokens=8, prompt_cache=cache, prefill_step_size=128))
        return [int(t) for t, _ in steps], mx.stack([lp for _, lp in steps]), cache

    toks, logprobs, cache = run()
    with kernels.disabled():
        plain_toks, plain_logprobs, _ = run()
    assert cache[0].offset >= 300 + 7 and toks == plain_toks
    assert max_diff(logprobs, plain_logprobs) < 1e-4
    # the same by hand: prefill whose logits are never evaluated, state only, then one-token steps
    cache = make_prompt_cache(model)
    model(prompt[None, :250], cache=cache)
    mx.eval([c.state for c in cache])
    model(prompt[None, 250:299], cache=cache)
    mx.eval([c.state for c in cache])
    y, out = prompt[299:], []
    for _ in range(8):
        y = mx.argmax(model(y[None], cache=cache)[0, -1:], axis=-1)
        out.append(int(y.item()))
    assert out == plain_toks


@needs_ext
def test_trimmed_cache_refed_with_other_tokens_matches_plain_mlx():
    """Speculative decoding's pattern: feed a draft, trim the rejected part, feed other tokens (the kernel
    overwrites the trimmed rows), here also across the 256-row growth boundary."""
    model = tiny_f32()
    prefix, draft1, other1, draft2, other2 = (_tokens(n, s) for n, s in ((250, 4), (10, 5), (5, 6), (4, 7), (2, 8)))

    def run():
        cache = make_prompt_cache(model)
        outs = [model(prefix, cache=cache), model(draft1, cache=cache)]  # 250 -> 260: grows to 512 rows
        mx.eval(outs)
        assert trim_prompt_cache(cache, 7) == 7  # keep 3 of the 10
        outs.append(model(other1, cache=cache))
        mx.eval(outs)
        trim_prompt_cache(cache, 5)  # all of other1
        outs.append(model(draft2, cache=cache))
        mx.eval(outs)
        trim_prompt_cache(cache, 1)
        outs.append(model(other2, cache=cache))
        mx.eval(outs)
        return outs, cache

    ours, cache = run()
    with kernels.disabled():
        plain, _ = run()
        full = model(mx.concatenate([prefix, draft1[:, :3], draft2[:, :3], other2], axis=1))
        mx.eval(full)
    assert cache[0].offset == 250 + 3 + 3 + 2
    for o, p in zip(ours, plain):
        assert _close(o, p)
    assert _close(ours[-1], full[:, -2:])


@needs_ext
def test_caches_written_by_either_path_continue_on_the_other():
    """A cache filled by the plain path (an array mask) continued by the kernel, and the reverse."""
    model = tiny_f32()
    tokens = _tokens(40, 9)
    causal = lambda n, off: mx.arange(off + n)[None, :] <= (off + mx.arange(n))[:, None]

    def run():
        cache = make_prompt_cache(model)
        outs = [model(tokens[:, :20], cache=cache, mask=causal(20, 0))]  # plain path (array mask)
        outs.append(model(tokens[:, 20:30], cache=cache))  # fused where available
        outs.append(model(tokens[:, 30:35], cache=cache, mask=causal(5, 30)))  # plain again
        outs.append(model(tokens[:, 35:40], cache=cache))
        mx.eval(outs)
        return outs

    ours = run()
    with kernels.disabled():
        plain = run()
        full = model(tokens)
    for o, p, (a, b) in zip(ours, plain, [(0, 20), (20, 30), (30, 35), (35, 40)]):
        assert _close(o, p) and _close(o, full[:, a:b])


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts calls of kernels.cached_attention (the model calls it through the module)."""
    calls = []
    real = kernels.cached_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "cached_attention", counting)
    return calls


class _MyKVCache(KVCache):
    pass


@needs_ext
def test_the_model_uses_the_fused_attention_exactly_where_it_applies(attention_calls):
    model = tiny_f32()
    n_layers = len(model.layers)
    tokens = _tokens(12, 10)
    # float32 model, mlx-lm KVCache on the CPU: one call a layer, prefill and decode alike
    cache = make_prompt_cache(model)
    ref = model(tokens[:, :10], cache=cache)
    step = model(tokens[:, 10:11], cache=cache)
    mx.eval(ref, step)
    assert len(attention_calls) == 2 * n_layers
    assert attention_calls[-1] == (1, 1, attention_calls[-1][2])
    attention_calls.clear()

    def uses_kernel(cache_factory, mask=None, m=model, inputs=tokens[:, :10]):
        attention_calls.clear()
        cache = cache_factory()
        mx.eval(m(inputs, cache=cache, mask=mask))
        return len(attention_calls) > 0

    assert uses_kernel(lambda: make_prompt_cache(model))
    with kernels.disabled():
        assert not uses_kernel(lambda: make_prompt_cache(model))
    assert not uses_kernel(lambda: None)  # no cache (training, scoring)
    assert not uses_kernel(lambda: [_MyKVCache() for _ in model.layers])  # not mlx-lm's plain KVCache
    assert not uses_kernel(lambda: [RotatingKVCache(max_size=64) for _ in model.layers])
    array_mask = mx.arange(10)[None, :] <= mx.arange(10)[:, None]
    assert not uses_kernel(lambda: make_prompt_cache(model), mask=array_mask)
    half = random_model("tiny", "float16", None, 0)
    assert not uses_kernel(lambda: make_prompt_cache(half), m=half)
    # and the paths that do not use it give the same logits
    sub = [_MyKVCache() for _ in model.layers]
    assert _close(model(tokens[:, :10], cache=sub), ref)
    assert _close(model(tokens[:, :10], cache=make_prompt_cache(model), mask=array_mask), ref)


@needs_ext
def test_a_prompt_cache_saved_and_loaded_continues_with_the_fused_attention(tmp_path):
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    model = tiny_f32()
    tokens = _tokens(9, 11)

    def run():
        cache = make_prompt_cache(model)
        mx.eval(model(tokens[:, :6], cache=cache))
        save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
        loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
        outs = [model(tokens[:, 6:7], cache=loaded), model(tokens[:, 7:9], cache=loaded)]
        mx.eval(outs)
        return outs

    _same_with_and_without_kernels(run)


@needs_ext
def test_a_cache_of_broadcast_views_continues_like_the_plain_path():
    model = tiny_f32()
    tokens = _tokens(4, 12)

    def run():
        cache = make_prompt_cache(model)
        model(tokens, cache=cache)
        for c in cache:  # one prompt, two samples
            c.keys, c.values = mx.repeat(c.keys, 2, axis=0), mx.repeat(c.values, 2, axis=0)
        out = model(mx.array([[7], [9]]), cache=cache)
        mx.eval(out)
        return out

    _same_with_and_without_kernels(run)


@needs_ext
def test_a_deep_copied_cache_is_independent_of_its_original():
    model = tiny_f32()
    tokens = _tokens(3, 13)

    def run():
        cache = make_prompt_cache(model)
        mx.eval(model(tokens, cache=cache))
        fork = copy.deepcopy(cache)  # a stored prompt cache handed out for a request sharing a prefix
        trim_prompt_cache(fork, 1)
        mx.eval(model(mx.array([[42]]), cache=fork))  # writes row 2 of the shared buffer
        out = model(mx.array([[7]]), cache=cache)  # the stored entry reused: must still see tokens[2] at row 2
        mx.eval(out)
        return out

    _same_with_and_without_kernels(run)


@needs_ext
@pytest.mark.parametrize("order", ["fork first", "original first"])
def test_caches_sharing_a_buffer_stay_independent_after_decoding(order):
    """The in-place write's ownership rule (the arrays the last write left in this very cache object, untrimmed):
    a deepcopy (which shares the buffers) and a trimmed original must not write into each other's rows,
    whichever decodes first, lazily or evaluated step by step."""
    model = tiny_f32()
    tokens = _tokens(3, 17)

    def run():
        cache = make_prompt_cache(model)
        mx.eval(model(tokens, cache=cache))
        mx.eval(model(mx.array([[5]]), cache=cache))  # one decoding step: the cache is now "owned"
        fork = copy.deepcopy(cache)
        steps = [(fork, 42), (cache, 7), (fork, 43), (cache, 8)]
        outs = []
        for c, t in (steps if order == "fork first" else steps[1::-1] + steps[3:1:-1]):
            outs.append(model(mx.array([[t]]), cache=c))
        trim_prompt_cache(cache, 2)  # the original goes back two rows (one the fork still holds)
        outs.append(model(mx.array([[9]]), cache=cache))
        outs.append(model(mx.array([[44]]), cache=fork))
        mx.eval(outs)
        return outs

    _same_with_and_without_kernels(run)


@needs_ext
def test_decoding_writes_the_cache_in_place_without_copies():
    """Each step hands the last step's cache arrays back in and nothing else holds them, so the new rows
    go into the same buffers (a copy per layer and step would cost the whole cache's bytes every token)."""
    from mlx_openelm.generate.stream import generate_step

    model = tiny_f32()
    prompt = mx.array(np.random.default_rng(3).integers(0, model.args.vocab_size, 300).tolist())
    before = kernels.cache_copies()
    tokens = [t for t, _ in generate_step(prompt, model, max_tokens=20, prefill_step_size=128)]
    assert len(tokens) == 20 and kernels.cache_copies() == before


@needs_ext
def test_the_cache_is_float16_for_half_and_quantized_models_and_float32_for_float32_ones():
    """model.kv_cache_dtype: what every layer's cache holds after a prompt and decoding steps (as the CPU
    policy loads each model), and half the bytes of the float32 cache."""
    from mlx_openelm.bench.core import as_loaded

    models = {"float32": tiny_f32(), "float16": as_loaded(random_model("tiny", "float16", None, 0)),
              "bfloat16": as_loaded(random_model("tiny", "bfloat16", None, 0)),
              "4-bit": as_loaded(random_model("tiny", "float16", 4, 0))}
    nbytes = {}
    for name, model in models.items():
        cache = make_prompt_cache(model)
        mx.eval(model(_tokens(20, 1), cache=cache), model(mx.array([[3]]), cache=cache))
        assert {c.keys.dtype for c in cache} == {c.values.dtype for c in cache} == (
            {mx.float32} if name == "float32" else {mx.float16}), name
        nbytes[name] = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert nbytes["float16"] == nbytes["bfloat16"] == nbytes["4-bit"] == nbytes["float32"] // 2


@needs_ext
def test_a_float16_cache_through_every_cache_path_matches_mlx_lms_cache_rounding_the_same():
    """A float16-matrix model (float16 cache): a 200-token prompt, one-token steps (in place, no copies), a
    chunk across the 256-row growth, a plain-path call (array mask) writing into the float16 buffers, a
    deep-copied fork and trims. Reference: plain MLX with mlx-lm's cache storing float16 (MLX's rounding)."""
    from mlx_openelm.bench.core import as_loaded

    model = as_loaded(random_model("tiny", "float16", None, 0))
    tokens = _tokens(300, 21)
    causal = lambda n, off: mx.arange(off + n)[None, :] <= (off + mx.arange(n))[:, None]

    def run(cache):
        outs = [model(tokens[:, :200], cache=cache)]
        mx.eval(outs)
        before = kernels.cache_copies()
        for i in range(200, 203):
            outs.append(model(tokens[:, i:i + 1], cache=cache))
            mx.eval(outs[-1])
        copies = kernels.cache_copies() - before
        outs.append(model(tokens[:, 203:263], cache=cache))  # grows the buffers past 256 rows
        outs.append(model(tokens[:, 263:268], cache=cache, mask=causal(5, 263)))  # plain path
        outs.append(model(tokens[:, 268:269], cache=cache))
        mx.eval(outs)
        fork = copy.deepcopy(cache)
        trim_prompt_cache(fork, 2)
        outs.append(model(tokens[:, 280:282], cache=fork))
        trim_prompt_cache(cache, 1)
        outs.append(model(tokens[:, 290:291], cache=cache))
        outs.append(model(tokens[:, 291:292], cache=fork))
        mx.eval(outs)
        return outs, cache, copies

    ours, cache, copies = run(make_prompt_cache(model))
    assert copies == 0 and {c.keys.dtype for c in cache} == {mx.float16} and cache[0].keys.shape[2] > 256
    with kernels.disabled():
        ref, _, _ = run([_Float16KV() for _ in model.layers])
        f32_ref, _, _ = run(make_prompt_cache(model))
    # measured: 1.4-3.7e-5 from the float16 reference (rounding ties of keys computed two ways), 1.7-5.6e-4 from
    # the logits with a float32 cache
    for o, r in zip(ours, ref):
        assert _close(o, r, rel=1e-4)
    assert max(max_diff(o, r32) / mx.abs(r32).max().item() for o, r32 in zip(ours, f32_ref)) > 3e-4


# ---------------------------------------------------------------- float16 / bfloat16 matrices


@needs_ext
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows,K,N", [(1, 1280, 1536), (1, 100, 37), (3, 256, 200), (8, 64, 64)])
def test_half_gemv_matches_float64(dtype, rows, K, N):
    """float32 x times float16/bfloat16 w, against the float64 product of the same (exactly widened) values."""
    rng = np.random.default_rng(rows * K + N)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(getattr(mx, dtype))
    x = mx.array(rng.standard_normal((2, rows, K)).astype(np.float32)) if rows > 1 else mx.array(
        rng.standard_normal((1, K)).astype(np.float32))
    y = kernels.gemv(x, w)
    ref = f64(x) @ f64(w.astype(mx.float32)).T
    assert y.dtype == mx.float32 and rel_err(y, ref) < 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_to_float32_is_exact(dtype):
    w = (mx.random.normal((257, 300), key=mx.random.key(5)) * 100).astype(getattr(mx, dtype))
    assert np.array_equal(np.array(kernels.to_float32(w)), np.array(w.astype(mx.float32)))


@needs_ext
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cpu_policy_keeps_half_matrices_and_computes_in_float32(dtype):
    """A float16/bfloat16 model loaded with dtype="auto" on the CPU keeps its Linear/Embedding weights in that
    dtype (half the bytes a decoding step reads), the norms and activations float32; its logits are those of
    the float32 upcast of the same weights (the widening is exact) for 1 row (gemv) and many (to_float32 + BLAS)."""
    from mlx_openelm.bench import core as bench
    from mlx.utils import tree_flatten

    plan = compute_plan("auto", False, stored_dtype=dtype, cpu=True)
    assert plan.dtype == "float32" and plan.matrices == dtype
    assert compute_plan("auto", False, stored_dtype="float32", cpu=True).matrices is None
    ckpt = bench.random_model("tiny", dtype, None, 0)
    ours = bench.as_loaded(ckpt, "auto")
    params = dict(tree_flatten(ours.parameters()))
    assert params["transformer.token_embeddings.weight"].dtype == getattr(mx, dtype)
    assert params["transformer.layers.0.ffn.proj_1.weight"].dtype == getattr(mx, dtype)
    assert params["transformer.norm.weight"].dtype == mx.float32
    upcast = bench.as_loaded(ckpt, "float32")
    ids = mx.array([[5, 17, 99, 3, 250, 7, 7, 300, 12, 44]])
    for part in (ids, ids[:, :1]):
        a, b = ours(part), upcast(part)
        assert a.dtype == mx.float32 and rel_err(a, f64(b)) < 1e-5


@needs_ext
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64), (4, 128)])
def test_half_scales_and_biases_are_read_exactly(half, bits, group_size):
    """Scales and biases kept float16/bfloat16 (as a half model is quantized and stored): every kernel that
    reads them (qgemv's one-row VNNI and float paths, its row blocks, fused_linear, dequantize, the tiled prompt
    product with and without bfloat16 inputs) agrees with float64 written out from the packed layout, and is
    bit-identical to the same kernel given the float32 widening of those scales (widening is exact)."""
    K, N = 512, 200
    k1, k2 = mx.random.split(mx.random.key(bits * 7 + group_size))
    wq, s32, b32 = mx.quantize(mx.random.normal((N, K), key=k2) * K**-0.5, group_size, bits)
    s, b = s32.astype(getattr(mx, half)), b32.astype(getattr(mx, half))
    sw, bw = s.astype(mx.float32), b.astype(mx.float32)  # exact: what the kernels widen to
    W = unpack_affine(wq, s, b, group_size, bits)
    for rows in (1, 3, 8):
        x = mx.random.normal((rows, K), key=mx.random.key(rows))
        y = kernels.qgemv(x, wq, s, b, group_size, bits)
        assert rel_err(y, f64(x) @ W.T) < 3e-6
        assert np.array_equal(np.array(y), np.array(kernels.qgemv(x, wq, sw, bw, group_size, bits)))
        fused = kernels._lib.fused_linear(x, wq, s, b, group_size, bits, "none", None, 0.0, None)
        assert np.array_equal(np.array(fused), np.array(kernels._lib.fused_linear(x, wq, sw, bw, group_size, bits,
                                                                                    "none", None, 0.0, None)))
    deq = kernels.dequantize(wq, s, b, group_size, bits)
    assert deq.dtype == mx.float32 and np.array_equal(np.array(deq), np.array(kernels.dequantize(wq, sw, bw, group_size, bits)))
    assert rel_err(deq, W) < 1e-6
    if kernels._lib.has_blas():
        x = mx.random.normal((40, K), key=mx.random.key(40))
        for bf16 in (False, True):
            y = kernels._lib.tiled_matmul(x, wq, s, b, group_size, bits, bf16_inputs=bf16)
            ref = (bf16_round(np.array(x)) if bf16 else f64(x)) @ W.T
            assert rel_err(y, ref) < 3e-6
            same = kernels._lib.tiled_matmul(x, wq, sw, bw, group_size, bits, bf16_inputs=bf16)
            assert np.array_equal(np.array(y), np.array(same))
    with pytest.raises(ValueError, match="alike"):  # scales and biases of two dtypes
        kernels.qgemv(x[:1], wq, s, bw, group_size, bits)
    with pytest.raises(ValueError, match="do not match"):  # one scale too few a row
        kernels.dequantize(wq, s[:, 1:], b[:, 1:], group_size, bits)


@needs_ext
def test_cpu_policy_keeps_a_quantized_models_scales_as_stored():
    """A 4-bit model of a float16 checkpoint loaded with dtype="auto" on the CPU keeps float16 scales and biases
    (fewer bytes a step, less memory), norms float32; its logits are those of the same model with float32 copies
    of the scales (1 row: qgemv/fused; many: tiled). Training loads (keep_quantized) widen them as before."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_openelm.bench import core as bench
    from mlx_openelm.weights import affine_params

    q4 = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert compute_plan("auto", q4, cpu=True).affine_kept
    assert not compute_plan("auto", q4, keep_quantized=True, cpu=True).affine_kept
    assert not compute_plan("auto", q4, cpu=False).affine_kept and not compute_plan("float32", q4, cpu=True).affine_kept
    ckpt = bench.random_model("tiny", "float16", 4, 0)
    ours = bench.as_loaded(ckpt, "auto")
    kept = affine_params(ours)
    assert kept and {v.dtype for v in kept.values()} == {mx.float16}
    assert dict(tree_flatten(ours.parameters()))["transformer.norm.weight"].dtype == mx.float32
    assert dtype_label(ours) == "float32 (float16 scales)"
    widened = share_weights(ours, Model(ours.args))
    widened.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in kept.items()]))
    assert dtype_label(widened) == "float32"
    ids = mx.array([[5, 17, 99, 3, 250, 7, 7, 300, 12, 44] * 2])
    for part in (ids, ids[:, :1]):
        a, b = ours(part), widened(part)
        assert a.dtype == mx.float32 and rel_err(a, f64(b)) < 1e-6


# ---------------------------------------------------------------- fused products (decode layer in five nodes)


def _np_rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


@needs_ext
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_linear_matches_float64(fmt, rows):
    """prologue(x) @ W.T + residual, written out in float64 (RMSNorm; SwiGLU = silu(gate) * up) against the
    one-node kernel, for every weight format the decode path uses."""
    rng = np.random.default_rng(rows + len(fmt))
    K, N = 128, 96
    lin = nn.Linear(K, N, bias=False)
    lin.weight = mx.array(rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K))
    if fmt in ("q4", "q8"):
        lin = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=int(fmt[1]))
        lin.scales, lin.biases = lin.scales.astype(mx.float32), lin.biases.astype(mx.float32)
        W = unpack_affine(lin.weight, lin.scales, lin.biases, 64, int(fmt[1]))
    else:
        lin.weight = lin.weight.astype(getattr(mx, fmt))
        W = f64(lin.weight.astype(mx.float32))
    assert kernels.fusable(lin)
    x = rng.standard_normal((1, rows, K)).astype(np.float32)
    x2 = rng.standard_normal((1, rows, 2 * K)).astype(np.float32)
    res = rng.standard_normal((1, rows, N)).astype(np.float32)
    g = (rng.random(K) + 0.5).astype(np.float32)

    class Norm:
        weight, eps = mx.array(g), 1e-6

    xd, x2d = x.astype(np.float64), x2.astype(np.float64)
    gate, up = x2d[..., :K], x2d[..., K:]
    cases = {
        "plain": (kernels.fused_linear(lin, mx.array(x)), xd @ W.T),
        "norm": (kernels.fused_linear(lin, mx.array(x), norm=Norm), _np_rms(xd, g, 1e-6) @ W.T),
        "residual": (kernels.fused_linear(lin, mx.array(x), residual=mx.array(res)), xd @ W.T + res),
        "swiglu+residual": (kernels.fused_linear(lin, mx.array(x2), swiglu=True, residual=mx.array(res)),
                            (gate / (1 + np.exp(-gate)) * up) @ W.T + res),
    }
    for name, (got, ref) in cases.items():
        assert got.shape == ref.shape and rel_err(got, ref) < 2e-5, (fmt, name)


@needs_ext
def test_fused_linear_refuses_what_it_cannot_do():
    lin = nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.fused_linear(lin, mx.zeros((9, 64)))
    with pytest.raises(ValueError, match="does not match"):
        kernels.fused_linear(lin, mx.zeros((1, 64)), swiglu=True)
    with pytest.raises(ValueError, match="not both"):
        kernels.fused_linear(lin, mx.zeros((1, 128)), swiglu=True, norm=nn.RMSNorm(64))
    assert not kernels.fusable(nn.Linear(64, 32, bias=True))


@needs_ext
def test_decode_layers_take_the_five_node_path_and_match_the_plain_one():
    """With a KV cache and <= 8 rows every layer runs through fused_linear (counted), and greedy decoding gives
    the plain MLX path's tokens and log-probabilities."""
    from mlx_openelm.generate.stream import generate_step

    model = tiny_f32()
    prompt = mx.array(np.random.default_rng(9).integers(0, model.args.vocab_size, 40).tolist())
    calls = []
    real = kernels.fused_linear

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    kernels.fused_linear = counting
    try:
        ours = [(t, np.array(lp)) for t, lp in generate_step(prompt, model, max_tokens=6)]
    finally:
        kernels.fused_linear = real
    per_pass = 4 * len(model.layers)  # four products a layer for each one-row forward pass (>= one a token)
    assert len(calls) % per_pass == 0 and len(calls) >= 6 * per_pass
    with kernels.disabled():
        plain = [(t, np.array(lp)) for t, lp in generate_step(prompt, model, max_tokens=6)]
    assert [t for t, _ in ours] == [t for t, _ in plain]
    assert max(np.abs(a - b).max() for (_, a), (_, b) in zip(ours, plain)) < 1e-4


def bf16_round(a) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float64: on the bits, independently of MLX."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def _layer(fmt: str, K: int, N: int, seed: int):
    rng = np.random.default_rng(seed)
    lin = nn.Linear(K, N, bias=False)
    lin.weight = mx.array(rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K))
    if fmt.startswith("q"):
        lin = nn.QuantizedLinear.from_linear(lin, group_size=64 if K % 64 == 0 else 32, bits=int(fmt[1]))
        lin.scales, lin.biases = lin.scales.astype(mx.float32), lin.biases.astype(mx.float32)
        return lin, unpack_affine(lin.weight, lin.scales, lin.biases, lin.group_size, int(fmt[1]))
    lin.weight = lin.weight.astype(getattr(mx, fmt))
    return lin, f64(lin.weight.astype(mx.float32))


needs_blas = pytest.mark.skipif(not (kernels.available() and kernels._lib.has_blas()), reason="no cblas_sgemm")


@needs_ext
@needs_blas
@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "q4", "q8"])
def test_many_row_products_widen_tiles_into_blas(fmt):
    """Prompt-sized products of half or 4/8-bit layers (``tiled_matmul``: float32 tiles of the weight into
    cblas_sgemm, no whole-layer copy) equal the float64 product of the stored values; N spans several tiles."""
    K, N, M = 1280, 2000, 37  # 2000 rows: several tiles of 4-8 MB of float32, the last one partial
    lin, W = _layer(fmt, K, N, len(fmt))
    x = mx.array(np.random.default_rng(len(fmt)).standard_normal((1, M, K)).astype(np.float32))
    y = kernels.linear(lin, x)
    assert y.shape == (1, M, N) and rel_err(y, f64(x) @ W.T) < 1e-5
    # the gradient with respect to x (LoRA on a half or quantized base trains through it)
    g = mx.grad(lambda a: (kernels.linear(lin, a) ** 2).sum())(x)
    ref = 2 * (f64(x) @ W.T) @ W
    assert rel_err(g, ref) < 1e-4


@needs_ext
@needs_blas
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "q4", "q8"])
def test_prompt_swiglu_a_tile_at_a_time_matches_float64(fmt):
    """silu(x Wg^T) * (x Wu^T) of the fused [gate; up] projection, one tile of hidden units at a time (the
    prompt path; the [M, 2H] output never exists whole) against float64 NumPy."""
    K, H, M = 1280, 1000, 23  # 1000 hidden units: several tiles (gate and up rows), the last one partial
    lin, W = _layer(fmt, K, 2 * H, 7 + len(fmt))
    x = mx.array(np.random.default_rng(8 + len(fmt)).standard_normal((1, M, K)).astype(np.float32))
    y = kernels.swiglu_product(lin, x)
    p = f64(x) @ W.T
    ref = p[..., :H] / (1 + np.exp(-p[..., :H])) * p[..., H:]
    assert y.shape == (1, M, H) and rel_err(y, ref) < 1e-5
    assert kernels.swiglu_product(lin, x[:, :4]) is None  # decode rows take fused_linear instead
    with kernels.no_fusion():
        assert kernels.swiglu_product(lin, x) is None


def _blas_threads():
    """OpenBLAS's thread count (None where the process's BLAS is not OpenBLAS)."""
    import ctypes

    lib = ctypes.CDLL(None)
    return lib.openblas_get_num_threads() if hasattr(lib, "openblas_get_num_threads") else None


@needs_ext
@needs_blas
@pytest.mark.parametrize("fmt", ["float16", "q4"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_prompt_tiles_on_the_extension_threads_match_float64(fmt, swiglu):
    """Prompt tiles claimed by the extension's threads, one single-threaded sgemm each (the default where the
    BLAS is OpenBLAS), and each tile split by the BLAS's own threads (``no_pooled_tiles``) both equal the float64
    product; 2 and 3 threads (shares of 4 and 8 tiles, the last partial); OpenBLAS's thread count is restored."""
    K, N, M = 1280, 2000, 29
    lin, W = _layer(fmt, K, N, 11 + swiglu)
    x = mx.array(np.random.default_rng(12).standard_normal((1, M, K)).astype(np.float32))
    p = f64(x) @ W.T
    ref = p[..., : N // 2] / (1 + np.exp(-p[..., : N // 2])) * p[..., N // 2:] if swiglu else p
    run = kernels.swiglu_product if swiglu else kernels.linear
    before = _blas_threads()
    try:
        for threads in (2, 3):
            kernels.set_threads(threads)
            y_panel = run(lin, x)  # the AVX-512 panel kernel where built
            mx.eval(y_panel)
            with kernels.no_f32_panel():
                y = run(lin, x)
                mx.eval(y)
                with kernels.no_pooled_tiles():
                    y_blas = run(lin, x)
                    mx.eval(y_blas)
                    assert "(the BLAS's threads)" in kernels.describe()
                if before is not None:  # OpenBLAS: the pooled tiles ran, and --verbose says so
                    assert "widened a tile at a time into BLAS (one single-threaded" in kernels.describe()
            assert rel_err(y_panel, ref) < 1e-5 and rel_err(y, ref) < 1e-5 and rel_err(y_blas, ref) < 1e-5
            assert _blas_threads() == before
    finally:
        kernels.set_threads(0)


@needs_ext
@needs_blas
@pytest.mark.skipif(not (kernels.available() and kernels._lib.has_f32_panel()), reason="no AVX-512 panel kernel")
@pytest.mark.parametrize("fmt,K", [("float16", 80), ("float16", 1280), ("bfloat16", 96), ("q4", 128), ("q8", 64)])
def test_f32_panel_kernel_matches_float64_for_every_row_and_column_remainder(fmt, K):
    """The AVX-512 panel kernel (half and 4/8-bit weights, float32 x: blocks of 6 rows, panels of 32 columns)
    against float64 for M = 1..13 (every remainder after blocks of 6) and N = 33 / 64 / 75 (partial and whole
    panels); K = 80 / 96: not a multiple of 32 (the panel transposes 16 values at a time); SwiGLU too."""
    assert "into AVX-512 FMA kernels" in kernels.describe()
    for N in (33, 64, 75):
        lin, W = _layer(fmt, K, 2 * N, K + N)
        q = (lin.scales, lin.biases, lin.group_size, lin.bits) if fmt.startswith("q") else (None, None, 0, 0)
        for M in range(1, 14):
            x = mx.array(np.random.default_rng(M).standard_normal((M, K)).astype(np.float32))
            p = f64(x) @ W.T
            y = kernels._lib.tiled_matmul(x, lin.weight, *q)
            s = kernels._lib.tiled_swiglu(x, lin.weight, *q)
            assert y.shape == (M, 2 * N) and rel_err(y, p) < 1e-5, (N, M)
            assert rel_err(s, p[:, :N] / (1 + np.exp(-p[:, :N])) * p[:, N:]) < 1e-5, (N, M)


@needs_ext
@needs_blas
@pytest.mark.skipif(_blas_threads() is None, reason="pooled prompt tiles need OpenBLAS")
def test_float32_prompt_products_on_the_extension_threads_train_like_matmul():
    """Many-row products of a float32 layer run as pooled tiles reading W in place (the weights' gradient too:
    full fine-tuning goes through them): value and both gradients against float64; with the pooled tiles off
    the layer's own matmul runs instead."""
    K, N, M = 320, 700, 21
    lin, W = _layer("float32", K, N, 21)
    x = mx.array(np.random.default_rng(22).standard_normal((2, M, K)).astype(np.float32))
    c = np.random.default_rng(23).standard_normal((2, M, N))
    loss = lambda a: (kernels.linear(lin, a) * mx.array(c.astype(np.float32))).sum()  # noqa: E731
    assert kernels.product(lin, x) is not None
    with kernels.no_pooled_tiles():
        assert kernels.product(lin, x) is None
    value, grads = nn.value_and_grad(lin, loss)(x)
    gx = mx.grad(loss)(x)
    xd = f64(x)
    assert rel_err(kernels.linear(lin, x), xd @ W.T) < 1e-6
    assert abs(float(value) - float((xd @ W.T * c).sum())) < 1e-5 * np.abs(xd @ W.T * c).sum()
    assert rel_err(grads["weight"], np.einsum("bmn,bmk->nk", c, xd)) < 1e-6
    assert rel_err(gx, c @ W) < 1e-6


@needs_ext
@needs_blas
@pytest.mark.parametrize("fmt,M,K,N", [(f, *s) for f in ("bfloat16", "q4", "q8")
                                        for s in ((37, 1280, 2000), (9, 96, 45), (14, 64, 33))] + [("bfloat16", 13, 80, 40)])
def test_bfloat16_prompt_precision_is_the_exact_product_of_rounded_x(fmt, M, K, N):
    """``prompt_precision("bfloat16")``: x rounded to bfloat16 (ties to even), the stored weights used exactly,
    float32 sums — against float64 of the rounded x, with the AVX-512 BF16 dots and without them (rounded x
    into the float32 path). M: a remainder after blocks of 6 rows; N: partial panels of 32 columns; K = 80:
    not a multiple of 32 (bfloat16 weights take the float32 path; 4/8-bit need groups of 32 anyway)."""
    lin, W = _layer(fmt, K, N, M + K + N)
    x = mx.array(np.random.default_rng(K).standard_normal((1, M, K)).astype(np.float32))
    x[0, 0, :3] = mx.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)])  # ties go to even: 1, 1 + 2^-6, -1
    ref = bf16_round(x) @ W.T
    exact = f64(x) @ W.T
    with kernels.prompt_precision("bfloat16"):
        assert kernels.get_prompt_precision() == "bfloat16" and "bfloat16 inputs" in kernels.describe()
        y = kernels.linear(lin, x)
        with kernels.no_bf16_dot():
            y_plain = kernels.linear(lin, x)
    assert kernels.get_prompt_precision() == "float32"
    for out in (y, y_plain):
        assert out.shape == (1, M, N) and rel_err(out, ref) < 2e-6
        assert rel_err(out, exact) > 1e-4  # x really was rounded
    if K == 1280 and kernels._lib.has_bf16_dot():  # two different paths (their sums differ in order)
        assert not np.array_equal(np.array(y), np.array(y_plain))
    # MLX's own product of the rounded x agrees too
    assert rel_err(y, f64(x.astype(mx.bfloat16).astype(mx.float32) @ mx.array(W.astype(np.float32)).T)) < 2e-6


@needs_ext
@needs_blas
@pytest.mark.parametrize("fmt", ["bfloat16", "q4", "q8"])
def test_bfloat16_prompt_precision_swiglu(fmt):
    K, H, M = 1280, 1000, 23
    lin, W = _layer(fmt, K, 2 * H, 3)
    x = mx.array(np.random.default_rng(5).standard_normal((1, M, K)).astype(np.float32))
    p = bf16_round(x) @ W.T
    ref = p[..., :H] / (1 + np.exp(-p[..., :H])) * p[..., H:]
    with kernels.prompt_precision("bfloat16"):
        y = kernels.swiglu_product(lin, x)
        with kernels.no_bf16_dot():
            y_plain = kernels.swiglu_product(lin, x)
    assert rel_err(y, ref) < 1e-5 and rel_err(y_plain, ref) < 1e-5


@needs_ext
@needs_blas
def test_bfloat16_prompt_precision_leaves_float16_and_decode_rows_alone():
    """float16 (and float32) layers have no bfloat16 product: their prompt products are unchanged, as are
    products of <= 8 rows (decoding) of every layer; a bad name is one clear error."""
    x = mx.array(np.random.default_rng(1).standard_normal((1, 20, 256)).astype(np.float32))
    lin16, _ = _layer("float16", 256, 64, 1)
    linb, _ = _layer("bfloat16", 256, 64, 1)
    before = [kernels.linear(lin16, x), kernels.linear(linb, x[:, :3])]
    with kernels.prompt_precision("bfloat16"):
        after = [kernels.linear(lin16, x), kernels.linear(linb, x[:, :3])]
    for a, b in zip(before, after):
        assert mx.array_equal(a, b)
    with pytest.raises(ValueError, match="float32, bfloat16"):
        kernels.set_prompt_precision("int8")
    assert kernels.get_prompt_precision() == "float32"


@needs_ext
@pytest.mark.parametrize("shape", ["tiny", "270M"])
def test_bfloat16_prompt_precision_rounds_less_than_a_bfloat16_model_computes(shape):
    """What the inference commands' default costs: a bfloat16 model's prompt logits with activations rounded to
    bfloat16 before each product are further from the float32 original (the weights before rounding) than with
    exact activations, but closer than the same bfloat16 model computed in bfloat16 throughout (plain MLX, as a
    GPU runs it: the reference for "less than a GPU rounds")."""
    from mlx_openelm.bench import core as bench

    ckpt32 = bench.random_model(shape, "float32", None, 3)
    ckpt16 = bench.random_model(shape, "bfloat16", None, 3)
    ids = mx.array(np.random.default_rng(0).integers(0, ckpt32.args.vocab_size, (1, 32)))
    ref = f64(bench.as_loaded(ckpt32, "auto")(ids))
    with kernels.disabled():
        gpu_like = f64(ckpt16(ids))
    ours = bench.as_loaded(ckpt16, "auto")
    assert dtype_label(ours) == "float32 (bfloat16 matrices)"
    exact = f64(ours(ids))
    with kernels.prompt_precision("bfloat16"):
        rounded = f64(ours(ids))
    e_exact, e_rounded, e_gpu = (rel_err(y, ref) for y in (exact, rounded, gpu_like))
    assert e_exact < e_rounded < 0.9 * e_gpu, (e_exact, e_rounded, e_gpu)


# ---------------------------------------------------------------- parameters in 2 MB pages


@needs_ext
def test_huge_page_pack_copies_arrays_into_one_aligned_mapping(tmp_path):
    """huge_page_pack: bitwise copies, the first starting on a 2 MB boundary (after its 64-byte header gap) and
    each on 64 bytes, in the given order; views and unevaluated arrays come back as they are; the copies work
    in MLX ops, the kernels and safetensors; the mapping goes when the last copy does."""
    import gc

    rng = np.random.default_rng(0)
    w = mx.array(rng.standard_normal((1536, 1000)).astype(np.float32))  # 6 MB
    h = mx.array(rng.standard_normal((777, 333)).astype(np.float16))  # odd size
    q = mx.array(rng.integers(0, 2**32, size=(64, 40), dtype=np.uint32))
    t = mx.array(rng.standard_normal((40, 64)).astype(np.float32))
    mx.eval(w, h, q, t)
    view, lazy = t.T, w + 1
    gc.collect()
    before = kernels.held_outside_mlx()
    packed = kernels._lib.huge_page_pack([w, h, q, view, lazy])
    assert kernels.held_outside_mlx() - before >= w.nbytes + h.nbytes + q.nbytes
    for a, b in zip([w, h, q, view, lazy], packed):
        assert a.dtype == b.dtype and a.shape == b.shape and mx.array_equal(a, b).item()
    addr = [np.array(a, copy=False).ctypes.data for a in packed[:3]]
    assert addr[0] % (2 << 20) == 64 and all(p % 64 == 0 for p in addr) and addr[0] < addr[1] < addr[2]
    assert np.array(packed[3], copy=False).ctypes.data != addr[0]  # not in the mapping
    x = mx.array(rng.standard_normal((1, 1000)).astype(np.float32))
    assert mx.array_equal(kernels.gemv(x, packed[0]), kernels.gemv(x, w)).item()
    assert mx.array_equal(packed[1].astype(mx.float32) * 2, h.astype(mx.float32) * 2).item()
    mx.save_safetensors(str(tmp_path / "p.safetensors"), {"w": packed[0], "q": packed[2]})
    back = mx.load(str(tmp_path / "p.safetensors"))
    assert mx.array_equal(back["w"], w).item() and mx.array_equal(back["q"], q).item()
    first, packed = packed[0], None  # one copy still holds the mapping
    gc.collect()
    assert kernels.held_outside_mlx() > before and mx.array_equal(first, w).item()
    first = None
    gc.collect()
    assert kernels.held_outside_mlx() == before

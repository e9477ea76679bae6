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

from mlx_openelm import kernels
from mlx_openelm.bench.core import mlx_lm_model, share_weights
from mlx_openelm.config import ModelArgs
from mlx_openelm.model import Model, init_weights
from mlx_openelm.weights import compute_plan, cpu_runs_quantized, quantize_model

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


def _decode_logits(model, tokens, steps=3):
    """Prompt, then ``steps`` one-token steps through a KV cache; every step's logits."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([tokens]), cache=cache)[:, -1]]
    for t in range(steps):
        out.append(model(mx.array([[tokens[t] + 1]]), cache=cache)[:, -1])
    out = mx.concatenate(out)
    mx.eval(out)
    return out


@pytest.mark.parametrize("quantize", [None, 4, 8])
def test_model_decode_with_kernels_matches_plain_mlx_and_mlx_lm(quantize, monkeypatch):
    """Our decode path (kernels where built) against the same weights through plain MLX products
    (kernels off) and through mlx-lm's OpenELM (an independent implementation)."""
    model = _tiny_model(quantize)
    tokens = [5, 17, 99, 3, 250, 7]
    ours = _decode_logits(model, tokens)
    theirs = share_weights(model, mlx_lm_model(model.args))
    ref = _decode_logits(theirs, tokens)
    scale = mx.abs(ref).max().item()
    assert max_diff(ours, ref) < 1e-5 * scale
    monkeypatch.setattr(kernels, "_lib", None)  # plain MLX products
    plain = _decode_logits(model, tokens)
    assert max_diff(ours, plain) < 1e-5 * scale


def max_diff(a, b) -> float:
    return mx.abs(a - b).max().item()


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

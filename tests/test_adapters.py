"""LoRA / DoRA adapters: init identity, gradients vs finite differences (numpy), a hand-computed DoRA
case, PEFT-style dropout, fusing (float and quantized), and apply/save/load on a tiny OpenELM."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from conftest import tiny_args
from mlx_openelm.adapters import (
    DEFAULT_TARGETS,
    DoRALinear,
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    apply_adapters,
    fuse_adapters,
    load_adapters,
    save_adapters,
)
from mlx_openelm.model import Model, init_weights

ADAPTERS = [LoRALinear, DoRALinear]


def np_(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def dense_weight(layer) -> np.ndarray:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        return np_(w)
    return np_(layer.weight)


# ---- numpy references, written from the formulas (not from the implementation) ----

def ref_lora(x, W, b, A, B, s, xd=None):
    xd = x if xd is None else xd
    return x @ W.T + b + s * (xd @ A @ B)


def ref_dora(x, W, b, A, B, m, s, norm=None, xd=None):
    """PEFT DoRA: y = W0 x + (n-1) W0 xd + n s B A xd + b, n = m / ||W0 + s BA||_row.
    ``norm`` given = held constant (the detached norm); xd = dropped input (x when no dropout)."""
    xd = x if xd is None else xd
    V = W + s * (A @ B).T
    norm = np.linalg.norm(V, axis=1) if norm is None else norm
    n = m / norm
    return x @ W.T + (n - 1) * (xd @ W.T) + n * s * (xd @ A @ B) + b


def make_linear(in_dims, out_dims, bias=True, quantized=False, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(in_dims, out_dims, bias=bias)
    if quantized:
        lin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    return lin


def randomize(layer, seed=1):
    """Non-trivial adapter state: random lora_b, perturbed magnitude."""
    rng = np.random.default_rng(seed)
    layer.lora_b = mx.array(rng.normal(0, 0.3, layer.lora_b.shape).astype(np.float32))
    if isinstance(layer, DoRALinear):
        layer.m = layer.m * mx.array(rng.uniform(0.7, 1.3, layer.m.shape).astype(np.float32))
    return layer


# ---- init ----

@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("quantized,in_dims", [(False, 24), (True, 64), (True, 128)])
@pytest.mark.parametrize("training", [True, False])
def test_output_equals_base_at_init(cls, quantized, in_dims, training):
    base = make_linear(in_dims, 16, bias=True, quantized=quantized)
    x = mx.random.normal((3, 5, in_dims))
    expected = base(x)
    layer = cls.from_base(base, rank=4, alpha=8.0, dropout=0.1)
    layer.train(training)
    assert layer.lora_a.shape == (in_dims, 4) and layer.lora_b.shape == (4, 16)
    assert not np.any(np.array(layer.lora_b))
    bound = 1 / math.sqrt(in_dims)
    assert float(mx.abs(layer.lora_a).max()) <= bound and float(mx.abs(layer.lora_a).max()) > 0.5 * bound
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), atol=1e-5, rtol=0)
    names = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    assert names == ({"lora_a", "lora_b", "m"} if cls is DoRALinear else {"lora_a", "lora_b"})
    if cls is DoRALinear:  # m = row norms of the (dequantized) base weight
        np.testing.assert_allclose(np.array(layer.m), np.linalg.norm(dense_weight(base), axis=1), rtol=1e-5)
        assert layer.m.dtype == mx.float32


# ---- gradients vs central finite differences (float64 numpy reference) ----

@pytest.mark.parametrize("cls", ADAPTERS)
def test_gradients_match_finite_differences(cls):
    in_dims, out_dims, rank, s = 6, 5, 3, 2.0
    layer = randomize(cls.from_base(make_linear(in_dims, out_dims, seed=3), rank=rank, alpha=rank * s, dropout=0.1))
    layer.eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, in_dims)).astype(np.float32)
    G = rng.normal(size=(4, out_dims)).astype(np.float32)  # loss = sum(G * y)

    def loss_fn(model, x):
        return (model(x) * mx.array(G)).sum()

    loss, grads = nn.value_and_grad(layer, loss_fn)(layer, mx.array(x))
    params = {k: np_(getattr(layer, k)) for k in (["lora_a", "lora_b"] + (["m"] if cls is DoRALinear else []))}
    W, b = np_(layer.linear.weight), np_(layer.linear.bias)
    x64, G64 = x.astype(np.float64), G.astype(np.float64)
    frozen_norm = np.linalg.norm(W + s * (params["lora_a"] @ params["lora_b"]).T, axis=1)

    def ref_loss(p, hold_norm=True):
        if cls is LoRALinear:
            y = ref_lora(x64, W, b, p["lora_a"], p["lora_b"], s)
        else:
            y = ref_dora(x64, W, b, p["lora_a"], p["lora_b"], p["m"], s, norm=frozen_norm if hold_norm else None)
        return float((G64 * y).sum())

    assert abs(float(loss) - ref_loss(params)) < 1e-4 * max(1.0, abs(float(loss)))

    def fd(name, hold_norm=True, eps=1e-6):
        g = np.zeros_like(params[name])
        for idx in np.ndindex(g.shape):
            for sign in (1, -1):
                p = {k: v.copy() for k, v in params.items()}
                p[name][idx] += sign * eps
                g[idx] += sign * ref_loss(p, hold_norm) / (2 * eps)
        return g

    for name in params:
        ref = fd(name)
        np.testing.assert_allclose(np_(grads[name]), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    if cls is DoRALinear:
        # the test can tell a detached norm from a differentiated one
        assert np.abs(fd("lora_b", hold_norm=False) - np_(grads["lora_b"])).max() > 1e-2


# ---- DoRA by hand ----

def test_dora_hand_computed():
    lin = nn.Linear(2, 2, bias=False)
    lin.weight = mx.array([[3.0, 4.0], [0.0, 5.0]])
    layer = DoRALinear.from_base(lin, rank=1, alpha=2.0, dropout=0.0)  # s = alpha / rank = 2
    # m = row norms of W0 = [sqrt(9+16), sqrt(0+25)] = [5, 5]
    np.testing.assert_allclose(np.array(layer.m), [5.0, 5.0], rtol=1e-6)
    layer.lora_a = mx.array([[0.5], [0.0]])  # [in, r]
    layer.lora_b = mx.array([[1.0, 0.0]])  # [r, out]
    # s * (A @ B).T = 2 * [[0.5, 0], [0, 0]] = [[1, 0], [0, 0]];  V = W0 + that = [[4, 4], [0, 5]]
    # ||V||_row = [4*sqrt(2), 5]; direction rows: [1/sqrt2, 1/sqrt2], [0, 1]
    # with m = [5, 5]: W' = [[5/sqrt2, 5/sqrt2], [0, 5]]  ->  x = [1, 2] gives [15/sqrt2, 10]
    x = mx.array([[1.0, 2.0], [-1.0, 1.0]])
    r2 = math.sqrt(2)
    np.testing.assert_allclose(np.array(layer(x)), [[15 / r2, 10.0], [0.0, 5.0]], rtol=1e-6, atol=1e-6)
    # with m = [2, 10]: W' = [[sqrt2, sqrt2], [0, 10]] -> [1, 2] gives [3 sqrt2, 20], [-1, 1] gives [0, 10]
    layer.m = mx.array([2.0, 10.0])
    np.testing.assert_allclose(np.array(layer(x)), [[3 * r2, 20.0], [0.0, 10.0]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(layer.fuse().weight), [[r2, r2], [0.0, 10.0]], rtol=1e-6, atol=1e-6)


# ---- dropout ----

@pytest.mark.parametrize("cls", ADAPTERS)
def test_training_dropout_follows_peft(cls):
    in_dims, out_dims, s, p = 16, 8, 2.0, 0.5
    layer = randomize(cls.from_base(make_linear(in_dims, out_dims, seed=4), rank=4, alpha=8.0, dropout=p))
    x = mx.random.normal((6, in_dims))
    mx.random.seed(11)
    xd = np_(nn.Dropout(p)(x))  # the mask the layer's dropout draws after the same seed
    mx.random.seed(11)
    layer.train()
    y = np_(layer(x))
    x64, W, b = np_(x), np_(layer.linear.weight), np_(layer.linear.bias)
    A, B = np_(layer.lora_a), np_(layer.lora_b)
    assert (xd == 0).mean() > 0.2 and not np.allclose(xd, x64)
    if cls is LoRALinear:
        np.testing.assert_allclose(y, ref_lora(x64, W, b, A, B, s, xd=xd), rtol=1e-5, atol=1e-5)
    else:
        m = np_(layer.m)
        np.testing.assert_allclose(y, ref_dora(x64, W, b, A, B, m, s, xd=xd), rtol=1e-5, atol=1e-5)
        n = m / np.linalg.norm(W + s * (A @ B).T, axis=1)
        mlx_lm_style = n * (x64 @ W.T + s * (xd @ A @ B)) + b  # rescales W0 x on the un-dropped x
        assert np.abs(y - mlx_lm_style).max() > 1e-2
    layer.eval()  # no dropout: y = W' x + b
    ref = ref_lora(x64, W, b, A, B, s) if cls is LoRALinear else ref_dora(x64, W, b, A, B, np_(layer.m), s)
    np.testing.assert_allclose(np_(layer(x)), ref, rtol=1e-5, atol=1e-5)


# ---- fusing ----

@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_fuse_float(cls, bias):
    layer = randomize(cls.from_base(make_linear(32, 12, bias=bias), rank=4, alpha=8.0))
    layer.eval()
    x = mx.random.normal((4, 32))
    fused = layer.fuse()
    assert type(fused) is nn.Linear and ("bias" in fused) == bias
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_fuse_quantized(cls):
    layer = randomize(cls.from_base(make_linear(128, 32, quantized=True), rank=4, alpha=8.0))
    layer.eval()
    x = mx.random.normal((5, 128))
    y = np_(layer(x))
    dense = layer.fuse(dequantize=True)
    assert type(dense) is nn.Linear
    np.testing.assert_allclose(np_(dense(x)), y, atol=1e-5, rtol=1e-5)

    requant = layer.fuse(dequantize=False)
    assert isinstance(requant, nn.QuantizedLinear) and (requant.bits, requant.group_size) == (4, 32)
    # MLX's affine quantization puts every weight within one step |scale| of its value (the zero point
    # is rounded, so the error reaches ~|scale|, not |scale|/2), hence |y_q - y| <= sum_j |x_j| |scale_j|.
    # Measured here: max |y_q - y| ~ 0.1-0.3, about 0.1-0.2x of that bound.
    step = np.abs(np.repeat(np_(requant.scales), 32, axis=1))
    W_fused = np_(dense.weight)
    assert np.all(np.abs(dense_weight(requant) - W_fused) <= step * (1 + 1e-5) + 1e-7)
    bound = np.abs(np_(x)) @ step.T
    err = np.abs(np_(requant(x)) - y)
    assert np.all(err <= bound + 1e-5)
    assert err.max() > 0  # the re-quantized layer really is quantized


# ---- embedding ----

@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("adapt_output", [False, True])
def test_lora_embedding(quantized, adapt_output):
    mx.random.seed(5)
    base = nn.Embedding(50, 64)
    if quantized:
        base = nn.QuantizedEmbedding.from_embedding(base, group_size=32, bits=4)
    ids = mx.array([[0, 7, 49, 7]])
    h = mx.random.normal((2, 3, 64))
    emb = LoRAEmbedding.from_base(base, rank=4, alpha=8.0, adapt_output=adapt_output)
    assert {k for k, _ in tree_flatten(emb.trainable_parameters())} == {"lora_a", "lora_b"}
    np.testing.assert_array_equal(np.array(emb(ids)), np.array(base(ids)))
    np.testing.assert_allclose(np.array(emb.as_linear(h)), np.array(base.as_linear(h)), atol=1e-5)

    emb.lora_a = mx.array(np.random.default_rng(0).normal(0, 0.1, (50, 4)).astype(np.float32))
    E = dense_weight(base) + 2.0 * np_(emb.lora_a) @ np_(emb.lora_b)  # E' = E + s A B, s = 2
    np.testing.assert_allclose(np_(emb(ids)), E[np.array(ids)], atol=1e-5)
    # CoreNet: the logits use the frozen base table E; adapt_output: the adapted E'
    out_table = E if adapt_output else dense_weight(base)
    np.testing.assert_allclose(np_(emb.as_linear(h)), np_(h) @ out_table.T, atol=1e-4)
    np.testing.assert_allclose(np_(emb.output_layer(dequantize=True)(h)), np_(h) @ dense_weight(base).T, atol=1e-4)
    fused = emb.fuse(dequantize=True)
    assert type(fused) is nn.Embedding
    np.testing.assert_allclose(np_(fused.weight), E, atol=1e-5)
    if quantized:
        requant = emb.fuse()
        assert isinstance(requant, nn.QuantizedEmbedding) and (requant.bits, requant.group_size) == (4, 32)
        step = np.abs(np.repeat(np_(requant.scales), 32, axis=1))
        assert np.all(np.abs(dense_weight(requant) - E) <= step * (1 + 1e-5) + 1e-7)


# ---- tiny OpenELM ----

def tiny_model(seed=0, quantize=False):
    model = init_weights(Model(tiny_args()), seed)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    model.eval()
    return model


TOKENS = mx.array([[1, 17, 42, 300, 5, 9, 2, 77]])


def expected_names(n_layers, use_dora, adapt_embeddings, layers=None):
    where = {"qkv_proj": "attn", "out_proj": "attn", "proj_1": "ffn", "proj_2": "ffn"}
    suffixes = ("lora_a", "lora_b", "m") if use_dora else ("lora_a", "lora_b")
    names = {
        f"transformer.layers.{i}.{where[t]}.{t}.{s}"
        for i in (range(n_layers) if layers is None else layers) for t in DEFAULT_TARGETS for s in suffixes
    }
    if adapt_embeddings:
        names |= {"transformer.token_embeddings.lora_a", "transformer.token_embeddings.lora_b"}
    return names


def perturb_adapters(model, seed=2):
    rng = np.random.default_rng(seed)
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, DoRALinear)):
            randomize(mod, int(rng.integers(1 << 30)))
        elif isinstance(mod, LoRAEmbedding):
            mod.lora_a = mx.array(rng.normal(0, 0.05, mod.lora_a.shape).astype(np.float32))


@pytest.mark.parametrize(
    "use_dora,adapt_embeddings,quantize",
    [(False, True, False), (True, False, False), (True, False, True), (False, True, True)],
)
def test_apply_save_load_fuse(tmp_path, use_dora, adapt_embeddings, quantize):
    model = tiny_model(quantize=quantize)
    base_logits = model(TOKENS)
    base_names = {k for k, _ in tree_flatten(model.parameters())}
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, use_dora=use_dora, adapt_embeddings=adapt_embeddings)
    assert apply_adapters(model, **config.to_dict()) is model
    n_layers = len(model.layers)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == expected_names(n_layers, use_dora, adapt_embeddings)
    assert all(not m.training for _, m in model.named_modules())  # adapters follow the model's eval mode
    np.testing.assert_allclose(np.array(model(TOKENS)), np.array(base_logits), atol=1e-5, rtol=0)

    perturb_adapters(model)
    logits = model(TOKENS)
    assert np.abs(np.array(logits) - np.array(base_logits)).max() > 1e-2
    save_adapters(tmp_path / "ad", model, config)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapters.safetensors"]

    fresh = tiny_model(quantize=quantize)
    assert load_adapters(fresh, tmp_path / "ad") == config
    np.testing.assert_array_equal(np.array(fresh(TOKENS)), np.array(logits))

    fuse_adapters(fresh, dequantize=True)
    assert not any(isinstance(m, (LoRALinear, DoRALinear, LoRAEmbedding)) for _, m in fresh.named_modules())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in fresh.transformer.layers[0].named_modules())
    np.testing.assert_allclose(np.array(fresh(TOKENS)), np.array(logits), atol=1e-4, rtol=1e-4)
    if not quantize:
        # an embedding adapter unties the fused model: E' feeds the input, lm_head keeps E (CoreNet)
        untied = {"lm_head.weight"} if adapt_embeddings else set()
        assert {k for k, _ in tree_flatten(fresh.parameters())} == base_names | untied
        assert fresh.args.share_input_output_layers is not adapt_embeddings


def test_apply_selected_layers_and_requantized_fuse():
    model = tiny_model(quantize=True)
    apply_adapters(model, rank=2, alpha=2.0, use_dora=True, targets=["qkv_proj", "proj_2"], layers=[0, -1])
    n = len(model.layers)
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert names == {
        f"transformer.layers.{i}.{p}.{s}"
        for i in (0, n - 1)
        for p in ("attn.qkv_proj", "ffn.proj_2")
        for s in ("lora_a", "lora_b", "m")
    }
    fuse_adapters(model)  # re-quantized with the base's settings
    q = model.transformer.layers[0].attn.qkv_proj
    assert isinstance(q, nn.QuantizedLinear) and (q.bits, q.group_size) == (4, 32)


def test_bad_arguments(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="qkv_proj, out_proj, proj_1, proj_2"):
        apply_adapters(model, targets=("q_proj",))
    with pytest.raises(ValueError, match="DoRA is not supported on token embeddings"):
        apply_adapters(model, use_dora=True, adapt_embeddings=True)
    with pytest.raises(ValueError, match="out of range"):
        apply_adapters(model, layers=[99])
    with pytest.raises(ValueError, match="rank"):
        apply_adapters(model, rank=0)
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for _, m in model.named_modules())
    with pytest.raises(ValueError, match="no trainable adapter parameters"):
        save_adapters(tmp_path / "none", model.freeze(), LoRAConfig())
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(model, tmp_path / "missing")

    apply_adapters(model, rank=4, alpha=4.0)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model)
    folder = save_adapters(tmp_path / "ad", model, LoRAConfig(rank=4, alpha=4.0))

    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "rank": 8}))
    fresh = tiny_model()
    with pytest.raises(ValueError, match="wrong shape"):
        load_adapters(fresh, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "targets": ["qkv_proj"]}))
    with pytest.raises(ValueError, match="unexpected"):
        load_adapters(fresh, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "lora_rank": 4}))
    with pytest.raises(ValueError, match="unknown adapter config key"):
        load_adapters(fresh, folder)
    assert not any(isinstance(m, (LoRALinear, DoRALinear)) for _, m in fresh.named_modules())  # left unchanged

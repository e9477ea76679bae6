"""OpenELM as an MLX module: a pre-norm decoder whose width varies layer by layer.

Attribute names are the Hugging Face weight names (``transformer.layers.N.attn.qkv_proj``),
so an ``apple/OpenELM-*`` checkpoint loads without a rename map.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from . import kernels
from .config import ModelArgs


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale. ``fused=False`` composes it from primitive ops
    (the naive baseline of the OpenELM paper's profiling study)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.fused = True

    def __call__(self, x: mx.array) -> mx.array:
        if self.fused:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        xf = x.astype(mx.float32)
        xf = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight * xf.astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.head_dim = hd = args.head_dim
        self.n_heads = args.num_query_heads[layer]
        self.n_kv_heads = args.num_kv_heads[layer]
        self.rope_base = args.rope_freq_constant
        self.scale = hd**-0.5
        # One fused projection; its rows are [query heads | key heads | value heads].
        self.qkv_proj = nn.Linear(args.model_dim, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.model_dim, bias=False)
        self.normalize_qk = args.normalize_qk_projections
        if self.normalize_qk:
            self.q_norm = RMSNorm(hd, args.rms_norm_eps)
            self.k_norm = RMSNorm(hd, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Union[None, str, mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        B, L, _ = x.shape
        if _fused_attention_applies(self, x, mask, cache):
            return self._fused(x, cache)
        qkv = kernels.linear(self.qkv_proj, x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        queries, keys, values = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if self.normalize_qk:
            queries, keys = self.q_norm(queries), self.k_norm(keys)

        # Keys enter the cache already rotated, so past keys are never re-rotated.
        offset = cache.offset if cache is not None else 0
        queries = mx.fast.rope(queries, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        keys = mx.fast.rope(keys, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        # GQA: query head h reads kv head h // (n_heads / n_kv_heads), as CoreNet's repeat_interleave.
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return kernels.linear(self.out_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _fused(self, x: mx.array, cache: KVCache) -> mx.array:
        """The same computation with the CPU kernels' one-node attention (inference with a KV cache)."""
        return kernels.linear(self.out_proj, self.attend_cached(kernels.linear(self.qkv_proj, x), cache))

    def attend_cached(self, qkv: mx.array, cache: KVCache) -> mx.array:
        """From the fused projection's output to out_proj's input, with the CPU kernels (see ``_fused``)."""
        B, L, _ = qkv.shape
        prev = _reserve(cache, B, L, self.n_kv_heads, self.head_dim, self)
        qn, kn = (self["q_norm"]["weight"], self["k_norm"]["weight"]) if self.normalize_qk else (None, None)
        eps = self["q_norm"].eps if self.normalize_qk else 0.0
        # the buffers are ours to write in place when they are what the last call left in this very cache
        # object, untrimmed (a deepcopy or a trimmed cache fails the test and gets the kernel's copy check)
        owned = getattr(cache, "_mlx_openelm_written", None) == _cache_state(cache)
        out, cache.keys, cache.values = kernels.cached_attention(
            qkv, qn, kn, cache.keys, cache.values, prev, self.n_heads, self.n_kv_heads, self.rope_base, eps, self.scale,
            owned)
        cache.offset = prev + L
        cache._mlx_openelm_written = _cache_state(cache)
        return out


def _cache_state(cache: KVCache) -> tuple:
    """Which cache object, which key/value arrays, which offset: equal before a write to what it was after the
    last one exactly when nothing replaced the arrays or moved the offset since."""
    return id(cache), id(cache.keys), id(cache.values), cache.offset


def _fused_attention_applies(attn: Attention, x: mx.array, mask, cache) -> bool:
    causal = mask == "causal" if isinstance(mask, str) else (mask is None and x.shape[1] == 1)
    return (type(cache) is KVCache and causal and x.dtype == mx.float32 and attn.head_dim % 16 == 0
            and (not attn.normalize_qk or attn["q_norm"].fused) and kernels.fusion_on()
            and (cache.keys is None or (cache.keys.dtype in _CACHE_DTYPES and cache.keys.shape[0] == x.shape[0])))


_CACHE_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def kv_cache_dtype(attn: Attention) -> mx.Dtype:
    """THE KV-cache dtype of the CPU kernels' attention: float32 for a float32 model; float16 when the
    weights are stored in half precision or quantized (as llama.cpp's default cache), which halves the
    bytes every decoding step reads from the cache (32 KB a position for 270M) and the cache's memory.
    Keys (RMS-normalised) and values are computed in float32 and rounded once as they are stored: a relative
    error of at most 2^-11 each, well below what half or quantized weights already carry."""
    qkv = attn["qkv_proj"]
    w = (qkv["linear"] if "linear" in qkv else qkv).get("weight")
    return mx.float32 if w is not None and w.dtype == mx.float32 else mx.float16


def _reserve(cache: KVCache, B: int, L: int, n_kv: int, head_dim: int, attn: Attention) -> int:
    """Make room for ``L`` more rows in ``cache``'s buffers (grown as mlx-lm's ``KVCache`` grows them, in
    steps of ``cache.step`` rows) as buffers of their own, which the fused attention writes into;
    returns the offset the new rows start at. New buffers take ``kv_cache_dtype``; a grown one keeps its dtype."""
    prev = cache.offset
    if cache.keys is None or prev + L > cache.keys.shape[2]:
        shape = (B, n_kv, (cache.step + L - 1) // cache.step * cache.step, head_dim)
        dt = kv_cache_dtype(attn) if cache.keys is None else cache.keys.dtype
        # two separate allocations: the kernel writes into each (mx.contiguous would share one buffer)
        keys, values = mx.zeros(shape, dt), mx.zeros(shape, dt)
        if cache.keys is not None:
            keys = mx.concatenate([cache.keys[..., :prev, :], keys], axis=2)
            values = mx.concatenate([cache.values[..., :prev, :], values], axis=2)
        cache.keys, cache.values = keys, values
    return prev


class FeedForward(nn.Module):
    """SwiGLU: the first half of ``proj_1``'s output is the gate."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden = args.ffn_intermediate_sizes[layer]
        self.proj_1 = nn.Linear(args.model_dim, 2 * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, args.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(kernels.linear(self.proj_1, x), 2, axis=-1)
        return kernels.linear(self.proj_2, nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.model_dim, args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn_norm = RMSNorm(args.model_dim, args.rms_norm_eps)
        self.ffn = FeedForward(args, layer)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if self._fuses(x, mask, cache):
            return self._decode(x, cache)
        h = x + self.attn(self.attn_norm(x), mask, cache)
        n = self.ffn_norm(h)
        if type(cache) is KVCache:  # a prompt through the CPU kernels (inference): SwiGLU a tile at a time
            u = kernels.swiglu_product(self.ffn.proj_1, n)
            if u is not None:
                return h + kernels.linear(self.ffn.proj_2, u)
        return h + self.ffn(n)

    # The two methods below run every decoding step: submodules by item (nn.Module is a dict), since
    # attribute access goes through Module.__getattr__ (~0.4 us each, ~500 a step for 270M).
    def _fuses(self, x: mx.array, mask, cache) -> bool:
        """Decoding on the CPU with the kernels: few rows, every product one the fused kernel takes."""
        a, f = self["attn"], self["ffn"]
        return (x.size // x.shape[-1] <= kernels.MAX_ROWS and self["attn_norm"].fused and self["ffn_norm"].fused
                and _fused_attention_applies(a, x, mask, cache)
                and all(kernels.fusable(m) for m in (a["qkv_proj"], a["out_proj"], f["proj_1"], f["proj_2"])))

    def _decode(self, x: mx.array, cache) -> mx.array:
        """The same layer in five kernel nodes: RMSNorm folded into the qkv and proj_1 products, the residual
        adds into out_proj and proj_2, SwiGLU into proj_2's input (see kernels.fused_linear)."""
        a, f = self["attn"], self["ffn"]
        qkv = kernels.fused_linear(a["qkv_proj"], x, norm=self["attn_norm"])
        h = kernels.fused_linear(a["out_proj"], a.attend_cached(qkv, cache), residual=x)
        u = kernels.fused_linear(f["proj_1"], h, norm=self["ffn_norm"])
        return kernels.fused_linear(f["proj_2"], u, swiglu=True, residual=h)


def _embed(emb: nn.Module, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """The rows of ``ids`` in the activations' dtype. A quantized table whose scales are kept in a half dtype
    (on the CPU, ``weights.ComputePlan.affine_kept``) dequantizes its rows in ``dtype``, not rounded to the scales'."""
    rows = kernels.embedding_rows(emb, ids) if dtype == mx.float32 else None
    if rows is not None:
        return rows
    if isinstance(emb, nn.QuantizedEmbedding) and emb["scales"].dtype != dtype:
        b = emb.get("biases")
        return mx.dequantize(emb["weight"][ids], emb["scales"][ids].astype(dtype),
                             None if b is None else b[ids].astype(dtype), emb.group_size, emb.bits, mode=emb.mode)
    return emb(ids).astype(dtype)


class OpenELMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.token_embeddings = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_transformer_layers)]
        self.norm = RMSNorm(args.model_dim, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, mask=None) -> mx.array:
        # the activations' dtype is the norms' (float32 on the CPU even where matrices stay float16/bfloat16)
        h = _embed(self.token_embeddings, inputs, self.norm.weight.dtype)
        if mask is None and h.shape[1] > 1:
            mask = "causal"  # aligned bottom-right, so it also holds after a cache offset
        cache = cache or [None] * len(self.layers)
        # A prompt through the CPU kernels: one layer at a time, so that MLX does not allocate every layer's
        # activations ahead of running them (a 4-bit 270M model's 512-token prompt: 106 -> 73 MB added peak;
        # 52 MB with the tiled SwiGLU below).
        stepwise = h.shape[1] > 64 and type(cache[0]) is KVCache and kernels.fusion_on()  # not for draft checks
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
            if stepwise:
                mx.eval(h)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM for causal language modelling: ``model(tokens[B, L], cache) -> logits[B, L, V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.transformer = OpenELMModel(args)
        if not args.share_input_output_layers:
            self.lm_head = nn.Linear(args.model_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, mask=None) -> mx.array:
        h = self.transformer(inputs, cache, mask)
        if self.args.share_input_output_layers:
            return kernels.as_linear(self.transformer.token_embeddings, h)
        return kernels.linear(self.lm_head, h)

    @property
    def layers(self):
        return self.transformer.layers

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]


def init_weights(model: Model, seed: int = 0) -> Model:
    """CoreNet's initialisation: N(0, fan_in^-1/2) for linears, N(0, d^-1/2) for the embedding,
    N(0, d^-1/2 (2N)^-1/2) for the residual projections ``out_proj``/``proj_2``, ones for norms."""
    from mlx.utils import tree_flatten, tree_unflatten

    args = model.args
    names_params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(names_params))
    residual_std = args.model_dim**-0.5 * (2 * args.num_transformer_layers) ** -0.5
    new = []
    for k, (name, p) in zip(keys, names_params):
        if name.endswith("norm.weight"):
            new.append((name, mx.ones_like(p)))
            continue
        if name.endswith(("out_proj.weight", "proj_2.weight")):
            std = residual_std
        elif name.endswith("token_embeddings.weight"):
            std = args.model_dim**-0.5
        else:
            std = p.shape[-1] ** -0.5
        new.append((name, (mx.random.normal(p.shape, key=k) * std).astype(p.dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model

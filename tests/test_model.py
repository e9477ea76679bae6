"""The model against an independent implementation (mlx-lm's OpenELM) and against itself with a cache."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_args
from mlx_openelm.config import ModelArgs, make_divisible
from mlx_openelm.model import Model, RMSNorm, init_weights


def reference_model(args: ModelArgs, weights):
    from mlx_lm.models import openelm as ref

    ref_args = ref.ModelArgs(
        model_type="openelm", head_dim=args.head_dim, num_transformer_layers=args.num_transformer_layers,
        model_dim=args.model_dim, vocab_size=args.vocab_size, ffn_dim_divisor=args.ffn_dim_divisor,
        num_query_heads=args.num_query_heads, num_kv_heads=args.num_kv_heads,
        ffn_multipliers=[s / args.model_dim for s in args.ffn_intermediate_sizes],
    )
    model = ref.Model(ref_args)
    model.load_weights(weights)
    return model


def assert_parity(args, tokens, seed=0):
    ours = init_weights(Model(args), seed)
    ref = reference_model(args, list(tree_flatten(ours.parameters())))
    a, b = ours(tokens), ref(tokens)
    mx.eval(a, b)
    err = mx.abs(a - b).max().item()
    assert err <= 1e-4 * mx.abs(b).max().item(), err
    return ours


def test_layerwise_scaling_matches_released_270m_lists():
    args = ModelArgs.from_name("270M")
    assert args.num_query_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert args.num_kv_heads == [q // 4 for q in args.num_query_heads]
    assert args.ffn_intermediate_sizes == [768, 1024, 1280, 1536, 1792, 2048, 2560, 2816, 3072, 3328, 3584, 3840, 4352, 4608, 4864, 5120]
    assert ModelArgs.from_name("OpenELM-1_1B-Instruct").num_parameters() == 1_079_891_456
    assert ModelArgs.from_name("3B").num_parameters() == 3_036_647_424
    assert make_divisible(0.5 * 1280, 256) == 768  # rounds to nearest, never more than 10% down


def test_config_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="ffn_with_glu"):
        tiny_args(ffn_with_glu=False)
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_dict({"model_type": "llama", "num_transformer_layers": 2, "model_dim": 64, "head_dim": 16})
    with pytest.raises(ValueError, match="entries"):
        tiny_args(ffn_multipliers=[1.0, 2.0, 3.0])


def test_logits_parity_with_mlx_lm_varying_heads():
    args = tiny_args(num_transformer_layers=6)
    assert len(set(args.num_query_heads)) > 1 and len(set(args.ffn_intermediate_sizes)) > 1
    tokens = mx.random.randint(0, args.vocab_size, (2, 33), key=mx.random.key(1))
    assert_parity(args, tokens)


def test_logits_parity_at_true_270m_shapes():
    args = ModelArgs.from_name("270M")
    tokens = mx.random.randint(0, args.vocab_size, (1, 12), key=mx.random.key(2))
    assert_parity(args, tokens)


def test_cached_decoding_equals_full_forward():
    args = tiny_args()
    model = init_weights(Model(args), 3)
    tokens = mx.random.randint(0, args.vocab_size, (2, 24), key=mx.random.key(4))
    full = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, :9], cache=cache), model(tokens[:, 9:13], cache=cache)]
    parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(13, 24)]
    inc = mx.concatenate(parts, axis=1)
    assert mx.abs(inc - full).max().item() < 1e-4


def test_naive_rmsnorm_equals_fused():
    x = mx.random.normal((3, 5, 64)) * 3
    norm = RMSNorm(64)
    norm.weight = mx.random.normal((64,))
    fused = norm(x)
    norm.fused = False
    naive = norm(x)
    ref = np.array(x) / np.sqrt((np.array(x) ** 2).mean(-1, keepdims=True) + 1e-6) * np.array(norm.weight)
    assert np.abs(np.array(fused) - ref).max() < 1e-4
    assert np.abs(np.array(naive) - ref).max() < 1e-4

"""The one loader: folder resolution (MLX, HF, Hub cache, conversion cache), compute dtype
choice, adapters, ``save_model`` and ``export_hf`` round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from conftest import TOKENS, fake_hub_cache, hf_config, logits, max_diff, tiny_args, write_hf_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
from mlx_openelm import kernels
from mlx_openelm.io.convert import convert
from mlx_openelm.io.folder import export_hf, save_model
from mlx_openelm.io.load import load, load_model, resolve_model_path
from mlx_openelm.tokenizer import CHAT_TEMPLATE, Tokenizer
from mlx_openelm.weights import DTYPE_NAMES, compute_plan

def float_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


@pytest.fixture
def converted(tmp_path, sp_model_path):
    """A float16 -Instruct conversion and the float32 model it came from."""
    src = tmp_path / "OpenELM-tiny-Instruct"
    model = write_hf_checkpoint(src, tiny_args(), seed=7)
    return convert(str(src), tmp_path / "mlx", tokenizer=str(sp_model_path)), model


def test_load_returns_model_and_tokenizer(converted):
    folder, model = converted
    m, tok = load(folder)
    assert isinstance(tok, Tokenizer) and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode("the cat") == Tokenizer(folder).encode("the cat")
    info = m.compute_info
    plan = compute_plan("auto", stored_quantized=False, stored_dtype="float16")  # THE device policy
    expected = plan.dtype or "float16"
    label = f"float32 ({plan.matrices} matrices)" if plan.matrices else expected
    assert (info["device"], info["dtype"], info["stored_dtype"], info["quantized"]) == (plan.device, label, "float16", None)
    assert "blas" in info and "compute_info" not in dict(tree_flatten(m.parameters()))
    # on a CPU with the kernels: float16 matrices (half the bytes per token), float32 norms and activations
    assert float_dtypes(m) == {getattr(mx, expected)} | ({getattr(mx, plan.matrices)} if plan.matrices else set())
    ref = logits(model)
    assert max_diff(logits(m), ref) < 2e-2 * mx.abs(ref).max().item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_explicit_dtype_is_forced(converted, dtype):
    folder, _ = converted
    m = load_model(folder, dtype=dtype)
    assert float_dtypes(m) == {getattr(mx, dtype)} and m.compute_info["dtype"] == dtype
    assert logits(m).shape == (1, TOKENS.shape[1], 384)


def test_bad_folders_are_one_line_errors(converted, tmp_path, sp_model_path):
    folder, _ = converted
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(folder, dtype="float8")
    quantized = convert(str(folder), tmp_path / "q", quantize=True, tokenizer=str(sp_model_path))
    (quantized / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model or tokenizer.json"):
        resolve_model_path(quantized)
    data = (quantized / "model.safetensors").read_bytes()
    (quantized / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(quantized)
    config = json.loads((folder / "config.json").read_text())
    config["model_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config.json") as e:
        load_model(folder)
    assert "\n" not in str(e.value)


def test_local_folders_resolve_as_is_or_convert_once_into_the_cache(tmp_path, sp_model_path, monkeypatch):
    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "cache"))
    with_tok = tmp_path / "with-tokenizer"
    model = write_hf_checkpoint(with_tok, tiny_args(), seed=2, tokenizer=sp_model_path)
    assert resolve_model_path(with_tok) == with_tok  # HF layout plus a tokenizer loads directly
    assert max_diff(logits(load_model(with_tok)), logits(model)) < 1e-5

    bare = tmp_path / "OpenELM-bare"  # the apple/OpenELM-* layout: no tokenizer
    model = write_hf_checkpoint(bare, tiny_args(), seed=3)
    folder = resolve_model_path(bare, tokenizer=str(sp_model_path))
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("local--OpenELM-bare--")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"  # the source dtype is kept
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    m, tok = load(bare, tokenizer=str(sp_model_path))
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # converted only once
    assert max_diff(logits(m), logits(model)) < 1e-5

    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path(tmp_path / "a" / "b" / "c")


def test_load_applies_adapters(converted, tmp_path):
    from mlx_openelm.adapters import LoRAConfig, apply_adapters, save_adapters

    folder, _ = converted
    adapted = load_model(folder)
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    apply_adapters(adapted, rank=4, alpha=8.0, dropout=0.0)
    trained = tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(1)) * 0.1, adapted.trainable_parameters())
    adapted.update(trained)
    save_adapters(tmp_path / "adapters", adapted, config)
    m, _ = load(folder, adapter_path=tmp_path / "adapters")
    assert max_diff(logits(m), logits(adapted)) < 1e-5
    assert max_diff(logits(m), logits(load_model(folder))) > 1e-2  # the adapters do something


def test_save_model_round_trip_float_and_quantized(converted, tmp_path, sp_model_path):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    folder, _ = converted
    m = load_model(folder, dtype="float32")
    out = save_model(tmp_path / "saved", m, {"note": "kept"}, folder)
    config = json.loads((out / "config.json").read_text())
    assert config["note"] == "kept" and config["dtype"] == "float32" and "quantization" not in config
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert max_diff(logits(load_model(out)), logits(m)) == 0.0
    theirs, _ = mlx_lm_load_model(out)
    assert max_diff(logits(theirs), logits(m)) < 1e-4

    nn.quantize(m, group_size=32, bits=8)  # Linear and Embedding, as mlx-lm does
    out = save_model(tmp_path / "saved-q", m, {}, sp_model_path)
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    kept = load_model(out, keep_quantized=True)
    assert kept.compute_info["quantized"]["bits"] == 8
    assert max_diff(logits(kept), logits(m)) < 1e-4


def test_export_hf_round_trip(converted, tmp_path, sp_model_path):
    folder, _ = converted
    m = load_model(folder, keep_quantized=True)
    args = m.args
    hf = export_hf(tmp_path / "hf", m, args)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((hf / "config.json").read_text())
    for key, value in hf_config(args).items():
        if key not in ("ffn_multipliers", "torch_dtype"):
            assert config[key] == value, key
    # the matrices' dtype (float16 kept where the CPU kernels read it, else upcast to float32)
    assert config["torch_dtype"] == DTYPE_NAMES[m.transformer.token_embeddings.weight.dtype]
    assert len(config["ffn_multipliers"]) == args.num_transformer_layers
    weights = mx.load(str(hf / "model.safetensors"))
    assert all(k.startswith("transformer.") for k in weights)
    again = convert(str(hf), tmp_path / "again", dtype="float32", tokenizer=str(sp_model_path))
    assert max_diff(logits(load_model(again)), logits(m)) < 1e-5

    nn.quantize(m, group_size=32, bits=4)
    export_hf(tmp_path / "hf-q", m, args)  # quantized layers come out dequantized
    weights = mx.load(str(tmp_path / "hf-q" / "model.safetensors"))
    assert not any(k.endswith(".scales") for k in weights)
    assert weights["transformer.layers.0.attn.qkv_proj.weight"].shape == (96, 128)  # (4 + 2 * 1) heads * 16
    assert isinstance(m.transformer.layers[0].attn.qkv_proj, nn.QuantizedLinear)  # the model is untouched
    deq = mx.dequantize(m.transformer.layers[0].attn.qkv_proj.weight, m.transformer.layers[0].attn.qkv_proj.scales,
                        m.transformer.layers[0].attn.qkv_proj.biases, 32, 4)
    assert max_diff(weights["transformer.layers.0.attn.qkv_proj.weight"], deq) < 1e-6


HUB_SCRIPT = """
import json, sys
from mlx_openelm.io.load import load, resolve_model_path
sp = sys.argv[1]
ready = resolve_model_path("mlx-community/OpenELM-tiny-4bit")
model, tok = load("apple/OpenELM-270M", tokenizer=sp)
first = resolve_model_path("apple/OpenELM-270M")  # already converted: no tokenizer needed now
print(json.dumps({"ready": str(ready), "converted": str(model.folder), "again": str(first),
                  "quantized": load(ready)[0].compute_info["stored_quantization"]}))
"""


def test_hub_ids_resolve_offline(tmp_path, sp_model_path, hf_checkpoint):
    src, model = hf_checkpoint
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "apple/OpenELM-270M", {n: src / n for n in ("config.json", "model.safetensors")}, commit=COMMIT, repo_type="model")
    mlx_community = convert(str(src), tmp_path / "q", quantize=True, tokenizer=str(sp_model_path))
    ready = fake_hub_cache(cache, "mlx-community/OpenELM-tiny-4bit", {p.name: p for p in mlx_community.iterdir()}, commit=COMMIT, repo_type="model")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "mlx-cache")}
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(sp_model_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ready"] == str(ready)  # an MLX conversion on the Hub is used as is
    expected = tmp_path / "mlx-cache" / "apple--OpenELM-270M--0123456789ab"
    assert result["converted"] == result["again"] == str(expected)
    assert result["quantized"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert max_diff(logits(load_model(expected)), logits(model)) < 1e-5


@pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built")
def test_loading_on_the_cpu_moves_the_parameters_into_huge_page_memory(converted, monkeypatch):
    """weights.ComputePlan.huge_pages: the parameters, bitwise as loaded without it, now sit outside MLX's
    allocator in memory advised for 2 MB pages (kernels.use_huge_pages); counted by held_outside_mlx, in the
    peak memory generation reports, and given back when the model goes; MLX_OPENELM_HUGE_PAGES=0 opts out."""
    import gc

    from mlx_openelm.generate.stream import stream_generate

    folder, _ = converted
    gc.collect()
    before = kernels.held_outside_mlx()
    monkeypatch.setenv("MLX_OPENELM_HUGE_PAGES", "0")
    plain = load_model(folder)
    assert kernels.held_outside_mlx() == before
    monkeypatch.delenv("MLX_OPENELM_HUGE_PAGES")
    m, tok = load(folder)
    params = dict(tree_flatten(m.parameters()))
    held = kernels.held_outside_mlx() - before
    assert held >= sum(v.nbytes for v in params.values())
    for k, v in tree_flatten(plain.parameters()):
        assert params[k].dtype == v.dtype and mx.array_equal(params[k], v).item(), k
    assert mx.array_equal(logits(m), logits(plain)).item()
    assert "advised for 2 MB pages" in kernels.describe()
    last = list(stream_generate(m, tok, "the cat", max_tokens=3))[-1]
    assert last.peak_memory * 1e9 >= held  # the parameters are counted
    del m, params, last
    gc.collect()
    assert kernels.held_outside_mlx() == before

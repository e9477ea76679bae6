"""``mlx-openelm fuse``: the fused model gives the logits of base + adapters (LoRA, DoRA; float,
float16 and 4-bit bases), keeps the base's stored format, exports the apple/OpenELM layout, and
refuses bad input with one line and nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from conftest import cli, tiny_args, write_hf_checkpoint
from mlx_openelm.io.convert import convert
from mlx_openelm.io.load import load, load_model
from mlx_openelm.adapters import DoRALinear, LoRAConfig, LoRAEmbedding, LoRALinear, apply_adapters, load_adapters, save_adapters

TOKENS = mx.array([[1, 5, 9, 33, 100, 7, 250, 383, 2, 64], [1, 17, 42, 300, 5, 9, 2, 77, 120, 3]])


def logits(model) -> mx.array:
    out = model(TOKENS).astype(mx.float32)
    mx.eval(out)
    return out


def rel_diff(a, b) -> float:
    """max |a - b| relative to max |b|."""
    return mx.abs(a - b).max().item() / mx.abs(b).max().item()




def stray(parent: Path):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, sp_model_path):
    """One tiny checkpoint converted three ways: float32, float16, 4-bit (group 32, float32 scales)."""
    tmp = tmp_path_factory.mktemp("fuse-bases")
    write_hf_checkpoint(tmp / "hf", tiny_args(), seed=3)
    tok = str(sp_model_path)
    return {
        "float32": convert(str(tmp / "hf"), tmp / "f32", dtype="float32", tokenizer=tok),
        "float16": convert(str(tmp / "hf"), tmp / "f16", dtype="float16", tokenizer=tok),
        "q4": convert(str(tmp / "hf"), tmp / "q4", dtype="float32", quantize=True, q_bits=4, q_group_size=32, tokenizer=tok),
        "hf": tmp / "hf",
    }


def make_adapters(base: Path, folder: Path, use_dora: bool, seed: int = 0, std: float = 0.05) -> LoRAConfig:
    """Adapters on ``base`` with random nonzero factors (and magnitudes), saved to ``folder``."""
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.1, use_dora=use_dora, adapt_embeddings=not use_dora)
    model = load_model(base, dtype=None)
    mx.random.seed(seed)  # lora_a's init
    apply_adapters(model, **config.to_dict())
    rng = np.random.default_rng(seed)

    def rand(shape, std):
        return mx.array(rng.normal(0, std, shape).astype(np.float32))

    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, DoRALinear)):
            m.lora_b = rand(m.lora_b.shape, std)
        if isinstance(m, DoRALinear):
            m.m = m.m * mx.array(rng.uniform(0.7, 1.3, m.m.shape).astype(np.float32))
        if isinstance(m, LoRAEmbedding):
            m.lora_a = rand(m.lora_a.shape, 0.02)
    save_adapters(folder, model, config)
    return config


def reference_logits(base: Path, adapters: Path) -> mx.array:
    """Base (stored quantization kept, float32 compute) with the adapters applied unfused."""
    model = load_model(base, dtype="float32", keep_quantized=True)
    load_adapters(model, adapters)
    model.eval()
    return logits(model)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_float_base_fuses_exactly(bases, tmp_path, capsys, use_dora):
    make_adapters(bases["float32"], tmp_path / "ad", use_dora)
    ref = reference_logits(bases["float32"], tmp_path / "ad")
    base = logits(load_model(bases["float32"]))
    assert rel_diff(base, ref) > 0.05  # the adapters matter: the checks below can fail

    code, out, err = cli("fuse", "--model", bases["float32"], "--adapter-path", tmp_path / "ad", "--save-path", tmp_path / "fused", capsys=capsys)
    assert code == 0, err
    assert "Saved" in out
    model, tok = load(tmp_path / "fused")
    assert rel_diff(logits(model), ref) < 1e-5
    assert not any(isinstance(m, (LoRALinear, DoRALinear, LoRAEmbedding)) for _, m in model.named_modules())
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization" not in config
    assert config["mlx_openelm"]["fused_adapters"]["use_dora"] is use_dora
    assert (tmp_path / "fused" / "tokenizer.model").read_bytes() == (bases["float32"] / "tokenizer.model").read_bytes()
    assert tok.encode("the cat sat") == load(bases["float32"])[1].encode("the cat sat")
    base_keys = set(mx.load(str(bases["float32"] / "model.safetensors")))
    # LoRA here adapts the embedding: the fused model is untied (E' in, the base E out, as CoreNet)
    untied = {"lm_head.weight"} if not use_dora else set()
    assert set(mx.load(str(tmp_path / "fused" / "model.safetensors"))) == base_keys | untied
    assert config["share_input_output_layers"] is use_dora


def test_float16_base_stays_float16(bases, tmp_path, capsys):
    make_adapters(bases["float16"], tmp_path / "ad", use_dora=True)
    ref = reference_logits(bases["float16"], tmp_path / "ad")
    code, _, err = cli("fuse", "-m", bases["float16"], "--adapter-path", tmp_path / "ad", "--save-path", tmp_path / "fused", capsys=capsys)
    assert code == 0, err
    weights = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["dtype"] == "float16"
    # Only the rounding of the fused weights to float16 differs: measured 0.9e-3-1.9e-3 of max |logit|
    # (LoRA, DoRA, adapter seeds 0-2), the size of rounding the base itself (1.2e-3 here).
    rounding = rel_diff(logits(load_model(bases["float16"])), logits(load_model(bases["float32"])))
    assert rel_diff(logits(load_model(tmp_path / "fused")), ref) < 3 * rounding


@pytest.mark.parametrize("use_dora", [False, True], ids=["qlora", "qdora"])
def test_quantized_base_requantized_or_dequantized(bases, tmp_path, capsys, use_dora):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    q4 = bases["q4"]
    make_adapters(q4, tmp_path / "ad", use_dora)
    ref = reference_logits(q4, tmp_path / "ad")
    common = ["fuse", "--model", q4, "--adapter-path", tmp_path / "ad"]

    code, _, err = cli(*common, "--save-path", tmp_path / "deq", "--dequantize", capsys=capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "deq" / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "float32"
    assert not any(k.endswith(".scales") for k in mx.load(str(tmp_path / "deq" / "model.safetensors")))
    assert rel_diff(logits(load_model(tmp_path / "deq")), ref) < 1e-5

    code, _, err = cli(*common, "--save-path", tmp_path / "q", capsys=capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == json.loads((q4 / "config.json").read_text())["quantization"]
    stored = mx.load(str(tmp_path / "q" / "model.safetensors"))
    # LoRA adapts the embedding: lm_head (the base's quantized table, as CoreNet's logits use E) is added
    untied = set() if use_dora else {"lm_head.weight", "lm_head.scales", "lm_head.biases"}
    assert set(stored) == set(mx.load(str(q4 / "model.safetensors"))) | untied
    assert stored["transformer.layers.0.attn.qkv_proj.weight"].dtype == mx.uint32
    kept = load_model(tmp_path / "q", dtype=None)
    assert isinstance(kept.transformer.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(kept.transformer.token_embeddings, nn.QuantizedEmbedding)
    requant = logits(kept)
    # adapted layers: exactly the dequantized fusion quantized with the base's settings; others: as stored
    adapted = {k.rsplit(".", 1)[0] for k in mx.load(str(tmp_path / "ad" / "adapters.safetensors"))}
    fused_float = mx.load(str(tmp_path / "deq" / "model.safetensors"))
    base_stored = mx.load(str(q4 / "model.safetensors"))
    for path in {k.rsplit(".", 1)[0] for k in stored if k.endswith(".scales")}:
        if path in adapted:
            expected = dict(zip(("weight", "scales", "biases"), mx.quantize(fused_float[f"{path}.weight"], 32, 4)))
        elif path == "lm_head":
            expected = {leaf: base_stored[f"transformer.token_embeddings.{leaf}"] for leaf in ("weight", "scales", "biases")}
        else:
            expected = {leaf: base_stored[f"{path}.{leaf}"] for leaf in ("weight", "scales", "biases")}
        for leaf, value in expected.items():
            assert mx.array_equal(stored[f"{path}.{leaf}"], value), f"{path}.{leaf}"
    # Random tiny weights are a worst case for 4 bits: quantizing the base alone moves the logits
    # by 0.51 of max |logit|; re-quantizing the fused weights measured 0.23-0.66 (LoRA with
    # embeddings and DoRA, adapter seeds 0-2, lora_b std 0.01-0.05).
    base_error = rel_diff(logits(load_model(q4)), logits(load_model(bases["float32"])))
    assert rel_diff(requant, ref) < 1.5 * base_error
    theirs, _ = mlx_lm_load_model(tmp_path / "q")  # mlx-lm reads the re-quantized folder the same way
    assert rel_diff(logits(theirs), requant) < 1e-5


def test_export_hf_round_trip(bases, tmp_path, capsys):
    q4 = bases["q4"]
    make_adapters(q4, tmp_path / "ad", use_dora=False)  # LoRA on a quantized embedding too
    ref = reference_logits(q4, tmp_path / "ad")
    code, _, err = cli("fuse", "--model", q4, "--adapter-path", tmp_path / "ad", "--save-path", tmp_path / "hf", "--export-hf", capsys=capsys)
    assert code == 0, err
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    apple = json.loads((bases["hf"] / "config.json").read_text())
    assert set(config) == set(apple)
    for key in ("architectures", "auto_map", "model_type", "num_query_heads", "num_kv_heads", "num_transformer_layers"):
        assert config[key] == apple[key], key

    # the apple/OpenELM checkpoint it came from has the same tensor names and shapes, plus the
    # untied output layer (the embedding LoRA leaves the logits on the base table, as CoreNet)
    theirs = {k: v.shape for k, v in mx.load(str(bases["hf"] / "model.safetensors")).items()}
    theirs["lm_head.weight"] = theirs["transformer.token_embeddings.weight"]
    assert config["share_input_output_layers"] is False
    ours = mx.load(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == theirs
    assert {v.dtype for v in ours.values()} == {mx.float32}

    again = convert(str(out), tmp_path / "again", dtype="float32")  # the exported tokenizer is found
    assert rel_diff(logits(load_model(again)), ref) < 1e-5

    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == theirs
    for name in ("transformer.token_embeddings.weight", "transformer.layers.0.attn.qkv_proj.weight",
                 "transformer.layers.0.attn.q_norm.weight", "transformer.layers.3.ffn.proj_2.weight", "transformer.norm.weight"):
        assert state[name].dtype == torch.float32
        np.testing.assert_array_equal(state[name].numpy(), np.array(ours[name]))


@pytest.fixture(scope="module")
def adapters_for_other_model(tmp_path_factory, sp_model_path):
    tmp = tmp_path_factory.mktemp("fuse-other")
    write_hf_checkpoint(tmp / "hf", tiny_args(model_dim=64, head_dim=16), seed=1)
    base = convert(str(tmp / "hf"), tmp / "mlx", dtype="float32", tokenizer=str(sp_model_path))
    make_adapters(base, tmp / "ad", use_dora=True)
    return tmp / "ad"


@pytest.mark.parametrize("case", ["missing-adapters", "other-model", "exists", "model-folder", "bad-layers"])
def test_bad_input_is_one_line_and_leaves_nothing(bases, tmp_path, capsys, case, adapters_for_other_model):
    f32 = bases["float32"]
    good = tmp_path / "good"
    make_adapters(f32, good, use_dora=False)
    adapter, save, message, extra = good, tmp_path / "out" / "fused", None, []
    if case == "missing-adapters":
        adapter, message = tmp_path / "nothing", "adapter_config.json not found"
    elif case == "other-model":
        adapter, message = adapters_for_other_model, "does not match"
    elif case == "exists":
        save.mkdir(parents=True)
        (save / "keep.txt").write_text("mine")
        message = "force"
    elif case == "model-folder":
        save, message, extra = f32, "would replace the model folder", ["--force"]
    elif case == "bad-layers":
        config = json.loads((good / "adapter_config.json").read_text())
        (good / "adapter_config.json").write_text(json.dumps({**config, "layers": [0, 9]}))
        message = "out of range"
    before = sorted(p.name for p in f32.iterdir())

    args = ["fuse", "--model", f32, "--adapter-path", adapter, "--save-path", save]
    code, _, err = cli(*args, *extra, capsys=capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in f32.iterdir()) == before
    if case == "exists":
        assert [p.name for p in save.iterdir()] == ["keep.txt"]
        assert stray(save.parent) == []
        code, _, err = cli(*args, "--force", capsys=capsys)  # --force replaces it
        assert code == 0, err
        assert (save / "model.safetensors").is_file() and not (save / "keep.txt").exists()
    elif case != "model-folder":
        assert not (tmp_path / "out").exists()

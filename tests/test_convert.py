"""The converter: HF folders (single, sharded, pytorch .bin), the Hub cache offline, CoreNet
checkpoints, quantization, mlx-lm compatibility, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from conftest import fake_hub_cache, hf_config, logits, max_diff, tiny_args, write_hf_checkpoint
from mlx_openelm.io.convert import convert
from mlx_openelm.io.load import load_model
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import CHAT_TEMPLATE
from mlx_openelm.weights import cpu_runs_quantized

REPO = Path(__file__).resolve().parents[1]
def run_convert(*argv, env=None, cwd=None):
    """``python convert.py ...`` as a user runs it."""
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "convert.py"), *map(str, argv)],
        capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=300,
    )


def leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name] if parent.exists() else []


# ---------------------------------------------------------------- round trips


def test_float32_round_trip_is_exact(hf_checkpoint, sp_model_path, tmp_path):
    src, model = hf_checkpoint
    seen = []
    out = convert(str(src), tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path),
                  progress=lambda name, i, n: seen.append((name, i, n)))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"]
    n = len(tree_flatten(model.parameters()))
    assert [i for _, i, _ in seen] == list(range(1, n + 1)) and seen[-1][2] == n
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization" not in config
    assert config["num_query_heads"] == model.args.num_query_heads
    assert config["ffn_intermediate_sizes"] == model.args.ffn_intermediate_sizes
    assert config["mlx_openelm"]["source_format"] == "safetensors"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["eos_token"] == "</s>" and "chat_template" not in tok_config
    loaded = load_model(out)
    assert max_diff(logits(loaded), logits(model)) < 1e-5
    assert leftovers(tmp_path) == []


def test_instruct_float16_gets_chat_template(tmp_path, sp_model_path):
    src = tmp_path / "OpenELM-tiny-Instruct"
    model = write_hf_checkpoint(src, tiny_args(), seed=3)
    out = convert(str(src), tmp_path / "out", tokenizer=str(sp_model_path))  # default float16
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert all(v.dtype == mx.float16 for v in mx.load(str(out / "model.safetensors")).values())
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<s>", "</s>")
    ref = logits(model)
    # float16 storage: relative error of a few 1e-3 on logits of order 1
    assert max_diff(logits(load_model(out)), ref) < 2e-2 * mx.abs(ref).max().item()


def _write_two_shards(folder: Path, model: Model):
    weights = dict(tree_flatten(model.parameters()))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        mx.save_safetensors(str(folder / file), {k: weights[k] for k in keys}, metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_source_and_sharded_output(tmp_path, sp_model_path, monkeypatch):
    src = tmp_path / "sharded"
    model = write_hf_checkpoint(src, tiny_args(), seed=1)
    (src / "model.safetensors").unlink()
    _write_two_shards(src, model)
    from mlx_openelm.io import folder

    monkeypatch.setattr(folder, "MAX_SHARD_BYTES", 600_000)  # force several output shards
    out = convert(str(src), tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert all(os.path.getsize(out / f) <= 600_000 + 10_000 for f in files)  # tensors + header
    assert max_diff(logits(load_model(out)), logits(model)) < 1e-5


def test_pytorch_bin_bfloat16_source(tmp_path, sp_model_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "bin"
    src.mkdir()
    args = tiny_args()
    model = init_weights(Model(args), seed=4)
    (src / "config.json").write_text(json.dumps(hf_config(args, "bfloat16")))
    state = {k: torch.tensor(v.astype(mx.float32).tolist(), dtype=torch.float32).to(torch.bfloat16)
             for k, v in tree_flatten(model.parameters())}
    torch.save(state, src / "pytorch_model.bin")
    out = convert(str(src), tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    assert json.loads((out / "config.json").read_text())["mlx_openelm"]["source_format"] == "pytorch"
    # the reference: the same weights rounded to bfloat16 exactly as torch stored them
    rounded = Model(args)
    rounded.update(tree_map(lambda p: p.astype(mx.bfloat16).astype(mx.float32), model.parameters()))
    assert max_diff(logits(load_model(out)), logits(rounded)) < 1e-5


# ---------------------------------------------------------------- CoreNet


def test_corenet_checkpoint_with_padded_vocabulary(tmp_path, sp_model_path):
    torch = pytest.importorskip("torch")
    args = tiny_args()
    model = init_weights(Model(args), seed=5)
    state = {}
    for k, v in tree_flatten(model.parameters()):
        t = torch.tensor(v.tolist(), dtype=torch.float32)
        if k.endswith("token_embeddings.weight"):  # CoreNet's 128 extra rows (padding index 384 and beyond)
            t = torch.cat([t, torch.randn(128, args.model_dim) * 50])
        state[k.removeprefix("transformer.")] = t  # CoreNet names have no prefix
    ckpt = tmp_path / "openelm_tiny.pt"
    torch.save(state, ckpt)
    yaml_text = f"""
_anchor_vocab_size: &_anchor_vocab_size {args.vocab_size + 128}
_anchor_padding_index: &_anchor_padding_index {args.vocab_size}
model:
  language_modeling:
    name: "general_gpt"
    general_gpt:
      model_name: "OpenELM-270M"
      vocab_size: *_anchor_vocab_size
      max_context_length: 2048
      padding_index: *_anchor_padding_index
      num_transformer_layers: {args.num_transformer_layers}
      model_dim: {args.model_dim}
      head_dim: {args.head_dim}
      ffn_dim_divisor: {args.ffn_dim_divisor}
"""
    yaml_path = tmp_path / "openelm_tiny.yaml"
    yaml_path.write_text(yaml_text)
    out = convert(corenet=ckpt, corenet_config=yaml_path, mlx_path=tmp_path / "out", dtype="float32",
                  tokenizer=str(sp_model_path))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == args.vocab_size
    assert config["mlx_openelm"]["source_vocab_size"] == args.vocab_size + 128
    assert config["mlx_openelm"]["padding_index"] == args.vocab_size
    assert config["mlx_openelm"]["source_format"] == "corenet"
    assert mx.load(str(out / "model.safetensors"))["transformer.token_embeddings.weight"].shape == (args.vocab_size, args.model_dim)
    assert max_diff(logits(load_model(out)), logits(model)) < 1e-5


# ---------------------------------------------------------------- quantization and mlx-lm


def _fake_quantized(model: Model, group_size: int, bits: int) -> Model:
    """The reference: float16 storage, then quantize/dequantize of the quantizable weights."""
    ref = Model(model.args)
    ref.update(tree_map(lambda p: p.astype(mx.float16).astype(mx.float32), model.parameters()))
    for _, m in ref.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0:
            wq, scales, biases = mx.quantize(m.weight.astype(mx.float16), group_size, bits)
            m.weight = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)
    return ref


@pytest.mark.parametrize("bits,group_size,bound", [(4, 64, 0.8), (8, 32, 0.05)])
def test_quantized_outputs_load_and_stay_close(hf_checkpoint, sp_model_path, tmp_path, bits, group_size, bound):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    src, model = hf_checkpoint
    out = convert(str(src), tmp_path / "q", quantize=True, q_bits=bits, q_group_size=group_size,
                  tokenizer=str(sp_model_path))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": group_size, "bits": bits, "mode": "affine"}
    ref, fake = logits(model), logits(_fake_quantized(model, group_size, bits))

    cpu = load_model(out)  # auto on CPU: float32; kept quantized where the CPU kernels run it, else dequantized
    assert cpu.compute_info["stored_quantization"]["bits"] == bits
    if cpu_runs_quantized(config["quantization"]):
        # float32 activations; the file's float16 scales and biases are kept (the kernels widen them exactly)
        assert cpu.compute_info["quantized"]["bits"] == bits and cpu.compute_info["dtype"] == "float32 (float16 scales)"
    else:
        assert cpu.compute_info["quantized"] is None
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in cpu.named_modules())
    assert max_diff(logits(cpu), fake) < 1e-4
    # Random tiny weights are a worst case: measured max|diff|/max|logit| = 0.38-0.55 (4-bit, g64)
    # and 0.021-0.026 (8-bit, g32) over seeds 0-2; the bounds leave some margin.
    assert max_diff(logits(cpu), ref) < bound * mx.abs(ref).max().item()

    kept = load_model(out, keep_quantized=True)
    quantized = [p for p, m in kept.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert "transformer.token_embeddings" in quantized and "transformer.layers.0.attn.qkv_proj" in quantized
    assert max_diff(logits(kept), fake) < 1e-4

    theirs, _ = mlx_lm_load_model(out)  # float16 scales, so float16-level agreement
    assert max_diff(logits(theirs), fake) < 1e-2 * mx.abs(fake).max().item()


def test_mlx_lm_loads_our_folder_with_the_same_logits(hf_checkpoint, sp_model_path, tmp_path):
    from mlx_lm import load as mlx_lm_load

    src, model = hf_checkpoint
    out = convert(str(src), tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    theirs, tokenizer = mlx_lm_load(str(out))
    assert max_diff(logits(theirs), logits(model)) < 1e-4
    from mlx_openelm.tokenizer import Tokenizer

    text = "The cat sat on the mat. Please answer true or false."
    assert tokenizer.encode(text) == Tokenizer(out).encode(text)


def test_float16_3b_warns_to_use_bfloat16(tmp_path, sp_model_path, capsys):
    src = tmp_path / "OpenELM-3B-like"
    src.mkdir()
    args = tiny_args(num_transformer_layers=1, model_dim=3072, head_dim=128, ffn_dim_divisor=256)
    (src / "config.json").write_text(json.dumps(hf_config(args)))
    mx.save_safetensors(str(src / "model.safetensors"), {"transformer.norm.weight": mx.ones((3072,))})
    with pytest.warns(UserWarning, match="bfloat16"), pytest.raises(ValueError, match="missing tensor"):
        convert(str(src), tmp_path / "out", tokenizer=str(sp_model_path))
    assert not (tmp_path / "out").exists()
    code, err = _cli(["--hf", src, "--mlx-path", tmp_path / "out", "--tokenizer", sp_model_path], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("warning:") and "--dtype bfloat16" in lines[0] and lines[1].startswith("error:")


# ---------------------------------------------------------------- errors: one line, nothing left


def _cli(argv, capsys):
    from mlx_openelm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def _break(kind: str, folder: Path):
    config = json.loads((folder / "config.json").read_text())
    weights = mx.load(str(folder / "model.safetensors"))
    if kind == "missing config":
        (folder / "config.json").unlink()
    elif kind == "wrong model_type":
        config["model_type"] = "llama"
    elif kind == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
        return
    elif kind == "missing tensor":
        del weights["transformer.layers.2.ffn.proj_2.weight"]
    elif kind == "misshaped tensor":
        weights["transformer.layers.1.attn.qkv_proj.weight"] = mx.zeros((8, 128))
    elif kind == "unexpected tensor":
        weights["lm_head.weight"] = mx.zeros((384, 128))
    elif kind == "big tokenizer":
        config["vocab_size"] = 300
        weights["transformer.token_embeddings.weight"] = weights["transformer.token_embeddings.weight"][:300]
    if kind != "missing config":
        (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing config", "has no config.json"),
        ("wrong model_type", "model_type 'llama'"),
        ("truncated", "truncated or corrupt"),
        ("missing tensor", "missing tensor transformer.layers.2.ffn.proj_2.weight of shape [128, 352]"),
        ("misshaped tensor", "transformer.layers.1.attn.qkv_proj.weight has shape [8, 128] but the config implies [192, 128]"),
        ("unexpected tensor", "unexpected tensor lm_head.weight"),
        ("big tokenizer", "the tokenizer has 384 tokens but the model only 300"),
    ],
)
def test_bad_input_gives_one_line_and_no_output(kind, message, tmp_path, sp_model_path, capsys):
    src = tmp_path / "src"
    write_hf_checkpoint(src, tiny_args())
    _break(kind, src)
    out = tmp_path / "models" / "out"
    code, err = _cli(["--hf", src, "--mlx-path", out, "--tokenizer", sp_model_path], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "models").exists()  # not even the parent made for it


def test_existing_output_needs_force_and_failure_keeps_it(hf_checkpoint, sp_model_path, tmp_path, capsys):
    src, model = hf_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli(["--hf", src, "--mlx-path", out, "--tokenizer", sp_model_path], capsys)
    assert code == 1 and "force" in err and len(err.strip().splitlines()) == 1
    # --force never replaces a folder that no conversion wrote
    code, err = _cli(["--hf", src, "--mlx-path", out, "--tokenizer", sp_model_path, "--force"], capsys)
    assert code == 1 and "not written by a conversion" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    ours = tmp_path / "ours"
    convert(str(src), ours, dtype="float16", tokenizer=str(sp_model_path))
    before = {p.name: p.read_bytes() for p in ours.iterdir()}

    def fail_midway(name, i, n):
        if i == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        convert(str(src), ours, tokenizer=str(sp_model_path), force=True, progress=fail_midway)
    assert {p.name: p.read_bytes() for p in ours.iterdir()} == before and leftovers(tmp_path) == []

    convert(str(src), ours, dtype="float32", tokenizer=str(sp_model_path), force=True)
    assert leftovers(tmp_path) == []
    assert max_diff(logits(load_model(ours)), logits(model)) < 1e-5


# ---------------------------------------------------------------- the Hub, offline


def _fake_hub_cache(cache: Path, repo: str, files: dict) -> Path:
    """conftest's fake cache for a model repo at one fixed commit."""
    return fake_hub_cache(cache, repo, files, commit="0123456789abcdef0123456789abcdef01234567", repo_type="model")


def test_hub_id_converts_fully_offline(tmp_path, sp_model_path, hf_checkpoint):
    src, model = hf_checkpoint
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "apple/OpenELM-270M", {n: src / n for n in ("config.json", "model.safetensors")})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    done = run_convert("--hf", "apple/OpenELM-270M", "--tokenizer", sp_model_path, "--dtype", "float32", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "mlx_model" / "OpenELM-270M"  # the default --mlx-path
    assert json.loads((out / "config.json").read_text())["mlx_openelm"]["source"] == "apple/OpenELM-270M"
    assert max_diff(logits(load_model(out)), logits(model)) < 1e-5

    for argv, message in [
        (["--hf", "apple/OpenELM-9B", "--tokenizer", sp_model_path], "apple/OpenELM-9B is not in the local Hugging Face cache"),
        (["--hf", "apple/OpenELM-270M", "--mlx-path", tmp_path / "none"], "no tokenizer"),
    ]:
        failed = run_convert(*argv, env=env, cwd=tmp_path)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1 and message in lines[0], failed.stderr
        assert "Traceback" not in failed.stderr
    assert "huggingface-cli login" in lines[0] and "--tokenizer" in lines[0]
    assert not (tmp_path / "none").exists() and not (tmp_path / "mlx_model" / "OpenELM-9B").exists()

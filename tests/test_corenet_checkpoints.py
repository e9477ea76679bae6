"""OpenELM's published CoreNet checkpoints (apple/corenet projects/openelm/README-pretraining.md):
``checkpoint_epoch_0_iter_*.pt`` / ``checkpoint_average.pt`` are a bare ``torch.save`` of the
model's ``state_dict()`` (CoreNet names: ``token_embeddings.weight``, ``layers.N.attn.qkv_proj.weight``,
..., vocabulary padded to 32000 + 128 rows); ``training_checkpoint_*.pt`` is CoreNet's
``get_training_state`` dict (``iterations``, ``epoch``, ``model_state_dict``, ``optim_state_dict``,
``best_metric``, ``is_interval_ckpt``). Each is built here with torch from a tiny model and must
convert to the same logits as the equivalent HF-layout checkpoint converted by the HF path."""

from __future__ import annotations

import json

import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import logits, max_diff, tiny_args, write_hf_checkpoint
from mlx_openelm.config import ModelArgs
from mlx_openelm.io.convert import CORENET_GENERAL_GPT, convert, corenet_args_from_shapes
from mlx_openelm.io.load import load, load_model
from mlx_openelm.model import Model

torch = pytest.importorskip("torch")
PAD_ROWS = 128  # CoreNet: 32000 tokens + padding index + hardware-friendly rows = 32128


def _corenet_state(model: Model, pad_rows: int = PAD_ROWS, seed: int = 0) -> dict:
    """The model's weights as CoreNet's GeneralGPTModel.state_dict() has them: no ``transformer.``
    prefix, padded embedding rows, rotary buffers of every attention layer."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in tree_flatten(model.parameters()):
        t = torch.tensor(v.tolist(), dtype=torch.float32)
        if k.endswith("token_embeddings.weight"):
            t = torch.cat([t, torch.randn(pad_rows, t.shape[1], generator=g) * 50])  # junk that must be sliced off
        state[k.removeprefix("transformer.")] = t
    for i in range(len(model.layers)):
        state[f"layers.{i}.attn.pos_embedding.inv_freq"] = torch.ones(model.args.head_dim // 2)
    return state


@pytest.fixture
def pair(tmp_path, sp_model_path):
    """(HF-layout folder converted by the HF path, CoreNet state dict of the same weights)."""
    args = tiny_args()
    hf = tmp_path / "hf"
    model = write_hf_checkpoint(hf, args, seed=3)
    ref = convert(str(hf), tmp_path / "ref", dtype="float32", tokenizer=str(sp_model_path))
    return load_model(ref), _corenet_state(model)


@pytest.mark.parametrize("layout", ["bare", "module_prefix", "model_wrapper", "state_dict_wrapper"])
def test_corenet_layouts_give_the_hf_logits(pair, layout, tmp_path, sp_model_path):
    ref, state = pair
    if layout == "module_prefix":  # a DDP-wrapped model's state dict
        obj = {f"module.{k}": v for k, v in state.items()}
    elif layout == "model_wrapper":
        obj = {"model": state}
    elif layout == "state_dict_wrapper":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 0}
    else:
        obj = state
    ckpt = tmp_path / "checkpoint_epoch_0_iter_49999.pt"
    torch.save(obj, ckpt)
    out = convert(corenet=ckpt, mlx_path=tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    config = json.loads((out / "config.json").read_text())
    marker = config["mlx_openelm"]
    assert config["vocab_size"] == 384 and marker["source_vocab_size"] == 384 + PAD_ROWS
    assert marker["corenet_config"] == "inferred from the tensor shapes"
    assert marker["corenet_checkpoint"] == "model weights"
    assert max_diff(logits(load_model(out)), logits(ref)) < 1e-5


def test_training_checkpoint_takes_only_the_model_part(pair, tmp_path, sp_model_path):
    ref, state = pair
    params = list(state.values())
    optim_state = {  # torch.optim.AdamW.state_dict(): per-parameter moments, then the param groups
        "state": {i: {"step": torch.tensor(5000.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                  for i, p in enumerate(params)},
        "param_groups": [{"lr": 0.0053, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(range(len(params)))}],
    }
    training_state = {"iterations": 50000, "epoch": 0, "model_state_dict": state, "optim_state_dict": optim_state,
                      "best_metric": 2.5, "is_interval_ckpt": True}
    ckpt = tmp_path / "training_checkpoint_epoch_0_iter_49999.pt"
    torch.save(training_state, ckpt)
    out = convert(corenet=ckpt, mlx_path=tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    marker = json.loads((out / "config.json").read_text())["mlx_openelm"]
    assert marker["corenet_checkpoint"] == ("training checkpoint: model_state_dict taken; best_metric, epoch, is_interval_ckpt, "
                                            "iterations, optim_state_dict ignored (never read)")
    assert marker["corenet_iterations"] == 50000 and marker["corenet_epoch"] == 0
    written = mx.load(str(out / "model.safetensors"))
    assert not any("exp_avg" in k or "optim" in k for k in written)
    assert max_diff(logits(load_model(out)), logits(ref)) < 1e-5


def test_yaml_still_works_and_bad_files_fail_cleanly(pair, tmp_path, sp_model_path):
    ref, state = pair
    ckpt = tmp_path / "checkpoint_average.pt"
    torch.save(state, ckpt)
    args = tiny_args()
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(
        "model:\n  language_modeling:\n    general_gpt:\n"
        f"      vocab_size: {args.vocab_size + PAD_ROWS}\n      padding_index: {args.vocab_size}\n"
        f"      num_transformer_layers: {args.num_transformer_layers}\n      model_dim: {args.model_dim}\n"
        f"      head_dim: {args.head_dim}\n      ffn_dim_divisor: {args.ffn_dim_divisor}\n      num_gqa_groups: 4\n"
    )
    out = convert(corenet=ckpt, corenet_config=yaml_path, mlx_path=tmp_path / "out", dtype="float32", tokenizer=str(sp_model_path))
    assert json.loads((out / "config.json").read_text())["mlx_openelm"]["padding_index"] == args.vocab_size
    assert max_diff(logits(load_model(out)), logits(ref)) < 1e-5

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read junk.pt"):
        convert(corenet=tmp_path / "junk.pt", mlx_path=tmp_path / "o2", tokenizer=str(sp_model_path))
    torch.save({"optim_state_dict": {}, "iterations": 3}, tmp_path / "opt_only.pt")
    with pytest.raises(ValueError, match="no token_embeddings.weight"):
        convert(corenet=tmp_path / "opt_only.pt", mlx_path=tmp_path / "o3", tokenizer=str(sp_model_path))
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("size", list(CORENET_GENERAL_GPT))
def test_published_sizes_are_found_by_their_shapes(size):
    """No YAML needed for Apple's four sizes: the shapes of a 32128-row checkpoint pick the shipped
    general_gpt block, whose architecture equals the preset (the lazy model allocates nothing)."""
    expected = ModelArgs.from_name(size, vocab_size=CORENET_GENERAL_GPT[size]["vocab_size"])
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(Model(expected).parameters())}
    args, found = corenet_args_from_shapes(shapes)
    assert found == size and args == expected
    assert CORENET_GENERAL_GPT[size]["padding_index"] == 32000 and args.vocab_size == 32128


def test_load_accepts_a_pt_path_and_converts_it_once(pair, tmp_path, sp_model_path, monkeypatch):
    ref, state = pair
    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "270M" / "checkpoint_epoch_0_iter_99999.pt"
    ckpt.parent.mkdir()
    torch.save(state, ckpt)
    model, tok = load(ckpt, dtype="float32", tokenizer=str(sp_model_path))
    assert max_diff(logits(model), logits(ref)) < 1e-5
    assert tok.vocab_size == 384
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("corenet--270M--checkpoint_epoch_0_iter_99999--")
    stamp = (cached[0] / "model.safetensors").stat().st_mtime_ns
    model2, _ = load(ckpt, dtype="float32")  # second time: the cache, no tokenizer needed
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert max_diff(logits(model2), logits(ref)) < 1e-5

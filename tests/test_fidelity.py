"""Fidelity to the methods we claim (issue 7, defects 1, 2 and 4), each against a reference
written out here: eval-mode adapters equal their fused model, the alignment-handbook prompt
string, and CoreNet's tied output layer computed in float64 numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from conftest import cli, TOKENS, logits, tiny_args, write_hf_checkpoint
from mlx_openelm.adapters import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    apply_adapters,
    fuse_adapters,
    load_adapters,
    save_adapters,
)
from mlx_openelm.generate.chat import ChatSession
from mlx_openelm.io.convert import convert
from mlx_openelm.io.load import load, load_model
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import CHAT_TEMPLATE, Tokenizer, render_chat, render_jinja

CONFIG = LoRAConfig(rank=4, alpha=8.0, dropout=0.5, adapt_embeddings=True)




@pytest.fixture(scope="module")
def base(tmp_path_factory, sp_model_path):
    """A float32 -Instruct conversion of a tiny random checkpoint."""
    tmp = tmp_path_factory.mktemp("fidelity")
    write_hf_checkpoint(tmp / "OpenELM-tiny-Instruct", tiny_args(), seed=3)
    return convert(str(tmp / "OpenELM-tiny-Instruct"), tmp / "mlx", dtype="float32", tokenizer=str(sp_model_path))


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """'Trained' LoRA adapters (non-zero factors, dropout 0.5) on every linear and the embedding."""
    model = load_model(base)
    model.train()
    apply_adapters(model, rank=CONFIG.rank, alpha=CONFIG.alpha, dropout=CONFIG.dropout, adapt_embeddings=True)
    rng = np.random.default_rng(0)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.array(rng.normal(0, 0.2, m.lora_b.shape).astype(np.float32))
        elif isinstance(m, LoRAEmbedding):
            m.lora_a = mx.array(rng.normal(0, 0.2, m.lora_a.shape).astype(np.float32))
    return save_adapters(tmp_path_factory.mktemp("fidelity-ad") / "ad", model, CONFIG)


# ---------------------------------------------------------------- defect 1: eval mode on load


def test_loaded_adapters_are_deterministic_and_equal_the_fused_model(base, adapters):
    model, _ = load(base, adapter_path=adapters)
    assert not any(m.training for _, m in model.named_modules())  # no dropout anywhere
    first, second = logits(model), logits(model)
    assert mx.array_equal(first, second).item()  # bit-identical

    fused = load_model(base)
    load_adapters(fused, adapters)
    fused.eval()
    fuse_adapters(fused)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for _, m in fused.named_modules())
    np.testing.assert_allclose(np.array(first), np.array(logits(fused)), atol=1e-4, rtol=1e-4)
    # the adapters matter, so the checks above can fail
    assert mx.abs(first - logits(load_model(base))).max().item() > 1e-2
    plain, _ = load(base)
    assert not plain.training


def test_eval_with_adapters_twice_gives_identical_json(base, adapters, tmp_path, capsys):
    data = tmp_path / "dataset"
    (data / "boolq").mkdir(parents=True)
    records = [{"instruction": f"Is the {w} red? Answer format: true/false", "input": "",
                "output": f"the correct answer is {a}", "answer": a}
               for w, a in [(w, "true" if i % 2 else "false") for i, w in enumerate(
                   "cat dog apple tree river city mat light mountain question model option sentence task blue green "
                   "red dark small large open slow fast river".split())]]
    (data / "boolq" / "test.json").write_text(json.dumps(records))
    outputs = []
    for i in range(2):
        out = tmp_path / f"run{i}.json"
        code, _, err = cli("eval", "--model", base, "--data", data, "--tasks", "boolq", "--adapter-path", adapters,
                           "--batch-size", "3", "--output", out, capsys=capsys)
        assert code == 0, err
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["results"]["boolq"]["n"] == len(records)


# ---------------------------------------------------------------- defect 2: the empty system turn

# alignment-handbook (the commit Apple used) inserts {"role": "system", "content": ""} when an
# example has no system message; rendered with the Zephyr template of openelm-instruct.yaml:
EXPECTED_HI = "<|system|>\n</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_chat_template_starts_with_the_empty_system_turn(sp_model_path):
    tok = Tokenizer(sp_model_path)
    hi = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(hi, add_generation_prompt=True) == EXPECTED_HI
    assert tok.apply_chat_template(hi, add_generation_prompt=True, add_empty_system=False) == "<|user|>\nHi</s>\n<|assistant|>\n"
    given = [{"role": "system", "content": "SYS"}, *hi]
    assert tok.apply_chat_template(given) == "<|system|>\nSYS</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert hi == [{"role": "user", "content": "Hi"}]  # the caller's list is not modified


def test_first_chat_turn_encodes_exactly_the_handbook_prompt(base):
    model, tok = load(base)
    session = ChatSession(model, tok)
    responses = list(session.reply("Hi", max_tokens=3))
    expected = tok.encode(EXPECTED_HI)
    assert responses[-1].prompt_tokens == len(expected) and responses[-1].cached_tokens == 0
    assert session.cache_tokens[: len(expected)] == expected
    plain = ChatSession(model, tok, add_empty_system=False)
    list(plain.reply("Hi", max_tokens=1))
    assert plain.cache_tokens[: len(tok.encode("<|user|>\nHi</s>\n<|assistant|>\n"))] == tok.encode("<|user|>\nHi</s>\n<|assistant|>\n")


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "a\n  b"}, {"role": "assistant", "content": "c"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_jinja_template_renders_as_render_chat(sp_model_path, tmp_path, messages, generation_prompt):
    """Our conversions store CHAT_TEMPLATE in tokenizer_config.json; honouring it (jinja2, as HF
    renders) must give exactly what the built-in renderer gives, system-turn insertion included."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    with_template = Tokenizer(folder, chat_template=CHAT_TEMPLATE)
    builtin = Tokenizer(folder)
    for system in (True, False):
        a = with_template.apply_chat_template(messages, generation_prompt, add_empty_system=system)
        assert a == builtin.apply_chat_template(messages, generation_prompt, add_empty_system=system)
        assert a == render_chat(messages, generation_prompt, add_empty_system=system)


def test_folder_chat_template_is_honoured(base, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE  # what the converter wrote for an -Instruct model
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
                            "{% if add_generation_prompt %}[assistant]{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    _, tok = load(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>[system]</s>[user]Hi</s>[assistant]"
    assert render_jinja(cfg["chat_template"], [], add_generation_prompt=False) == "<s>"
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load(folder)[1].apply_chat_template([{"role": "user", "content": "Hi"}]) == EXPECTED_HI  # the fallback


# ---------------------------------------------------------------- defect 4: CoreNet's output layer


def test_embedding_lora_leaves_the_output_layer_on_the_base_table():
    """CoreNet (general_gpt.py) computes logits as F.linear(h, token_embeddings.weight), the frozen
    base table, while the input embedding is E + s A B. Reference in float64 numpy."""
    model = init_weights(Model(tiny_args()), seed=4)
    model.eval()
    E = np.array(model.transformer.token_embeddings.weight, dtype=np.float64)
    apply_adapters(model, rank=4, alpha=8.0, adapt_embeddings=True, targets=["qkv_proj"])
    emb = model.transformer.token_embeddings
    rng = np.random.default_rng(1)
    emb.lora_a = mx.array(rng.normal(0, 0.1, emb.lora_a.shape).astype(np.float32))
    A, B, s = np.array(emb.lora_a, np.float64), np.array(emb.lora_b, np.float64), 8.0 / 4
    ids = np.array(TOKENS)

    np.testing.assert_allclose(np.array(emb(TOKENS)), (E + s * A @ B)[ids], atol=1e-5)  # adapted input
    h = np.array(model.transformer(TOKENS), np.float64)  # final hidden states (from the adapted input)
    out = np.array(model(TOKENS), np.float64)
    np.testing.assert_allclose(out, h @ E.T, atol=1e-4, rtol=1e-5)  # logits on the base table
    assert np.abs(out - h @ (E + s * A @ B).T).max() > 1e-2  # ... and not on the adapted one

    fused = fuse_adapters(model)  # untied: E' in, lm_head = E out
    assert fused.args.share_input_output_layers is False and isinstance(fused.lm_head, nn.Linear)
    np.testing.assert_allclose(np.array(fused(TOKENS), np.float64), out, atol=1e-4, rtol=1e-5)


def test_adapt_output_option_adapts_both():
    model = init_weights(Model(tiny_args()), seed=4)
    model.eval()
    E = np.array(model.transformer.token_embeddings.weight, dtype=np.float64)
    apply_adapters(model, rank=4, alpha=8.0, adapt_embeddings=True, targets=["qkv_proj"], adapt_output=True)
    emb = model.transformer.token_embeddings
    emb.lora_a = mx.array(np.random.default_rng(1).normal(0, 0.1, emb.lora_a.shape).astype(np.float32))
    A, B = np.array(emb.lora_a, np.float64), np.array(emb.lora_b, np.float64)
    h = np.array(model.transformer(TOKENS), np.float64)
    out = np.array(model(TOKENS), np.float64)
    np.testing.assert_allclose(out, h @ (E + 2.0 * A @ B).T, atol=1e-4, rtol=1e-5)
    fused = fuse_adapters(model)
    assert fused.args.share_input_output_layers is True and "lm_head" not in fused
    np.testing.assert_allclose(np.array(fused(TOKENS), np.float64), out, atol=1e-4, rtol=1e-5)


def test_adapters_saved_before_adapt_output_keep_their_output_layer(base, adapters, tmp_path):
    """An adapter_config.json without ``adapt_output`` predates the option: its embedding adapter
    was trained feeding the output layer too, so it loads that way (the fused model stays tied)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(adapters, old)
    config = json.loads((old / "adapter_config.json").read_text())
    assert config["adapt_output"] is False  # what we write now
    del config["adapt_output"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    model = load_model(base)
    assert load_adapters(model, old).adapt_output is True
    assert model.transformer.token_embeddings.adapt_output is True

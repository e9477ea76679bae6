"""Shared test helpers, one home each: the SentencePiece tokenizer trained on the fly
(``sp_model_path``), tiny checkpoints in the exact ``apple/OpenELM-*`` layout (``tiny_args``,
``write_hf_checkpoint``: config.json + model.safetensors with ``transformer.*`` keys), a fake
offline Hugging Face cache (``fake_hub_cache``, ``offline_hub``), ``logits``/``max_diff``, and
the literal LLM-Adapters prompt templates."""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_openelm.config import ModelArgs
from mlx_openelm.data import generate_prompt
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer
from mlx_openelm.train.loop import METRICS_FILE

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

WORDS = (
    "the a cat dog sat on mat runs fast slow red blue green question answer true false "
    "solution option ending model apple tree river mountain city light dark open small large "
    "please choose correct following sentence complete instruction response below task"
).split()


def _corpus(n=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + ".")
    lines += [
        "Please answer the following question with true or false.",
        "Answer format: true/false",
        "### Instruction:",
        "### Response:",
        "the correct answer is answer1 answer2 answer3 answer4 answer5",
        "solution1 solution2 option1 option2 ending1 ending2 ending3 ending4",
        "<|user|> <|assistant|> <|system|>",
        "Hello! How are you? 1234567890 ({[]}) é ü ß — …",
    ] * 20
    return lines


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> Path:
    """A Llama-layout SentencePiece model (unk=0, bos=1, eos=2, byte fallback) trained in the test."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(_corpus()))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        vocab_size=384,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        remove_extra_whitespaces=False,  # as Llama's tokenizer: the templates' indentation survives
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return d / "tokenizer.model"


def tiny_args(**overrides) -> ModelArgs:
    """The one tiny test shape: ``config.PRESETS["TINY"]`` (vocab 384 = the tokenizers trained here)."""
    return ModelArgs.from_name("tiny", **overrides)


def cli(*argv, capsys):
    """Run ``mlx-openelm ARGV`` in process; ``(exit code, stdout, stderr)``."""
    from mlx_openelm.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def hf_config(args: ModelArgs, torch_dtype="float32") -> dict:
    """config.json as the apple/OpenELM repos store it (per-layer lists, remote-code fields)."""
    return {
        "activation_fn_name": "swish",
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": args.ffn_dim_divisor,
        "ffn_multipliers": [round(s / args.model_dim, 4) for s in args.ffn_intermediate_sizes],
        "ffn_with_glu": True,
        "head_dim": args.head_dim,
        "initializer_range": 0.02,
        "max_context_length": args.max_context_length,
        "model_dim": args.model_dim,
        "model_type": "openelm",
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": True,
        "num_gqa_groups": args.num_gqa_groups,
        "num_kv_heads": args.num_kv_heads,
        "num_query_heads": args.num_query_heads,
        "num_transformer_layers": args.num_transformer_layers,
        "qkv_multipliers": [0.5, 1.0],
        "rope_freq_constant": 10000,
        "rope_max_length": 4096,
        "share_input_output_layers": True,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.39.3",
        "use_cache": True,
        "vocab_size": args.vocab_size,
    }


def write_hf_checkpoint(folder: Path, args: ModelArgs, seed: int = 0, tokenizer: Path | None = None) -> Model:
    """Write a random-weight checkpoint in the apple/OpenELM layout; return the model it holds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = init_weights(Model(args), seed)
    (folder / "config.json").write_text(json.dumps(hf_config(args), indent=2))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"})
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return model


TOKENS = mx.array([[1, 5, 9, 33, 100, 7, 250, 383, 2, 64]])


def logits(model) -> mx.array:
    """float32 logits of a fixed token row, evaluated."""
    out = model(TOKENS).astype(mx.float32)
    mx.eval(out)
    return out


def max_diff(a, b) -> float:
    return mx.abs(a - b).max().item()


# ---------------------------------------------------------------- a fake Hugging Face cache


def fake_hub_cache(root, repo_id, files, revision="main", commit="a" * 40, repo_type="dataset") -> Path:
    """A Hugging Face cache as ``hf_hub_download``/``snapshot_download`` leave it:
    ``<root>/<type>s--Owner--name`` with ``refs/<revision>`` holding the commit and
    ``snapshots/<commit>/<file>``. ``files`` maps a name to bytes or to a file to copy.
    Returns the snapshot folder."""
    folder = Path(root) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        p = snapshot / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME/HF_HUB_CACHE in a temporary folder and HF_HUB_OFFLINE=1 (the constants are
    read at import, so they are patched too). Returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "mlx-openelm-cache"))
    return cache


# ---------------------------------------------------------------- LLM-Adapters prompts

# Literal copies of LLM-Adapters (commit 8166572) finetune.py / commonsense_evaluate.py prompts.
TRAIN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                INS\n"
    "                \n"
    "                ### Response:\n"
    "                OUT"
)
EVAL_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                INS\n"
    "\n"
    "                ### Response:\n"
    "                "
)


@pytest.fixture
def hf_checkpoint(tmp_path, sp_model_path):
    """A tiny apple/OpenELM-layout folder (without tokenizer, like the real repos) and its model."""
    folder = tmp_path / "OpenELM-tiny"
    model = write_hf_checkpoint(folder, tiny_args())
    return folder, model


# -- a learnable task for the trainers (SFT, DPO tests): which words are colours ---------------------------

# "Is <word> a colour?" after two random filler words; the model must learn which words are colours
# and ignore the filler. Held-out questions use filler pairs never seen in training.
COLOURS, OTHERS = ("red", "blue"), ("cat", "tree")
FILLER = "the a sat on runs fast slow small large open light dark model sentence task city".split()


def colour_record(word: str, filler: str) -> dict:
    label = "true" if word in COLOURS else "false"
    instruction = (
        f"Please answer the following question with true or false, question: {filler} is {word} a colour?"
        "\n\nAnswer format: true/false"
    )
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {label}", "answer": label}


def colour_task(n_train_per_word=24, n_test_per_word=12, seed=0):
    rng = random.Random(seed)
    pairs = [f"{a} {b}" for a in FILLER for b in FILLER if a != b]
    rng.shuffle(pairs)
    words = COLOURS + OTHERS
    n_tr, n_te = n_train_per_word, n_test_per_word
    train_set = [colour_record(w, pairs[i * len(words) + k]) for i in range(n_tr) for k, w in enumerate(words)]
    base = n_tr * len(words)
    test_set = [colour_record(w, pairs[base + i * len(words) + k]) for i in range(n_te) for k, w in enumerate(words)]
    return train_set, test_set


@pytest.fixture(scope="session")
def task_spm_path(tmp_path_factory) -> Path:
    """A word-level SentencePiece model trained on the task's prompts, so sequences stay ~56 tokens."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("task_spm")
    train_set, test_set = colour_task()
    lines = [generate_prompt(r, train=t).replace("\n", " ") for r in train_set + test_set for t in (True, False)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=300, model_type="bpe",
        hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def task_tokenizer(task_spm_path) -> Tokenizer:
    return Tokenizer(task_spm_path)


def metrics(folder: Path):
    lines = [json.loads(x) for x in (Path(folder) / METRICS_FILE).read_text().splitlines()]
    return [x for x in lines if "loss" in x], [x for x in lines if "val_loss" in x]




def free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per local rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    pytest.skip("no two consecutive free local ports for the ring backend")

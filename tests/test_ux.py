"""The new user's defects (issue 7, section 3): usage errors and bad input as one line without a
traceback, nothing lost or left behind on disk, the chat that keeps going, the tokenizer that
just works (offline, with fake Hugging Face caches), mlx-lm's option names, a sign of life."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
from conftest import cli, fake_hub_cache, tiny_args, write_hf_checkpoint
from mlx_openelm.generate.chat import ChatSession
from mlx_openelm.io import hub
from mlx_openelm.io.convert import convert
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer
from mlx_openelm.utils import OWNER_FILE, PARTIAL_TAG

ROOT = Path(__file__).resolve().parents[1]




def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny apple/OpenELM-layout folder (no tokenizer, as the real repos)."""
    folder = tmp_path_factory.mktemp("ux") / "OpenELM-tiny-Instruct"
    write_hf_checkpoint(folder, tiny_args(), seed=5)
    return folder


@pytest.fixture(scope="module")
def mlx_folder(hf_folder, sp_model_path, tmp_path_factory):
    return convert(str(hf_folder), tmp_path_factory.mktemp("ux-mlx") / "m", dtype="float32", tokenizer=str(sp_model_path))


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize("argv, message", [
    (["generate"], "Missing option '--model'"),
    (["generate", "--model", "x", "--prompt", "hi", "--max-tokens", "abc"], "Invalid value for '--max-tokens'"),
    (["generate", "--model", "x", "--prompt", "hi", "--learning-rate", "3"], "No such option: --learning-rate"),
    (["convert", "-q", "4"], "-q/--quantize is a switch; give the bits with --q-bits"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["generate", "--model", "x", "--prompt", "hi", "--prompt-lookup", "-2"], "--prompt-lookup"),
    (["eval", "--model", "x", "--limit", "-1"], "--limit"),
    (["eval", "--model", "x", "--limit", "0"], "--limit"),
])
def test_usage_errors_are_one_line_exit_2(argv, message, capsys):
    code, _, err = cli(*argv, capsys=capsys)
    assert code == 2
    assert message in one_line(err)


def test_no_arguments_prints_usage_and_exits_2(capsys):
    code, out, err = cli(capsys=capsys)
    assert code == 2 and "Usage: mlx-openelm COMMAND" in out and "Traceback" not in err


@pytest.mark.parametrize("option, value, name", [
    ("--temp", "-1", "temp"), ("--top-p", "1.5", "top_p"), ("--top-k", "-5", "top_k"), ("--min-p", "2", "min_p"),
])
def test_bad_sampling_values_are_refused_before_loading(option, value, name, capsys):
    """SamplingConfig checks the ranges: the error names the value, not the (missing) model."""
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        code, _, err = cli(*command, "--model", "/no/such/model", option, value, capsys=capsys)
        line = one_line(err)
        assert code == 1 and f"{name}=" in line and "/no/such/model" not in line


# ---------------------------------------------------------------- mlx-lm's option names


def test_mlx_lm_option_names_are_accepted(hf_folder, sp_model_path, mlx_folder, tmp_path, capsys, monkeypatch):
    code, _, err = cli("convert", "--hf-path", hf_folder, "--mlx-path", tmp_path / "out", "--tokenizer", sp_model_path, capsys=capsys)
    assert code == 0, err
    code, out, err = cli("bench", "--shape", "tiny", "-p", "6", "-g", "2", "-n", "1", "--json", capsys=capsys)
    assert code == 0, err
    r = json.loads(out)
    assert (r["prompt_tokens"], r["gen_tokens"], r["repeats"]) == (6, 2, 1)
    r2 = dict(r)
    code, out, err = cli("bench", "--shape", "tiny", "--prompt-tokens", "6", "--generation-tokens", "2", "--num-trials", "1",
                         "--json", capsys=capsys)
    assert code == 0 and (json.loads(out)["gen_tokens"], json.loads(out)["repeats"]) == (r2["gen_tokens"], 1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/exit\n"))
    code, out, err = cli("chat", "--model", mlx_folder, "--system-prompt", "Be brief.", "--max-tokens", "2", capsys=capsys)
    assert code == 0, err
    code, out, _ = cli("eval", "--help", capsys=capsys)
    assert code == 0 and "--num-shots" in out


# ---------------------------------------------------------------- one line for bad files


def test_full_disk_during_convert_is_one_line_and_leaves_nothing(hf_folder, sp_model_path, tmp_path, capsys, monkeypatch):
    from mlx_openelm.io import folder as folder_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(folder_mod.mx, "save_safetensors", full)
    out = tmp_path / "parent" / "out"
    code, _, err = cli("convert", "--hf", hf_folder, "--mlx-path", out, "--tokenizer", sp_model_path, capsys=capsys)
    line = one_line(err)
    assert code == 1 and "no space left" in line and "nothing was kept" in line
    assert not (tmp_path / "parent").exists()  # nor the partial folder, nor the parent made for it


def _broken(mlx_folder: Path, tmp_path: Path, name: str, change) -> Path:
    folder = tmp_path / name
    shutil.copytree(mlx_folder, folder)
    change(folder)
    return folder


def _config_edit(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return change


@pytest.mark.parametrize("name, change, message", [
    ("list-config", lambda f: (f / "config.json").write_text("[1, 2]"), "not an object"),
    ("bad-tokenizer", lambda f: (f / "tokenizer.model").write_bytes(b"\x00garbage" * 10), "not a valid SentencePiece tokenizer.model"),
    ("head-dim-0", _config_edit(head_dim=0, num_query_heads=None, num_kv_heads=None), "head_dim must be a positive integer"),
])
def test_bad_model_folders_are_one_line(mlx_folder, tmp_path, capsys, name, change, message):
    folder = _broken(mlx_folder, tmp_path, name, change)
    code, _, err = cli("generate", "--model", folder, "--prompt", "hi", "--max-tokens", "2", capsys=capsys)
    assert code == 1 and message in one_line(err)


def test_chat_skips_a_non_utf8_line_and_keeps_going(mlx_folder):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_openelm.cli", "chat", "--model", str(mlx_folder), "--max-tokens", "2", "--verbose"],
        input=b"Hello\n\xff\xfe caf\xe9\nAgain\n/exit\n", capture_output=True, cwd=ROOT, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    stderr = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0 and "Traceback" not in stderr, stderr
    assert "not valid UTF-8" in stderr
    assert stderr.count("reused from cache") == 2  # both good lines were answered


def test_chat_rejects_an_overlong_message_and_keeps_the_conversation(sp_model_path):
    model = init_weights(Model(tiny_args(max_context_length=96)), seed=1)
    model.eval()
    session = ChatSession(model, Tokenizer(sp_model_path))
    list(session.reply("Hello there", max_tokens=3))
    history = [dict(m) for m in session.messages]
    with pytest.raises(ValueError, match="beyond OpenELM's context of 96.*it was not sent"):
        list(session.reply("the cat sat on the mat " * 30, max_tokens=3))
    assert session.messages == history
    last = list(session.reply("Hi again", max_tokens=3))[-1]
    assert last.cached_tokens > 0 and len(session.messages) == len(history) + 2


# ---------------------------------------------------------------- --tokenizer where the message points


def test_generate_converts_an_apple_folder_with_tokenizer_option(hf_folder, sp_model_path, tmp_path, capsys, offline_hub):
    code, _, err = cli("generate", "--model", hf_folder, "--prompt", "the cat", "--max-tokens", "3", capsys=capsys)
    line = one_line(err)
    assert code == 1 and "no tokenizer" in line and "--tokenizer PATH" in line
    code, out, err = cli("generate", "--model", hf_folder, "--prompt", "the cat", "--max-tokens", "3", "--tokenizer", sp_model_path,
                         capsys=capsys)
    assert code == 0, err
    assert out.strip()


# ---------------------------------------------------------------- convert --force never loses data


def test_force_refuses_the_source_its_parents_and_the_working_folder(hf_folder, sp_model_path, tmp_path, capsys, monkeypatch):
    src = tmp_path / "models" / "OpenELM-tiny"
    shutil.copytree(hf_folder, src)
    (tmp_path / "models" / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path / "models")
    for dest in (src, src.parent, tmp_path, "."):
        code, _, err = cli("convert", "--hf", src, "--mlx-path", dest, "--tokenizer", sp_model_path, "--force", capsys=capsys)
        line = one_line(err)
        assert code == 1 and ("holds the input" in line or "working folder" in line), line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # an earlier conversion (it has our marker) may be replaced
    code, _, err = cli("convert", "--hf", src, "--mlx-path", tmp_path / "out", "--tokenizer", sp_model_path, capsys=capsys)
    assert code == 0, err
    code, _, err = cli("convert", "--hf", src, "--mlx-path", tmp_path / "out", "--tokenizer", sp_model_path, "--force",
                       "--dtype", "float32", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


# ---------------------------------------------------------------- kill -9 litter


def _partial(parent: Path, name: str, tag: str, owner=None, age: float = 0.0) -> Path:
    p = parent / f".{name}{PARTIAL_TAG}{tag}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"x" * 100)
    if owner is not None:
        (p / OWNER_FILE).write_text(owner)
    if age:
        t = time.time() - age
        os.utime(p, (t, t))
    return p


def test_stale_partial_conversions_are_removed_by_the_next_one(hf_folder, sp_model_path, tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = _partial(tmp_path, "out", "killed", owner=f"{host} {dead.pid}")
    old = _partial(tmp_path, "out", "old", age=2 * 3600)  # an unknown writer, untouched for 2 hours
    live = _partial(tmp_path, "out", "live", owner=f"{host} {os.getppid()}")  # a writer still running
    fresh = _partial(tmp_path, "out", "fresh")  # unknown writer, recent: maybe still at work
    other = _partial(tmp_path, "other", "killed", owner=f"{host} {dead.pid}")  # not this destination's
    out = convert(str(hf_folder), tmp_path / "out", tokenizer=str(sp_model_path))
    assert not killed.exists() and not old.exists()
    assert live.exists() and fresh.exists() and other.exists()
    assert not (out / OWNER_FILE).exists()


# ---------------------------------------------------------------- the tokenizer that just works


def test_llama_tokenizer_falls_back_to_the_verified_public_copy(offline_hub, sp_model_path, monkeypatch, hf_folder, tmp_path):
    good = sp_model_path.read_bytes()
    # pin the checksum to our stand-in file (the real one is Llama-2's 499723-byte tokenizer.model)
    monkeypatch.setattr(hub, "LLAMA_TOKENIZER_SHA256", hashlib.sha256(good).hexdigest())

    with pytest.raises(ValueError, match="not in the local Hugging Face cache") as e:
        hub.llama_tokenizer()  # neither copy available
    assert hub.LLAMA_TOKENIZER_FALLBACK in str(e.value)

    fake_hub_cache(offline_hub, hub.LLAMA_TOKENIZER_FALLBACK, {"tokenizer.model": good}, repo_type="model")
    path, repo = hub.llama_tokenizer()
    assert repo == hub.LLAMA_TOKENIZER_FALLBACK and path.read_bytes() == good
    out = convert(str(hf_folder), tmp_path / "via-fallback")  # no --tokenizer: the fallback is used and recorded
    assert json.loads((out / "config.json").read_text())["mlx_openelm"]["tokenizer"] == hub.LLAMA_TOKENIZER_FALLBACK
    assert (out / "tokenizer.model").read_bytes() == good

    fake_hub_cache(offline_hub, hub.LLAMA_TOKENIZER_REPO, {"tokenizer.model": good}, repo_type="model", commit="b" * 40)
    assert hub.llama_tokenizer()[1] == hub.LLAMA_TOKENIZER_REPO  # the gated original comes first when accessible


def test_a_public_copy_with_other_content_is_refused(offline_hub, sp_model_path, hf_folder, tmp_path):
    fake_hub_cache(offline_hub, hub.LLAMA_TOKENIZER_FALLBACK, {"tokenizer.model": sp_model_path.read_bytes()}, repo_type="model")
    with pytest.raises(ValueError, match="is not the Llama-2 file .*so it was refused"):
        hub.llama_tokenizer()
    with pytest.raises(ValueError, match="no tokenizer: .*refused.*--tokenizer PATH"):
        convert(str(hf_folder), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert hub.LLAMA_TOKENIZER_SHA256 == "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
    assert hub.LLAMA_TOKENIZER_SIZE == 499723


# ---------------------------------------------------------------- signs of life


def test_bench_shows_progress(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws live displays only on a terminal
    code, _, err = cli("bench", "--shape", "tiny", "-p", "4", "-g", "2", "-n", "1", "--json", capsys=capsys)
    assert code == 0 and "benchmarking OpenELM-tiny shapes" in err


# ---------------------------------------------------------------- start-up

STARTUP_SCRIPT = r"""
import sys, time
t0 = time.perf_counter()
from mlx_openelm.cli import main
try:
    main(["generate", "--model", sys.argv[1], "--prompt", "the cat", "--max-tokens", "2"])
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted(m for m in ("transformers", "torch", "jinja2", "huggingface_hub") if m in sys.modules)
import mlx_lm  # the deferred package still works in full on first use
assert callable(mlx_lm.load) and mlx_lm.__version__
print("RESULT", heavy, round(time.perf_counter() - t0, 3))
"""


def test_generate_starts_without_transformers(mlx_folder):
    r = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT, str(mlx_folder)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    assert line.startswith("RESULT []"), line  # mlx-lm's eager __init__ (transformers, torch: ~3 s) is not run


def test_our_generate_step_matches_mlx_lm(sp_model_path):
    """Our token loop (mlx-lm's lives in a module that imports transformers) against mlx-lm's own,
    with a sampler and a logits processor, on a prompt longer than one prefill chunk."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step as theirs

    from mlx_openelm.generate.sampling import SamplingConfig
    from mlx_openelm.generate.stream import generate_step as ours

    model = init_weights(Model(tiny_args()), seed=2)
    model.eval()
    prompt = mx.array(Tokenizer(sp_model_path).encode("the cat sat on the mat " * 6), mx.uint32)
    config = SamplingConfig(temp=0.8, top_k=20, repetition_penalty=1.3, seed=0)
    runs = []
    for step in (ours, theirs):
        mx.random.seed(0)
        runs.append([(t, lp) for t, lp in step(prompt, model, max_tokens=12, sampler=config.sampler(),
                                                 logits_processors=config.logits_processors(), prefill_step_size=16)])
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    assert all(mx.allclose(a, b, atol=1e-5).item() for (_, a), (_, b) in zip(*runs))


def test_our_streaming_detokenizer_matches_mlx_lm(sp_model_path):
    import random

    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    tok = Tokenizer(sp_model_path)
    rng = random.Random(0)
    texts = ["Hello! How are you? é ü ß — …", "the cat  sat\n\n on   the mat", "".join(rng.choice("aé😀 \n") for _ in range(60))]
    ids_list = [tok.encode(t, add_bos=False) for t in texts] + [[rng.randrange(3, len(tok)) for _ in range(80)]]
    for ids in ids_list:
        ours, theirs = tok.detokenizer, SPMStreamingDetokenizer(tok)
        a, b = [], []
        for i in ids:
            ours.add_token(i)
            theirs.add_token(i)
            a.append(ours.last_segment)
            b.append(theirs.last_segment)
        ours.finalize()
        theirs.finalize()
        assert a + [ours.last_segment] == b + [theirs.last_segment]
    assert tok.detokenizer is not tok.detokenizer  # a fresh one per stream


_EXIT_WITH_WORK_IN_FLIGHT = """
import mlx_openelm
import mlx.core as mx
from mlx_lm.generate import generation_stream
w = mx.random.normal((4096, 4096)) * 0.01
x = mx.random.normal((64, 4096))
mx.eval(w, x)
ys = []
for stream in (None, generation_stream):
    with mx.stream(stream if stream is not None else mx.default_stream(mx.default_device())):
        y = x
        for _ in range(20):
            y = y @ w.T
        ys.append(y)
mx.async_eval(*ys)
print(mlx_openelm._backend.BLAS)
"""


def test_exit_with_blas_work_in_flight_is_clean():
    """A process that ends while MLX still computes (mx.async_eval, as mlx-lm's generate_step leaves the next
    token) exits 0: with OpenBLAS preloaded its shutdown raced the stream thread inside cblas_sgemm (hung or
    segfaulted 5 times in 6 before mlx_openelm waited for in-flight work at exit)."""
    for _ in range(3):
        try:
            r = subprocess.run([sys.executable, "-c", _EXIT_WITH_WORK_IN_FLIGHT], capture_output=True, text=True,
                               timeout=90, cwd=ROOT)
        except subprocess.TimeoutExpired:
            pytest.fail("the process hung at exit")
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])

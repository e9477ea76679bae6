"""generate and chat driven end to end through the command line on a tiny converted model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_args, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(*args, stdin=None, env=None, cwd=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, env=e, cwd=cwd or ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def mlx_model(tmp_path_factory, sp_model_path):
    tmp = tmp_path_factory.mktemp("cli")
    write_hf_checkpoint(tmp / "OpenELM-tiny-Instruct", tiny_args(), seed=7)
    out = tmp / "mlx"
    r = run("convert.py", "--hf", str(tmp / "OpenELM-tiny-Instruct"), "--mlx-path", str(out), "--tokenizer", str(sp_model_path))
    assert r.returncode == 0, r.stderr
    return out


def test_generate_streams_and_reports(mlx_model):
    r = run("-m", "mlx_openelm.cli", "generate", "--model", str(mlx_model), "--prompt", "the cat", "--max-tokens", "12", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "peak memory" in r.stderr and "float32" in r.stderr


def test_generate_prompt_precision_option(mlx_model):
    """The inference commands default to --prompt-precision bfloat16 and --verbose says so (where the CPU kernels
    are built); it rounds only the inputs of bfloat16/4-8-bit layers, so this float32 model generates the same
    text with float32; a bad value is one line."""
    base = ["-m", "mlx_openelm.cli", "generate", "--model", str(mlx_model), "--prompt", "the cat sat", "--max-tokens", "8"]
    default = run(*base, "--verbose")
    exact = run(*base, "--prompt-precision", "float32", "--verbose")
    assert default.returncode == 0 and exact.returncode == 0, default.stderr + exact.stderr
    assert default.stdout == exact.stdout
    from mlx_openelm import kernels

    if kernels.available():
        assert "bfloat16 inputs" in default.stderr and "bfloat16 inputs" not in exact.stderr
    bad = run(*base, "--prompt-precision", "int4")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "prompt precision 'int4'" in bad.stderr and "float32, bfloat16" in bad.stderr
    assert "--prompt-precision" in run("-m", "mlx_openelm.cli", "generate", "--help").stdout


def _precision_while_generating(monkeypatch):
    """Record ``kernels.get_prompt_precision()`` each time the generate command starts generating."""
    from mlx_openelm import kernels
    from mlx_openelm.generate import stream

    seen, real = [], stream.stream_generate

    def spy(*a, **k):
        seen.append(kernels.get_prompt_precision())
        yield from real(*a, **k)

    monkeypatch.setattr(stream, "stream_generate", spy)
    return seen


def test_prompt_precision_lasts_for_the_command(mlx_model, capsys, monkeypatch):
    """The command's precision (default bfloat16, or --prompt-precision) holds while it generates, also after the
    --draft-model is loaded (each load once reset it), and the process's own setting (the library's float32) is
    back when the command returns, also when it fails: commands run in-process from Python and tests."""
    from conftest import cli
    from mlx_openelm import kernels

    seen = _precision_while_generating(monkeypatch)
    assert kernels.get_prompt_precision() == "float32"
    code, _, err = cli("generate", "--model", mlx_model, "--prompt", "the cat", "--max-tokens", "3",
                       "--draft-model", mlx_model, capsys=capsys)
    assert code == 0, err
    assert seen == ["bfloat16"] and kernels.get_prompt_precision() == "float32"
    code, _, err = cli("generate", "--model", mlx_model, "--prompt", "the cat", "--max-tokens", "3",
                       "--prompt-precision", "float32", capsys=capsys)
    assert code == 0 and seen == ["bfloat16", "float32"], err
    with kernels.prompt_precision("bfloat16"):  # a caller's own setting survives a failing command
        code, _, err = cli("generate", "--model", mlx_model, "--prompt", "the cat", "--adapter-path",
                           mlx_model / "no-such-adapters", "--prompt-precision", "float32", capsys=capsys)
        assert code == 1 and "no-such-adapters" in err and kernels.get_prompt_precision() == "bfloat16"
    assert kernels.get_prompt_precision() == "float32"


def test_generate_prompt_lookup_matches_greedy(mlx_model):
    base = ["-m", "mlx_openelm.cli", "generate", "--model", str(mlx_model), "--prompt", "red blue red blue red blue", "--max-tokens", "16"]
    plain = run(*base)
    fast = run(*base, "--prompt-lookup", "4", "--verbose")
    assert plain.returncode == 0 and fast.returncode == 0, fast.stderr
    assert plain.stdout == fast.stdout
    assert "accepted from drafts" in fast.stderr


def test_chat_through_a_pipe(mlx_model):
    r = run("-m", "mlx_openelm.cli", "chat", "--model", str(mlx_model), "--max-tokens", "8", "--verbose",
            stdin="Hello there\nWhat about the dog?\n/reset\nHi again\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert len([l for l in r.stdout.splitlines()]) >= 3
    assert "history cleared" in r.stderr
    reused = [int(l.split(":")[1].split()[0]) for l in r.stderr.splitlines() if l.startswith("reused from cache")]
    assert len(reused) == 3 and reused[0] == 0 and reused[1] > 0 and reused[2] == 0


@pytest.mark.parametrize("args", [
    ["generate", "--model", "/no/such/folder", "--prompt", "hi"],
    ["generate", "--model", "apple/OpenELM-9B-Nope", "--prompt", "hi"],
    ["chat", "--model", "/no/such/folder"],
])
def test_missing_model_is_one_line(args, tmp_path):
    r = run("-m", "mlx_openelm.cli", *args, env={"HF_HUB_CACHE": str(tmp_path), "MLX_OPENELM_CACHE": str(tmp_path / "c")}, stdin="")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

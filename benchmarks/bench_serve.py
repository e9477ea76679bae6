"""Ours vs ``mlx_lm.server`` on the same model folder, same run: aggregate generated tokens/s and
time to first token (TTFT) with 1, 4 and 16 concurrent streaming clients. Every round sends new
prompts (the same ones to both servers), so mlx-lm's prompt cache cannot reuse an earlier round.

Random weights at a chosen shape (no download) and a SentencePiece tokenizer trained on the fly
(the model's vocabulary is the tokenizer's, so the 270M shape here has the 270M layers with a
small vocabulary). Each server runs alone as a subprocess on 127.0.0.1; every client streams one
``/v1/completions`` request (a text prompt of about ``--prompt-tokens`` tokens, ``--gen-tokens``
tokens, temperature 0, ``stream_options.include_usage``). TTFT is the time to the first streamed
chunk with text; aggregate tokens/s is all completion tokens over the wall time of the round.

Ratios are ours/mlx-lm: above 1 is faster for tokens/s, below 1 is faster for TTFT. Prints JSON.

    python benchmarks/bench_serve.py --shape tiny                 # seconds
    python benchmarks/bench_serve.py --shape 270M --gen-tokens 32 # minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

WORDS = ("the a cat dog sat on mat runs fast slow red blue green question answer true false solution option "
         "model apple tree river mountain city light dark open small large please choose correct sentence").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(root: Path, shape: str, vocab: int, seed: int) -> Path:
    import sentencepiece as spm

    from mlx_openelm.bench.core import shape_args
    from mlx_openelm.io.folder import save_model
    from mlx_openelm.model import Model, init_weights

    rng = random.Random(seed)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(3000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tokenizer"), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    tok_dir = root / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes((root / "tokenizer.model").read_bytes())
    args = shape_args(shape)
    args.vocab_size = vocab
    model = init_weights(Model(args), seed)
    folder = root / f"OpenELM-{shape}-random"
    save_model(folder, model, {}, tok_dir)
    return folder


def start(cmd, port: int, log: Path, timeout: float = 300.0, env=None) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[2]} did not start in {timeout:.0f}s")


def one_stream(url: str, prompt: str, gen_tokens: int, out: dict) -> None:
    import httpx

    body = {"prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for ch in obj.get("choices", []):
                if ch.get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    out.update(start=t0, end=time.perf_counter(), ttft=ttft, tokens=tokens if tokens is not None else chunks)


def round_(url: str, prompts, gen_tokens: int) -> dict:
    results = [dict() for _ in prompts]
    threads = [threading.Thread(target=one_stream, args=(url, p, gen_tokens, res)) for p, res in zip(prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"clients": len(prompts), "tokens": tokens, "wall_s": round(wall, 3), "aggregate_tps": round(tokens / wall, 2),
            "ttft_median_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_max_s": round(max(ttfts), 4) if ttfts else None}


def bench_server(name: str, cmd, port: int, prompts_for, levels, gen_tokens: int, repeats: int, log: Path, env=None) -> dict:
    proc = start(cmd, port, log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        round_(url, prompts_for(1), min(gen_tokens, 8))  # warm-up
        out = {}
        for c in levels:
            runs = [round_(url, prompts_for(c), gen_tokens) for _ in range(repeats)]
            best = sorted(runs, key=lambda r: r["aggregate_tps"])[len(runs) // 2]  # the median round
            out[str(c)] = best
            print(f"{name} c={c}: {best['aggregate_tps']} tok/s, TTFT {best['ttft_median_s']} s", file=sys.stderr)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny", help="tiny, 270M, 450M, 1_1B, 3B (random weights)")
    p.add_argument("--vocab", type=int, default=512, help="tokenizer and model vocabulary size")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=1, help="rounds per level; the median round is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-openblas", action="store_true",
                   help="run mlx_lm.server with OpenBLAS preloaded too (LD_PRELOAD), as our package does on Linux CPUs")
    args = p.parse_args()

    from mlx_openelm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_folder(root, args.shape, args.vocab, args.seed)
        tok = Tokenizer(folder)
        rng = random.Random(args.seed)

        def prompt(i: int) -> str:
            words = []
            while len(tok.encode(" ".join(words))) < args.prompt_tokens:
                words.append(rng.choice(WORDS))
            return f"{i} " + " ".join(words)

        # fresh prompts for every round (a new first word), so neither server reuses a cached prefix
        # from an earlier round (mlx_lm.server keeps a prompt cache); both servers see the same ones
        bodies = [prompt(i).split(" ", 1)[1] for i in range(max(args.concurrency))]
        rounds = {}

        def prompts_for(c: int):
            r = rounds.setdefault(c, [0])
            r[0] += 1
            pick = random.Random(f"{c}/{r[0]}")
            return [f"{pick.choice(WORDS)} {pick.choice(WORDS)} {pick.choice(WORDS)} {bodies[i]}" for i in range(c)]

        def reset_rounds():
            rounds.clear()
        py = sys.executable
        levels = args.concurrency
        ours = bench_server("ours", [py, "-m", "mlx_openelm.cli", "serve", "--model", str(folder), "--port", str(port := free_port()),
                                     "--max-concurrency", "32", "--max-tokens-default", str(args.gen_tokens)],
                            port, prompts_for, levels, args.gen_tokens, args.repeats, root / "ours.log")
        reset_rounds()
        peer_env = None
        if args.peer_openblas:
            from mlx_openelm._backend import _find_openblas

            lib = _find_openblas()
            if lib is None:
                raise SystemExit("--peer-openblas: no OpenBLAS library found")
            peer_env = {"LD_PRELOAD": lib}
        theirs = bench_server("mlx_lm.server", [py, "-m", "mlx_lm.server", "--model", str(folder), "--port", str(port2 := free_port()),
                                                "--max-tokens", str(args.gen_tokens), "--log-level", "WARNING"],
                              port2, prompts_for, levels, args.gen_tokens, args.repeats, root / "mlx_lm.log",
                              env=peer_env)
    import mlx_lm

    ratios = {c: {"aggregate_tps": round(ours[c]["aggregate_tps"] / theirs[c]["aggregate_tps"], 3),
                  "ttft_median": round(ours[c]["ttft_median_s"] / theirs[c]["ttft_median_s"], 3)} for c in ours}
    print(json.dumps({
        "shape": args.shape, "vocab": args.vocab, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "weights": "random float32", "peer_openblas": args.peer_openblas, "ours": ours, "mlx_lm_server": theirs, "ratio_ours_over_mlx_lm": ratios,
        "machine": {"device": str(mx.default_device()), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
    }, indent=2))


if __name__ == "__main__":
    main()

"""Speculative and prompt-lookup decoding vs plain greedy decoding, same run, same weights.

Random weights at the real shapes (no download): a 270M-shaped draft for a 1.1B-shaped target.
Random weights agree rarely, so draft acceptance is low here; prompt lookup is also measured on a
repetitive prompt, where copying from the context pays off. Every method must produce exactly the
greedy tokens (checked). Prints JSON on stdout.

    python benchmarks/bench_speculative.py                       # 270M draft -> 1.1B target
    python benchmarks/bench_speculative.py --target 270M --draft 270M --gen-tokens 32
"""

from __future__ import annotations

import argparse
import json
import time

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import generate_step, speculative_generate_step

from mlx_openelm._backend import BLAS
from mlx_openelm.config import ModelArgs
from mlx_openelm.generate.stream import prompt_lookup_generate_step
from mlx_openelm.model import Model, init_weights


def timed(steps) -> tuple:
    """Tokens, decode time (after the first token, so the prompt's prefill is left out), drafted count."""
    tokens, drafted, first = [], 0, None
    for item in steps:
        if first is None:
            first = time.perf_counter()
        tokens.append(int(item[0]))
        drafted += bool(item[2])
    return tokens, time.perf_counter() - first, drafted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="1_1B")
    p.add_argument("--draft", default="270M")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--prompt-lookup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    target = init_weights(Model(ModelArgs.from_name(a.target)), a.seed)
    draft = init_weights(Model(ModelArgs.from_name(a.draft)), a.seed + 1)
    vocab = target.args.vocab_size
    random_prompt = mx.random.randint(3, vocab, (a.prompt_tokens,), key=mx.random.key(a.seed)).astype(mx.uint32)
    motif = mx.random.randint(3, vocab, (16,), key=mx.random.key(a.seed + 2)).astype(mx.uint32)
    repetitive = mx.concatenate([motif] * (a.prompt_tokens // 16)).astype(mx.uint32)
    n = a.gen_tokens

    def plain(prompt):
        return ((t, lp, False) for t, lp in generate_step(prompt, target, max_tokens=n))

    list(generate_step(random_prompt[:8], target, max_tokens=2))  # warm-up
    results = {"target": a.target, "draft": a.draft, "gen_tokens": n, "device": str(mx.default_device()), "blas": BLAS, "dtype": "float32"}
    for name, prompt in (("random_prompt", random_prompt), ("repetitive_prompt", repetitive)):
        ref, t_ref, _ = timed(plain(prompt))
        row = {"greedy_decode_tps": (n - 1) / t_ref}
        runs = {
            "speculative": speculative_generate_step(prompt, target, draft, num_draft_tokens=a.num_draft_tokens, max_tokens=n),
            "prompt_lookup": prompt_lookup_generate_step(prompt, target, num_draft_tokens=a.prompt_lookup, max_tokens=n),
        }
        for method, steps in runs.items():
            toks, t, drafted = timed(steps)
            if toks != ref:
                raise SystemExit(f"{method} on {name} did not reproduce greedy decoding")
            row[method] = {"decode_tps": (n - 1) / t, "speedup": t_ref / t, "accepted_from_draft": drafted / n}
        results[name] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

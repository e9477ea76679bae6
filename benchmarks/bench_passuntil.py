"""PassUntil's shared prefill: one batch-1 prefill whose KV cache is repeated along the batch axis
(what ``eval.passuntil`` does) vs prefilling the prompt tiled over the batch, same run, same weights.

Both give the same next-token logits for every row (checked). A PassUntil item draws many batches
from one prompt, so the repeated cache also keeps its prefill across batches: the per-batch cost is
the copy alone (``repeat_only``). Random weights (no download). Prints JSON on stdout.

    python benchmarks/bench_passuntil.py                          # a small 8x512 shape, batch 64, prompt 64
    python benchmarks/bench_passuntil.py --shape 270M --batch 64 --prompt 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_openelm.config import ModelArgs
from mlx_openelm.eval.passuntil import _repeat_cache
from mlx_openelm.model import Model, init_weights

SMALL = dict(num_transformer_layers=8, model_dim=512, head_dim=64, vocab_size=32000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help="small, or a released size: 270M, 450M, 1_1B, 3B")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    args = ModelArgs(**SMALL) if a.shape == "small" else ModelArgs.from_name(a.shape)
    model = init_weights(Model(args), 0)
    ids = mx.random.randint(3, args.vocab_size, (a.prompt,), key=mx.random.key(1))
    nxt = mx.random.randint(3, args.vocab_size, (a.batch, 1), key=mx.random.key(2))

    def prefill_once():
        cache = model.make_cache()
        model(ids[None], cache=cache)
        mx.eval([c.state[:2] for c in cache])
        return cache

    def repeated(cache=None):
        cache = cache or prefill_once()
        batch = _repeat_cache(cache, a.batch)
        out = model(nxt, cache=batch)
        mx.eval(out)
        return out

    def tiled():
        cache = model.make_cache()
        model(mx.broadcast_to(ids[None], (a.batch, a.prompt)), cache=cache)
        out = model(nxt, cache=cache)
        mx.eval(out)
        return out

    diff = mx.abs(repeated() - tiled()).max().item()
    kept = prefill_once()
    times = {"repeat": [], "tiled": [], "repeat_only": []}
    for k in range(a.repeats):  # interleaved, order reversed every other round
        order = [("repeat", repeated), ("tiled", tiled), ("repeat_only", lambda: repeated(kept))]
        for name, fn in (order if k % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "shape": a.shape, "params": args.num_parameters(), "batch": a.batch, "prompt_tokens": a.prompt, "repeats": a.repeats,
        "seconds_prefill_plus_first_step": {k: round(v, 4) for k, v in med.items()},
        "tiled_over_repeat": round(med["tiled"] / med["repeat"], 2),
        "tiled_over_repeat_only": round(med["tiled"] / med["repeat_only"], 2),
        "max_logit_diff": diff,
        "device": str(mx.default_device()),
    }, indent=2))


if __name__ == "__main__":
    main()

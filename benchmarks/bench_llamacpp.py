"""CPU decode and prompt speed: ours (with and without the CPU kernels) vs llama.cpp, same random
checkpoint, same run, against the measured memory-bandwidth roofline.

Random weights at the real shapes (``--shape``, default 270M), a 512-token prompt and 128 greedy
tokens by default. Rows, at equal weight bytes, each of ours being the stored checkpoint as
mlx-openelm loads it on this CPU (``dtype="auto"``) and run as the inference commands run it (their default
``--prompt-precision bfloat16``, which affects bfloat16 and 4/8-bit layers only):

- ``f32``: ours float32 with ``mlx_openelm.kernels`` and with plain MLX (the "before"), vs llama.cpp F32;
- ``f16`` / ``bf16``: ours with float16 / bfloat16 matrices kept (float32 compute), vs llama.cpp F16 / BF16;
- ``q8``: ours 8-bit (group 64, quantized from float16; float16 scales and biases, in the file and in
  memory: 1.0625 bytes a weight, as Q8_0) vs llama.cpp Q8_0;
- ``q4``: ours 4-bit (group 64, likewise: 0.5625 bytes a weight, as Q4_0) vs llama.cpp Q4_0 (whose file keeps
  the tied embedding, also the output layer, in Q6_K: ~7% more bytes a step than ours at the 270M shape);
- the prompts of ``bf16`` / ``q8`` / ``q4`` take activations rounded to bfloat16 before each product, as
  llama.cpp's BF16 rows do (its Q8_0 / Q4_0 rows round them to 8-bit blocks); the same three again with
  ``--prompt-precision float32`` (``f32p`` in ``--rows``): exact activations, as decoding (which is the same
  in both).

Peak memory is reported against the file size ``convert`` would write for ours (``peak/file``).

The roofline is measured in the same script: read bandwidth of NumPy sums over 512 MB (one thread,
and one per core at once; the larger is used), divided by the bytes one decode step reads (all
weights; the tied embedding once, as the output layer). llama.cpp (``pip install llama-cpp-python``)
is optional: GGUF files are made by llama.cpp's own ``convert_hf_to_gguf.py`` (``--converter``,
e.g. from the llama-cpp-python sdist's ``vendor/llama.cpp``) from the same weights exported in the
apple/OpenELM layout, Q4_0 by ``llama_cpp.llama_model_quantize``. Where either is missing the rows
say why and only the roofline is compared.

Noise: every contender is warmed up, then ``--repeats`` interleaved rounds (order reversed every
other round), medians; ratios are medians of per-round ratios. Prints JSON on stdout and a table
on stderr. Slow on a 2-core CPU (~10 min at 270M with the defaults).

    python benchmarks/bench_llamacpp.py --converter /path/to/llama.cpp/convert_hf_to_gguf.py
    python benchmarks/bench_llamacpp.py --shape tiny --prompt-tokens 32 --gen-tokens 8 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from mlx_openelm import kernels
from mlx_openelm.bench import core as bench
from mlx_openelm.io.folder import export_hf


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> dict:
    """Measured read bandwidth (GB/s): NumPy sums over ``mb`` MB, one thread and one per core at once."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    parts = np.array_split(a, threads)

    def one():
        t = time.perf_counter()
        a.sum()
        return a.nbytes / (time.perf_counter() - t) / 1e9

    def many():
        ts = [threading.Thread(target=p.sum) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return a.nbytes / (time.perf_counter() - t) / 1e9

    one(), many()
    single = statistics.median(one() for _ in range(repeats))
    multi = statistics.median(many() for _ in range(repeats))
    return {"single_thread": single, "all_threads": multi, "threads": threads, "gbs": max(single, multi)}


def step_bytes(model) -> int:
    """Bytes one decode step reads: every parameter (the tied embedding once, as the output layer)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ---------------------------------------------------------------- llama.cpp


def llama_cpp_status() -> str:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python"
    return "ok"


def make_ggufs(checkpoint, args, workdir: Path, converter: Path) -> dict:
    """GGUF files of ``checkpoint`` (float32) by llama.cpp's converter: f32, f16, bf16, q8_0; q4_0 by quantizing f32."""
    import llama_cpp

    hf = export_hf(workdir / "hf", checkpoint, checkpoint.args)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.setdefault("architectures", ["OpenELMForCausalLM"])
    (hf / "config.json").write_text(json.dumps(cfg))
    out = {}
    for kind in ("f32", "f16", "bf16", "q8_0"):
        path = workdir / f"model-{kind}.gguf"
        r = subprocess.run([sys.executable, str(converter), str(hf), "--outtype", kind, "--outfile", str(path)],
                           capture_output=True, text=True)
        out[kind] = path if r.returncode == 0 else f"converter failed: {r.stderr.strip().splitlines()[-1:]}"
    if isinstance(out["f32"], Path):
        path = workdir / "model-q4_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        with quiet_stderr():  # llama.cpp logs every tensor
            rc = llama_cpp.llama_model_quantize(str(out["f32"]).encode(), str(path).encode(), params)
        out["q4_0"] = path if rc == 0 else f"llama_model_quantize returned {rc}"
    return out


@contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null (llama.cpp's C code logs there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(null)
        os.close(saved)


def llama_runner(path: Path, threads: int, n_ctx: int):
    from llama_cpp import Llama

    with quiet_stderr():
        llm = _llama(Llama, path, threads, n_ctx)

    def run(ids, n):
        llm.reset()
        for i, _ in enumerate(llm.generate(list(ids), temp=0.0, reset=True)):
            yield i
            if i + 1 >= n:
                break

    return run, llm


def _llama(Llama, path, threads, n_ctx):
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False, logits_all=False)


# ---------------------------------------------------------------- ours


def ours_runner(model, plain: bool = False, prompt_precision: str = "bfloat16"):
    """Our generation; ``plain``: with plain MLX (no kernels); ``prompt_precision``: the kernels' setting
    (default: that of the inference commands)."""
    run = bench.ours_runner(model, bench.TokenIds())

    def run_with(ids, n):
        with kernels.disabled() if plain else kernels.prompt_precision(prompt_precision):
            yield from run(ids, n)

    return run_with


def measure(contenders: dict, ids, gen: int, repeats: int) -> dict:
    """``name: (runner, weights_gb)``: warm-up, then interleaved rounds; medians and samples."""
    for run, _ in contenders.values():
        for _ in run(ids[:16], 4):
            pass
    samples = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            run, gb = contenders[name]
            samples[name].append(bench.time_generation(lambda: run(ids, gen), len(ids), gb))
            gc.collect()
    return {k: {**{q: statistics.median(s[q] for s in v) for q in v[0]}, "samples": {q: [s[q] for s in v] for q in v[0]}}
            for k, v in samples.items()}


def paired(a: dict, b: dict, key: str) -> float:
    return statistics.median(x / y for x, y in zip(a["samples"][key], b["samples"][key]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="270M")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py (for the llama.cpp rows)")
    p.add_argument("--rows", default="f32,f16,q8,q4,f32p",
                   help="comma-separated subset of f32,f16,q8,q4,f32p (f32p: the bf16/q8/q4 rows present again with "
                   "--prompt-precision float32)")
    args = p.parse_args()
    tic = time.perf_counter()
    rows = args.rows.split(",")
    bw = read_bandwidth_gbs()
    ids = bench.prompt_ids(args.prompt_tokens, bench.shape_args(args.shape).vocab_size, args.seed)
    threads = bw["threads"]

    checkpoint = bench.random_model(args.shape, "float32", None, args.seed)
    # ours: each stored checkpoint as mlx-openelm loads it on this CPU (float16/bfloat16 matrices kept, 4/8-bit
    # kept quantized with their float16 scales); file_gb: what `convert` writes for it
    ours, file_gb = {}, {}

    def add(name, stored):
        file_gb[name] = step_bytes(stored) / 1e9
        ours[name] = bench.as_loaded(stored, "auto")

    if "f32" in rows:
        add("f32", checkpoint)
    if "f16" in rows:
        add("f16", bench.random_model(args.shape, "float16", None, args.seed))
        add("bf16", bench.random_model(args.shape, "bfloat16", None, args.seed))
    if "q8" in rows:
        add("q8", bench.random_model(args.shape, "float16", 8, args.seed))
    if "q4" in rows:
        add("q4", bench.random_model(args.shape, "float16", 4, args.seed))

    llama = {"status": llama_cpp_status()}
    ggufs = {}
    tmp = tempfile.TemporaryDirectory(prefix="bench_llamacpp_")
    if llama["status"] == "ok":
        if args.converter is None or not args.converter.exists():
            llama["status"] = "no --converter (llama.cpp's convert_hf_to_gguf.py) given or found"
        else:
            ggufs = make_ggufs(checkpoint, args, Path(tmp.name), args.converter)
            llama["files"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in ggufs.items()}

    contenders = {}
    if "f32" in ours:
        contenders["ours f32 kernels"] = (ours_runner(ours["f32"]), step_bytes(ours["f32"]) / 1e9)
        contenders["ours f32 plain MLX"] = (ours_runner(ours["f32"], plain=True), step_bytes(ours["f32"]) / 1e9)
    for q in ("f16", "bf16", "q8", "q4"):
        if q in ours:
            contenders[f"ours {q} kernels"] = (ours_runner(ours[q]), step_bytes(ours[q]) / 1e9)
    for q in ("bf16", "q8", "q4") if "f32p" in rows else ():
        if q in ours:
            contenders[f"ours {q} kernels f32 prompt"] = (ours_runner(ours[q], prompt_precision="float32"),
                                                        step_bytes(ours[q]) / 1e9)
    kinds = {"f32": ["f32"], "f16": ["f16", "bf16"], "q8": ["q8_0"], "q4": ["q4_0"], "f32p": []}
    for row in rows:
        for kind in kinds[row]:
            if isinstance(ggufs.get(kind), Path):
                run, _ = llama_runner(ggufs[kind], threads, args.prompt_tokens + args.gen_tokens + 16)
                contenders[f"llama.cpp {kind}"] = (run, ggufs[kind].stat().st_size / 1e9)

    res = measure(contenders, ids, args.gen_tokens, args.repeats)
    table = []

    def line(row, mine, theirs, fmt=None):
        o = res.get(mine)
        t = res.get(theirs) if theirs else None
        gb = contenders[mine][1] if mine in contenders else None
        entry = {"row": row, "ours": mine, "llama_cpp": theirs if t else None}
        if o:
            fgb = file_gb.get(fmt)
            entry.update(ours_decode_tps=o["generation_tps"], ours_prompt_tps=o["prompt_tps"], ours_step_gb=gb,
                         ours_file_gb=fgb, ours_peak_memory_gb=o["peak_memory_gb"],
                         ours_peak_over_weights=o["peak_memory_gb"] / gb,
                         ours_peak_over_file=o["peak_memory_gb"] / fgb if fgb else None,
                         ours_roofline_tps=bw["gbs"] / gb, ours_pct_roofline=100 * o["generation_tps"] * gb / bw["gbs"])
        if t:
            tgb = contenders[theirs][1]
            entry.update(llama_decode_tps=t["generation_tps"], llama_prompt_tps=t["prompt_tps"], llama_file_gb=tgb,
                         llama_pct_roofline=100 * t["generation_tps"] * tgb / bw["gbs"])
            if o:
                entry.update(decode_ratio=paired(o, t, "generation_tps"), prompt_ratio=paired(o, t, "prompt_tps"))
        table.append(entry)

    if "f32" in rows:
        line("f32", "ours f32 kernels", "llama.cpp f32", "f32")
        line("f32 (plain MLX, before)", "ours f32 plain MLX", "llama.cpp f32", "f32")
        if "ours f32 kernels" in res:
            table[-2]["kernels_over_plain_decode"] = paired(res["ours f32 kernels"], res["ours f32 plain MLX"], "generation_tps")
            table[-2]["kernels_over_plain_prompt"] = paired(res["ours f32 kernels"], res["ours f32 plain MLX"], "prompt_tps")
    if "f16" in rows:
        line("f16", "ours f16 kernels", "llama.cpp f16", "f16")
        line("bf16", "ours bf16 kernels", "llama.cpp bf16", "bf16")
    if "q8" in rows:
        line("q8 (ours 8-bit g64 / Q8_0)", "ours q8 kernels", "llama.cpp q8_0", "q8")
    if "q4" in rows:
        line("q4 (ours 4-bit g64 / Q4_0)", "ours q4 kernels", "llama.cpp q4_0", "q4")
    if "f32p" in rows:
        for q, theirs, name in (("bf16", "llama.cpp bf16", "bf16"), ("q8", "llama.cpp q8_0", "q8 (8-bit / Q8_0)"),
                                ("q4", "llama.cpp q4_0", "q4 (4-bit / Q4_0)")):
            if f"ours {q} kernels f32 prompt" in contenders:
                line(f"{name}, f32 prompt", f"ours {q} kernels f32 prompt", theirs, q)

    out = {
        "command": " ".join(["python", *sys.argv]),
        "shape": args.shape, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats,
        "bandwidth": bw, "kernels": kernels.describe(), "blas": mlx_openelm._backend.BLAS, "mlx_version": mx.__version__,
        "bf16_dot": bool(kernels.available() and kernels._lib.has_bf16_dot()),
        "llama_cpp": llama, "table": table,
        "raw": {k: v for k, v in res.items()}, "seconds": round(time.perf_counter() - tic, 1),
    }
    tmp.cleanup()
    print(json.dumps(out, indent=2))
    print(f"bandwidth {bw['gbs']:.1f} GB/s (1 thread {bw['single_thread']:.1f}, {threads} threads {bw['all_threads']:.1f}); "
          f"llama.cpp: {llama['status']}", file=sys.stderr)
    for e in table:
        s = f"{e['row']:<32}"
        if "ours_decode_tps" in e:
            s += (f" ours decode {e['ours_decode_tps']:6.2f} tok/s ({e['ours_pct_roofline']:4.0f}% of roofline "
                  f"{e['ours_roofline_tps']:.1f}), prompt {e['ours_prompt_tps']:6.1f}, peak/file "
                  f"{e['ours_peak_over_file'] or float('nan'):.2f}")
        if "llama_decode_tps" in e:
            s += f" | llama.cpp {e['llama_decode_tps']:6.2f} / {e['llama_prompt_tps']:6.1f}"
        if "decode_ratio" in e:
            s += f" | ratio decode x{e['decode_ratio']:.2f} prompt x{e['prompt_ratio']:.2f}"
        if "kernels_over_plain_decode" in e:
            s += f" | kernels/plain decode x{e['kernels_over_plain_decode']:.2f} prompt x{e['kernels_over_plain_prompt']:.2f}"
        print(s, file=sys.stderr)


if __name__ == "__main__":
    main()

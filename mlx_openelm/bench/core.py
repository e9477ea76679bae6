"""Throughput benchmark and the RMSNorm study.

``benchmark`` times prompt processing, decoding, time to first token and peak memory of our
OpenELM through ``generate.stream.stream_generate`` (greedy, exactly ``gen_tokens`` tokens), and
optionally, in the same run and on the same weights, mlx-lm's OpenELM through mlx-lm's
``generate_step`` (the token loop under its ``stream_generate``; it needs no tokenizer).
``run_bench`` builds the models for the ``mlx-openelm bench`` command. Functions return plain
dicts; nothing here prints.

Terms. The *checkpoint* is the model as stored: a model folder, or random weights at a released
size's shapes (dtype: ``random_checkpoint_dtype``). mlx-lm runs the checkpoint at its defaults
(stored dtype and quantization). Ours runs what ``io.load.load_model`` makes of it: with
``dtype="auto"`` float32 on the CPU (quantized layers dequantized), the stored dtype on a GPU;
a named dtype casts and keeps quantization.
Two comparisons come out: ``same_dtype`` (ours on the checkpoint exactly as stored, vs mlx-lm:
the same kernels, so only the model code differs) and ``defaults`` (ours as loaded vs mlx-lm at
its defaults: what a user of each gets from the same checkpoint).

Noise. Every contender is warmed up once with a short run; then ``repeats`` rounds run every
contender once each, interleaved (the order reversed every other round), and medians are reported.
Ratios ours/mlx-lm are medians of the per-round ratios (each round's runs are close in time, so
drift on a shared machine cancels). mlx-lm is timed on its bare ``generate_step`` and ours through
our whole ``stream_generate`` (detokenizer, response objects): ~0.1 ms per token more for ours,
visible only on tiny models.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .. import kernels
from ..config import ModelArgs
from ..model import Model, RMSNorm, init_weights
from ..utils import atomic_write, first_line
from ..weights import (DTYPES, QUANTIZED, apply_plan, compute_plan, device_is_cpu, dtype_label, float_dtype_of,
                       quantization_of)
from ..weights import quantize_model as _quantize

# A shape for tests and quick checks; dimensions are multiples of 64 so 4/8-bit quantization applies.
SHAPES = ("270M", "450M", "1_1B", "3B", "tiny")
GROUP_SIZE = 64
QUANT_BITS = (2, 3, 4, 5, 6, 8)
WARMUP_PROMPT, WARMUP_GEN = 16, 4
NAIVE_COLOR = "#d62728"

ABLATION_METHOD = (
    "Measured, not estimated from FLOPs. One decode step (one token, KV cache holding the prompt) is run "
    "with every RMSNorm call's input recorded (same shapes, dtypes and memory layouts as in the model). "
    "Then, in interleaved rounds, for fused and naive RMSNorm alike: a full decode step is timed, and "
    "those RMSNorm calls alone are re-run and timed (8 steps' worth per evaluation, graph construction "
    "included). Share = median over rounds of norm time / step time, both taken back to back so that "
    "load from other processes hits them alike. Tok/s figures come from the end-to-end generation runs. "
    "Both sides run the layers op by op (kernels.no_fusion): the CPU kernels' fused decode layers fold the "
    "norms into the products, which would leave nothing to compare."
)


# ---------------------------------------------------------------- models


def shape_args(shape: str) -> ModelArgs:
    """``ModelArgs`` of a released size (``270M``, ``450M``, ``1_1B``, ``3B``) or ``tiny``."""
    try:
        return ModelArgs.from_name(shape)
    except ValueError:
        raise ValueError(f"unknown --shape {shape!r}; choose one of {', '.join(SHAPES)}") from None


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize every Linear and the embedding in place (affine, group size 64 as converters do; 32 for
    the tiny test shape, whose widths are multiples of 32 only)."""
    widths = [m.weight.shape[-1] for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    group = GROUP_SIZE if all(w % GROUP_SIZE == 0 for w in widths) else 32
    return _quantize(model, bits, group)


def random_model(shape: str, dtype: str = "float16", quantize: Optional[int] = None, seed: int = 0) -> Model:
    """Random weights (CoreNet's initialisation) at the shapes of ``shape``, stored in ``dtype``,
    optionally quantized: a stand-in checkpoint that needs no download."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    model = Model(shape_args(shape))
    model.set_dtype(DTYPES[dtype])
    init_weights(model, seed)
    if quantize:
        quantize_model(model, quantize)
    return model


def random_checkpoint_dtype(dtype: str, quantize: Optional[int] = None) -> str:
    """Stored dtype of a random-weight checkpoint: a named ``dtype`` as is; for ``"auto"`` float16
    (as the published MLX conversions), except float32 for a quantized one on a CPU, where MLX's
    ``quantized_matmul`` is ~36x slower with float16 activations (0.06 vs 2.2 GFLOP/s measured)."""
    if dtype != "auto":
        return dtype
    return "float32" if quantize and _on_cpu() else "float16"


def share_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (same architecture, e.g. mlx-lm's OpenELM) the very arrays of ``src``, with the
    same layers quantized; no copy is made."""
    quant = {p: dict(group_size=m.group_size, bits=m.bits, mode=m.mode)
             for p, m in src.named_modules() if isinstance(m, QUANTIZED)}
    if quant:
        nn.quantize(dst, class_predicate=lambda p, m: quant.get(p, False))
    mine = {k: v.shape for k, v in tree_flatten(dst.parameters())}
    theirs = tree_flatten(src.parameters())
    if mine != {k: v.shape for k, v in theirs}:
        raise ValueError("the two models' parameter names or shapes differ; they are not the same architecture")
    dst.update(tree_unflatten(theirs))
    return dst


def mlx_lm_model(args: ModelArgs) -> nn.Module:
    """mlx-lm's OpenELM for ``args`` (uninitialised; fill it with ``share_weights``)."""
    from mlx_lm.models import openelm

    return openelm.Model(openelm.ModelArgs(
        model_type="openelm", head_dim=args.head_dim, num_transformer_layers=args.num_transformer_layers,
        model_dim=args.model_dim, vocab_size=args.vocab_size, ffn_dim_divisor=args.ffn_dim_divisor,
        num_query_heads=list(args.num_query_heads), num_kv_heads=list(args.num_kv_heads),
        ffn_multipliers=[s / args.model_dim for s in args.ffn_intermediate_sizes],
        normalize_qk_projections=args.normalize_qk_projections, share_input_output_layers=args.share_input_output_layers,
        rms_norm_eps=args.rms_norm_eps, rope_freq_constant=args.rope_freq_constant,
    ))


def _on_cpu() -> bool:
    return device_is_cpu()


def as_loaded(checkpoint: Model, dtype: str = "auto") -> Model:
    """Our model for ``checkpoint`` as ``io.load.load_model(folder, dtype, keep_quantized=dtype != "auto")``
    makes it from a folder holding ``checkpoint`` (same policy function: ``weights.compute_plan``);
    ``checkpoint`` itself (its memory placed by ``weights.apply_plan``) when nothing else changes."""
    plan = compute_plan(dtype, quantization_of(checkpoint) is not None, keep_quantized=dtype != "auto",
                        stored_dtype=float_dtype_of(checkpoint))
    if not plan.dequantize and (plan.dtype is None or plan.dtype == float_dtype_of(checkpoint)):
        return apply_plan(checkpoint, plan)  # nothing to convert; its memory placed as loading places it
    return apply_plan(share_weights(checkpoint, Model(checkpoint.args)), plan)


def set_fused_norms(model: nn.Module, fused: bool) -> int:
    """Switch every ``RMSNorm`` between ``mx.fast.rms_norm`` and the naive composed ops; returns their count."""
    norms = [m for _, m in model.named_modules() if isinstance(m, RMSNorm)]
    for m in norms:
        m.fused = fused
    return len(norms)


def describe(model: nn.Module) -> Dict[str, Any]:
    """dtype, quantization and weight size of a model."""
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {"dtype": dtype_label(model), "quantization": quantization_of(model), "weights_gb": nbytes / 1e9}


class TokenIds:
    """What ``stream_generate`` needs from a tokenizer when there is none (random weights): a token's
    text is its id; generation runs without EOS checks (``stop_at_eos=False``)."""

    eos_token_ids = frozenset()

    class _Detokenizer:
        def __init__(self):
            self.last_segment = ""

        def add_token(self, token: int) -> None:
            self.last_segment = f" {token}"

        def finalize(self) -> None:
            self.last_segment = ""

    @property
    def detokenizer(self):
        return self._Detokenizer()


# ---------------------------------------------------------------- timing


def _sync() -> None:
    from mlx_lm.generate import generation_stream

    mx.synchronize(generation_stream)
    mx.synchronize()


def time_generation(run: Callable[[], Iterable], n_prompt: int, weights_gb: float) -> Dict[str, float]:
    """Time one generation: ``run()`` yields once per generated token.

    ttft_s: call to first token (prompt processing plus the first step); prompt_tps = n_prompt / ttft_s;
    generation_tps = (tokens - 1) / (last token - first token); peak_memory_gb = the model's weights plus
    the most memory the run added (KV cache, activations), so models held alongside do not count.
    """
    gc.collect()
    _sync()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    n, first, last = 0, 0.0, 0.0
    tic = time.perf_counter()
    for _ in run():
        last = time.perf_counter()
        first = first or last
        n += 1
    _sync()
    if n < 2:
        raise ValueError("a benchmark run must generate at least 2 tokens")
    ttft = first - tic
    return {
        "prompt_tps": n_prompt / ttft,
        "generation_tps": (n - 1) / (last - first),
        "ttft_s": ttft,
        "peak_memory_gb": weights_gb + max(mx.get_peak_memory() - base, 0) / 1e9,
    }


Runner = Callable[[Sequence[int], int], Iterable]


def ours_runner(model: nn.Module, tokenizer: Any, fused_norms: bool = True, fusion: bool = True) -> Runner:
    """Our ``stream_generate``, greedy, exactly ``n`` tokens; ``fusion=False``: layers op by op (``kernels.no_fusion``)."""
    from ..generate.stream import stream_generate

    def run(ids, n):
        set_fused_norms(model, fused_norms)
        with kernels.no_fusion() if not fusion else nullcontext():
            yield from stream_generate(model, tokenizer, ids, max_tokens=n, stop_at_eos=False)

    return run


def mlx_lm_runner(model: nn.Module) -> Runner:
    """mlx-lm's ``generate_step`` (greedy by default), exactly ``n`` tokens."""
    from mlx_lm.generate import generate_step

    return lambda ids, n: generate_step(mx.array(ids, mx.uint32), model, max_tokens=n)


def measure(contenders: Dict[str, tuple], ids: Sequence[int], gen_tokens: int, repeats: int) -> Dict[str, Dict[str, Any]]:
    """Warm each ``name: (runner, model)`` up, then time ``repeats`` interleaved rounds (order reversed
    every other round).
    Returns per contender the medians, ``describe(model)`` and the per-round ``samples``."""
    info = {name: describe(model) for name, (_, model) in contenders.items()}
    for runner, _ in contenders.values():
        for _ in runner(ids[:WARMUP_PROMPT], WARMUP_GEN):
            pass
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order: no contender always goes first
            runner = contenders[name][0]
            samples[name].append(time_generation(lambda: runner(ids, gen_tokens), len(ids), info[name]["weights_gb"]))
    out = {}
    for name, rounds in samples.items():
        keys = rounds[0].keys()
        out[name] = {
            **{k: statistics.median(r[k] for r in rounds) for k in keys},
            **info[name],
            "samples": {k: [r[k] for r in rounds] for k in keys},
        }
    return out


def paired_ratios(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, float]:
    """Median over rounds of a/b for each timed quantity (the rounds ran interleaved)."""
    return {k: statistics.median(x / y for x, y in zip(a["samples"][k], b["samples"][k])) for k in a["samples"]}


# ---------------------------------------------------------------- RMSNorm study


@contextmanager
def _recording_norm_inputs(store: List[tuple]):
    call = RMSNorm.__call__

    def recording(self, x):
        store.append((self, x))
        return call(self, x)

    RMSNorm.__call__ = recording
    try:
        yield
    finally:
        RMSNorm.__call__ = call


def norm_time_per_token(model: Model, ids: Sequence[int], rounds: int = 10, steps_per_eval: int = 8) -> Dict[str, Any]:
    """Per decode step, fused and naive: milliseconds of the whole step, of its RMSNorm calls alone,
    and their ratio (see ``ABLATION_METHOD``)."""
    from mlx_lm.models.cache import trim_prompt_cache

    cache = model.make_cache()
    if len(ids) > 1:
        model(mx.array([ids[:-1]]), cache=cache)
        mx.eval([c.state for c in cache])
    token = mx.array([[ids[-1]]])
    captured: List[tuple] = []

    def step() -> float:
        tic = time.perf_counter()
        mx.eval(mx.argmax(model(token, cache=cache)[:, -1], axis=-1))
        elapsed = time.perf_counter() - tic
        trim_prompt_cache(cache, 1)  # every step sees the same cache length
        return elapsed * 1e3

    def norms() -> float:
        tic = time.perf_counter()
        mx.eval([norm(x) for _ in range(steps_per_eval) for norm, x in captured])
        return (time.perf_counter() - tic) * 1e3 / steps_per_eval

    with _recording_norm_inputs(captured):
        step()
    mx.eval([x for _, x in captured])

    times = {f: {"step": [], "norm": []} for f in (True, False)}
    for r in range(rounds + 1):
        for fused in (True, False):
            set_fused_norms(model, fused)
            step_ms, norm_ms = step(), norms()
            if r:  # round 0 warms up
                times[fused]["step"].append(step_ms)
                times[fused]["norm"].append(norm_ms)
    set_fused_norms(model, True)
    out: Dict[str, Any] = {"calls": len(captured)}
    for fused, name in ((True, "fused"), (False, "naive")):
        t = times[fused]
        out[name] = {
            "decode_step_ms": statistics.median(t["step"]),
            "norm_ms_per_token": statistics.median(t["norm"]),
            "norm_share": statistics.median(n / s for n, s in zip(t["norm"], t["step"])),
        }
    return out


def ablation_summary(fused: Dict[str, Any], naive: Dict[str, Any], norms: Dict[str, Any]) -> Dict[str, Any]:
    """Combine the end-to-end runs (fused, naive) with the step and norm timings of ``norm_time_per_token``."""
    out: Dict[str, Any] = {"method": ABLATION_METHOD, "norm_calls_per_token": norms["calls"]}
    for name, run in (("fused", fused), ("naive", naive)):
        out[name] = {
            **{k: run[k] for k in ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb", "samples")},
            "decode_ms_per_token": 1e3 / run["generation_tps"],
            **norms[name],
        }
    ratios = paired_ratios(fused, naive)
    out["generation_speedup_fused_over_naive"] = ratios["generation_tps"]
    out["prompt_speedup_fused_over_naive"] = ratios["prompt_tps"]
    # What fusing saves per token: in the step timings and in the norm-only timings.
    out["step_ms_saved_by_fusion"] = norms["naive"]["decode_step_ms"] - norms["fused"]["decode_step_ms"]
    out["norm_ms_saved_by_fusion"] = norms["naive"]["norm_ms_per_token"] - norms["fused"]["norm_ms_per_token"]
    return out


# ---------------------------------------------------------------- the benchmark


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> List[int]:
    """``n`` random token ids (BOS first), avoiding the special ids 0-2."""
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, vocab_size) for _ in range(n - 1)]


def benchmark(
    ours: Model,
    tokenizer: Any = None,
    *,
    checkpoint: Optional[nn.Module] = None,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    repeats: int = 3,
    compare_mlx_lm: bool = False,
    rmsnorm_ablation: bool = False,
    seed: int = 0,
    label: str = "",
) -> Dict[str, Any]:
    """Benchmark ``ours`` (our ``Model``); see the module docstring for the terms.

    ``checkpoint`` (our ``Model`` or mlx-lm's OpenELM holding the stored weights; default ``ours``)
    is what mlx-lm runs when ``compare_mlx_lm``. ``rmsnorm_ablation`` adds our model with naive
    RMSNorm to the rounds and measures the share of decode time spent in normalisation.
    ``tokenizer`` defaults to ``TokenIds()``. Every key is always present (``None`` when not asked).
    """
    import mlx_lm

    from .. import _backend

    args = ours.args
    if prompt_tokens < 1 or gen_tokens < 2 or repeats < 1:
        raise ValueError("need --prompt-tokens >= 1, --gen-tokens >= 2 and --repeats >= 1")
    if prompt_tokens + gen_tokens > args.max_context_length:
        raise ValueError(f"--prompt-tokens + --gen-tokens is {prompt_tokens + gen_tokens}, "
                         f"over OpenELM's {args.max_context_length}-token context")
    tokenizer = tokenizer or TokenIds()
    ids = prompt_ids(prompt_tokens, args.vocab_size, seed)
    checkpoint = ours if checkpoint is None else checkpoint

    contenders = {"ours": (ours_runner(ours, tokenizer), ours)}
    if compare_mlx_lm:
        ours_stored = checkpoint if isinstance(checkpoint, Model) else share_weights(checkpoint, Model(args))
        theirs = share_weights(checkpoint, mlx_lm_model(args)) if isinstance(checkpoint, Model) else checkpoint
        if describe(ours_stored) != describe(ours):  # else mode (a) is mode (b): measure once
            contenders["ours_stored"] = (ours_runner(ours_stored, tokenizer), ours_stored)
        contenders["mlx_lm"] = (mlx_lm_runner(theirs), theirs)
    if rmsnorm_ablation:
        # the paper's setting: norms as graph ops, so no layer fusion on either side (it folds the norms away)
        contenders["ours_rmsnorm_ops"] = (ours_runner(ours, tokenizer, fusion=False), ours)
        contenders["ours_naive_rmsnorm"] = (ours_runner(ours, tokenizer, fused_norms=False, fusion=False), ours)

    runs = measure(contenders, ids, gen_tokens, repeats)
    main = runs["ours"]
    result: Dict[str, Any] = {
        "model": label,
        "device": mx.default_device().type.name,
        "device_name": str(mx.device_info().get("device_name", "")) if hasattr(mx, "device_info") else "",
        "blas": _backend.BLAS,
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        **describe(ours),
        "checkpoint": _checkpoint_info(ours, checkpoint),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "repeats": repeats,
        **{k: main[k] for k in ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb", "samples")},
        "mlx_lm": None,
        "rmsnorm_ablation": None,
        "plot": None,
    }
    if compare_mlx_lm:
        stored = runs.get("ours_stored", main)
        result["mlx_lm"] = {
            "same_dtype": {"ours": stored, "mlx_lm": runs["mlx_lm"], "ratio": paired_ratios(stored, runs["mlx_lm"])},
            "defaults": {"ours": main, "mlx_lm": runs["mlx_lm"], "ratio": paired_ratios(main, runs["mlx_lm"])},
            "same_dtype_is_defaults": "ours_stored" not in runs,
        }
    if rmsnorm_ablation:
        with kernels.no_fusion():
            norms = norm_time_per_token(ours, ids)
        result["rmsnorm_ablation"] = ablation_summary(runs["ours_rmsnorm_ops"], runs["ours_naive_rmsnorm"], norms)
    return result


def _checkpoint_info(ours: nn.Module, checkpoint: nn.Module) -> Dict[str, Any]:
    if checkpoint is not ours:
        return describe(checkpoint)
    info = getattr(ours, "compute_info", None)  # set by loading.load_model: what the folder stores
    if info:
        return {"dtype": info["stored_dtype"], "quantization": info["stored_quantization"], "weights_gb": None}
    return describe(ours)


def run_bench(
    *,
    model: Optional[str] = None,
    shape: Optional[str] = None,
    dtype: str = "auto",
    quantize: Optional[int] = None,
    seed: int = 0,
    plot: Optional[Union[str, Path]] = None,
    **options,
) -> Dict[str, Any]:
    """Build the models for ``mlx-openelm bench`` and run ``benchmark`` (``options`` are its keywords).

    ``shape``: random weights at a released size's shapes (or ``tiny``), stored in
    ``random_checkpoint_dtype(dtype, quantize)``; ``quantize`` quantizes that checkpoint.
    ``model``: a folder or hub id loaded with ``io.load.load`` (``keep_quantized`` unless
    ``dtype="auto"``); ``quantize`` quantizes after loading, for ours and for the checkpoint
    mlx-lm runs. ``plot`` writes a PNG chart.
    """
    if (model is None) == (shape is None):
        raise ValueError("give either --model or --shape")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if plot is not None:
        _require_matplotlib()
    if shape is not None:
        checkpoint = random_model(shape, random_checkpoint_dtype(dtype, quantize), quantize, seed)
        ours, tokenizer, label = as_loaded(checkpoint, dtype), None, f"random weights, OpenELM-{shape} shapes"
    else:
        ours, tokenizer, checkpoint, label = _load_for_bench(model, dtype, quantize, options.get("compare_mlx_lm", False))
    result = benchmark(ours, tokenizer, checkpoint=checkpoint, seed=seed, label=label, **options)
    if plot is not None:
        result["plot"] = str(plot_results(result, plot))
    return result


def _load_for_bench(path: str, dtype: str, quantize: Optional[int], need_checkpoint: bool):
    from ..io.load import load

    ours, tokenizer = load(path, dtype=dtype, keep_quantized=dtype != "auto")
    folder = getattr(ours, "folder", path)
    checkpoint = None
    if need_checkpoint:
        from mlx_lm.utils import load_model as mlx_lm_load_model

        try:
            checkpoint = mlx_lm_load_model(Path(folder))[0]
        except Exception as e:  # mlx-lm's own error types vary; say which side failed
            raise ValueError(f"mlx-lm could not load {folder} for --compare-mlx-lm: {first_line(e)}") from None
    if quantize:
        quantize_model(ours, quantize)
        if checkpoint is not None:
            quantize_model(checkpoint, quantize)
    return ours, tokenizer, checkpoint, str(path)


# ---------------------------------------------------------------- chart


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'mlx-openelm[plot]'") from None


def plot_results(result: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Bar charts of a ``benchmark`` result (prompt and decode tok/s of every contender, and the
    RMSNorm share of decode time when the ablation ran), written atomically as a PNG."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    bars = [(f"{name.replace(', ', chr(10))}\n{weights_label(run)}", run) for name, run in contender_runs(result)]
    ablation = result.get("rmsnorm_ablation")
    panels = [("prompt tok/s", "prompt_tps"), ("decode tok/s", "generation_tps")]
    fig = Figure(figsize=(5.2 * (len(panels) + bool(ablation)), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels) + bool(ablation), squeeze=False)[0]
    palette = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"])
    colors = [NAIVE_COLOR if "naive" in label else next(palette) for label, _ in bars]
    for ax, (title, key) in zip(axes, panels):
        labels = [b[0] for b in bars]
        values = [b[1][key] for b in bars]
        rects = ax.bar(range(len(bars)), values, color=colors)
        ax.bar_label(rects, fmt="%.1f", padding=2)
        ax.set_xticks(range(len(bars)), labels, fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.15)
    if ablation:
        ax = axes[-1]
        shares = [100 * ablation["fused"]["norm_share"], 100 * ablation["naive"]["norm_share"]]
        rects = ax.bar([0, 1], shares, color=[colors[0], NAIVE_COLOR])
        ax.bar_label(rects, fmt="%.1f%%", padding=2)
        ax.set_xticks([0, 1], ["fused\nmx.fast.rms_norm", "naive\ncomposed ops"])
        ax.set_title("decode time in RMSNorm (%)")
        ax.margins(y=0.15)
    fig.suptitle(
        f"{result['model']} | {result['device']} ({result['device_name']}) | ours {weights_label(result)} | "
        f"{result['prompt_tokens']}-token prompt, {result['gen_tokens']} generated",
        fontsize=10,
    )
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def weights_label(summary: Dict[str, Any]) -> str:
    """``float16`` or ``float16, 4-bit``."""
    q = summary.get("quantization")
    return summary["dtype"] + (f", {q['bits']}-bit" if q else "")


def contender_runs(result: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(name, summary) of every distinct run in a ``benchmark`` result, in table order."""
    runs = [("ours", result)]
    cmp, ablation = result.get("mlx_lm"), result.get("rmsnorm_ablation")
    if cmp:
        if not cmp["same_dtype_is_defaults"]:
            runs.append(("ours, as stored", cmp["same_dtype"]["ours"]))
        runs.append(("mlx-lm", cmp["same_dtype"]["mlx_lm"]))
    if ablation:
        runs.append(("ours, naive RMSNorm", {**ablation["naive"], "dtype": result["dtype"], "quantization": result["quantization"]}))
    return runs

"""LoRA / DoRA fine-tuning: schedule, compiled accumulate/update steps, data parallelism,
validation, metrics and exactly resumable checkpoints.

One *step* is one optimizer update. It consumes ``grad_accum`` micro-batches of ``batch_size``
sequences (the global batch; with ``mx.distributed`` each rank takes its rows of it). The loss is
the mean token cross-entropy over every masked target token of the step: sums of losses,
gradients and token counts are accumulated over micro-batches and ranks and divided once, so
batch 4 x accum 1, batch 2 x accum 2 and 2 processes x batch 2 all make the same update.

Output folder layout::

    <out>/adapters.safetensors, adapter_config.json   final adapters (adapters.save_adapters)
    <out>/training_args.json                          the TrainingArgs of the run
    <out>/metrics.jsonl                               one line per step, plus val_loss lines
                                                      ("tokens" = trained target tokens of the step)
    <out>/checkpoints/step_<N>/                       adapters, optimizer.safetensors, state.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..adapters import ADAPTER_TYPES, LoRAConfig, apply_adapters, save_adapters
from ..data import encode_record, iterate_batches
from ..utils import write_json, write_text

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
ARGS_FILE = "training_args.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PAD_MULTIPLE = 8  # batch widths are rounded up to this, so compiled steps are reused

# Fields that only change reporting or where files go; all others must match on --resume.
_RESUMABLE_CHANGES = {"output_dir", "resume", "steps_per_eval", "save_every", "keep_checkpoints", "val_batches"}


@dataclass
class TrainingArgs:
    """Fine-tuning settings. Defaults follow CoreNet's OpenELM PEFT recipe (cosine 3e-4 -> 3e-5,
    AdamW betas (0.9, 0.95), weight decay 0, gradient clipping 1.0, LoRA r32/alpha32/dropout 0.1 on
    qkv_proj, out_proj, proj_1, proj_2) and LLM-Adapters' commonsense run where CoreNet's does not fit
    one machine (3 epochs, 16 sequences per update as 4 x 4 accumulation, cutoff 256 tokens,
    train_on_inputs, 100 warmup steps, 120 validation records every 80 steps, 3 checkpoints kept)."""

    output_dir: str = "adapters"
    adapter: LoRAConfig = field(default_factory=LoRAConfig)
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    warmup: float = 100  # optimizer steps; a value in (0, 1) is a fraction of all steps
    warmup_init: float = 1e-6
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per micro-batch, across all ranks
    grad_accum: int = 4  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    iters: Optional[int] = None  # optimizer steps; None: derived from epochs
    epochs: float = 3.0
    cutoff_len: int = 256
    train_on_inputs: bool = True
    val_size: int = 120
    val_batches: Optional[int] = None  # None: the whole validation set
    steps_per_eval: int = 80  # 0 disables validation (except at the end when a val set is given)
    save_every: int = 80  # 0 disables intermediate checkpoints
    keep_checkpoints: int = 3  # 0 keeps all
    grad_checkpoint: bool = False
    seed: int = 0
    resume: bool = False

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["adapter"] = self.adapter.to_dict()
        d["betas"] = list(self.betas)
        return d

    def validate(self, world_size: int = 1) -> None:
        """Raise ValueError/FileNotFoundError (one line, what to change) for unusable settings,
        including an output folder that already holds a run (without ``resume``) or none (with it)."""
        checks = [
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (0 <= self.min_learning_rate <= self.learning_rate, f"min learning rate must be in [0, {self.learning_rate}], got {self.min_learning_rate}"),
            (self.warmup >= 0, f"warmup must be >= 0 steps (or a fraction in (0, 1)), got {self.warmup}"),
            (all(0 <= b < 1 for b in self.betas), f"AdamW betas must be in [0, 1), got {self.betas}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation steps must be >= 1, got {self.grad_accum}"),
            (self.max_grad_norm >= 0, f"max grad norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"),
            (self.iters is None or self.iters >= 1, f"iters must be >= 1, got {self.iters}"),
            (self.iters is not None or self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.cutoff_len >= 2, f"cutoff length must be >= 2 tokens, got {self.cutoff_len}"),
            (self.val_size >= 0, f"val size must be >= 0, got {self.val_size}"),
            (self.val_batches is None or self.val_batches >= 1, f"val batches must be >= 1, got {self.val_batches}"),
            (self.steps_per_eval >= 0 and self.save_every >= 0 and self.keep_checkpoints >= 0,
             "steps per eval, save every and keep checkpoints must be >= 0"),
            (self.batch_size % world_size == 0,
             f"batch size {self.batch_size} is not divisible by the {world_size} processes; use a multiple of {world_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; give a folder for the adapters")
        if self.resume:
            if latest_checkpoint(out) is None:
                raise FileNotFoundError(f"no checkpoint in {out / CHECKPOINTS_DIR} to resume from; run without --resume")
        elif any((out / name).exists() for name in (CHECKPOINTS_DIR, METRICS_FILE, "adapters.safetensors")):
            raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another adapter path")


class TrainingCallback:
    """Progress hooks, called on rank 0 only. ``on_start(info)`` gets total_steps, start_step,
    train/val sizes and trainable parameter count; ``on_step``/``on_val`` get the metrics lines."""

    def on_start(self, info: Dict[str, Any]) -> None:
        pass

    def on_step(self, metrics: Dict[str, Any]) -> None:
        pass

    def on_val(self, metrics: Dict[str, Any]) -> None:
        pass

    def on_save(self, path: Path) -> None:
        pass


def loss_sums(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """``(sum of masked token cross-entropies, number of masked tokens)``, both float32."""
    logits = model(inputs).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets, reduction="none")
    mask = mask.astype(mx.float32)
    return (ce * mask).sum(), mask.sum()


def learning_rate_schedule(args: TrainingArgs, total_steps: int):
    """Linear warmup from ``warmup_init`` to ``learning_rate``, then cosine decay to
    ``min_learning_rate`` at ``total_steps`` (CoreNet's OpenELM schedule)."""
    warmup = round(args.warmup * total_steps) if 0 < args.warmup < 1 else int(args.warmup)
    warmup = min(warmup, max(total_steps - 1, 0))
    cosine = optim.cosine_decay(args.learning_rate, max(total_steps - warmup, 1), args.min_learning_rate)
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(args.warmup_init, args.learning_rate, warmup)
    return optim.join_schedules([ramp, cosine], [warmup])


def total_steps(args: TrainingArgs, n_train: int) -> int:
    """Optimizer steps of a run: ``iters``, else ``epochs`` passes over ``n_train`` records."""
    if args.iters is not None:
        return args.iters
    per_epoch = math.ceil(n_train / args.batch_size)
    return max(1, math.ceil(args.epochs * per_epoch / args.grad_accum))


# -- gradient checkpointing --------------------------------------------------------------------


class _KeySource:
    """Dropout keys for one block call, split from a key that is an input of the checkpointed
    function, so the backward recomputation draws the same masks as the forward pass."""

    key: Optional[mx.array] = None

    def next(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


class _KeyedDropout(nn.Module):
    """``nn.Dropout`` whose masks come from a ``_KeySource`` instead of the global PRNG."""

    def __init__(self, p: float, source: _KeySource):
        super().__init__()
        self.p = p
        self.source = source

    def __call__(self, x: mx.array) -> mx.array:
        if not self.training or self.p == 0:
            return x
        keep = mx.random.bernoulli(1 - self.p, x.shape, key=self.source.next())
        return (keep * x) * (1 / (1 - self.p))


_CHECKPOINTED: Dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        call = cls.__call__

        def __call__(self, x, mask=None, cache=None):
            if not self.training:
                return call(self, x, mask, cache)
            # MLX recomputes the block in the backward pass by calling `inner` again; the dropout key
            # is drawn once, outside, so both passes use the same masks (the global PRNG would not).
            key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)

            def inner(params, x):
                self.update(params)
                self._dropout_keys.key = key
                return call(self, x, mask, cache)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


def enable_grad_checkpoint(model) -> None:
    """Recompute each transformer block's activations in the backward pass (less memory, about a
    third more compute). Dropout inside the blocks is made replayable; only ``model``'s blocks change."""
    for block in model.layers:
        if type(block) in _CHECKPOINTED.values():
            continue
        source = _KeySource()
        object.__setattr__(block, "_dropout_keys", source)
        swaps = [(name, _KeyedDropout(1 - m._p_1, source)) for name, m in block.named_modules() if isinstance(m, nn.Dropout)]
        if swaps:
            from mlx.utils import tree_unflatten

            block.update_modules(tree_unflatten(swaps))
        block.__class__ = _checkpointed_class(type(block))


# -- checkpoints ---------------------------------------------------------------------------------


def _step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def list_checkpoints(output_dir) -> List[Path]:
    """Complete checkpoints ``<out>/checkpoints/step_<N>`` in step order."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _random_key() -> List[int]:
    return [int(v) for v in np.array(mx.random.state[0]).tolist()]


def _set_random_key(key: Sequence[int]) -> None:
    mx.random.seed((int(key[0]) << 32) | int(key[1]))  # seed(s) sets the key to [s >> 32, s & 0xffffffff]


def _save_checkpoint(out: Path, step: int, model, optimizer, state: Dict[str, Any], args: TrainingArgs) -> Path:
    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step}-"))
    try:
        save_adapters(tmp, model, args.adapter)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.keep_checkpoints:
        for old in list_checkpoints(out)[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_tree(tree, flat: Dict[str, mx.array], what: str):
    missing = [p for p, _ in tree_flatten(tree) if p not in flat]
    if missing:
        raise ValueError(f"{what} lacks {missing[:3]}; it was written for other adapters or another model")
    return tree_map_with_path(lambda p, _: flat[p], tree)


def _load_checkpoint(folder: Path, model, optimizer) -> None:
    from ..adapters import ADAPTERS_FILE

    model.update(_restore_tree(model.trainable_parameters(), mx.load(str(folder / ADAPTERS_FILE)), str(folder / ADAPTERS_FILE)))
    optimizer.init(model.trainable_parameters())
    optimizer.state = _restore_tree(optimizer.state, mx.load(str(folder / OPTIMIZER_FILE)), str(folder / OPTIMIZER_FILE))
    mx.eval(model.trainable_parameters(), optimizer.state)


def _check_resumable(saved: Dict[str, Any], args: TrainingArgs, fingerprint: Dict[str, int], world_size: int) -> None:
    now = args.to_dict()
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved["args"].get(k) != now[k])
    if changed:
        raise ValueError(f"cannot resume: {', '.join(changed)} differ from the checkpointed run; use the same settings")
    if saved["data"] != fingerprint:
        raise ValueError("cannot resume: the training data differ from the checkpointed run (records or tokens); use the same data")
    if saved["world_size"] != world_size:
        raise ValueError(f"cannot resume: the run used {saved['world_size']} processes, this one {world_size}; use the same number")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines an interrupted run wrote after the checkpoint it resumes from."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in keep))


# -- data --------------------------------------------------------------------------------------


def _encode(tokenizer, records: Sequence, args: TrainingArgs) -> List[Tuple[List[int], List[int]]]:
    return [encode_record(tokenizer, r, args.cutoff_len, args.train_on_inputs) for r in records]


def _shard(batch: Tuple[mx.array, mx.array, mx.array], rank: int, size: int):
    """This rank's rows of a global batch, widened to a multiple of PAD_MULTIPLE. A rank left
    without rows (a short last batch) gets one fully masked row so it still joins the sums."""
    inputs, targets, mask = batch
    if size > 1:
        rows = mx.arange(rank, inputs.shape[0], size)
        if rows.size == 0:
            rows, mask = mx.array([0]), mx.zeros_like(mask)
        inputs, targets, mask = inputs[rows], targets[rows], mask[rows]
    extra = -inputs.shape[1] % PAD_MULTIPLE
    if extra:
        pad = [(0, 0), (0, extra)]
        inputs, targets, mask = mx.pad(inputs, pad), mx.pad(targets, pad), mx.pad(mask, pad)
    return inputs, targets, mask


def _train_stream(encoded, args: TrainingArgs, consumed: int) -> Iterator[Tuple[mx.array, mx.array, mx.array]]:
    """Global micro-batches from position ``consumed`` on, epoch after epoch; batch order depends
    only on (seed, epoch), so a position is all it takes to resume."""
    per_epoch = math.ceil(len(encoded) / args.batch_size)
    epoch, start = divmod(consumed, per_epoch)
    while True:
        yield from iterate_batches(encoded, args.batch_size, shuffle=True, seed=args.seed, epoch=epoch, start=start)
        epoch, start = epoch + 1, 0


# -- training ------------------------------------------------------------------------------------


def _all_sum_tree(tree, group):
    """Sum a tree of float arrays over ``group`` with one all-reduce; the tree keeps its structure."""
    flat = tree_flatten(tree)
    if group.size() == 1 or not flat:
        return tree
    sizes = [v.size for _, v in flat]
    big = mx.distributed.all_sum(mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in flat]), group=group)
    parts = mx.split(big, list(np.cumsum(sizes)[:-1]))
    summed = {k: p.reshape(v.shape).astype(v.dtype) for (k, v), p in zip(flat, parts)}
    return tree_map_with_path(lambda path, _: summed[path], tree)


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def evaluate_loss(model, encoded, args: TrainingArgs, group=None) -> Tuple[float, int]:
    """Mean token cross-entropy (and token count) of pre-encoded records, in eval mode, over the
    first ``args.val_batches`` batches (all by default), summed over the ranks of ``group``."""
    group = group or mx.distributed.init()
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    batches = iterate_batches(encoded, args.batch_size, shuffle=False)
    for i, batch in enumerate(batches):
        if args.val_batches is not None and i >= args.val_batches:
            break
        s, n = loss_sums(model, *_shard(batch, group.rank(), group.size()))
        total, count = total + s, count + n
        mx.eval(total, count)
    if group.size() > 1:
        total, count = mx.distributed.all_sum(total, group=group), mx.distributed.all_sum(count, group=group)
    model.train(was_training)
    n = int(count.item())
    return (total.item() / n if n else float("nan")), n


def train(model, tokenizer, train_set: Sequence[dict], val_set: Sequence[dict], args: TrainingArgs, callback: Optional[TrainingCallback] = None) -> Dict[str, Any]:
    """Add ``args.adapter`` adapters to ``model`` (frozen base, float or quantized = QLoRA) and train
    them on LLM-Adapters records (``instruction``/``input``/``output``); see the module docstring
    for steps, files and data parallelism. With ``args.resume`` the newest checkpoint in
    ``args.output_dir`` is restored (adapters, optimizer, data position, PRNG keys), so the run
    continues with the losses an uninterrupted run would have. Only rank 0 writes files and
    calls ``callback``; every rank reads the checkpoint on resume, so across machines the output
    folder must be shared (or copied). Returns ``{"steps", "loss", "val_loss", "output_dir"}``."""
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    problem = None
    try:
        args.validate(world)
        if not train_set:
            raise ValueError("the training set is empty; give records with instruction and output fields")
        if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
            raise ValueError("the model already has adapters; pass a model without adapters (train adds args.adapter)")
    except (ValueError, FileNotFoundError) as e:
        problem = e
    if world > 1:  # every rank checks before rank 0 writes anything, and all stop if one objects
        objections = mx.distributed.all_sum(mx.array(float(problem is not None)), group=group).item()
        if objections and problem is None:
            problem = ValueError("another process rejected the training settings; see its error")
    if problem is not None:
        raise problem
    out = Path(args.output_dir)
    lead = rank == 0
    cb = callback if (callback is not None and lead) else TrainingCallback()

    train_enc, val_enc = _encode(tokenizer, train_set, args), _encode(tokenizer, val_set, args)
    fingerprint = {"records": len(train_enc), "tokens": int(sum(len(ids) for ids, _ in train_enc))}
    steps = total_steps(args, len(train_enc))
    if args.resume:  # checked before the model is touched
        ckpt = latest_checkpoint(out)
        saved = json.loads((ckpt / STATE_FILE).read_text())
        _check_resumable(saved, args, fingerprint, world)

    mx.random.seed(args.seed)  # adapter init: identical on every rank
    apply_adapters(model, **args.adapter.to_dict())
    model.train()
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(args, steps), betas=list(args.betas), weight_decay=args.weight_decay)
    optimizer.init(model.trainable_parameters())
    mx.random.seed(_rank_seed(args.seed, rank))  # dropout: one stream per rank

    start_step, consumed = 0, 0
    if args.resume:
        _load_checkpoint(ckpt, model, optimizer)
        start_step, consumed = saved["step"], saved["micro_batches"]
        _set_random_key(saved["random_keys"][rank])
        if lead:
            _truncate_metrics(out / METRICS_FILE, start_step)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / ARGS_FILE, args.to_dict())

    loss_and_grad = nn.value_and_grad(model, loss_sums)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(inputs, targets, mask, acc):
        (s, n), grads = loss_and_grad(model, inputs, targets, mask)
        if acc is not None:
            s, n, grads = s + acc[0], n + acc[1], tree_map(mx.add, grads, acc[2])
        return s, n, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update(s, n, grads):
        s, n, grads = _all_sum_tree((s, n, grads), group)
        grads = tree_map(lambda g: g / n, grads)
        if args.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, args.max_grad_norm)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return s / n, norm, n

    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    cb.on_start({"total_steps": steps, "start_step": start_step, "train_records": len(train_enc),
                 "val_records": len(val_enc), "trainable_parameters": n_trainable, "world_size": world})
    metrics_file = open(out / METRICS_FILE, "a") if lead else None

    def log(line: Dict[str, Any]) -> None:
        if metrics_file:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()

    per_epoch = math.ceil(len(train_enc) / args.batch_size)
    stream = _train_stream(train_enc, args, consumed)
    loss = val_loss = float("nan")
    try:
        for step in range(start_step + 1, steps + 1):
            tic = time.perf_counter()
            acc = None
            for _ in range(args.grad_accum):
                acc = accumulate(*_shard(next(stream), rank, world), acc)
                mx.eval(acc)
                consumed += 1
            loss_a, norm_a, tokens_a = update(*acc)
            mx.eval(state, loss_a, norm_a, tokens_a)
            seconds = time.perf_counter() - tic
            loss, tokens = loss_a.item(), int(tokens_a.item())
            line = {"step": step, "epoch": round(consumed / per_epoch, 4), "loss": loss, "lr": optimizer.learning_rate.item(),
                    "grad_norm": norm_a.item(), "tokens": tokens, "tokens_per_sec": tokens / seconds,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9}
            log(line)
            cb.on_step(line)

            if val_enc and ((args.steps_per_eval and step % args.steps_per_eval == 0) or step == steps):
                tic = time.perf_counter()
                val_loss, val_tokens = evaluate_loss(model, val_enc, args, group)
                vline = {"step": step, "val_loss": val_loss, "val_tokens": val_tokens, "val_seconds": time.perf_counter() - tic}
                log(vline)
                cb.on_val(vline)

            if args.save_every and step % args.save_every == 0 and step < steps:
                keys = mx.array([_random_key()], dtype=mx.uint32)
                if world > 1:
                    keys = mx.distributed.all_gather(keys, group=group)
                    mx.eval(keys)  # every rank must take part, not only the one that writes
                if lead:
                    ckpt_state = {"step": step, "micro_batches": consumed, "epoch": consumed // per_epoch,
                                  "batch_in_epoch": consumed % per_epoch, "random_keys": np.array(keys).tolist(),
                                  "world_size": world, "data": fingerprint, "args": args.to_dict()}
                    cb.on_save(_save_checkpoint(out, step, model, optimizer, ckpt_state, args))
    finally:
        if metrics_file:
            metrics_file.close()

    if lead:
        save_adapters(out, model, args.adapter)
        cb.on_save(out)
    return {"steps": steps, "loss": loss, "val_loss": val_loss, "output_dir": str(out)}

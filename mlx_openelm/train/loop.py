"""A generic training loop: the model arrives with what should train unfrozen (adapters applied,
or every parameter for full fine-tuning), plus a loss function and a stream of batches. Objectives
(``train.sft``, ``train.dpo``) are small modules over this one.

One *step* is one optimizer update. It consumes ``grad_accum`` micro-batches of ``batch_size`` rows
(the global batch; with ``mx.distributed`` each rank takes its rows of it). The loss function returns
*sums* ``(loss_sum, count, extras)``; sums of losses, gradients, counts and extras are accumulated over
micro-batches and ranks and divided once, so batch 4 x accum 1, batch 2 x accum 2 and 2 processes x
batch 2 all make the same update.

The open training record (LLM360-style) written into ``output_dir``::

    metrics.jsonl             per step: step, epoch, tokens, loss, lr, grad_norm (before clipping),
                              tokens_per_sec, peak_memory_gb, the objective's extras; val_* lines
    data_order.jsonl          per step: the record ids of every row the step trained on, in order
    data_manifest.json        seed, dataset fingerprint (sha256, record count, ...)
    run_config.json           the objective's settings (must match on resume)
    checkpoints/step_<N>/     trainable parameters (saver.file), optimizer.safetensors, state.json
    checkpoints/manifest.jsonl  step, sha256 of each checkpoint file, val_loss
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from .. import kernels
from ..utils import sha256_file, write_json, write_text

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
DATA_ORDER_FILE = "data_order.jsonl"
DATA_MANIFEST_FILE = "data_manifest.json"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINT_MANIFEST = "manifest.jsonl"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
PAD_MULTIPLE = 8  # batch widths are rounded up to this, so compiled steps are reused
# what a run killed before its first checkpoint leaves behind: a plain re-run removes it
_RUN_LITTER = (METRICS_FILE, DATA_ORDER_FILE, DATA_MANIFEST_FILE, RUN_CONFIG_FILE)

Arrays = Tuple[mx.array, ...]
# loss(model, *arrays) -> (loss_sum, count, extras: {name: sum}); "tokens" in extras (else count) is what
# tokens_per_sec counts. MLX's compile (0.32) fails with "_Map_base::at" when an aux output duplicates
# another (mask.sum() twice) or is a scaled term of the loss (c * z returned and added to the loss): return
# the raw term (z) and set ``loss.scales = {"name": c}``; the loop multiplies the logged means by it.
LossFn = Callable[..., Tuple[mx.array, mx.array, Dict[str, mx.array]]]


@dataclass
class LoopArgs:
    """Optimizer, schedule and bookkeeping of a run. AdamW is PyTorch's (bias-corrected), as CoreNet and
    LLM-Adapters use; the schedule is linear warmup then cosine decay (CoreNet's OpenELM schedule)."""

    output_dir: str = field(default="adapters", metadata={"help": "Output folder: weights, metrics, checkpoints."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate after warmup."})
    min_learning_rate: float = field(default=3e-5, metadata={"help": "Learning rate at the end of the cosine decay."})
    warmup: float = field(default=100, metadata={"help": "Linear warmup steps from warmup_init; a value in (0, 1) is a fraction of all steps."})
    warmup_init: float = 1e-6
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch_size: int = field(default=4, metadata={"help": "Rows per micro-batch, over all processes."})
    grad_accum: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; 0 disables."})
    iters: Optional[int] = field(default=None, metadata={"help": "Optimizer steps (overrides epochs)."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    val_batches: Optional[int] = None  # None: the whole validation set
    steps_per_eval: int = field(default=80, metadata={"help": "Validate every N steps and at the end; 0: only at the end."})
    save_every: int = field(default=80, metadata={"help": "Checkpoint every N steps; 0 disables."})
    keep_checkpoints: int = 3  # 0 keeps all
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute block activations in the backward pass."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, data order and dropout."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in output_dir."})

    # fields that only change reporting or where files go; all others must match on resume
    RESUMABLE_CHANGES = ("output_dir", "resume", "steps_per_eval", "save_every", "keep_checkpoints", "val_batches")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def validate(self, world_size: int = 1) -> None:
        """Raise ``ValueError`` naming the parameter for unusable settings."""
        checks = [
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (0 <= self.min_learning_rate <= self.learning_rate,
             f"min_learning_rate must be in [0, learning_rate={self.learning_rate}], got {self.min_learning_rate}"),
            (self.warmup >= 0, f"warmup must be >= 0 steps (or a fraction in (0, 1)), got {self.warmup}"),
            (all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}"),
            (self.eps > 0, f"eps must be positive, got {self.eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"),
            (self.iters is None or self.iters >= 1, f"iters must be >= 1, got {self.iters}"),
            (self.iters is not None or self.epochs > 0, f"epochs must be positive, got {self.epochs}"),
            (self.val_batches is None or self.val_batches >= 1, f"val_batches must be >= 1, got {self.val_batches}"),
            (self.steps_per_eval >= 0, f"steps_per_eval must be >= 0, got {self.steps_per_eval}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.batch_size % world_size == 0,
             f"batch_size {self.batch_size} is not divisible by the {world_size} processes; use a multiple of {world_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class BatchSource(Protocol):
    """Global micro-batches of one epoch. ``batches(epoch, start)`` yields ``(record ids, arrays)`` from
    micro-batch ``start`` on; the order depends only on (seed, epoch), so a position resumes it. By
    convention the LAST array is the weight (per token ``[B, L]`` or per row ``[B]``): a rank given no
    row gets a copy of row 0 with it zeroed, which adds nothing to the sums."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[List[int], Arrays]]: ...


@dataclass
class Saver:
    """How the trainable state is written: ``save(folder, model)`` for checkpoints and the final output;
    ``file`` is the file inside a checkpoint that holds ``model.trainable_parameters()`` by name."""

    file: str
    save: Callable[[Path, nn.Module], None]


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


def learning_rate_schedule(args: LoopArgs, total_steps: int):
    """Linear warmup from ``warmup_init`` to ``learning_rate``, then cosine decay to
    ``min_learning_rate`` at ``total_steps`` (CoreNet's OpenELM schedule)."""
    warmup = round(args.warmup * total_steps) if 0 < args.warmup < 1 else int(args.warmup)
    warmup = min(warmup, max(total_steps - 1, 0))
    cosine = optim.cosine_decay(args.learning_rate, max(total_steps - warmup, 1), args.min_learning_rate)
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(args.warmup_init, args.learning_rate, warmup)
    return optim.join_schedules([ramp, cosine], [warmup])


def total_steps(args: LoopArgs, batches_per_epoch: int) -> int:
    """Optimizer steps of a run: ``iters``, else ``epochs`` passes of ``batches_per_epoch`` micro-batches."""
    if args.iters is not None:
        return args.iters
    return max(1, math.ceil(args.epochs * batches_per_epoch / args.grad_accum))


def make_optimizer(args: LoopArgs, steps: int) -> optim.Optimizer:
    """PyTorch's AdamW: decoupled weight decay and bias correction (MLX's default has none, which makes
    the first steps 0.45x too small with betas (0.9, 0.95))."""
    return optim.AdamW(learning_rate=learning_rate_schedule(args, steps), betas=list(args.betas), eps=args.eps,
                       weight_decay=args.weight_decay, bias_correction=True)


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


def _save_checkpoint(out: Path, step: int, model, optimizer, state: Dict[str, Any], saver: Saver, keep: int,
                     val_loss: Optional[float]) -> Path:
    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # a checkpoint whose writer was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step}-"))
    try:
        saver.save(tmp, model)
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        write_json(tmp / STATE_FILE, state)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(root / CHECKPOINT_MANIFEST, "a") as f:
        f.write(json.dumps({"step": step, "path": final.name, "files": files, "val_loss": val_loss}) + "\n")
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _restore_tree(tree, flat: Dict[str, mx.array], what: str):
    missing = [p for p, _ in tree_flatten(tree) if p not in flat]
    if missing:
        raise ValueError(f"{what} lacks {missing[:3]}; it was written for another model or other adapters")
    return tree_map_with_path(lambda p, _: flat[p], tree)


def _load_checkpoint(folder: Path, model, optimizer, saver: Saver) -> None:
    params = folder / saver.file
    model.update(_restore_tree(model.trainable_parameters(), mx.load(str(params)), str(params)))
    optimizer.init(model.trainable_parameters())
    optimizer.state = _restore_tree(optimizer.state, mx.load(str(folder / OPTIMIZER_FILE)), str(folder / OPTIMIZER_FILE))
    mx.eval(model.trainable_parameters(), optimizer.state)


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop the lines an interrupted run wrote after the checkpoint it resumes from."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in keep))


def check_output(out: Path, resume: bool) -> Optional[Path]:
    """Whether ``out`` can take a new run (or be resumed); returns the checkpoint to resume from.
    Nothing is written or removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; give a folder")
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {out / CHECKPOINTS_DIR} to resume from; run again without resume")
        return ckpt
    if ckpt is not None or any(out.glob("*.safetensors")):
        raise ValueError(f"{out} already holds a training run; resume it or choose another output_dir")
    return None


def prepare_output(out: Path, resume: bool) -> Optional[Path]:
    """``check_output``, then clean what a run killed before its first checkpoint left behind (metrics,
    data order, run config), so that a plain re-run works."""
    ckpt = check_output(out, resume)
    if ckpt is None:
        for name in _RUN_LITTER:
            (Path(out) / name).unlink(missing_ok=True)
        shutil.rmtree(Path(out) / CHECKPOINTS_DIR, ignore_errors=True)
    return ckpt


def resume_state(args: LoopArgs, run_config: Dict[str, Any], fingerprint: Dict[str, Any], world_size: int = 1):
    """Check before anything is touched that ``args.output_dir`` takes a new run, or can be resumed with
    these settings and data; returns the saved state or None."""
    ckpt = check_output(Path(args.output_dir), args.resume)
    if ckpt is None:
        return None
    saved = json.loads((ckpt / STATE_FILE).read_text())
    _check_resumable(saved, full_config(run_config, args), fingerprint, world_size)
    return saved


def full_config(run_config: Dict[str, Any], args: Optional[LoopArgs]) -> Dict[str, Any]:
    """The settings that must match on resume: the objective's and the loop's (minus reporting ones)."""
    conf = json.loads(json.dumps(run_config, default=str))
    if args is not None:
        conf.update({k: v for k, v in args.to_dict().items() if k not in LoopArgs.RESUMABLE_CHANGES})
    return conf


def _check_resumable(saved: Dict[str, Any], run_config: Dict[str, Any], fingerprint: Dict[str, Any], world_size: int) -> None:
    skip = set(LoopArgs.RESUMABLE_CHANGES)
    changed = sorted(k for k in set(run_config) | set(saved["run_config"])
                     if k not in skip and saved["run_config"].get(k) != run_config.get(k))
    if changed:
        raise ValueError(f"cannot resume: {', '.join(changed)} differ from the checkpointed run; use the same settings")
    if saved["data"] != fingerprint:
        raise ValueError("cannot resume: the training data differ from the checkpointed run; use the same data")
    if saved["world_size"] != world_size:
        raise ValueError(f"cannot resume: the run used {saved['world_size']} processes, this one {world_size}; use the same number")


# -- batches across ranks -------------------------------------------------------------------------


def shard(arrays: Arrays, rank: int, size: int) -> Arrays:
    """This rank's rows of a global batch, arrays with ndim >= 2 widened on axis 1 to a multiple of
    PAD_MULTIPLE. A rank left without rows gets row 0 with the last array (the weight) zeroed."""
    arrays = list(arrays)
    if size > 1:
        rows = mx.arange(rank, arrays[0].shape[0], size)
        if rows.size == 0:
            arrays = [a[:1] for a in arrays]
            arrays[-1] = mx.zeros_like(arrays[-1])
        else:
            arrays = [a[rows] for a in arrays]
    for i, a in enumerate(arrays):
        extra = -a.shape[1] % PAD_MULTIPLE if a.ndim >= 2 else 0
        if extra:
            arrays[i] = mx.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))
    return tuple(arrays)


def _stream(data: BatchSource, consumed: int) -> Iterator[Tuple[List[int], Arrays]]:
    """Global micro-batches from position ``consumed`` on, epoch after epoch."""
    per_epoch = len(data)
    epoch, start = divmod(consumed, per_epoch)
    while True:
        yield from data.batches(epoch, start)
        epoch, start = epoch + 1, 0


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


def _scalars(extras: Dict[str, mx.array], n: float) -> Dict[str, float]:
    return {k: v.item() / n if n else float("nan") for k, v in extras.items()}


def evaluate(model, loss: LossFn, data: BatchSource, args: LoopArgs, group=None) -> Dict[str, float]:
    """``{"loss", "count", **extras}`` (means over ``count``) of ``data`` in eval mode, over the first
    ``args.val_batches`` micro-batches (all by default), summed over the ranks of ``group``."""
    group = group or mx.distributed.init()
    was_training = model.training
    model.eval()
    total, count, extras = mx.array(0.0), mx.array(0.0), {}
    for i, (_, arrays) in enumerate(data.batches(0, 0)):
        if args.val_batches is not None and i >= args.val_batches:
            break
        s, n, ex = loss(model, *shard(arrays, group.rank(), group.size()))
        total, count = total + s, count + n
        extras = {k: extras.get(k, 0.0) + v for k, v in ex.items()}
        mx.eval(total, count, extras)
    total, count, extras = _all_sum_tree((total, count, extras), group)
    model.train(was_training)
    n = count.item()
    extras.pop("tokens", None)
    return {"loss": total.item() / n if n else float("nan"), "count": n, **_scalars(extras, n)}


def train(model, loss: LossFn, train_data: BatchSource, val_data: Optional[BatchSource], args: LoopArgs, *,
          saver: Saver, fingerprint: Dict[str, Any], run_config: Dict[str, Any],
          callback: Optional[TrainingCallback] = None) -> Dict[str, Any]:
    """Train the unfrozen parameters of ``model`` on ``loss`` over ``train_data``.

    ``run_config`` (the objective's settings, JSON-able) and ``fingerprint`` (the data's identity) must
    match to resume. With ``args.resume`` the newest checkpoint is restored (trainable parameters,
    optimizer, data position, PRNG keys), so the run continues with the losses of an uninterrupted one.
    Only rank 0 writes files and calls ``callback``. Ctrl-C saves a checkpoint of the last finished
    step (single process) and re-raises ``KeyboardInterrupt``.
    Returns ``{"steps", "loss", "val_loss", "val", "output_dir", "interrupted"}``."""
    group = mx.distributed.init()
    rank, world = group.rank(), group.size()
    out = Path(args.output_dir)
    problem, ckpt = None, None
    try:
        args.validate(world)
        if len(train_data) == 0:
            raise ValueError("the training data is empty")
        if not tree_flatten(model.trainable_parameters()):
            raise ValueError("the model has no trainable parameters; apply adapters or unfreeze it first")
        ckpt = prepare_output(out, args.resume) if rank == 0 else latest_checkpoint(out) if args.resume else None
        if args.resume and ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {out / CHECKPOINTS_DIR} to resume from")
    except (ValueError, FileNotFoundError) as e:
        problem = e
    if world > 1:  # every rank checks before rank 0 writes anything, and all stop if one objects
        objections = mx.distributed.all_sum(mx.array(float(problem is not None)), group=group).item()
        if objections and problem is None:
            problem = ValueError("another process rejected the training settings; see its error")
    if problem is not None:
        raise problem
    lead = rank == 0
    cb = callback if (callback is not None and lead) else TrainingCallback()
    run_config = full_config(run_config, args)

    steps = total_steps(args, len(train_data))
    saved = None
    if ckpt is not None:  # checked before the model is touched
        saved = json.loads((ckpt / STATE_FILE).read_text())
        _check_resumable(saved, run_config, fingerprint, world)

    model.train()
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    optimizer = make_optimizer(args, steps)
    optimizer.init(model.trainable_parameters())
    mx.random.seed(_rank_seed(args.seed, rank))  # dropout: one stream per rank

    start_step, consumed = 0, 0
    if saved is not None:
        _load_checkpoint(ckpt, model, optimizer, saver)
        start_step, consumed = saved["step"], saved["micro_batches"]
        _set_random_key(saved["random_keys"][rank])
        if lead:
            for name in (METRICS_FILE, DATA_ORDER_FILE, f"{CHECKPOINTS_DIR}/{CHECKPOINT_MANIFEST}"):
                _truncate_jsonl(out / name, start_step)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_CONFIG_FILE, run_config)
        write_json(out / DATA_MANIFEST_FILE, {"seed": args.seed, "world_size": world, **fingerprint})

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(arrays, acc):
        (s, n, extras), grads = loss_and_grad(model, *arrays)
        if acc is not None:
            s, n = s + acc[0], n + acc[1]
            extras = {k: v + acc[2][k] for k, v in extras.items()}
            grads = tree_map(mx.add, grads, acc[3])
        return s, n, extras, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update(s, n, extras, grads):
        s, n, extras, grads = _all_sum_tree((s, n, extras, grads), group)
        grads = tree_map(lambda g: g / n, grads)
        if args.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, args.max_grad_norm)  # norm before clipping
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return s / n, norm, n, extras

    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    cb.on_start({"total_steps": steps, "start_step": start_step, "train_batches": len(train_data),
                 "val_batches": len(val_data) if val_data is not None else 0,
                 "trainable_parameters": n_trainable, "world_size": world})
    files = {name: open(out / name, "a") for name in (METRICS_FILE, DATA_ORDER_FILE)} if lead else {}

    def log(name: str, line: Dict[str, Any]) -> None:
        if name in files:
            files[name].write(json.dumps(line) + "\n")
            files[name].flush()

    progress = {"saved_step": start_step}

    def checkpoint(step: int, micro_batches: int, val_loss: Optional[float]) -> None:
        progress["saved_step"] = step
        keys = mx.array([_random_key()], dtype=mx.uint32)
        if world > 1:
            keys = mx.distributed.all_gather(keys, group=group)
            mx.eval(keys)  # every rank must take part, not only the one that writes
        if lead:
            per_epoch = len(train_data)
            ckpt_state = {"step": step, "micro_batches": micro_batches, "epoch": micro_batches // per_epoch,
                          "batch_in_epoch": micro_batches % per_epoch, "random_keys": np.array(keys).tolist(),
                          "world_size": world, "data": fingerprint, "run_config": run_config}
            cb.on_save(_save_checkpoint(out, step, model, optimizer, ckpt_state, saver, args.keep_checkpoints, val_loss))

    stream = _stream(train_data, consumed)
    loss_value = val_loss = float("nan")
    val: Dict[str, float] = {}
    step, done_consumed, interrupted = start_step, consumed, False
    scales = getattr(loss, "scales", {})  # extras the objective returns unscaled (see LossFn)
    logged = {"step": start_step}  # the last step whose record lines are written
    records: List[int] = []
    try:
        for step in range(start_step + 1, steps + 1):
            tic = time.perf_counter()
            acc, records = None, []
            for _ in range(args.grad_accum):
                ids, arrays = next(stream)
                records.extend(int(i) for i in ids)
                acc = accumulate(shard(arrays, rank, world), acc)
                mx.eval(acc)
                consumed += 1
            loss_a, norm_a, count_a, extras_a = update(*acc)
            mx.eval(state, loss_a, norm_a, count_a, extras_a)
            done_consumed = consumed
            seconds = time.perf_counter() - tic
            loss_value, count = loss_a.item(), count_a.item()
            tokens = extras_a.pop("tokens", count_a).item()
            extras = {k: v * scales.get(k, 1.0) for k, v in _scalars(extras_a, count).items()}
            line = {"step": step, "epoch": round(consumed / len(train_data), 4), "tokens": int(tokens), "loss": loss_value,
                    "lr": optimizer.learning_rate.item(), "grad_norm": norm_a.item(), "tokens_per_sec": tokens / seconds,
                    "peak_memory_gb": kernels.peak_memory() / 1e9, **extras}
            log(METRICS_FILE, line)
            log(DATA_ORDER_FILE, {"step": step, "records": records})
            logged["step"] = step
            cb.on_step(line)

            evaluated = None
            if val_data is not None and len(val_data) and ((args.steps_per_eval and step % args.steps_per_eval == 0) or step == steps):
                tic = time.perf_counter()
                val = evaluate(model, loss, val_data, args, group)
                val = {k: v * scales.get(k, 1.0) for k, v in val.items()}
                val_loss = val["loss"]
                vline = {"step": step, "val_loss": val_loss, "val_count": val["count"], "val_seconds": time.perf_counter() - tic,
                         **{f"val_{k}": v for k, v in val.items() if k not in ("loss", "count")}}
                log(METRICS_FILE, vline)
                cb.on_val(vline)
                evaluated = val_loss

            if args.save_every and step % args.save_every == 0 and step < steps:
                checkpoint(step, consumed, evaluated)
    except KeyboardInterrupt:
        interrupted = True
        # Ctrl-C lands right after the C++ call it interrupts returns, so read what was applied from the
        # optimizer's own step counter rather than from Python bookkeeping
        last = int(optimizer.step.item())  # restored with the optimizer state on resume
        if last > logged["step"]:  # the step's update was applied but its record lines not written
            loss_now = mx.array(float("nan")) if last != step else loss_a
            log(METRICS_FILE, {"step": last, "loss": loss_now.item(), "note": "interrupted before this line was complete"})
            log(DATA_ORDER_FILE, {"step": last, "records": records})
            done_consumed = consumed if last == step else done_consumed
        if world == 1 and lead and last > progress["saved_step"]:
            checkpoint(last, done_consumed if last < step else consumed, None)  # resumable: the last applied step
        raise
    finally:
        for f in files.values():
            f.close()

    if lead:
        saver.save(out, model)
        cb.on_save(out)
    return {"steps": steps, "loss": loss_value, "val_loss": val_loss, "val": val, "output_dir": str(out),
            "interrupted": interrupted}

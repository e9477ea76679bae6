"""Supervised fine-tuning (LoRA / DoRA / QLoRA) on LLM-Adapters records: an objective over ``train.loop``.

The loss is the mean token cross-entropy over every trained target token of a step, plus CoreNet's
z-loss when ``z_loss > 0``: ``z_loss * mean over trained tokens of logsumexp(logits)^2`` (CoreNet
``CrossEntropyLM`` with ``use_z_loss``; its PEFT configs use 1e-4). CoreNet also adds a constant
``(log V)^2`` for every ignored position (it zeroes their logits before the logsumexp); that changes
the reported value, never the gradient, and is left out here.

Output folder: ``adapters.safetensors`` + ``adapter_config.json`` (final adapters) and the training
record of ``train.loop`` (metrics, data order, checkpoints with adapters).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..adapters import ADAPTER_TYPES, ADAPTERS_FILE, LoRAConfig, apply_adapters, save_adapters
from ..data import batch_indices, encode_record, pad_batch
from ..utils import write_json
from . import loop
from .loop import LoopArgs, Saver, TrainingCallback

ARGS_FILE = "training_args.json"


@dataclass
class TrainingArgs(LoopArgs):
    """Fine-tuning settings. Defaults follow CoreNet's OpenELM PEFT recipe (cosine 3e-4 -> 3e-5,
    AdamW betas (0.9, 0.95), weight decay 0, gradient clipping 1.0, LoRA r32/alpha32/dropout 0.1 on
    qkv_proj, out_proj, proj_1, proj_2) and LLM-Adapters' commonsense run where CoreNet's does not fit
    one machine (3 epochs, 16 sequences per update as 4 x 4 accumulation, cutoff 256 tokens,
    train_on_inputs, 100 warmup steps, uniform shuffling). ``recipes/`` holds the exact recipes."""

    adapter: LoRAConfig = field(default_factory=LoRAConfig)
    cutoff_len: int = field(default=256, metadata={"help": "Truncate each prompt + answer to this many tokens."})
    train_on_inputs: bool = field(default=True, metadata={"help": "Loss on the whole prompt, or only on the answer."})
    z_loss: float = field(default=0.0, metadata={"help": "CoreNet's z-loss coefficient (its recipe: 1e-4); 0 disables."})
    group_by_length: bool = field(default=False, metadata={"help": "Batch examples of similar length (faster; not what "
                                                                    "LLM-Adapters or CoreNet do, who shuffle uniformly)."})

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["adapter"] = self.adapter.to_dict()
        return d

    def validate(self, world_size: int = 1, context_length: Optional[int] = None) -> None:
        super().validate(world_size)
        if self.cutoff_len < 2:
            raise ValueError(f"cutoff_len must be >= 2 tokens, got {self.cutoff_len}")
        if context_length is not None and self.cutoff_len > context_length:
            raise ValueError(f"cutoff_len {self.cutoff_len} exceeds the model's {context_length}-token context")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")


class EncodedBatches:
    """``loop.BatchSource`` over ``encode_record`` pairs: arrays ``(inputs, targets, loss_mask)``."""

    def __init__(self, encoded: Sequence[Tuple[List[int], List[int]]], batch_size: int, *, shuffle: bool,
                 seed: int = 0, bucket: bool = False):
        self.encoded, self.batch_size, self.shuffle, self.seed, self.bucket = encoded, batch_size, shuffle, seed, bucket
        self.lengths = [len(ids) for ids, _ in encoded]
        if any(n < 2 for n in self.lengths):
            raise ValueError("every example needs at least 2 tokens; raise cutoff_len")

    def __len__(self) -> int:
        return math.ceil(len(self.encoded) / self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[List[int], Tuple[mx.array, ...]]]:
        order = batch_indices(self.lengths, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch, bucket=self.bucket)
        for idx in order[start:]:
            yield idx.tolist(), pad_batch(self.encoded, idx)


def token_loss(z_loss: float = 0.0):
    """``loss(model, inputs, targets, mask) -> (Σ masked CE [+ z-loss], Σ mask, {["z_loss"]})``; the loop
    counts trained tokens as Σ mask."""

    def loss(model, inputs: mx.array, targets: mx.array, mask: mx.array):
        logits = model(inputs).astype(mx.float32)
        mask = mask.astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets, reduction="none")
        total = (ce * mask).sum()
        extras = {}
        if z_loss > 0:
            z = (mx.logsumexp(logits, axis=-1) ** 2 * mask).sum()
            total = total + z_loss * z
            extras["z_loss"] = z  # raw: the loop scales it by loss.scales (see train.loop.LossFn)
        return total, mask.sum(), extras

    loss.scales = {"z_loss": z_loss}
    return loss


def loss_sums(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """``(sum of masked token cross-entropies, number of masked tokens)``, both float32."""
    s, n, _ = token_loss()(model, inputs, targets, mask)
    return s, n


def records_sha256(records: Sequence[dict]) -> str:
    """sha256 of the records as canonical JSON: the dataset's identity in the training record."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare_model(model: nn.Module, config: LoRAConfig, seed: int) -> nn.Module:
    """Add ``config``'s adapters to ``model`` (frozen base; float or quantized = QLoRA), initialised
    from ``seed`` (identical on every rank)."""
    if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
        raise ValueError("the model already has adapters; pass a model without adapters")
    mx.random.seed(seed)
    return apply_adapters(model, **config.to_dict())


def adapter_saver(config: LoRAConfig) -> Saver:
    return Saver(file=ADAPTERS_FILE, save=lambda folder, model: save_adapters(folder, model, config))


def train(model, tokenizer, train_set: Sequence[dict], val_set: Sequence[dict], args: TrainingArgs,
          callback: Optional[TrainingCallback] = None) -> Dict[str, Any]:
    """Add ``args.adapter`` adapters to ``model`` and train them on LLM-Adapters records
    (``instruction``/``input``/``output``) with ``train.loop``. Returns the loop's result dict."""
    context = getattr(getattr(model, "args", None), "max_context_length", None)
    args.validate(mx.distributed.init().size(), context)
    if not train_set:
        raise ValueError("the training data has no records; give records with instruction and output fields")
    encode = lambda records: [encode_record(tokenizer, r, args.cutoff_len, args.train_on_inputs) for r in records]
    train_enc, val_enc = encode(train_set), encode(val_set)
    fingerprint = {"dataset_sha256": records_sha256(train_set), "records": len(train_enc),
                   "tokens": int(sum(len(ids) for ids, _ in train_enc))}
    run_config = {k: v for k, v in args.to_dict().items() if k not in asdict(LoopArgs())}
    world = mx.distributed.init()
    if world.rank() == 0:  # before the model is touched: a run that cannot start changes nothing
        loop.resume_state(args, run_config, fingerprint, world.size())
    prepare_model(model, args.adapter, args.seed)
    result = loop.train(
        model, token_loss(args.z_loss),
        EncodedBatches(train_enc, args.batch_size, shuffle=True, seed=args.seed, bucket=args.group_by_length),
        EncodedBatches(val_enc, args.batch_size, shuffle=False) if val_enc else None,
        args, saver=adapter_saver(args.adapter), fingerprint=fingerprint, run_config=run_config, callback=callback,
    )
    if mx.distributed.init().rank() == 0:
        write_json(Path(args.output_dir) / ARGS_FILE, args.to_dict())
    return result

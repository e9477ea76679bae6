"""Preference tuning (DPO / hinge / IPO) on the generic training loop: how OpenELM-Instruct was made.

The objective is TRL's ``DPOTrainer`` (v0.8, the version alignment-handbook ran for Apple): with
``π`` the policy's and ``ref`` the frozen reference's log-probability of a response (summed over its
tokens; averaged for IPO) and ``logits = (π_c − π_r) − (ref_c − ref_r)``,

    sigmoid  −logsigmoid(β·logits)          (standard DPO; 1.1B)
    hinge    relu(1 − β·logits)             (SLiC; 270M, 450M, 3B)
    ipo      (logits − 1/(2β))²

and the logged rewards are ``β(π_c − ref_c)``, ``β(π_r − ref_r)``, their margin and whether the
chosen one is larger. The reference needs two numbers per pair, so they are computed once before
training (batched, eval mode, no gradient) and cached on disk under a key of the model's weights
and the token ids; no second model is ever held in memory. With adapters the reference is the base
before the adapters are attached (= the base with adapters off); with full fine-tuning it is the
initial weights.

A micro-batch holds pairs: per pair the chosen and rejected inputs/targets/masks (same width), the
two reference values, the pair's token count and a row weight (last array, as the loop expects); the
loss runs chosen and rejected through the model as one batch of 2B rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..adapters import ADAPTER_TYPES, LoRAConfig, apply_adapters
from ..data import PAD_ID, batch_indices
from ..utils import atomic_write, read_recipe
from .dpo_data import EncodedPair, PreferencePair, data_hash, encode_pairs
from . import loop as train_loop
from .loop import TrainingCallback
from .sft import adapter_saver

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
METHODS = ("lora", "dora", "full")
RECIPES = ("openelm-270M", "openelm-450M", "openelm-1_1B", "openelm-3B")
RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
MODEL_FILE = "model.safetensors"  # trainable parameters of a full fine-tuning checkpoint
MODEL_DIR = "model"  # the full fine-tuned model folder inside output_dir


# -- the losses ----------------------------------------------------------------------------------


def preference_loss(policy_chosen: mx.array, policy_rejected: mx.array, ref_chosen: mx.array, ref_rejected: mx.array,
                    loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0
                    ) -> Tuple[mx.array, mx.array, mx.array]:
    """``(losses, chosen_rewards, rejected_rewards)`` per pair, as TRL's ``DPOTrainer.dpo_loss``;
    inputs are per-pair sequence log-probs (averaged per token for ``ipo``). Rewards carry no gradient."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits) * (1 - label_smoothing) - nn.log_sigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = mx.maximum(1 - beta * logits, 0.0)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * mx.stop_gradient(policy_chosen - ref_chosen)
    rejected_rewards = beta * mx.stop_gradient(policy_rejected - ref_rejected)
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model, inputs: mx.array, targets: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """``(Σ masked log p(target), number of masked tokens)`` per row, in float32 (float64 for a
    float64 model)."""
    logits = model(inputs)
    dtype = mx.float64 if logits.dtype == mx.float64 else mx.float32
    logits = logits.astype(dtype)
    token = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
    mask = mask.astype(dtype)
    return (token * mask).sum(axis=-1), mask.sum(axis=-1)


def make_loss(loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0) -> Callable:
    """The loop's loss over a preference micro-batch (see the module docstring): returns
    ``(Σ loss, Σ weight = pairs, {rewards/..., logps/...: Σ, "tokens": tokens of both sequences})``."""
    average = loss_type == "ipo"
    preference_loss(mx.zeros(1), mx.zeros(1), mx.zeros(1), mx.zeros(1), loss_type, beta)  # validates loss_type

    def loss(model, c_in, c_tgt, c_mask, r_in, r_tgt, r_mask, ref_c, ref_r, n_tokens, weight):
        b = c_in.shape[0]
        lp, n = sequence_logps(model, mx.concatenate([c_in, r_in]), mx.concatenate([c_tgt, r_tgt]), mx.concatenate([c_mask, r_mask]))
        if average:
            lp = lp / mx.maximum(n, 1.0)
        pc, pr = lp[:b], lp[b:]
        losses, rc, rr = preference_loss(pc, pr, ref_c, ref_r, loss_type, beta, label_smoothing)
        w = weight.astype(lp.dtype)
        extras = {
            "rewards/chosen": (rc * w).sum(), "rewards/rejected": (rr * w).sum(), "rewards/margins": ((rc - rr) * w).sum(),
            "rewards/accuracies": ((rc > rr).astype(w.dtype) * w).sum(),
            "logps/chosen": (mx.stop_gradient(pc) * w).sum(), "logps/rejected": (mx.stop_gradient(pr) * w).sum(),
            "tokens": (n_tokens.astype(w.dtype) * w).sum(),  # the loop's token count (tokens/s): both sequences
        }
        return (losses * w).sum(), w.sum(), extras

    return loss


# -- batches -------------------------------------------------------------------------------------


def pair_arrays(encoded: Sequence[EncodedPair], idx: Sequence[int]) -> Tuple[np.ndarray, ...]:
    """Right-padded ``(c_in, c_tgt, c_mask, r_in, r_tgt, r_mask)`` of the pairs ``idx``, all [B, W]
    with one width W for both responses; the mask is 1 on response targets."""
    width = max(encoded[i].length for i in idx) - 1
    out = []
    for which in ("chosen", "rejected"):
        inputs = np.full((len(idx), width), PAD_ID, np.int32)
        targets = np.full((len(idx), width), PAD_ID, np.int32)
        mask = np.zeros((len(idx), width), np.float32)
        for row, i in enumerate(idx):
            ids, start = getattr(encoded[i], which), getattr(encoded[i], f"{which}_start")
            n = len(ids) - 1
            inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
            mask[row, max(start - 1, 0):n] = 1.0  # target t = ids[t + 1] is scored when t + 1 >= start
        out += [inputs, targets, mask]
    return tuple(out)


class PreferenceBatches:
    """The loop's ``BatchSource`` over encoded pairs and their reference values (already in loss
    units: summed log-probs, or per-token means for IPO). Shuffled order depends only on
    (seed, epoch); unshuffled (validation) batches are sorted by length."""

    def __init__(self, encoded: Sequence[EncodedPair], ref_chosen: np.ndarray, ref_rejected: np.ndarray, batch_size: int,
                 *, shuffle: bool, seed: int = 0):
        if len(ref_chosen) != len(encoded) or len(ref_rejected) != len(encoded):
            raise ValueError("need one reference value per pair for chosen and rejected")
        self.encoded, self.batch_size, self.shuffle, self.seed = list(encoded), batch_size, shuffle, seed
        self.ref_chosen = np.asarray(ref_chosen, np.float32)
        self.ref_rejected = np.asarray(ref_rejected, np.float32)
        self.lengths = [e.length for e in self.encoded]

    def __len__(self) -> int:
        return -(-len(self.encoded) // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tuple[List[int], Tuple[mx.array, ...]]]:
        for idx in batch_indices(self.lengths, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch)[start:]:
            idx = [int(i) for i in idx]
            arrays = pair_arrays(self.encoded, idx)
            n_tokens = np.array([len(self.encoded[i].chosen) + len(self.encoded[i].rejected) for i in idx], np.float32)
            ref = (self.ref_chosen[idx], self.ref_rejected[idx], n_tokens, np.ones(len(idx), np.float32))
            yield idx, tuple(mx.array(a) for a in arrays + ref)


# -- reference log-probs -------------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes: the model half of the cache key."""
    h = hashlib.sha256()
    for name, v in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if v.dtype == mx.bfloat16:
            v = v.view(mx.uint16)
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}\n".encode())
        h.update(np.ascontiguousarray(np.array(v, copy=False)).tobytes())
    return h.hexdigest()


def reference_logps(model, encoded: Sequence[EncodedPair], batch_size: int = 8, progress=None) -> Dict[str, np.ndarray]:
    """Summed response log-probs and token counts of every pair under ``model`` in eval mode:
    ``{"chosen", "chosen_tokens", "rejected", "rejected_tokens"}`` (float64 / int arrays), computed
    longest batch first, without gradients."""
    was_training = model.training
    model.eval()
    n = len(encoded)
    out = {k: np.zeros(n, np.float64) for k in ("chosen", "rejected")}
    out.update({f"{k}_tokens": np.zeros(n, np.int64) for k in ("chosen", "rejected")})
    order = sorted(range(n), key=lambda i: -encoded[i].length)
    try:
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            c_in, c_tgt, c_mask, r_in, r_tgt, r_mask = (mx.array(a) for a in pair_arrays(encoded, idx))
            lp, cnt = sequence_logps(model, mx.concatenate([c_in, r_in]), mx.concatenate([c_tgt, r_tgt]), mx.concatenate([c_mask, r_mask]))
            mx.eval(lp, cnt)
            lp, cnt, b = np.array(lp), np.array(cnt), len(idx)
            out["chosen"][idx], out["rejected"][idx] = lp[:b], lp[b:]
            out["chosen_tokens"][idx], out["rejected_tokens"][idx] = cnt[:b], cnt[b:]
            if progress is not None:
                progress("reference log-probs", min(s + batch_size, n), n)
    finally:
        model.train(was_training)
    return out


def cached_reference_logps(model, encoded: Sequence[EncodedPair], cache_dir, *, model_key: Optional[str] = None,
                           batch_size: int = 8, progress=None) -> Tuple[Dict[str, np.ndarray], str, bool]:
    """``(reference_logps(...), cache key, cache hit)``. The key is sha256 of the model fingerprint and
    the data hash; the values live in ``cache_dir/<key>.npz`` (written atomically)."""
    model_key = model_key or model_fingerprint(model)
    key = hashlib.sha256(f"{model_key}\n{data_hash(encoded)}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            values = {k: z[k] for k in z.files}
        if all(len(v) == len(encoded) for v in values.values()) and len(values) == 4:
            return values, key, True
    values = reference_logps(model, encoded, batch_size, progress)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(p: str) -> None:
        with open(p, "wb") as f:
            np.savez(f, **values)

    atomic_write(path, write)
    return values, key, False


def in_loss_units(ref: Dict[str, np.ndarray], loss_type: str) -> Tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) reference values as the loss uses them: sums, or per-token means for IPO."""
    if loss_type == "ipo":
        return (ref["chosen"] / np.maximum(ref["chosen_tokens"], 1), ref["rejected"] / np.maximum(ref["rejected_tokens"], 1))
    return ref["chosen"], ref["rejected"]


# -- settings and recipes ------------------------------------------------------------------------


@dataclass
class DPOArgs:
    """Preference-tuning settings: the objective, the adapters (or full fine-tuning) and the loop's
    optimizer/bookkeeping settings. Defaults follow Apple's OpenELM-Instruct recipe where it does
    not depend on the model size (β 0.01, lengths 1024/512, cosine, warmup 10%, AdamW (0.9, 0.999),
    no weight decay, clipping 1.0, seed 42); the per-size parts are in ``recipes/``."""

    loss_type: str = "hinge"
    beta: float = 0.01
    label_smoothing: float = 0.0
    max_length: int = 1024
    max_prompt_length: int = 512
    method: str = "lora"  # lora | dora | full
    adapter: LoRAConfig = field(default_factory=LoRAConfig)
    ref_batch_size: int = 8
    reference_cache: Optional[str] = None  # folder of cached reference log-probs; None: <cache_dir>/dpo-reference
    loop: "train_loop.LoopArgs" = field(default_factory=lambda: train_loop.LoopArgs(
        output_dir="dpo", learning_rate=5e-5, min_learning_rate=0.0, warmup=0.1, warmup_init=0.0, betas=(0.9, 0.999),
        batch_size=8, grad_accum=2, epochs=5.0, seed=42))

    def validate(self) -> None:
        checks = [
            (self.loss_type in LOSS_TYPES, f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"),
            (self.beta > 0, f"beta must be positive, got {self.beta}"),
            (0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (self.label_smoothing == 0 or self.loss_type == "sigmoid", "label_smoothing applies to the sigmoid loss only"),
            (1 <= self.max_prompt_length < self.max_length,
             f"need 1 <= max_prompt_length < max_length, got {self.max_prompt_length} and {self.max_length}"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.ref_batch_size >= 1, f"ref_batch_size must be >= 1, got {self.ref_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def run_config(self) -> Dict[str, Any]:
        """The objective's settings (must match on resume)."""
        return {"objective": "dpo", "loss_type": self.loss_type, "beta": self.beta, "label_smoothing": self.label_smoothing,
                "max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "method": self.method,
                "adapter": None if self.method == "full" else self.adapter_config().to_dict()}

    def adapter_config(self) -> LoRAConfig:
        return LoRAConfig(**{**self.adapter.to_dict(), "use_dora": self.method == "dora"})


LOOP_FIELDS = ("learning_rate", "min_learning_rate", "warmup", "warmup_init", "betas", "eps", "weight_decay", "batch_size",
               "grad_accum", "max_grad_norm", "iters", "epochs", "seed")
OBJECTIVE_FIELDS = ("loss_type", "beta", "label_smoothing", "max_length", "max_prompt_length", "method")


def load_recipe(name: str) -> Dict[str, Any]:
    """The settings of ``recipes/<name>-dpo.yaml`` (``openelm-270M`` ... ``openelm-3B``) or of a YAML path."""
    path = Path(name)
    if not path.is_file():
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)} or give a YAML file")
        path = RECIPE_DIR / f"{name}-dpo.yaml"
    return read_recipe(path, {*LOOP_FIELDS, *OBJECTIVE_FIELDS, "model"})


def dpo_args(recipe: Optional[Dict[str, Any]] = None, **overrides) -> DPOArgs:
    """``DPOArgs`` from the defaults, then ``recipe``, then ``overrides`` (None values are skipped:
    explicit settings win over the recipe). Loop fields and ``output_dir``/``resume``/... go to ``loop``."""
    values = {k: v for k, v in {**(recipe or {}), **overrides}.items() if v is not None and k != "model"}
    args = DPOArgs()
    loop_names = set(asdict(args.loop))
    for k, v in values.items():
        if k == "betas":
            v = tuple(v)
        if k in loop_names:
            setattr(args.loop, k, v)
        elif k in DPOArgs.__dataclass_fields__:
            setattr(args, k, v)
        else:
            raise ValueError(f"unknown DPO setting {k!r}")
    return args


# -- training ------------------------------------------------------------------------------------


def _full_saver() -> "train_loop.Saver":
    def save(folder: Path, model) -> None:
        weights = dict(tree_flatten(model.trainable_parameters()))
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(folder) / MODEL_FILE, lambda p: mx.save_safetensors(p, weights, metadata={"format": "mlx"}))

    return train_loop.Saver(MODEL_FILE, save)


def run_dpo(model, tokenizer, train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair], args: DPOArgs, *,
            model_source=None, callback: Optional[TrainingCallback] = None, progress=None) -> Dict[str, Any]:
    """Preference-tune ``model`` on ``train_pairs`` (held-out rewards on ``val_pairs``) with the generic loop.

    Steps: tokenize (TRL 0.8's exact text), reference log-probs of the untouched model (cached, see
    ``cached_reference_logps``), then attach adapters (``lora``/``dora``) or unfreeze every weight
    (``full``) and train. Output (``args.loop.output_dir``): the loop's training record plus the
    adapters (``adapters.safetensors`` + ``adapter_config.json``, for ``fuse``/``load(adapter_path=)``) or, for
    ``full``, the weights (``model.safetensors``) and, given ``model_source`` (the base's folder: config and
    tokenizer), an MLX model folder ``model/`` for ``chat``/``eval``.
    ``progress(label, done, total)`` reports tokenization and the reference pass.
    Returns the loop's result plus ``reference_cache_hit`` and ``model_path`` (full)."""
    args.validate()
    if not train_pairs:
        raise ValueError("train_pairs is empty; give preference records with prompt, chosen and rejected")
    context = getattr(getattr(model, "args", None), "max_context_length", None)
    if context is not None and args.max_length > context:
        raise ValueError(f"max_length {args.max_length} exceeds the model's context of {context} tokens; lower max_length")
    if any(isinstance(m, ADAPTER_TYPES) for _, m in model.named_modules()):
        raise ValueError("the model already has adapters; pass the base model (run_dpo attaches them, and the reference is the base)")
    if args.method == "full" and any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ValueError("full fine-tuning needs float weights; load the model unquantized or train adapters (method='lora': QLoRA)")
    from ..io.hub import cache_dir

    train_enc = encode_pairs(tokenizer, train_pairs, args.max_length, args.max_prompt_length, progress)
    val_enc = encode_pairs(tokenizer, val_pairs, args.max_length, args.max_prompt_length, progress) if val_pairs else []

    model_key = model_fingerprint(model)
    fingerprint = {"dataset_sha256": data_hash(train_enc), "records": len(train_enc),
                   "tokens": int(sum(len(e.chosen) + len(e.rejected) for e in train_enc)),
                   "val_dataset_sha256": data_hash(val_enc) if val_enc else None, "reference_model_sha256": model_key}
    world = mx.distributed.init()
    if world.rank() == 0:  # a finished or incompatible output folder fails here, before the reference pass
        train_loop.resume_state(args.loop, args.run_config(), fingerprint, world.size())

    ref_dir = Path(args.reference_cache) if args.reference_cache else cache_dir() / "dpo-reference"
    ref_train, key, hit = cached_reference_logps(model, train_enc, ref_dir, model_key=model_key, batch_size=args.ref_batch_size, progress=progress)
    ref_val = cached_reference_logps(model, val_enc, ref_dir, model_key=model_key, batch_size=args.ref_batch_size, progress=progress)[0] if val_enc else None

    loop = args.loop
    if args.method == "full":
        model.unfreeze()
        saver = _full_saver()
    else:
        config = args.adapter_config()
        mx.random.seed(loop.seed)  # adapter init: identical on every rank and on resume
        apply_adapters(model, **config.to_dict())
        saver = adapter_saver(config)

    train_src = PreferenceBatches(train_enc, *in_loss_units(ref_train, args.loss_type), loop.batch_size, shuffle=True, seed=loop.seed)
    val_src = PreferenceBatches(val_enc, *in_loss_units(ref_val, args.loss_type), loop.batch_size, shuffle=False) if val_enc else None
    loss = make_loss(args.loss_type, args.beta, args.label_smoothing)
    result = train_loop.train(model, loss, train_src, val_src, loop, saver=saver, fingerprint=fingerprint,
                   run_config=args.run_config(), callback=callback)
    result["reference_cache_hit"] = hit
    result["reference_key"] = key
    if args.method == "full" and model_source is not None and world.rank() == 0:
        from ..io.folder import MARKER, read_config, save_model

        source = Path(model_source)
        config = read_config(source) if (source / "config.json").is_file() else {}
        config.pop("quantization_config", None)
        config[MARKER] = {**config.get(MARKER, {}), "dpo": args.run_config()}
        result["model_path"] = str(save_model(Path(loop.output_dir) / MODEL_DIR, model, config, source, force=True))
    return result


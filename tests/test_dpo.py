"""Preference tuning (DPO / hinge / IPO): the exact training text of TRL 0.8 (ids against a written-out,
piecewise expectation from SentencePiece itself), the losses and rewards against TRL's formulas written
out in numpy, reference log-probs against an on-the-fly frozen copy, the policy gradient against finite
differences (float64), a learning test on a synthetic preference task (LoRA and full), exact resume,
recipes, and the ``dpo`` command (its output feeds ``fuse``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from conftest import tiny_args
from mlx_openelm.adapters import apply_adapters, load_adapters
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer, render_chat
from mlx_openelm.train import dpo
from mlx_openelm.train.dpo_data import encode_pair, encode_pairs, load_preferences, to_pair

# -- the exact training text ---------------------------------------------------------------------


def no_prefix_processor(model_path: Path):
    """The same SentencePiece model with its dummy "▁" prefix switched off in the proto (how Hugging
    Face's LlamaTokenizer(legacy=False) encodes text that follows a special token)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def expected_ids(sp_model_path: Path, prompt: str, response: str):
    """``<s><|system|>\\n</s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n{response}</s>\\n</s>`` built piece by
    piece: BOS, the first text with SentencePiece's dummy prefix, every text after a ``</s>`` without it."""
    import sentencepiece as spm

    sp, bare = spm.SentencePieceProcessor(model_file=str(sp_model_path)), no_prefix_processor(sp_model_path)
    bos, eos = 1, 2
    prompt_ids = [bos] + sp.encode("<|system|>\n") + [eos] + bare.encode(f"\n<|user|>\n{prompt}") + [eos]
    tail = bare.encode(f"\n<|assistant|>\n{response}")  # "\n" then the assistant turn: one text after </s>
    newline = bare.encode("\n")
    assert tail[: len(newline)] == newline  # the prompt's last "\n" is a token of its own
    prompt_ids += newline
    return prompt_ids, tail[len(newline):] + [eos] + newline + [eos]


UF_ROW = {
    "prompt": "Is the cat on the mat?",
    "chosen": [{"content": "Is the cat on the mat?", "role": "user"}, {"content": "The cat sat on the mat.", "role": "assistant"}],
    "rejected": [{"content": "Is the cat on the mat?", "role": "user"}, {"content": "Red tree.", "role": "assistant"}],
}


def test_training_text_ids_equal_the_written_out_sequence(sp_model_path):
    tok = Tokenizer(sp_model_path.parent)
    enc = encode_pair(tok, to_pair(UF_ROW, "row"), max_length=1024, max_prompt_length=512)
    prompt, chosen = expected_ids(sp_model_path, UF_ROW["prompt"], "The cat sat on the mat.")
    _, rejected = expected_ids(sp_model_path, UF_ROW["prompt"], "Red tree.")
    assert enc.chosen == prompt + chosen and enc.chosen_start == len(prompt)
    assert enc.rejected == prompt + rejected and enc.rejected_start == len(prompt)
    # The scored tokens (mask) are exactly the response's: the prompt is masked.
    arrays = dpo.pair_arrays([enc], [0])
    c_tgt, c_mask = arrays[1][0], arrays[2][0]
    assert list(c_tgt[c_mask > 0]) == chosen and c_mask.sum() == len(chosen)
    # String answers give the same pair as the dataset's message lists.
    flat = {"prompt": UF_ROW["prompt"], "chosen": "The cat sat on the mat.", "rejected": "Red tree."}
    assert encode_pair(tok, to_pair(flat), 1024, 512) == enc
    # An explicit system turn replaces the empty one.
    with_system = {**UF_ROW, "chosen": [{"role": "system", "content": "Be brief."}] + UF_ROW["chosen"]}
    assert to_pair(with_system).prompt[0] == {"role": "system", "content": "Be brief."}


def test_truncation_is_trl_keep_end_then_response(sp_model_path):
    tok = Tokenizer(sp_model_path.parent)
    long_prompt = " ".join(["the red cat sat on the mat"] * 6)
    row = {"prompt": long_prompt, "chosen": "The dog runs fast and the cat sat on the mat.", "rejected": "Blue."}
    prompt, chosen = expected_ids(sp_model_path, long_prompt, row["chosen"])
    _, rejected = expected_ids(sp_model_path, long_prompt, row["rejected"])
    longer = max(len(chosen), len(rejected))
    # Room for everything: nothing is cut.
    enc = encode_pair(tok, to_pair(row), len(prompt) + longer, 8)
    assert enc.chosen == prompt + chosen
    # One token short: the prompt keeps its last 8 tokens (BOS included in what is cut, as TRL 0.8).
    max_length, max_prompt = len(prompt) + longer - 1, 8
    enc = encode_pair(tok, to_pair(row), max_length, max_prompt)
    assert enc.chosen == prompt[-max_prompt:] + chosen and enc.chosen_start == max_prompt
    assert enc.rejected == prompt[-max_prompt:] + rejected
    # Still too long after the prompt cut: responses keep max_length - max_prompt_length tokens.
    max_length = max_prompt + longer - 3
    enc = encode_pair(tok, to_pair(row), max_length, max_prompt)
    assert enc.chosen == prompt[-max_prompt:] + chosen[: max_length - max_prompt]
    assert enc.rejected == prompt[-max_prompt:] + rejected[: max_length - max_prompt]


@pytest.mark.parametrize("item, message", [
    ([1, 2], "JSON object"),
    ({"prompt": "p", "chosen": "a"}, "'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "string 'prompt'"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}], "rejected": "b"}, "last message"),
    ({"prompt": "p", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "unknown role"),
])
def test_bad_records_name_the_line(tmp_path, item, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(UF_ROW) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_preferences(path)
    assert f"{path}:2" in str(e.value)


# -- losses and rewards --------------------------------------------------------------------------


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def trl_formulas(pc, pr, rc, rr, loss_type, beta, ls=0.0):
    """TRL 0.8 DPOTrainer.dpo_loss, written out in float64 numpy."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -np_logsigmoid(beta * logits) * (1 - ls) - np_logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("loss_type, beta, ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.01, 0.0), ("sigmoid", 0.5, 0.2),
                                                 ("hinge", 0.01, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.01, 0.0)])
def test_losses_and_rewards_equal_trl_formulas(loss_type, beta, ls):
    rng = np.random.default_rng(0)
    # hand-made log-probs: chosen better, worse, equal; large margins so hinge both saturates and not
    pc = np.array([-10.0, -50.0, -7.5, -300.0, -3.0, -120.0])
    pr = np.array([-12.0, -20.0, -7.5, -100.0, -90.0, -121.0])
    rc = pc + rng.normal(0, 5, 6)
    rr = pr + rng.normal(0, 5, 6)
    got = dpo.preference_loss(*(mx.array(v, dtype=mx.float32) for v in (pc, pr, rc, rr)), loss_type, beta, ls)
    want = trl_formulas(pc, pr, rc, rr, loss_type, beta, ls)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), w, rtol=2e-5, atol=2e-5)
    if loss_type == "hinge" and beta == 0.5:
        assert (want[0] == 0).any() and (want[0] > 0).any()  # the case covers both sides of the hinge


def tiny_model(seed=0, **overrides) -> Model:
    return init_weights(Model(tiny_args(**{"num_transformer_layers": 2, **overrides})), seed)


def np_sequence_logps(model, ids, start):
    """Summed log p of ids[start:] given the prefix, from one unpadded forward pass, in float64."""
    logits = np.array(model(mx.array([ids[:-1]])).astype(mx.float32), dtype=np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    tok = logp[np.arange(len(ids) - 1), ids[1:]]
    return tok[start - 1:].sum(), len(ids) - start


def random_pairs(n, rng, vocab=384):
    from mlx_openelm.train.dpo_data import EncodedPair

    out = []
    for _ in range(n):
        p = [1] + rng.integers(3, vocab, rng.integers(2, 9)).tolist()
        c = rng.integers(3, vocab, rng.integers(1, 7)).tolist()
        r = rng.integers(3, vocab, rng.integers(1, 7)).tolist()
        out.append(EncodedPair(p + c, len(p), p + r, len(p)))
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_batch_loss_and_rewards_equal_a_per_pair_numpy_computation(loss_type):
    """make_loss on a padded batch == TRL's formulas on log-probs of each pair scored alone (numpy);
    IPO uses per-token means, the others sums; the sums are weighted by the row weights."""
    model = tiny_model()
    model.eval()
    rng = np.random.default_rng(1)
    pairs = random_pairs(5, rng)
    ref_c, ref_r = rng.normal(-40, 5, 5), rng.normal(-40, 5, 5)
    batch = next(dpo.PreferenceBatches(pairs, ref_c, ref_r, 5, shuffle=False).batches(0))[1]
    weight = np.array([1, 1, 0, 1, 1], np.float32)  # a padding row adds nothing
    loss_sum, count, extras = dpo.make_loss(loss_type, 0.5)(model, *batch[:-1], mx.array(weight))
    order_ = next(dpo.PreferenceBatches(pairs, ref_c, ref_r, 5, shuffle=False).batches(0))[0]
    assert extras["tokens"].item() == sum(w * (len(pairs[i].chosen) + len(pairs[i].rejected)) for w, i in zip(weight, order_))
    order = next(dpo.PreferenceBatches(pairs, ref_c, ref_r, 5, shuffle=False).batches(0))[0]
    pc, pr = [], []
    for i in order:
        (sc, nc), (sr, nr) = np_sequence_logps(model, pairs[i].chosen, pairs[i].chosen_start), np_sequence_logps(model, pairs[i].rejected, pairs[i].rejected_start)
        pc.append(sc / nc if loss_type == "ipo" else sc)
        pr.append(sr / nr if loss_type == "ipo" else sr)
    losses, cr, rr = trl_formulas(np.array(pc), np.array(pr), ref_c[order], ref_r[order], loss_type, 0.5)
    assert count.item() == 4
    np.testing.assert_allclose(loss_sum.item(), (losses * weight).sum(), rtol=1e-4)
    np.testing.assert_allclose(extras["rewards/chosen"].item(), (cr * weight).sum(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(extras["rewards/rejected"].item(), (rr * weight).sum(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(extras["rewards/margins"].item(), ((cr - rr) * weight).sum(), rtol=1e-4, atol=1e-4)
    assert extras["rewards/accuracies"].item() == ((cr > rr) * weight).sum()


# -- reference log-probs -------------------------------------------------------------------------


def test_precomputed_reference_equals_a_frozen_copy_and_is_cached(tmp_path):
    rng = np.random.default_rng(2)
    pairs = random_pairs(11, rng)
    model = tiny_model(seed=3)
    ref, key, hit = dpo.cached_reference_logps(model, pairs, tmp_path / "cache", batch_size=4)
    assert not hit and (tmp_path / "cache" / f"{key}.npz").is_file()
    frozen = tiny_model(seed=3)  # an independent copy of the same weights, scored pair by pair, unpadded
    frozen.eval()
    for i, p in enumerate(pairs):
        sc, nc = np_sequence_logps(frozen, p.chosen, p.chosen_start)
        sr, nr = np_sequence_logps(frozen, p.rejected, p.rejected_start)
        np.testing.assert_allclose([ref["chosen"][i], ref["rejected"][i]], [sc, sr], rtol=1e-5, atol=1e-4)
        assert (ref["chosen_tokens"][i], ref["rejected_tokens"][i]) == (nc, nr)
    # Second call: read from disk, identical; a model with other weights or other data misses.
    again, key2, hit2 = dpo.cached_reference_logps(model, pairs, tmp_path / "cache", batch_size=3)
    assert hit2 and key2 == key and all(np.array_equal(again[k], ref[k]) for k in ref)
    assert not dpo.cached_reference_logps(tiny_model(seed=4), pairs, tmp_path / "cache")[2]
    assert not dpo.cached_reference_logps(model, pairs[:-1], tmp_path / "cache")[2]


# -- gradient --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_policy_gradient_matches_finite_differences(method, monkeypatch):
    """In float64 the gradient of the summed DPO loss equals central differences of the loss. (The
    model's RMSNorm and MLX's fused RoPE and attention compute in float32 inside; here they are replaced by
    float64 formulas so the differences are exact to ~1e-9.)"""
    from mlx_openelm import model as model_module

    def rms_norm_f64(self, x):
        return self.weight * (x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + self.eps))

    def attention_f64(q, k, v, scale, mask=None):
        rep = q.shape[1] // k.shape[1]  # GQA: query head h reads kv head h // rep
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        scores = (q * scale) @ k.swapaxes(-1, -2)
        if mask is not None:
            assert mask == "causal"
            n, m = q.shape[2], k.shape[2]
            allowed = mx.arange(m)[None] <= mx.arange(n)[:, None] + (m - n)
            scores = mx.where(allowed, scores, -mx.inf)
        return mx.softmax(scores, axis=-1) @ v

    def rope_f64(x, dims, traditional=False, base=10000.0, scale=1.0, offset=0):
        assert not traditional
        half = dims // 2
        freqs = mx.power(mx.array(base, dtype=mx.float64), -mx.arange(half, dtype=mx.float64) / half)
        theta = (mx.arange(x.shape[-2], dtype=mx.float64) + offset)[:, None] * scale * freqs[None]
        cos, sin = mx.cos(theta), mx.sin(theta)
        x1, x2 = x[..., :half], x[..., half:dims]
        return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., dims:]], axis=-1)

    monkeypatch.setattr(model_module.RMSNorm, "__call__", rms_norm_f64)
    monkeypatch.setattr(mx.fast, "rope", rope_f64)
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", attention_f64)
    model = tiny_model(seed=5)
    model.update(tree_map(lambda v: v.astype(mx.float64), model.parameters()))
    if method == "lora":
        mx.random.seed(0)
        apply_adapters(model, rank=4, alpha=8, dropout=0.0)
        model.update(tree_map(lambda p: (p + 0.05).astype(mx.float64), model.trainable_parameters()))
    model.train()
    rng = np.random.default_rng(3)
    pairs = random_pairs(3, rng)
    batch = next(dpo.PreferenceBatches(pairs, rng.normal(-40, 3, 3), rng.normal(-40, 3, 3), 3, shuffle=False).batches(0))[1]
    batch = tuple(a.astype(mx.float64) if a.dtype == mx.float32 else a for a in batch)
    loss_fn = dpo.make_loss("sigmoid", 0.5)

    def scalar(m, *arrays):
        return loss_fn(m, *arrays)[0]

    params = model.trainable_parameters()
    _, grads = nn.value_and_grad(model, scalar)(model, *batch)
    grads = dict(tree_flatten(grads))
    names = sorted(grads)
    picks = [names[0], names[len(names) // 2], names[-1]]
    eps = 1e-2  # MLX's float64 exp/log/sin are float32-accurate on CPU: larger steps, extrapolated
    for name in picks:
        shape = grads[name].shape
        index = tuple(int(rng.integers(0, s)) for s in shape)

        def at(delta):
            def shift(path, p):
                if path != name:
                    return p
                d = np.zeros(p.shape, np.float64)
                d[index] = delta
                return p + mx.array(d)

            model.update(tree_map_with_path(shift, params))
            return scalar(model, *batch).item()

        central = lambda h: (at(h) - at(-h)) / (2 * h)
        numeric = (4 * central(eps / 2) - central(eps)) / 3  # Richardson: O(eps^4)
        model.update(params)
        analytic = grads[name][index].item()
        assert abs(analytic - numeric) <= 1e-3 * abs(numeric) + 1e-6, (name, analytic, numeric)
    assert any(abs(grads[n]).max().item() > 1e-6 for n in picks)  # not a trivially zero gradient


# -- a synthetic preference task -------------------------------------------------------------------

COLOURS, OTHERS = ("red", "blue"), ("cat", "tree")
FILLER = "the a sat on runs fast slow small large open light dark model sentence task city".split()


def colour_pair(word: str, filler: str) -> dict:
    """UltraFeedback-format row: "<filler> is <word> a colour?"; chosen answers right, rejected wrong."""
    yes = word in COLOURS
    question = f"{filler} is {word} a colour?"
    answer = lambda ok: [{"role": "user", "content": question}, {"role": "assistant", "content": "yes" if ok else "no"}]
    return {"prompt": question, "chosen": answer(yes), "rejected": answer(not yes)}


def colour_prefs(n_train_per_word=16, n_test_per_word=8, seed=0):
    rng = random.Random(seed)
    fillers = [f"{a} {b}" for a in FILLER for b in FILLER if a != b]
    rng.shuffle(fillers)
    words = COLOURS + OTHERS
    rows = [colour_pair(w, fillers[i * len(words) + k]) for i in range(n_train_per_word + n_test_per_word) for k, w in enumerate(words)]
    cut = n_train_per_word * len(words)
    return [to_pair(r) for r in rows[:cut]], [to_pair(r) for r in rows[cut:]]  # held-out: unseen filler pairs


@pytest.fixture(scope="module")
def task_spm(tmp_path_factory) -> Path:
    """A word-level SentencePiece model of the task's training text (role tags as single pieces)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("dpo_spm")
    train, test = colour_prefs()
    lines = [render_chat(p.prompt + [{"role": "assistant", "content": a}], False).replace("\n", " ")
             for p in train + test for a in (p.chosen, p.rejected)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=120, model_type="bpe", hard_vocab_limit=False,
        user_defined_symbols=["<|system|>", "<|user|>", "<|assistant|>", "\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    return d / "tokenizer.model"


@pytest.fixture(scope="module")
def task_tok(task_spm) -> Tokenizer:
    return Tokenizer(task_spm.parent)


def task_model(tok: Tokenizer, seed=0) -> Model:
    return tiny_model(seed=seed, vocab_size=len(tok))


def held_out(model, tok, pairs, loss_type="sigmoid", beta=0.5):
    """(reward accuracy as TRL logs it, fraction of pairs where π_c > π_r) on ``pairs``; the
    reference is a fresh copy of the base (same seed), scored independently of the training run."""
    enc = encode_pairs(tok, pairs, 64, 32)
    ref = dpo.in_loss_units(dpo.reference_logps(task_model(tok), enc), loss_type)
    was = model.training
    model.eval()
    acc = pref = n = 0.0
    for _, batch in dpo.PreferenceBatches(enc, *ref, 16, shuffle=False).batches(0):
        _, count, extras = dpo.make_loss(loss_type, beta)(model, *batch)
        acc += extras["rewards/accuracies"].item()
        c_lp, r_lp = dpo.sequence_logps(model, batch[0], batch[1], batch[2])[0], dpo.sequence_logps(model, batch[3], batch[4], batch[5])[0]
        pref += (c_lp > r_lp).sum().item()
        n += count.item()
    model.train(was)
    return acc / n, pref / n


def metric_lines(folder):
    lines = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x], [x for x in lines if "val_loss" in x]


def task_args(out, method, dropout=0.0, **overrides):
    """Settings for the task: sigmoid loss, β 0.5, 40 steps of 8 pairs, references cached next to ``out``."""
    settings = dict(output_dir=str(out), learning_rate=1e-3 if method != "full" else 3e-4, min_learning_rate=1e-4, warmup=0,
                    batch_size=8, grad_accum=1, iters=40, steps_per_eval=20, save_every=0, seed=0, loss_type="sigmoid", beta=0.5,
                    method=method, max_length=64, max_prompt_length=32, reference_cache=str(Path(out).parent / "refcache"))
    args = dpo.dpo_args(None, **{**settings, **overrides})
    args.adapter = dpo.LoRAConfig(rank=8, alpha=16, dropout=dropout)
    return args


@pytest.mark.parametrize("method", ["lora", "full"])
def test_preference_tuning_learns_the_task(tmp_path, task_tok, task_spm, method):
    from conftest import write_hf_checkpoint

    train, test = colour_prefs()
    model = task_model(task_tok)
    source = tmp_path / "base"  # the same base as an apple/OpenELM folder: config + tokenizer for the saved model
    write_hf_checkpoint(source, model.args, seed=0, tokenizer=task_spm)
    acc0, pref0 = held_out(model, task_tok, test)
    assert acc0 == 0.0  # policy == reference: every reward is exactly 0 (TRL reports the same)
    assert 0.2 <= pref0 <= 0.8, pref0  # the untrained model prefers the right answer about half the time
    result = dpo.run_dpo(model, task_tok, train, test[:16], task_args(tmp_path / "out", method), model_source=source)
    acc, pref = held_out(model, task_tok, test)
    assert acc >= 0.9 and pref > pref0, (acc, pref, pref0)
    steps, vals = metric_lines(tmp_path / "out")
    assert [s["step"] for s in steps] == list(range(1, 41)) and [v["step"] for v in vals] == [20, 40]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(np.isfinite(s[key]) for s in steps) and f"val_{key}" in vals[-1], key
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and vals[-1]["val_rewards/accuracies"] >= 0.9
    assert not result["reference_cache_hit"]
    if method == "lora":
        fresh = task_model(task_tok)
        load_adapters(fresh, tmp_path / "out")  # the saved adapters reproduce the trained policy
        assert held_out(fresh, task_tok, test)[0] == acc
    else:
        from mlx_openelm.io.load import load_model

        saved = load_model(Path(result["model_path"]))
        assert held_out(saved, task_tok, test)[0] == acc


class KillAfterSave(dpo.TrainingCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, path):
        if Path(path).name == f"step_{self.step}":
            raise KeyboardInterrupt


def test_resume_after_a_kill_gives_the_same_losses(tmp_path, task_tok):
    train, test = colour_prefs(6, 2)  # 24 pairs: 3 micro-batches of 8 per epoch
    kw = dict(iters=7, save_every=2, steps_per_eval=3, dropout=0.2, learning_rate=3e-3, grad_accum=2, batch_size=4)
    dpo.run_dpo(task_model(task_tok), task_tok, train, test, task_args(tmp_path / "full", "lora", **kw))
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        dpo.run_dpo(task_model(task_tok), task_tok, train, test, task_args(cut, "lora", **kw), callback=KillAfterSave(4))
    assert not (cut / "adapters.safetensors").exists()
    result = dpo.run_dpo(task_model(task_tok), task_tok, train, test, task_args(cut, "lora", resume=True, **kw))
    assert result["reference_cache_hit"]  # the reference pass is not repeated
    (a, av), (b, bv) = metric_lines(tmp_path / "full"), metric_lines(cut)
    assert [s["step"] for s in b] == list(range(1, 8))
    for key in ("loss", "rewards/margins", "rewards/accuracies", "lr"):
        np.testing.assert_allclose([s[key] for s in b], [s[key] for s in a], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose([v["val_loss"] for v in bv], [v["val_loss"] for v in av], rtol=1e-5)
    with pytest.raises(ValueError):  # another objective setting: refuses to resume
        dpo.run_dpo(task_model(task_tok), task_tok, train, test, task_args(cut, "lora", resume=True, beta=0.25, **kw))


# -- recipes and the command ---------------------------------------------------------------------


def test_recipes_are_apples_and_explicit_settings_win():
    table = {"openelm-270M": ("hinge", 5, 2e-5), "openelm-450M": ("hinge", 8, 3e-5), "openelm-1_1B": ("sigmoid", 5, 5e-5),
             "openelm-3B": ("hinge", 10, 1e-4)}
    for name, (loss_type, epochs, lr) in table.items():
        args = dpo.dpo_args(dpo.load_recipe(name))
        assert (args.loss_type, args.loop.epochs, args.loop.learning_rate) == (loss_type, epochs, lr)
        assert (args.beta, args.max_length, args.max_prompt_length, args.method) == (0.01, 1024, 512, "full")
        assert (args.loop.warmup, args.loop.min_learning_rate, args.loop.seed, args.loop.betas) == (0.1, 0.0, 42, (0.9, 0.999))
    args = dpo.dpo_args(dpo.load_recipe("openelm-270M"), learning_rate=1e-3, method="lora", loss_type=None)
    assert (args.loop.learning_rate, args.method, args.loss_type) == (1e-3, "lora", "hinge")
    with pytest.raises(ValueError, match="unknown recipe"):
        dpo.load_recipe("openelm-7B")


@pytest.fixture
def task_folder(tmp_path, task_tok, task_spm, monkeypatch):
    from conftest import write_hf_checkpoint

    monkeypatch.setenv("MLX_OPENELM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "OpenELM-task"
    write_hf_checkpoint(folder, tiny_args(num_transformer_layers=2, vocab_size=len(task_tok)), tokenizer=task_spm)
    return folder


def write_jsonl(path: Path, pairs_rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs_rows))
    return path


def colour_rows(n):
    return [colour_pair(w, f"{a} {b}") for w, (a, b) in zip((COLOURS + OTHERS) * n, [(x, y) for x in FILLER for y in FILLER if x != y])]


def test_cli_trains_adapters_that_fuse_and_a_full_model_that_loads(tmp_path, task_folder, capsys):
    from mlx_openelm.cli import main
    from mlx_openelm.io.load import load

    data = tmp_path / "prefs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", colour_rows(4))
    write_jsonl(data / "test.jsonl", colour_rows(1))
    common = ["--model", str(task_folder), "--data", str(data), "--iters", "2", "--batch-size", "4", "--grad-accum", "1",
              "--loss", "sigmoid", "--beta", "0.1", "--save-every", "0", "--max-length", "64", "--max-prompt-length", "32"]
    assert main(["dpo", *common, "-o", str(tmp_path / "lora"), "--rank", "4", "--alpha", "8"]) == 0
    steps, vals = metric_lines(tmp_path / "lora")
    assert len(steps) == 2 and "rewards/accuracies" in steps[0] and "val_rewards/margins" in vals[-1]
    assert main(["fuse", "--model", str(task_folder), "--adapter-path", str(tmp_path / "lora"), "--save-path", str(tmp_path / "fused")]) == 0
    assert load(tmp_path / "fused")[0] is not None

    assert main(["dpo", *common, "-o", str(tmp_path / "dora"), "--dora", "--rank", "4"]) == 0
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True

    assert main(["dpo", *common, "-o", str(tmp_path / "full"), "--full"]) == 0
    model, tok = load(tmp_path / "full" / "model")
    assert len(tok) == model.args.vocab_size  # the base's tokenizer was copied
    assert "reference log-probs from the cache" in capsys.readouterr().err  # same base + data: the second run reused them


@pytest.mark.parametrize("extra, code, message", [
    (["--lora", "--full"], 1, "choose one of --lora, --dora, --full"),
    (["--recipe", "openelm-7B"], 1, "unknown recipe"),
    (["--loss", "kto"], 1, "loss_type must be one of"),
    (["--max-length", "16", "--max-prompt-length", "16"], 1, "max_prompt_length"),
    (["--max-length", "100000"], 1, "exceeds the model's context"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, task_folder, capsys, extra, code, message):
    from mlx_openelm.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", colour_rows(1))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(task_folder), "--data", str(data), "-o", str(out), *extra])
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_bad_data_names_the_line(tmp_path, task_folder, capsys):
    from mlx_openelm.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(UF_ROW) + "\n{not json\n")
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(task_folder), "--data", str(data), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and f"{data}:2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# -- UltraFeedback through the Hub module (a fake offline cache) ---------------------------------


def test_ultrafeedback_splits_from_the_hub_cache(offline_hub, tmp_path):
    """The dataset's parquet splits read through ``io.hub`` from a fake offline HF cache (conftest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import fake_hub_cache
    from mlx_openelm.train.dpo_data import ULTRAFEEDBACK_REPO

    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        load_preferences("ultrafeedback")
    rows = {"train": [UF_ROW, {**UF_ROW, "prompt": "Q2"}, UF_ROW], "test": [UF_ROW]}
    files = {}
    for split, items in rows.items():
        path = tmp_path / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist([{**r, "chosen-rating": 5.0} for r in items]), path)
        files[f"data/{split}-00000-of-00001.parquet"] = path
    fake_hub_cache(offline_hub, ULTRAFEEDBACK_REPO, files)
    train = load_preferences("ultrafeedback", "train")
    assert len(train) == 3 and len(load_preferences("ultrafeedback", "test")) == 1
    assert train[0] == to_pair(UF_ROW) and train[0].prompt[0] == {"role": "system", "content": ""}
    assert len(load_preferences("ultrafeedback", "train", limit=2)) == 2


def test_two_processes_match_one(tmp_path, task_folder, task_tok):
    """``mlx.launch -n 2`` running ``dpo`` gives the losses, rewards and adapters of one process with the
    same global batch, including a last micro-batch of one pair (the second rank gets a zero-weight row)."""
    import os
    import shutil
    import subprocess
    import sys

    from mlx_openelm.cli import main

    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    from conftest import free_port_pair

    port = free_port_pair()
    data = tmp_path / "prefs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", colour_rows(3)[:9])  # 9 pairs in micro-batches of 4: 4, 4, 1
    write_jsonl(data / "test.jsonl", colour_rows(1)[:3])
    flags = lambda out: ["dpo", "--model", str(task_folder), "--data", str(data), "-o", str(out), "--iters", "3", "--batch-size", "4",
                         "--grad-accum", "1", "--loss", "sigmoid", "--beta", "0.5", "--lr", "1e-3", "--warmup", "0", "--rank", "4",
                         "--dropout", "0", "--save-every", "0", "--steps-per-eval", "3", "--max-length", "64", "--max-prompt-length", "32"]
    assert main(flags(tmp_path / "one")) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "cache2"), "PYTHONPATH": str(Path(__file__).parents[1])}
    two = subprocess.run([str(launch if launch.exists() else shutil.which("mlx.launch")), "-n", "2", "--backend", "ring",
                          "--starting-port", str(port), "--python", sys.executable, "--", "-m", "mlx_openelm.cli", *flags(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    (s1, v1), (s2, v2) = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two")
    assert [s["step"] for s in s2] == [1, 2, 3] and len(v2) == 1
    for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "tokens"):
        np.testing.assert_allclose([s[key] for s in s2], [s[key] for s in s1], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(v2[0]["val_rewards/margins"], v1[0]["val_rewards/margins"], rtol=1e-4, atol=1e-6)
    w1, w2 = mx.load(str(tmp_path / "one" / "adapters.safetensors")), mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for k in w1:
        np.testing.assert_allclose(np.array(w2[k]), np.array(w1[k]), rtol=1e-3, atol=1e-5)

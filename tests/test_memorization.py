"""Memorization across checkpoints (Analysis360): the score against its definition written out,
the sampling against HF ``datasets``' shuffle (the library Analysis360 uses), the batched cached
greedy decoder against a plain uncached one-sequence loop, and a tiny model that learns a few
sequences: its score on them rises across its checkpoints while unseen ones stay at chance."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import mlx_openelm  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from conftest import hf_config, tiny_args
from mlx_openelm.eval.memorization import (
    Checkpoint,
    MemorizationConfig,
    _after_eos,
    adapter_checkpoints,
    greedy_continuations,
    load_data,
    make_checkpoints,
    match_scores,
    pearson_matrix,
    run_memorization,
    summarize,
)
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer

VOCAB = 384


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _save_folder(folder: Path, model: Model, sp_model_path: Path) -> Path:
    """A loadable model folder (HF config.json, safetensors, tokenizer)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(model.args)))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "tokenizer.model").write_bytes(Path(sp_model_path).read_bytes())
    return folder


def _reference_greedy(model: Model, prompt, length: int):
    """Greedy decoding the slow, obvious way: the whole sequence through the model at every step."""
    seq = list(prompt)
    for _ in range(length):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    return seq[len(prompt):]


# ---------------------------------------------------------------- the definition


def test_scores_equal_analysis360_definition_on_hand_made_cases():
    truth = np.array([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    generated = np.array([[5, 6, 7, 8], [1, 0, 3, 0], [0, 0, 0, 9]])
    tm, fm = match_scores(generated, truth)
    l, n = truth.shape[1], truth.shape[0]
    # Σ_seqs Σ_i 1[ĝ_{k+i} = s_{k+i}] / (l · #seqs), written out
    total = 0
    for g_row, s_row in zip(generated.tolist(), truth.tolist()):
        for g, s in zip(g_row, s_row):
            total += 1 if g == s else 0
    records = [{"chunk": "c", "row": i, "token_match": float(tm[i]), "full_match": bool(fm[i])} for i in range(n)]
    summary = summarize(records)
    assert summary["token_match"] == pytest.approx(total / (l * n)) == pytest.approx(7 / 12)
    assert tm.tolist() == [1.0, 0.5, 0.25] and fm.tolist() == [True, False, False]
    assert summary["full_match"] == pytest.approx(1 / 3)
    assert summary["quantiles"]["0.5"] == pytest.approx(0.5)
    # HF generate stops at EOS (2): later positions are padding and never match
    assert _after_eos(np.array([[4, 2, 4, 4], [4, 4, 4, 4], [2, 2, 5, 6]]), 2).tolist() == [[4, 2, -1, -1], [4, 4, 4, 4], [2, -1, -1, -1]]
    assert pearson_matrix([np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.6, 1.1]), np.array([1.0, 1.0, 1.0])])[0][:2] == pytest.approx([1.0, 1.0])
    assert pearson_matrix([np.array([0.0, 1.0]), np.array([1.0, 1.0])])[0][1] is None


def test_sampling_is_datasets_shuffle_and_reads_text_with_bos(tmp_path, sp_model_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = [{"token_ids": rng.integers(3, VOCAB, size=int(rng.integers(20, 30))).tolist(), "source": "x"} for _ in range(50)]
    rows[7]["token_ids"] = [5] * 10  # too short for k + l = 24: skipped, the next of the permutation replaces it
    data = _write_jsonl(tmp_path / "train_000.jsonl", rows)
    config = MemorizationConfig(prompt_len=8, continuation_len=16, num_sequences=12, seed=42)
    (chunk,) = load_data(data, config)
    ref = datasets.Dataset.from_list(rows).shuffle(seed=42)
    expected = [r for r in ref if len(r["token_ids"]) >= 24][:12]
    assert chunk.tokens.tolist() == [r["token_ids"][:24] for r in expected]
    assert [rows[i] for i in chunk.rows] == expected

    tok = Tokenizer(sp_model_path)
    texts = [{"text": f"the cat sat on the mat number {i} and the dog runs fast under the red tree"} for i in range(6)]
    folder = tmp_path / "chunks"
    folder.mkdir()
    _write_jsonl(folder / "train_001.jsonl", texts)
    _write_jsonl(folder / "train_000.jsonl", rows[:5])
    chunks = load_data(folder, config, encode=lambda t: tok.encode(t, add_bos=True))
    assert [c.name for c in chunks] == ["train_000", "train_001"]
    for i, r in zip(chunks[1].rows, chunks[1].tokens.tolist()):
        assert r == tok.encode(texts[i]["text"], add_bos=True)[:24] and r[0] == tok.bos_id
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_data(folder, config)
    _write_jsonl(tmp_path / "bad.jsonl", [{"tokens": [1, 2]}])
    with pytest.raises(ValueError, match='neither "token_ids" nor "text"'):
        load_data(tmp_path / "bad.jsonl", config)


# ---------------------------------------------------------------- a tiny model


def test_own_greedy_continuations_score_one_and_random_ones_near_chance():
    model = init_weights(Model(tiny_args()), seed=11)
    rng = np.random.default_rng(1)
    k, l = 6, 10
    prompts = rng.integers(3, VOCAB, size=(5, k))
    own = np.array([list(p) + _reference_greedy(model, p.tolist(), l) for p in prompts])
    assert greedy_continuations(model, prompts, l).tolist() == own[:, k:].tolist()  # batched + cached == plain loop
    tm, fm = match_scores(greedy_continuations(model, own[:, :k], l), own[:, k:])
    assert tm.tolist() == [1.0] * 5 and fm.all()
    random_seqs = rng.integers(3, VOCAB, size=(40, k + l))
    tm, fm = match_scores(greedy_continuations(model, random_seqs[:, :k], l), random_seqs[:, k:])
    assert tm.mean() < 0.03 and not fm.any()  # chance is 1/381 per token


def _train_checkpoints(tmp_path: Path, sp_model_path: Path, seen: np.ndarray, steps=(0, 15, 60)):
    """Full fine-tuning of a tiny model on ``seen`` (plain MLX loop), saved at ``steps``."""
    mx.random.seed(0)
    model = init_weights(Model(tiny_args()), seed=2)
    opt = optim.Adam(learning_rate=3e-3)
    x = mx.array(seen)

    def loss_fn(m):
        logits = m(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

    step_fn = nn.value_and_grad(model, loss_fn)
    folders = []
    for step in range(max(steps) + 1):
        if step in steps:
            folders.append(_save_folder(tmp_path / f"step_{step}", model, sp_model_path))
        if step < max(steps):
            loss, grads = step_fn(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
    return folders


def test_memorized_sequences_rise_across_checkpoints_unseen_stay_low(tmp_path, sp_model_path):
    rng = np.random.default_rng(3)
    k, l = 8, 16
    seen = rng.integers(3, VOCAB, size=(4, k + l))
    unseen = rng.integers(3, VOCAB, size=(4, k + l))
    folders = _train_checkpoints(tmp_path, sp_model_path, seen)
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "seen.jsonl", [{"token_ids": r.tolist()} for r in seen])
    _write_jsonl(data / "unseen.jsonl", [{"token_ids": r.tolist()} for r in unseen])
    config = MemorizationConfig(prompt_len=k, continuation_len=l, num_sequences=10, batch_size=3)
    calls = []
    result = run_memorization(make_checkpoints([str(f) for f in folders]), data, tmp_path / "out", config, dtype="float32",
                              progress=lambda *a: calls.append(a))
    by_label = {s["label"]: s for s in result["checkpoints"]}
    seen_scores = [by_label[f"step_{s}"]["chunks"]["seen"]["token_match"] for s in (0, 15, 60)]
    unseen_scores = [by_label[f"step_{s}"]["chunks"]["unseen"]["token_match"] for s in (0, 15, 60)]
    assert seen_scores[0] < 0.1 and seen_scores[2] == 1.0 and by_label["step_60"]["chunks"]["seen"]["full_match"] == 1.0
    assert seen_scores[0] < seen_scores[1] <= seen_scores[2]
    assert max(unseen_scores) < 0.1
    assert calls[-1][1:] == (8, 8)  # progress(label, done, total) ends complete

    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["chunk_scores.png", "score_correlation.png", "score_distribution.png",
                                                     "step_0", "step_15", "step_60", "summary.json"]
    for png in ("chunk_scores.png", "score_correlation.png", "score_distribution.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "step_60" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["chunk"] for r in rows} == {"seen", "unseen"}
    assert np.mean([float(r["token_match"]) for r in rows if r["chunk"] == "seen"]) == 1.0
    line = json.loads((out / "step_60" / "scores.jsonl").read_text().splitlines()[0])
    assert len(line["generated"]) == l
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunk_scores"]["step_60"]["seen"] == 1.0 and len(summary["correlation"]["pearson"]) == 3
    with pytest.raises(ValueError, match="already exists"):
        run_memorization(make_checkpoints([str(folders[0])]), data, out, config)


def test_adapter_checkpoint_lists(tmp_path):
    assert [c.label for c in make_checkpoints(["a/m1", "b/m1", "x/ckpt.pt"])] == ["m1", "m1-2", "ckpt"]
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    a1.mkdir(), a2.mkdir()
    assert make_checkpoints(["base"], [str(a1), str(a2)]) == [Checkpoint("a1", "base", str(a1)), Checkpoint("a2", "base", str(a2))]
    assert make_checkpoints(["m1", "m2"], ["x1", "x2"]) == [Checkpoint("x1", "m1", "x1"), Checkpoint("x2", "m2", "x2")]
    with pytest.raises(ValueError, match="one adapter path per checkpoint"):
        make_checkpoints(["m1", "m2", "m3"], ["a1", "a2"])


def test_trainer_checkpoints_folder_expands_in_step_order(tmp_path):
    run = tmp_path / "run"
    for s in (160, 80, 240):
        (run / "checkpoints" / f"step_{s}").mkdir(parents=True)
    (run / "adapters.safetensors").write_bytes(b"")
    expected = [run / "checkpoints" / f"step_{s}" for s in (80, 160, 240)] + [run]
    assert adapter_checkpoints(run) == expected
    assert adapter_checkpoints(run / "checkpoints") == expected
    assert [c.label for c in make_checkpoints(["base"], [str(run)])] == ["step_80", "step_160", "step_240", "run"]


# ---------------------------------------------------------------- the command


def test_command_on_a_corenet_pt_and_its_hf_twin(tmp_path, sp_model_path):
    """``memorization --checkpoints A.pt B``: the CoreNet file (converted once into the cache) and
    the HF folder of the same weights score identically; bad input is one red line, no output."""
    import os
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    from conftest import write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "hf", tiny_args(), seed=4, tokenizer=sp_model_path)
    state = {k.removeprefix("transformer."): torch.tensor(np.array(v)) for k, v in tree_flatten(model.parameters())}
    torch.save(state, tmp_path / "checkpoint_epoch_0_iter_49999.pt")
    rng = np.random.default_rng(5)
    _write_jsonl(tmp_path / "train_000.jsonl", [{"token_ids": rng.integers(3, VOCAB, size=20).tolist()} for _ in range(7)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLX_OPENELM_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_openelm.cli", "memorization", *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], env=env, timeout=300)

    r = cli("--checkpoints", str(tmp_path / "checkpoint_epoch_0_iter_49999.pt"), str(tmp_path / "hf"), "--data",
            str(tmp_path / "train_000.jsonl"), "-k", "6", "-l", "8", "-n", "5", "-b", "2", "--tokenizer", str(sp_model_path),
            "--dtype", "float32", "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "Saved" in r.stdout and "token match" in r.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    a, b = summary["checkpoints"]
    assert (a["label"], b["label"], a["sequences"]) == ("checkpoint_epoch_0_iter_49999", "hf", 5)
    gen = [[json.loads(x)["generated"] for x in (tmp_path / "out" / s["label"] / "scores.jsonl").read_text().splitlines()] for s in (a, b)]
    assert gen[0] == gen[1] and a["token_match"] == b["token_match"]

    r = cli("--checkpoints", str(tmp_path / "hf"), "--data", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out2"))
    assert r.returncode == 1 and "nope.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out2").exists()


def test_sft_run_checkpoints_show_the_rise(tmp_path, sp_model_path):
    """A real LoRA run of ``train.sft`` (``run/checkpoints/step_N`` + final adapters) scored with
    ``make_checkpoints([base], [run])`` on its own training sequences (encoded records, BOS first, as
    training saw them) and on unseen records; one step folder lacks adapter_config.json (the run's is used)."""
    from mlx_openelm.adapters import CONFIG_FILE, LoRAConfig
    from mlx_openelm.data import encode_record
    from mlx_openelm.train import sft

    words = "the cat sat on mat dog runs fast red blue green tree river city light open small large dark apple".split()
    rng = np.random.default_rng(0)
    records = [{"instruction": " ".join(rng.choice(words, size=10)), "input": "", "output": " ".join(rng.choice(words, size=8))}
               for _ in range(8)]
    base_dir = _save_folder(tmp_path / "base", init_weights(Model(tiny_args()), seed=1), sp_model_path)
    run = tmp_path / "run"
    args = sft.TrainingArgs(output_dir=str(run), adapter=LoRAConfig(rank=16, alpha=32, dropout=0.0), learning_rate=3e-3,
                            min_learning_rate=3e-3, warmup=0, batch_size=4, grad_accum=1, iters=30, save_every=10,
                            keep_checkpoints=0, steps_per_eval=0, seed=0, cutoff_len=128, max_grad_norm=0)
    tok = Tokenizer(sp_model_path)
    sft.train(init_weights(Model(tiny_args()), seed=1), tok, records[:4], [], args)
    (run / "checkpoints" / "step_20" / CONFIG_FILE).unlink()

    encoded = [encode_record(tok, r, 128)[0] for r in records]
    l = 10
    k = min(len(ids) for ids in encoded) - l  # prompts reach into each record's own words
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "seen.jsonl", [{"token_ids": ids} for ids in encoded[:4]])
    _write_jsonl(data / "unseen.jsonl", [{"token_ids": ids} for ids in encoded[4:]])
    ckpts = make_checkpoints([str(base_dir)], [str(run)])
    assert [c.label for c in ckpts] == ["step_10", "step_20", "run"]
    config = MemorizationConfig(prompt_len=k, continuation_len=l, num_sequences=10, batch_size=8)
    result = run_memorization(ckpts, data, tmp_path / "out", config, dtype="float32", figures=False)
    seen_scores = [s["chunks"]["seen"]["token_match"] for s in result["checkpoints"]]
    unseen_scores = [s["chunks"]["unseen"]["token_match"] for s in result["checkpoints"]]
    # measured here: seen 0.05 -> 0.175 -> 0.625, unseen 0.025 at every checkpoint
    assert seen_scores[0] < 0.2 and seen_scores[0] < seen_scores[1] < seen_scores[2], (seen_scores, unseen_scores)
    assert seen_scores[2] >= 0.5 and max(unseen_scores) < 0.1, (seen_scores, unseen_scores)
    assert not any(p.suffix == ".png" for p in (tmp_path / "out").iterdir())


"""Generation: greedy reference, speculative and prompt-lookup decoding, chat cache reuse, limits."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_args
from mlx_openelm.generate.chat import ChatSession
from mlx_openelm.generate.stream import find_draft, generate, stream_generate
from mlx_openelm.model import Model, init_weights
from mlx_openelm.tokenizer import Tokenizer, render_chat


@pytest.fixture(scope="module")
def tok(sp_model_path):
    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def model():
    return init_weights(Model(tiny_args()), 11)


def greedy_reference(model, ids, n):
    """Greedy decoding by full forward passes, no cache: the independent reference."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array(ids)[None])[0, -1]
        t = int(mx.argmax(logits).item())
        out.append(t)
        ids.append(t)
    return out


def tokens_of(model, tok, prompt, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, stop_at_eos=False, **kw)]


def test_greedy_stream_matches_uncached_reference(model, tok):
    ids = tok.encode("the cat sat on the mat")
    assert tokens_of(model, tok, ids, max_tokens=12) == greedy_reference(model, ids, 12)


def test_speculative_and_prompt_lookup_equal_greedy(model, tok):
    draft = init_weights(Model(tiny_args(num_transformer_layers=2)), 5)
    ids = tok.encode("red blue green red blue green red blue green red blue")
    want = greedy_reference(model, ids, 20)
    assert tokens_of(model, tok, ids, max_tokens=20, draft_model=draft, num_draft_tokens=3) == want
    assert tokens_of(model, tok, ids, max_tokens=20, prompt_lookup=4) == want
    # a draft that is the target itself is always accepted
    got = list(stream_generate(model, tok, ids, max_tokens=10, draft_model=model, stop_at_eos=False))
    assert sum(r.from_draft for r in got) >= 6


def test_prompt_lookup_accepts_copied_text():
    # the model is fed its own output, so a repeated pattern must be found and proposed
    assert find_draft([5, 6, 7, 8, 5, 6], ngram_max=3, num_draft=3) == [7, 8, 5]
    assert find_draft([1, 2, 3], ngram_max=3, num_draft=3) == []


def test_sampling_is_seeded_and_respects_top_k(model, tok):
    ids = tok.encode("open small large")
    a = tokens_of(model, tok, ids, max_tokens=8, temp=1.0, top_k=5, seed=3)
    b = tokens_of(model, tok, ids, max_tokens=8, temp=1.0, top_k=5, seed=3)
    assert a == b
    logits = model(mx.array(ids)[None])[0, -1]
    top5 = set(np.argsort(np.array(logits))[-5:].tolist())
    assert a[0] in top5


def test_context_limit_is_enforced(tok):
    small = init_weights(Model(tiny_args(max_context_length=16)), 0)
    with pytest.raises(ValueError, match="context is 16"):
        generate(small, tok, list(range(3, 20)))
    last = list(stream_generate(small, tok, list(range(3, 13)), max_tokens=50, stop_at_eos=False))[-1]
    assert last.finish_reason == "context" and last.generation_tokens == 6


def test_chat_reuses_cache_across_turns(model, tok):
    chat = ChatSession(model, tok, system="Be brief.")
    first = list(chat.reply("Hello!", max_tokens=6))
    assert first[-1].cached_tokens == 0
    second = list(chat.reply("And the cat?", max_tokens=6))
    turn2_ids = tok.encode(tok.apply_chat_template(chat.messages[:-1]))
    # only the new turn was prefilled; the history came from the cache
    assert second[-1].cached_tokens > len(tok.encode(render_chat(chat.messages[:2], add_generation_prompt=True))) - 2
    assert second[-1].prompt_tokens + second[-1].cached_tokens == len(turn2_ids)
    # and the answer is what a fresh, uncached run on the whole history gives
    fresh = greedy_reference(model, turn2_ids, 6)
    got = [r.token for r in second]
    assert got[: len(fresh)] == fresh[: len(got)]

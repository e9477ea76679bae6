"""``mlx-openelm serve``: a live server on 127.0.0.1 (uvicorn in a thread, a free port) with a tiny
converted model, driven by real clients: the ``openai`` package, lm-eval's ``local-completions``
and plain HTTP (httpx). References: ``generate`` (the in-process streaming generator), lm-eval
through our in-process backend, and a float64 numpy log-softmax of the model's logits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import mlx_openelm  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from conftest import tiny_args, write_hf_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from mlx_openelm.generate.stream import generate  # noqa: E402
from mlx_openelm.model import Model, init_weights  # noqa: E402
from mlx_openelm.serve import BackgroundServer, ServeConfig, ServedModel, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Please answer the following question with true or false."}]
TIMEOUT = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_model_path):
    """A tiny random-weight model converted into an MLX folder (with its tokenizer)."""
    from mlx_openelm.io.convert import convert

    d = tmp_path_factory.mktemp("serve")
    write_hf_checkpoint(d / "hf", tiny_args(), seed=3, tokenizer=sp_model_path)
    convert(str(d / "hf"), d / "OpenELM-tiny", dtype="float32")
    return d / "OpenELM-tiny"


@pytest.fixture(scope="module")
def served(model_dir):
    """(base url, model, tokenizer, app config) of a running server; stopped after the module."""
    from mlx_openelm.io.load import load

    model, tok = load(str(model_dir))
    config = ServeConfig(max_tokens_default=16, max_concurrency=16)
    app = create_app([ServedModel("OpenELM-tiny", model, tok, aliases=["tiny"], max_concurrency=16)], config)
    with BackgroundServer(app) as server:
        yield server.url, model, tok, config


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=TIMEOUT) as c:
        yield c


def reference(model, tok, prompt, max_tokens):
    return generate(model, tok, prompt, max_tokens=max_tokens, temp=0.0)


# -- the openai client ----------------------------------------------------------------------------

def test_openai_client_chat_streaming_and_not_equal_generate(served):
    openai = pytest.importorskip("openai")
    url, model, tok, _ = served
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    want = reference(model, tok, tok.apply_chat_template(MESSAGES, add_generation_prompt=True), 24)
    assert want  # the tiny model says something before EOS

    r = c.chat.completions.create(model="OpenELM-tiny", messages=MESSAGES, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(MESSAGES)))

    parts, usage, finish = [], None, None
    for chunk in c.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_completion_tokens=24,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == want
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    models = c.models.list()
    assert [m.id for m in models.data] == ["OpenELM-tiny"]


def test_chat_logprobs_and_stop_strings(client, served):
    _, model, tok, _ = served
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    want = reference(model, tok, prompt, 24)
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 24,
                                                   "logprobs": True, "top_logprobs": 3}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert r["choices"][0]["message"]["content"] == want
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace").lstrip(" ") == want.lstrip(" ")
    # greedy: every chosen token is the most likely one and leads its top list
    ids = tok.encode(prompt)
    logits = np.array(model(mx.array(ids)[None])[0, -1].astype(mx.float32), dtype=np.float64)
    ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert content[0]["logprob"] == pytest.approx(ref.max(), abs=1e-4)
    for e in content:
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
    # a stop string cuts the text before it
    stop = want[len(want) // 2:len(want) // 2 + 3]
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 24, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == want[:want.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


# -- /v1/completions: echo, logprobs, n ------------------------------------------------------------

def test_echo_logprobs_on_token_id_prompts_equal_a_forward_pass(client, served):
    _, model, tok, _ = served
    prompts = [tok.encode("the cat sat on the mat"), tok.encode("red blue green river")]
    r = client.post("/v1/completions", json={"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 1,
                                              "temperature": 0, "seed": 1234}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip(prompts, r["choices"]):
        lp = choice["logprobs"]
        logits = np.array(model(mx.array(ids)[None])[0].astype(mx.float32), dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        ref = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))  # float64 log-softmax
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["tokens"]) == len(ids) + 1  # the prompt plus the one generated token
        np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], [ref[i - 1, ids[i]] for i in range(1, len(ids))], atol=1e-4)
        for i in range(1, len(ids)):
            top = lp["top_logprobs"][i]
            assert len(top) <= 2 and max(top.values()) == pytest.approx(ref[i - 1].max(), abs=1e-4)
        # the generated token is the greedy one after the prompt
        assert lp["token_logprobs"][-1] == pytest.approx(ref[-1].max(), abs=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"])
        assert choice["text"].startswith(tok.decode(ids))


def test_string_prompt_and_n_greedy_and_seeded(client, served):
    _, model, tok, _ = served
    want = reference(model, tok, "the cat sat", 12)
    r = client.post("/v1/completions", json={"prompt": "the cat sat", "n": 4, "max_tokens": 12, "temperature": 0}).json()
    assert [c["text"] for c in r["choices"]] == [want] * 4
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    body = {"prompt": "the cat sat", "n": 4, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    b = [c["text"] for c in client.post("/v1/completions", json=body).json()["choices"]]
    assert a == b
    assert len(set(a)) > 1  # the choices are different samples, not one repeated
    c = [c["text"] for c in client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"]]
    assert c != a


def test_sixteen_concurrent_clients_get_their_solo_answers(client, served):
    url = served[0]
    words = "the a cat dog sat on mat runs fast slow red blue green river mountain city".split()
    prompts = [" ".join(words[i:] + words[:i][:3]) for i in range(16)]

    def ask(p):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo
    assert len(set(solo)) > 1
    assert _engine(client)["peak_batch"] > 1  # the concurrent requests were decoded together


# -- lm-eval local-completions -----------------------------------------------------------------------

TASKS = {
    "srv_mc": """task: srv_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "<s>{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "srv_gen": """task: srv_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "<s>{{{{question}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""",
}
DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "question answer true false"], "label": 0},
    {"question": "Please choose the correct answer: red or", "choices": ["dark", "green"], "label": 1},
    {"question": "A small river runs", "choices": ["fast", "slow", "open"], "label": 2},
]


def _responses(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("bos", ["literal", "tokenize_bos"])
def test_lm_eval_local_completions_matches_the_in_process_backend(served, tmp_path, monkeypatch, bos):
    """Log-likelihoods (and a greedy generation task) through the server with lm-eval's remote
    tokenizer equal our in-process backend's. lm-eval's remote tokenizer never asks for BOS, which
    our backend puts first (as the model card): either the contexts start with the literal ``<s>``
    or the server runs with ``tokenize_bos`` (``--tokenize-bos``)."""
    import lm_eval.models.openai_completions  # noqa: F401  (registers local-completions)
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from mlx_openelm.eval.harness import OpenELMLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url, model, tok, _ = served
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        if bos == "tokenize_bos":
            text = text.replace('"<s>{{{{question}}}}"', '"{{{{question}}}}"')
            assert "<s>" not in text
        (tasks / f"{name}.yaml").write_text(text.format(data=data, cache=tmp_path / "hf-cache"))
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    common = dict(tasks=list(TASKS), task_manager=manager, log_samples=True, random_seed=0, numpy_random_seed=0,
                  torch_random_seed=0, fewshot_random_seed=0)
    config = served[3]
    config.tokenize_bos = bos == "tokenize_bos"
    try:
        remote = simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,model=OpenELM-tiny,tokenizer_backend=remote,batch_size=2,max_retries=1",
            **common,
        )
    finally:
        config.tokenize_bos = False
    local = simple_evaluate(model=OpenELMLM(model=model, tokenizer=tok, batch_size=4), **common)
    got, want = _responses(remote, "srv_mc"), _responses(local, "srv_mc")
    assert len(got) == len(DOCS)
    for g_doc, w_doc in zip(got, want):
        assert len(g_doc) == len(w_doc)
        for (g,), (w,) in zip(g_doc, w_doc):
            assert float(g[0]) == pytest.approx(float(w[0]), abs=1e-4)
            assert bool(g[1]) == bool(w[1])
    assert _responses(remote, "srv_gen") == _responses(local, "srv_gen")
    assert remote["results"]["srv_mc"]["acc,none"] == local["results"]["srv_mc"]["acc,none"]


def test_tokenizer_endpoints(client, served):
    tok = served[2]
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    ids = client.post("/tokenize", json={"prompt": "the cat sat", "add_special_tokens": False}).json()["tokens"]
    assert ids == tok.encode("the cat sat", add_bos=False)
    assert client.post("/tokenize", json={"prompt": "the cat sat"}).json()["tokens"] == tok.encode("the cat sat")
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "the cat sat"


# -- errors and disconnects ---------------------------------------------------------------------------

def _expect(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, served):
    _, _, tok, config = served
    post = lambda path, body: client.post(path, json=body)  # noqa: E731
    raw = client.post("/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    _expect(raw, 400)
    _expect(client.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    _expect(post("/v1/completions", {"prompt": 3}), 400, "prompt")
    _expect(post("/v1/completions", {"prompt": []}), 400, "prompt")
    _expect(post("/v1/completions", {"prompt": [1, 99999]}), 400, "prompt")
    _expect(post("/v1/completions", {"prompt": "x", "max_tokens": -1}), 400, "max_tokens")
    _expect(post("/v1/completions", {"prompt": "x", "max_tokens": "ten"}), 400, "max_tokens")
    _expect(post("/v1/completions", {"prompt": "x", "temperature": -0.5}), 400, "temperature")
    _expect(post("/v1/completions", {"prompt": "x", "top_p": 1.5}), 400, "top_p")
    _expect(post("/v1/completions", {"prompt": "x", "n": 0}), 400, "n")
    _expect(post("/v1/completions", {"prompt": "x", "stop": 5}), 400, "stop")
    _expect(post("/v1/completions", {"prompt": "x", "stream": "yes"}), 400, "stream")
    _expect(post("/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    _expect(post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role")
    _expect(post("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}), 400, "top_logprobs")
    _expect(post("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-4o"}), 404, "model")
    _expect(post("/v1/completions", {"prompt": "x", "model": "apple/OpenELM-3B"}), 404, "model")
    _expect(post("/v1/completions", {"prompt": [5] * 2048}), 413, "prompt")
    _expect(post("/v1/chat/completions", {"messages": [{"role": "user", "content": "cat " * 3000}]}), 413, "messages")
    _expect(client.get("/v1/nothing"), 404)
    old = config.max_body_bytes
    config.max_body_bytes = 1000
    try:
        _expect(post("/v1/completions", {"prompt": "x" * 2000}), 413)
    finally:
        config.max_body_bytes = old
    config.api_key = "sekret"
    try:
        _expect(client.get("/v1/models"), 401)
        _expect(client.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
    finally:
        config.api_key = None
    r = post("/v1/completions", {"prompt": "the cat", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(served[1], tok, "the cat", 4)


def _engine(client):
    return client.get("/health").json()["engine"]["OpenELM-tiny"]


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_mid_stream_stops_generation(client, served, stream):
    url = served[0]
    before = _engine(client)
    body = {"prompt": "the cat sat on the mat", "max_tokens": 1500, "temperature": 0, "stream": stream}
    if stream:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith("data: ")
                    if chunks >= 3:
                        break
    else:  # the client gives up waiting for the whole answer
        with httpx.Client(base_url=url, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)
    # the connection is closed: the engine drops the sequence and stops counting tokens
    deadline = time.monotonic() + 30
    while _engine(client)["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _engine(client)
    assert after["active_sequences"] == 0
    assert after["cancelled"] > before["cancelled"]
    time.sleep(0.3)
    assert _engine(client)["generated_tokens"] == after["generated_tokens"]
    assert after["generated_tokens"] - before["generated_tokens"] < 1000
    ok = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3})
    assert ok.status_code == 200


def test_speculative_engine_equals_greedy(served):
    """With a draft model the engine decodes by speculative decoding; at temperature 0 the tokens
    are the plain greedy ones (the reference: ``stream_generate`` without a draft)."""
    from mlx_openelm.generate.batch import BatchEngine, batch_generate
    from mlx_openelm.generate.stream import stream_generate

    _, model, tok, _ = served
    draft = init_weights(Model(tiny_args(num_transformer_layers=2)), 5)
    prompts = [tok.encode("red blue green red blue green red"), tok.encode("the cat sat")]
    want = []
    for ids in prompts:
        toks = [r.token for r in stream_generate(model, tok, ids, max_tokens=12, temp=0.0)]
        want.append([t for t in toks if t not in tok.eos_token_ids])
    with BatchEngine(model, tok, draft_model=draft, num_draft_tokens=3) as engine:
        got = batch_generate(engine, prompts, max_tokens=12, n=2)
        assert engine.stats.peak_batch <= 1
    assert got == [[w, w] for w in want]


def test_several_models_are_listed_and_routed(served):
    _, model, tok, _ = served
    small = init_weights(Model(tiny_args(num_transformer_layers=2)), 9)
    app = create_app([ServedModel("big", model, tok, aliases=["b"]), ServedModel("small", small, tok)])
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["big", "small"]
        for name, m in (("b", model), ("small", small), (None, model)):
            body = {"prompt": "the cat", "max_tokens": 6, "temperature": 0, **({"model": name} if name else {})}
            r = c.post("/v1/completions", json=body).json()
            assert r["choices"][0]["text"] == reference(m, tok, "the cat", 6)
        _expect(c.post("/v1/completions", json={"prompt": "x", "model": "medium"}), 404, "model")


def test_cors_only_when_asked_for(served):
    _, model, tok, _ = served
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in (((), False), (("http://ui.example",), True)):
        app = create_app([ServedModel("m", model, tok)], ServeConfig(allowed_origins=origins))
        with BackgroundServer(app) as server:
            r = httpx.options(server.url + "/v1/chat/completions", headers=preflight, timeout=TIMEOUT)
            assert (r.headers.get("access-control-allow-origin") == "http://ui.example") == allowed


def test_serve_command_starts_a_server(model_dir):
    """The CLI in a subprocess: loads the folder, binds 127.0.0.1, answers, stops on SIGTERM."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_openelm.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "--api-key", "k"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        assert [m["id"] for m in r.json()["data"]] == [model_dir.name]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_command_bad_model_is_one_line(capsys):
    from mlx_openelm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "/no/such/model-folder"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_serve_command_help(capsys):
    from mlx_openelm.cli import main

    try:
        code = main(["serve", "--help"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "--api-key" in out and "--max-concurrency" in out

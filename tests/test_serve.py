"""The OpenAI-compatible server against the official `openai` client, on live loopback servers.

A scripted model (tests/test_serve_common.py) makes reasoning, stops and budgets exact; the tiny
DeepSeek-V3 preset with random weights covers the real architecture and seeded sampling.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import nanoseek
from nanoseek.serve.cli import main as serve_main

from test_serve_common import (ANSWER, MODEL, REASONING, engine_factory, live_server, loop_ids, metric,
                               random_model, scripted_model, tokenizer)

USER = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def scripted(tok):
    with live_server(engine_factory(scripted_model(tok), tok, max_batch_size=8, max_seq_len=4096)) as live:
        yield live


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=scripted.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def get_metrics(url) -> str:
    return httpx.get(url + "/metrics").text


def wait_for(cond, timeout=60.0):   # a liveness bound, generous for a loaded machine
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# -- the OpenAI surface -----------------------------------------------------------------------------
def test_models_and_health(client, scripted):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(scripted.url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_splits_reasoning_from_the_answer(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING and msg.reasoning == REASONING
    assert msg.content == ANSWER and r.choices[0].finish_reason == "stop"
    n_reasoning = len(tok.encode(REASONING)) + 1                       # ... + </think>
    assert r.usage.completion_tokens_details.reasoning_tokens == n_reasoning
    assert r.usage.completion_tokens == n_reasoning + 1 + len(tok.encode(ANSWER))   # + "\n\n"
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(USER)))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_sends_reasoning_then_content_and_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True, temperature=0.6, seed=3,
                                            stream_options={"include_usage": True})
    kinds, reasoning, content, usage, finish = [], "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        if getattr(d, "reasoning_content", None):
            kinds.append("r")
            reasoning += d.reasoning_content
        if d.content:
            kinds.append("c")
            content += d.content
    assert (reasoning, content, finish) == (REASONING, ANSWER, "stop")
    assert "".join(kinds) == "r" * kinds.count("r") + "c" * kinds.count("c") and len(kinds) > 2
    assert usage.completion_tokens_details.reasoning_tokens > 0


def test_completions_plain_streamed_echo_and_batch(client, tok):
    r = client.completions.create(model=MODEL, prompt="Adding", max_tokens=3, temperature=0, logprobs=1)
    assert r.choices[0].text == " two and three" and r.choices[0].finish_reason == "length"
    assert r.choices[0].logprobs.tokens == [" two", " and", " three"]
    assert r.usage.completion_tokens == 3 and r.usage.prompt_tokens == 1
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Adding", max_tokens=3, stream=True, echo=True, temperature=0) if c.choices)
    assert text == "Adding two and three"
    r = client.completions.create(model=MODEL, prompt=["Adding", " two"], n=2, max_tokens=2, seed=5)
    assert sorted((c.index, c.text) for c in r.choices) == [(0, " two and"), (1, " two and"),
                                                            (2, " and three"), (3, " and three")]


def test_stop_strings_cut_the_text(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, stop=[" three"], temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.reasoning_content == "Adding two and" and c.message.content == ""
    r = client.completions.create(model=MODEL, prompt="Adding", stop="and", max_tokens=20, temperature=0)
    assert r.choices[0].text == " two " and r.choices[0].finish_reason == "stop"


def test_n_choices_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, n=3, logprobs=True, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == ANSWER
        lp = c.logprobs.content
        assert [t.token for t in lp][:2] == ["Adding", " two"] and all(t.logprob <= 0 for t in lp)


def test_thinking_budget_closes_reasoning_and_the_model_answers(client, tok, scripted):
    close = len(tok.encode("\n</think>\n\n"))
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0, extra_body={"reasoning_budget": 3})
    m = r.choices[0].message
    assert m.reasoning_content == "Adding two and\n" and m.content == ANSWER
    assert r.usage.completion_tokens_details.reasoning_tokens == 3 + close
    assert r.usage.completion_tokens == 3 + close + len(tok.encode(ANSWER))
    # the same through streaming, with DeepSeek's other spelling, and a budget of 0
    stream = client.chat.completions.create(model=MODEL, messages=USER, stream=True, temperature=0,
                                            extra_body={"thinking_budget": 0})
    parts = [(getattr(c.choices[0].delta, "reasoning_content", None), c.choices[0].delta.content)
             for c in stream if c.choices]
    assert "".join(r or "" for r, _ in parts) == "\n" and "".join(c or "" for _, c in parts) == ANSWER
    # a budget that is not reached changes nothing; a server default applies when the body has none
    r = client.chat.completions.create(model=MODEL, messages=USER, temperature=0,
                                       extra_body={"reasoning_budget": 100})
    assert r.choices[0].message.reasoning_content == REASONING
    with live_server(engine_factory(scripted_model(tok), tok), reasoning_budget=1) as live:
        r = httpx.post(live.url + "/v1/chat/completions", json={"messages": USER, "temperature": 0}).json()
        assert r["choices"][0]["message"]["reasoning_content"] == "Adding\n"
        assert r["choices"][0]["message"]["content"] == ANSWER


def test_seeded_sampling_is_reproducible_on_the_random_deepseek_model(tok):
    with live_server(engine_factory(random_model(tok), tok, max_batch_size=4)) as live:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        ask = lambda seed: c.chat.completions.create(  # noqa: E731
            model=MODEL, messages=USER, max_tokens=12, temperature=1.0, seed=seed).choices[0].message
        a, b, other = ask(7), ask(7), ask(8)
        assert a.reasoning_content == b.reasoning_content and a.content == b.content
        assert (other.reasoning_content, other.content) != (a.reasoning_content, a.content)
        r = c.completions.create(model=MODEL, prompt="Adding two", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens <= 5


# -- errors -----------------------------------------------------------------------------------------
def test_api_key_is_required_and_checked(tok):
    with live_server(engine_factory(scripted_model(tok), tok), api_key="s3cret") as live:
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model=MODEL, messages=USER)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.get(live.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=USER, temperature=0)
        assert r.choices[0].message.content == ANSWER
        assert httpx.get(live.url + "/health").status_code == 200          # health needs no key


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages[0].role"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 1000}', 400, "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, None),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e300}', 400, "seed"),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": [1]}', 400, "stop"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400, "tools"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}', 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors_naming_the_field(scripted, body, status, param):
    r = httpx.post(scripted.url + "/v1/chat/completions", content=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_unknown_route_huge_body_and_completions_errors(scripted):
    r = httpx.get(scripted.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(scripted.url + "/v1/chat/completions", content=b"x" * (5 << 20))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(scripted.url + "/v1/completions", json={"prompt": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(scripted.url + "/v1/completions", json={"prompt": "x" * 20000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # a web page elsewhere cannot make a visitor's browser use the server; the chat page itself can
    r = httpx.post(scripted.url + "/v1/chat/completions", json={"messages": USER},
                   headers={"origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = httpx.post(scripted.url + "/v1/chat/completions", json={"messages": USER},
                   headers={"origin": scripted.url})
    assert r.status_code == 200


# -- robustness ------------------------------------------------------------------------------------
def _loop_stream(url, tok, max_tokens, **kw):
    """A streaming completion that runs until max_tokens (the scripted model's loop)."""
    body = {"prompt": loop_ids(tok)[:1], "max_tokens": max_tokens, "stream": True, "temperature": 0, **kw}
    return httpx.stream("POST", url + "/v1/completions", json=body, timeout=60)


def test_concurrent_streams_are_decoded_in_one_batch(scripted, tok):
    before = metric(get_metrics(scripted.url), "nanoseek_engine_steps_total")
    with _loop_stream(scripted.url, tok, 4000) as long:
        lines = long.iter_lines()
        assert next(lines).startswith("data: ")        # the long request is running

        async def one():
            text = ""
            async with httpx.AsyncClient(timeout=60) as c:
                async with c.stream("POST", scripted.url + "/v1/completions", json={
                        "prompt": loop_ids(tok)[:1], "max_tokens": 40, "stream": True, "temperature": 0}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
            return text

        async def many():
            return await asyncio.gather(*[one() for _ in range(6)])
        texts = asyncio.run(many())
    assert texts == [" plusWhat" * 20] * 6
    m = get_metrics(scripted.url)
    assert metric(m, "nanoseek_max_batch_size_observed") >= 2
    assert metric(m, "nanoseek_engine_steps_total") > before
    wait_for(lambda: metric(get_metrics(scripted.url), "nanoseek_running_requests") == 0)


def test_queue_full_429_and_disconnects_free_their_rows(tok):
    with live_server(engine_factory(scripted_model(tok), tok, max_batch_size=1, max_queue=1,
                                    max_seq_len=100_000)) as live:
        with _loop_stream(live.url, tok, 90_000) as running:
            lines = running.iter_lines()      # keep a reference: a collected iterator closes the stream
            assert next(lines).startswith("data: ")
            with _loop_stream(live.url, tok, 90_000) as queued:
                assert queued.status_code == 200
                wait_for(lambda: metric(get_metrics(live.url), "nanoseek_queue_depth") == 1)
                r = httpx.post(live.url + "/v1/completions", json={"prompt": "Adding", "max_tokens": 2})
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                assert r.headers["retry-after"] == "1"
        # both streams were closed by the client: the engine dropped them
        wait_for(lambda: metric(get_metrics(live.url), "nanoseek_aborted_requests_total") >= 2)
        wait_for(lambda: live.worker.batch_size == 0 and live.worker.queue_depth == 0)
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={"prompt": loop_ids(tok)[:1], "max_tokens": 90_000},
                       timeout=0.5)
        wait_for(lambda: metric(get_metrics(live.url), "nanoseek_aborted_requests_total") >= 3)
        wait_for(lambda: live.worker.batch_size == 0)
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "Adding", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " two and"


def test_503_while_loading_then_ready(tok):
    release = threading.Event()
    make = engine_factory(scripted_model(tok), tok)

    def slow():
        release.wait(30)
        return make()

    from nanoseek.serve.app import create_app
    from nanoseek.serve.cli import _bind, build_server
    from nanoseek.serve.worker import Worker
    worker = Worker(slow)
    sock = _bind("127.0.0.1", 0)
    server = build_server(create_app(worker, MODEL), worker, port=sock.getsockname()[1], log_level="warning")
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_for(lambda: server.started)
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        release.set()
        wait_for(lambda: httpx.get(url + "/health").status_code == 200)
        worker.drain()                        # what the first SIGTERM does before uvicorn drains
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    finally:
        release.set()
        server.should_exit = True
        t.join(15)


def test_cli_sigterm_drains_in_flight_requests(tmp_path, tok):
    model = scripted_model(tok)
    nanoseek.save(model, tok, tmp_path / "m")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.serve", "--model", str(tmp_path / "m"), "--port", "0",
                             "--max-seq-len", "4096"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        threading.Thread(target=proc.stderr.read, daemon=True).start()    # keep the pipe drained
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _health(url) == 200, timeout=60)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "m"
        got = []
        with _loop_stream(url, tok, 500) as r:
            lines = r.iter_lines()
            got.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            got += [x for x in lines if x]
        assert got[-1] == "data: [DONE]"
        finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in got if x.startswith("data: {")]
        assert finish[-1] == "length"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after draining
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _health(url):
    try:
        return httpx.get(url + "/health").status_code
    except httpx.TransportError:
        return None


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, tok):
    assert serve_main(["--model", str(tmp_path / "missing")]) == 2
    assert serve_main(["--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert serve_main(["--model", str(tmp_path)]) == 2                       # no config.json
    nanoseek.save(scripted_model(tok), tok, tmp_path / "m")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert serve_main(["--model", str(tmp_path / "m"), "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("nanoseek: error:") for e in err)
    assert "cannot listen" in err[-1]

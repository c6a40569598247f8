"""Fuzz the server with malformed and extreme requests: never a 5xx, and healthy afterwards.

Bodies are bad bytes, arbitrary JSON, and valid requests with fields replaced by wrong types,
huge or negative numbers, NaN-like literals, unicode (lone surrogates included), empty or missing
messages; both endpoints, streaming or not. Bounded: 300 examples (NANOSEEK_FUZZ_EXAMPLES=5000 for
a deeper run), no deadline, no database.
"""

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_serve_common import ANSWER, REASONING, engine_factory, live_server, metric, scripted_model, tokenizer

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "stop", "seed", "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "reasoning_budget", "thinking_budget",
          "response_format", "tools", "logit_bias", "best_of", "suffix", "user"]

unicode = (st.text(st.characters(codec=None), max_size=40)
           | st.text(st.characters(categories=["Co", "Mn", "So", "Cc"]), max_size=8)
           | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)       # lone surrogates
           | st.sampled_from(["<think>", "</think>", "<｜end▁of▁sentence｜>", "\x00", "\u202e", "🧠" * 50]))
numbers = st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**63, -2**63, 10**30, -10**30, 1e308, -1e308, 0.5, -0.0,
                           1e-320, 4096, 255]) | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | numbers | unicode
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(unicode, inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]) | json_values,
                  "content": unicode | json_values | st.just([{"type": "text", "text": "hi"}])}), max_size=4)
prompts = unicode | st.lists(st.integers(-5, 400), max_size=6) | st.lists(unicode, max_size=3) | json_values
good_chat = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "max_tokens": 20}


@st.composite
def bodies(draw):
    kind = draw(st.sampled_from(["bytes", "json", "text", "mutated", "mutated", "mutated"]))
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    if kind == "bytes":
        return path, draw(st.binary(max_size=64) | unicode.map(lambda s: s.encode("utf-8", "surrogatepass")))
    if kind == "json":
        return path, json.dumps(draw(json_values)).encode()
    if kind == "text":       # well-formed requests whose text is anything unicode can spell
        text = draw(unicode)
        body = {"messages": [{"role": draw(st.sampled_from(["user", "system", "assistant"])), "content": text}]} \
            if path.endswith("chat/completions") else {"prompt": text}
        return path, json.dumps(body | {"max_tokens": 20, "stop": draw(st.none() | unicode)}).encode()
    body = dict(good_chat) if path.endswith("chat/completions") else {"prompt": "Adding", "max_tokens": 20}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and name in body:
            del body[name]
        elif name == "messages":
            body[name] = draw(messages)
        elif name == "prompt":
            body[name] = draw(prompts)
        else:
            body[name] = draw(scalars | json_values)
    if draw(st.booleans()):
        body["stream"] = True
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def server():
    tok = tokenizer()
    # a short context bounds the slowest example (the scripted loop x n=16) on a loaded machine
    with live_server(engine_factory(scripted_model(tok), tok, max_batch_size=16, max_seq_len=64)) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@settings(max_examples=int(os.environ.get("NANOSEEK_FUZZ_EXAMPLES", 300)), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(req=bodies())
def test_no_request_makes_the_server_fail(http, req):
    path, raw = req
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert not any('"error"' in e[:12] for e in events)
        return
    body = r.json()
    if r.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
    else:
        assert body["choices"] and "usage" in body


def test_still_healthy_after_the_fuzz(server, http):
    assert http.get("/health").json()["status"] == "ok"
    r = http.post("/v1/chat/completions", json=good_chat | {"temperature": 0})
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": ANSWER,
                                                 "reasoning_content": REASONING, "reasoning": REASONING}
    m = http.get("/metrics").text
    assert metric(m, "nanoseek_running_requests") == 0 and metric(m, "nanoseek_queue_depth") == 0
    assert not [line for line in m.splitlines() if line.startswith("nanoseek_requests_total") and 'status="5' in line]

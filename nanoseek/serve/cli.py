"""`nanoseek serve`: flags, the uvicorn server, and a graceful drain on SIGTERM.

    nanoseek serve --model DIR_OR_GGUF [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-batch N] [--max-queue N] [--quantize auto|none|fp16|bf16|int8|int4|w8a8] [--compile]
                   [--reasoning-budget N] [--log-prompts] [--max-tokens N] [--allowed-hosts a,b]
                   [--max-concurrency N] [--read-timeout S]
    python -m nanoseek.serve --model DIR        # the same, without the nanoseek CLI

The socket is bound first (a busy port is a one-line error, exit 2), then uvicorn starts at once
and the model loads in the engine thread: until it is ready, /health and generation answer 503.
SIGTERM (or Ctrl-C) stops admitting requests (503), lets in-flight ones finish (up to
--drain-timeout seconds), then exits; a second signal exits at once.

Limits (docs/security.md): requests must name this server in their Host header (--allowed-hosts
adds names; guards against DNS rebinding), at most --max-concurrency in flight (503 beyond),
--read-timeout seconds to send a request head and again its body, --max-tokens per request.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..args import HelpFormatter
from ..errors import NanoseekError

log = logging.getLogger("nanoseek.serve")
EXAMPLES = ("examples:\n"
            "  nanoseek serve --model runs/distill/final\n"
            "  nanoseek serve --model SmolLM2-135M-Instruct.Q4_1.gguf --quantize fp16 --port 8080\n"
            "  NANOSEEK_API_KEY=secret nanoseek serve --model DIR --host 0.0.0.0 --reasoning-budget 256\n"
            "then: curl localhost:8000/v1/chat/completions -d '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'\n"
            "      or open http://127.0.0.1:8000/ for the chat page")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="HF-style directory or .gguf file")
    s.add_argument("--model-name", default=None, help="the id clients use (default: the file or directory name)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOSEEK_API_KEY)")
    s.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get 429")
    s.add_argument("--max-seq-len", type=int, default=4096, help="context per request (prompt + completion)")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens one request may generate (default: what the context leaves); more is a 400")
    s.add_argument("--allowed-hosts", default="",
                   help="comma-separated Host names this server answers to besides its address "
                        "(e.g. chat.example.com,*.example.com; '*' for any): guards against DNS rebinding")
    s.add_argument("--max-concurrency", type=int, default=512,
                   help="requests in flight (streaming ones included); more get 503 (default 512)")
    s.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send its request head, and again its body (default 30)")
    s.add_argument("--quantize", choices=["auto", "none", "fp16", "bf16", "int8", "int4", "w8a8"], default="auto",
                   help="weight format: auto (default) = the fastest lossless one here (fp16 weights on CPU, "
                        "the model's own dtype on GPU); none = as loaded; int8/int4 smaller, slightly lossy")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default float32")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 1.2-1.7x faster decode on CPU after ~20-60 s of compiling "
                        "at the first request (docs/benchmarks.md)")
    s.add_argument("--reasoning-budget", type=int, default=None,
                   help="default max reasoning tokens before </think> is forced (requests may override)")
    s.add_argument("--log-prompts", action="store_true", help="log prompts (off by default: they may be private)")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads for the engine (default: torch's)")
    s.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to finish in-flight requests on SIGTERM")


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible server with visible reasoning and a web chat page",
        formatter_class=HelpFormatter,
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions,\n"
                    "/v1/completions, /v1/models, /health, /metrics) with continuous batching;\n"
                    "reasoning goes to message.reasoning_content. A chat page is served at /.\n\n" + EXAMPLES)
    add_arguments(s)
    s.set_defaults(func=run)
    return s


def _check(args) -> None:
    """Cheap checks before the server starts (the weights themselves load in the engine thread)."""
    for name, lo in (("max_batch", 1), ("max_queue", 1), ("max_seq_len", 2), ("port", 0), ("max_concurrency", 1)):
        if getattr(args, name) < lo:
            raise NanoseekError(f"--{name.replace('_', '-')} must be >= {lo}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise NanoseekError("--max-tokens must be >= 1")
    if not 0 < args.read_timeout < 1e6:
        raise NanoseekError("--read-timeout must be a positive number of seconds")
    if args.port > 65535:
        raise NanoseekError("--port must be <= 65535")
    if args.threads is not None and args.threads < 1:
        raise NanoseekError("--threads must be >= 1")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise NanoseekError("--reasoning-budget must be >= 0")
    if args.api_key is not None and not args.api_key.strip():
        raise NanoseekError("--api-key is empty")
    p = Path(args.model)
    if not p.exists():
        raise NanoseekError(f"{args.model}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise NanoseekError(f"{args.model}: not a GGUF file and not a model directory")
    else:
        from ..weights.hf import read_config
        read_config(p)                       # config.json present, parseable, a supported architecture
        if not (p / "tokenizer.json").is_file():
            raise NanoseekError(f"{args.model}: no tokenizer.json (the server needs a tokenizer)")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NanoseekError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_server(app, worker, host="127.0.0.1", port=0, drain_timeout=60.0, log_level="info", read_timeout=30.0):
    """A uvicorn server whose first SIGTERM/SIGINT makes the worker stop admitting (503) before draining;
    a connection that does not complete its request head within read_timeout seconds is closed."""
    import uvicorn

    from .guard import head_timeout_protocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout, timeout_keep_alive=5,
                            http=head_timeout_protocol(read_timeout))   # h11 caps a request head at 16 KiB
    return DrainingServer(config)


def run(args) -> int:
    _check(args)
    import torch

    from ..infer import Engine
    from .app import create_app
    from .worker import Worker

    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
    if not _is_loopback(args.host) and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", args.host)
    if not _is_loopback(args.host) and not args.allowed_hosts:
        log.info("clients must reach this server by IP address, or by a name listed in --allowed-hosts")

    if args.threads:
        torch.set_num_threads(args.threads)

    def make_engine():
        from ..weights import load
        model, tok = load(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None)
        from ..infer.quantize import best_lossless_mode, quantize
        mode = args.quantize
        if mode == "auto":  # an fp32 model gets the fast lossless weights; a bf16/fp16 one stays
            mode = best_lossless_mode(model.device.type) if model.dtype == torch.float32 else None
        if mode and mode != "none":
            quantize(model, mode)
        log.info("model loaded: %s (%s)", args.model, model.config.architecture)
        return Engine(model, tok, max_batch_size=args.max_batch, max_seq_len=args.max_seq_len,
                      max_queue=args.max_queue, compile=args.compile)

    sock = _bind(args.host, args.port)
    name = args.model_name or (Path(args.model).stem if Path(args.model).is_file() else Path(args.model).resolve().name)
    worker = Worker(make_engine)
    allowed = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    app = create_app(worker, name, api_key=args.api_key, reasoning_budget=args.reasoning_budget,
                     log_prompts=args.log_prompts, max_tokens=args.max_tokens, host=args.host,
                     allowed_hosts=allowed, max_concurrency=args.max_concurrency, body_timeout=args.read_timeout)
    server = build_server(app, worker, args.host, sock.getsockname()[1], args.drain_timeout,
                          read_timeout=args.read_timeout)
    worker.on_failed = lambda msg: setattr(server, "should_exit", True)
    log.info("nanoseek serve: %s as '%s' on http://%s:%d (loading the model)", args.model, name,
             args.host, sock.getsockname()[1])
    server.run(sockets=[sock])
    if worker.status == "failed":
        raise NanoseekError(worker.error)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanoseek.serve", formatter_class=HelpFormatter,
                                description=__doc__.split("\n\n")[0] + "\n\n" + EXAMPLES)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

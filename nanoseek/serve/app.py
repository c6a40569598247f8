"""The FastAPI app: OpenAI-compatible endpoints over the engine thread, plus the web chat page.

    from nanoseek.serve.app import create_app
    from nanoseek.serve.worker import Worker
    app = create_app(Worker(lambda: Engine(model, tok, max_batch_size=32)), model_name="tiny")
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: nanoseek serve --model DIR

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or SSE streaming), GET /v1/models,
/health, /metrics (Prometheus text) and / (the chat page, static files in ./static).
Chat answers of reasoning models carry the chain of thought in `reasoning_content` (DeepSeek's
field, also sent as `reasoning`) and the answer in `content`; usage counts reasoning tokens.
Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .. import __version__
from ..infer import QueueFull, SamplingParams
from ..infer.reasoning import opens_reasoning
from .guard import Guard, HostCheck
from .protocol import ApiError, GenRequest, bad, parse_chat, parse_completion
from .worker import Event, Job, Unavailable, Worker

log = logging.getLogger("nanoseek.serve")
STATIC = Path(__file__).parent / "static"
FINGERPRINT = f"nanoseek-{__version__}"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")]
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def create_app(worker: Worker, model_name: str, api_key: str | None = None,
               reasoning_budget: int | None = None, log_prompts: bool = False,
               max_body_bytes: int = 4 << 20, max_tokens: int | None = None, host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, max_concurrency: int | None = None,
               body_timeout: float = 30.0, template_seconds: float = 5.0) -> FastAPI:
    """max_tokens: the server's cap per request (None: the context); host: the bound address the Host
    header is checked against (with allowed_hosts); body_timeout: seconds to receive a request body;
    template_seconds: the chat template's render bound."""
    templates = RenderThreads(2)     # chat templates render off the event loop

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="nanoseek", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Guard, hosts=HostCheck(host, allowed_hosts), max_concurrency=max_concurrency)
    app.add_middleware(_CountAndHeaders, metrics=worker.metrics)     # outermost: counts Guard's answers too
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    metrics = worker.metrics

    # -- errors -----------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        headers = {"retry-after": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        msg = f"unknown route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return JSONResponse(ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    def authorize(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def same_origin(request: Request):
        """Browsers send Origin on cross-site POSTs: refuse them, so a web page cannot spend this server."""
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            raise ApiError(403, f"cross-origin request from {origin[:100]} refused", code="cross_origin")

    def ready():
        if worker.status != "ready":
            raise ApiError(503, worker.error or f"the server is {worker.status}", code=worker.status)

    async def read_json(request: Request):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"request body larger than {max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()

        async def receive():
            async for chunk in request.stream():
                raw.extend(chunk)
                if len(raw) > max_body_bytes:
                    raise ApiError(413, f"request body larger than {max_body_bytes} bytes", code="request_too_large")
        try:
            await asyncio.wait_for(receive(), body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {body_timeout:g} s",
                           code="request_timeout") from None
        try:
            body = json.loads(bytes(raw), parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON ({str(e)[:120]})", code="invalid_json") from None
        try:   # JSON escapes can spell lone surrogates ("\ud800"), which are not text
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the body contains a lone surrogate escape (\\ud800-\\udfff)",
                           code="invalid_json") from None
        return body

    # -- plain endpoints --------------------------------------------------------------------------
    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.status == "ready" else worker.status, "model": model_name}
        if worker.error:
            body["error"] = worker.error
        return JSONResponse(body, status_code=200 if worker.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus():
        gauges = {"nanoseek_queue_depth": ("requests waiting for a batch row", worker.queue_depth),
                  "nanoseek_running_requests": ("requests in the running batch", worker.batch_size),
                  "nanoseek_max_batch_size_observed": ("largest batch decoded together so far",
                                                       worker.max_batch_seen),
                  "nanoseek_ready": ("1 when the model is loaded and admitting requests",
                                     int(worker.status == "ready"))}
        return Response(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": model_name, "object": "model", "created": started, "owned_by": "nanoseek"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return model_card()

    # -- generation -------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        same_origin(request)
        body = await read_json(request)
        ready()
        req = parse_chat(body, model_name, reasoning_budget, max_tokens)
        prompt, ids = await _render_chat(worker.tok, req.messages, templates, template_seconds)
        started_in_reasoning = opens_reasoning(prompt)
        jobs = _jobs(req, [ids], worker, reasoning=True, started_in_reasoning=started_in_reasoning,
                     cap=max_tokens)
        ctx = _Ctx("chatcmpl", "chat", model_name, t0, prompt, [ids], jobs, log_prompts)
        return await _respond(request, worker, req, ctx, _chat_stream, _chat_body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        authorize(request)
        same_origin(request)
        body = await read_json(request)
        ready()
        req = parse_completion(body, model_name, worker.tok.vocab_size, max_tokens)
        prompts = [p if isinstance(p, list) else await asyncio.to_thread(worker.tok.encode, p) for p in req.prompts]
        if not all(prompts):
            raise bad("prompt", "the prompt encodes to no tokens")
        jobs = _jobs(req, prompts, worker, reasoning=False, cap=max_tokens)
        ctx = _Ctx("cmpl", "completions", model_name, t0, req.prompts, prompts, jobs, log_prompts)
        return await _respond(request, worker, req, ctx, _completion_stream, _completion_body)

    started = int(time.time())
    app.state.worker = worker
    return app


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


class _Ctx:
    """One HTTP request's bookkeeping: ids, timing, token counts for usage, metrics and the log."""

    def __init__(self, prefix, endpoint, model, t0, prompt, prompt_ids, jobs, log_prompts):
        self.id, self.model = f"{prefix}-{uuid.uuid4().hex[:24]}", model
        self.endpoint, self.t0, self.jobs, self.prompt_ids = endpoint, t0, jobs, prompt_ids
        self.created, self.first_token = int(time.time()), None
        if log_prompts:
            log.info("%s prompt: %r", self.id, prompt)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(len(j.generated) for j in self.jobs)
        u = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if self.endpoint == "chat":
            u["completion_tokens_details"] = {"reasoning_tokens": sum(j.reasoning_tokens for j in self.jobs)}
        return u

    def saw(self, ev: Event, metrics):
        if self.first_token is None and ev.token_ids:
            self.first_token = time.perf_counter()
            metrics.ttft.observe(self.first_token - self.t0)

    def done(self, metrics, finish):
        u = self.usage()
        metrics.prompt_tokens.inc(u["prompt_tokens"])
        metrics.completion_tokens.inc(u["completion_tokens"])
        metrics.reasoning_tokens.inc(sum(j.reasoning_tokens for j in self.jobs))
        dt = time.perf_counter() - self.t0
        metrics.latency.observe(dt)
        log.info("%s %s prompt=%d completion=%d finish=%s %.2fs", self.id, self.endpoint,
                 u["prompt_tokens"], u["completion_tokens"], ",".join(map(str, finish)), dt)


class RenderThreads:
    """At most `n` chat-template renders at once, each in a daemon thread: a template that ignores its
    deadline costs one thread until it ends, but never the event loop, and never blocks the exit."""

    def __init__(self, n: int):
        self.n, self.slots = n, None

    async def run(self, fn, timeout: float):
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.n)     # bound to the running loop
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await asyncio.wait_for(self.slots.acquire(), timeout)
        fut = loop.create_future()

        def target():
            try:
                result = (fn(), None)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
                result = (None, e)
            try:
                loop.call_soon_threadsafe(self._done, fut, *result)
            except RuntimeError:                       # the loop has closed: nobody is waiting
                pass
        threading.Thread(target=target, name="nanoseek-template", daemon=True).start()
        return await asyncio.wait_for(asyncio.shield(fut), max(deadline - loop.time(), 0.001))

    def _done(self, fut, value, error):
        self.slots.release()                           # when the thread ends, not when the wait does
        if not fut.done():
            fut.set_exception(error) if error else fut.set_result(value)


async def _render_chat(tok, messages, threads: RenderThreads, seconds: float) -> tuple[str, list[int]]:
    """The chat prompt and its ids, rendered off the event loop with the template's time bound."""
    limit = 2 * seconds + 1
    try:
        return await threads.run(functools.partial(tok.encode_chat, messages, seconds=seconds), limit)
    except asyncio.TimeoutError:   # the render ignored its own deadline: stop waiting for it
        raise bad("messages", f"the chat template did not finish within {limit:g} s") from None
    except Exception as e:  # noqa: BLE001 - NanoseekError from a bound, raise_exception() in the template
        raise bad("messages", f"the chat template rejected the messages: {str(e)[:300]}") from None


def _jobs(req: GenRequest, prompts: list[list[int]], worker: Worker, reasoning: bool,
          started_in_reasoning: bool = False, cap: int | None = None) -> list[Job]:
    """One Job per (prompt, choice); a max_tokens past the context left after the prompt is a 400."""
    jobs, max_seq = [], worker.engine.max_seq_len
    for pi, ids in enumerate(prompts):
        left = max_seq - len(ids)
        if left < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context is {max_seq}",
                           param="messages" if reasoning else "prompt", code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > left:
            raise ApiError(400, f"max_tokens is {req.max_tokens}, but this server's context is {max_seq} tokens "
                                f"and the prompt has {len(ids)}: at most {left} can be generated",
                           param="max_tokens", code="context_length_exceeded")
        n_tokens = req.max_tokens or min(left, req.default_max_tokens or left, cap or left)
        for j in range(req.n):
            p = dict(req.params)
            if p["seed"] is not None:
                p["seed"] = (p["seed"] + j) & (2**63 - 1)
            params = SamplingParams(max_tokens=n_tokens, logprobs=req.logprobs, **p)
            jobs.append(Job(ids, params, index=pi * req.n + j, reasoning=reasoning,
                            started_in_reasoning=started_in_reasoning, budget=req.budget if reasoning else None))
    return jobs


async def _respond(request: Request, worker: Worker, req: GenRequest, ctx: _Ctx, stream_fn, body_fn):
    sink: asyncio.Queue = asyncio.Queue()
    try:
        await worker.submit(ctx.jobs, sink)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {e}", code="queue_full") from None
    except Unavailable as e:
        raise ApiError(503, str(e), code=worker.status) from None
    except ValueError as e:
        raise bad("messages" if ctx.endpoint == "chat" else "prompt", str(e)) from None
    events = worker.events(ctx.jobs, sink)
    if req.stream:
        return StreamingResponse(_sse(stream_fn(ctx, req, events, worker)), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-request-id": ctx.id},
                                 background=BackgroundTask(_abort_left, worker, ctx.jobs))
    collected = asyncio.create_task(_collect(ctx, events, worker))
    gone = asyncio.create_task(_disconnected(request))
    await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not collected.done():          # the client left: free its batch rows
        collected.cancel()
        worker.abort(ctx.jobs)
        return Response(status_code=499)
    gone.cancel()
    acc = collected.result()
    errors = [a["error"] for a in acc.values() if a["error"]]
    if errors:
        raise ApiError(500, errors[0], code="engine_error")
    ctx.done(worker.metrics, [a["finish_reason"] for a in acc.values()])
    return JSONResponse(body_fn(ctx, req, acc, worker), headers={"x-request-id": ctx.id})


async def _abort_left(worker: Worker, jobs: list[Job]):
    """After a stream ends, however it ended: abort what is still running (a no-op for finished jobs)."""
    worker.abort(jobs)


async def _disconnected(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(ctx: _Ctx, events, worker) -> dict[int, dict]:
    acc = {j.index: {"reasoning": "", "content": "", "token_ids": [], "logprobs": [], "finish_reason": None,
                     "error": None} for j in ctx.jobs}
    async for ev in events:
        ctx.saw(ev, worker.metrics)
        a = acc[ev.index]
        a["reasoning"] += ev.reasoning
        a["content"] += ev.content
        a["token_ids"] += ev.token_ids
        a["logprobs"] += ev.logprobs or []
        a["finish_reason"] = ev.finish_reason or a["finish_reason"]
        a["error"] = ev.error or a["error"]
    return acc


async def _sse(chunks):
    async for c in chunks:
        yield f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"
    yield "data: [DONE]\n\n"


def _head(ctx, kind, worker) -> dict:
    return {"id": ctx.id, "object": kind, "created": ctx.created, "model": ctx.model,
            "system_fingerprint": FINGERPRINT}


def _chat_logprobs(tok, ids, lps):
    out = []
    for t, lp in zip(ids, lps):
        s = tok.decode([t])
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []})
    return {"content": out}


# -- chat --------------------------------------------------------------------------------------------
def _chat_body(ctx, req, acc, worker) -> dict:
    choices = []
    for i, a in sorted(acc.items()):
        msg = {"role": "assistant", "content": a["content"]}
        if a["reasoning"] or any(j.started_in_reasoning for j in ctx.jobs):
            msg["reasoning_content"] = msg["reasoning"] = a["reasoning"]
        choices.append({"index": i, "message": msg, "finish_reason": a["finish_reason"],
                        "logprobs": _chat_logprobs(worker.tok, a["token_ids"], a["logprobs"]) if req.logprobs else None})
    return {**_head(ctx, "chat.completion", worker), "choices": choices, "usage": ctx.usage()}


async def _chat_stream(ctx, req, events, worker):
    head = _head(ctx, "chat.completion.chunk", worker)
    extra = {"usage": None} if req.include_usage else {}

    def chunk(index, delta, finish=None, logprobs=None):
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}], **extra}

    finish = {}
    for j in ctx.jobs:
        yield chunk(j.index, {"role": "assistant", "content": ""})
    try:
        async for ev in events:
            ctx.saw(ev, worker.metrics)
            if ev.error:
                yield {"error": ApiError(500, ev.error, code="engine_error").body()["error"]}
                return
            lp = _chat_logprobs(worker.tok, ev.token_ids, ev.logprobs) if req.logprobs and ev.logprobs else None
            if ev.reasoning:
                yield chunk(ev.index, {"reasoning_content": ev.reasoning, "reasoning": ev.reasoning}, logprobs=lp)
                lp = None
            if ev.content or lp:
                yield chunk(ev.index, {"content": ev.content}, logprobs=lp)
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
                yield chunk(ev.index, {}, ev.finish_reason)
    finally:
        if len(finish) == len(ctx.jobs):
            ctx.done(worker.metrics, list(finish.values()))
    if req.include_usage:
        yield {**head, "choices": [], "usage": ctx.usage()}


# -- completions -------------------------------------------------------------------------------------
def _completion_logprobs(tok, ids, lps, offset=0) -> dict:
    tokens = [tok.decode([t]) for t in ids]
    offsets, pos = [], offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": None, "text_offset": offsets}


def _prompt_text(ctx, job, worker) -> str:
    return worker.tok.decode(job.prompt_ids)


def _completion_body(ctx, req, acc, worker) -> dict:
    choices = []
    for job in ctx.jobs:
        a = acc[job.index]
        prefix = _prompt_text(ctx, job, worker) if req.echo else ""
        choices.append({"index": job.index, "text": prefix + a["content"], "finish_reason": a["finish_reason"],
                        "logprobs": _completion_logprobs(worker.tok, a["token_ids"], a["logprobs"], len(prefix))
                        if req.logprobs else None})
    return {**_head(ctx, "text_completion", worker), "choices": choices, "usage": ctx.usage()}


async def _completion_stream(ctx, req, events, worker):
    head = _head(ctx, "text_completion", worker)
    extra = {"usage": None} if req.include_usage else {}
    finish = {}
    if req.echo:
        for job in ctx.jobs:
            yield {**head, "choices": [{"index": job.index, "text": _prompt_text(ctx, job, worker),
                                        "logprobs": None, "finish_reason": None}], **extra}
    try:
        async for ev in events:
            ctx.saw(ev, worker.metrics)
            if ev.error:
                yield {"error": ApiError(500, ev.error, code="engine_error").body()["error"]}
                return
            if ev.finish_reason:
                finish[ev.index] = ev.finish_reason
            if ev.content or ev.finish_reason or (req.logprobs and ev.token_ids):
                lp = (_completion_logprobs(worker.tok, ev.token_ids, ev.logprobs or [])
                      if req.logprobs else None)
                yield {**head, "choices": [{"index": ev.index, "text": ev.content, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}], **extra}
    finally:
        if len(finish) == len(ctx.jobs):
            ctx.done(worker.metrics, list(finish.values()))
    if req.include_usage:
        yield {**head, "choices": [], "usage": ctx.usage()}


class _CountAndHeaders:
    """ASGI middleware: count requests by route and status; add security headers to every response."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(route=route, status=str(message["status"]))
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_wrapper)

"""The engine thread: the one place that touches the (not thread-safe) continuous-batching Engine.

    worker = Worker(lambda: Engine(model, tok, max_batch_size=32), metrics)
    worker.start()                                    # loads the engine in its thread, then loops
    jobs = [Job(prompt_ids, SamplingParams(max_tokens=64), reasoning=True, started_in_reasoning=True)]
    async for ev in worker.run(jobs):                 # inside the event loop (FastAPI handlers)
        print(ev.reasoning, ev.content, ev.finish_reason)

The event loop hands work to the thread through a thread-safe queue (`add`, `abort`, `close`);
the thread loops `engine.step()` while there is work and posts `Event`s back to each request's
asyncio.Queue with `loop.call_soon_threadsafe`. Admission (QueueFull, prompt too long) is
answered through an asyncio future, so a handler knows its HTTP status before it streams.

Reasoning lives here too, because the thinking budget must act between two engine steps: the
thread splits each job's text into reasoning and content (`ReasoningSplitter`), counts reasoning
tokens, and when a job reaches its budget while still inside <think> it aborts the engine
request and re-submits prompt + generated + "\\n</think>\\n\\n" as a continuation, so no token
is generated past the budget and the model goes on to answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from ..infer import Engine, QueueFull, SamplingParams
from ..infer.reasoning import ReasoningSplitter
from .metrics import Metrics

log = logging.getLogger("nanoseek.serve")
CLOSE_THINK = "\n</think>\n\n"


class Unavailable(RuntimeError):
    """The engine is loading, failed to load, or the server is shutting down (HTTP 503)."""


@dataclass
class Event:
    """What one choice gained in one engine step, already split into reasoning and content."""
    index: int
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Job:
    """One choice of one HTTP request; the engine may see it as several requests (continuations)."""
    prompt_ids: list[int]
    params: SamplingParams
    index: int = 0
    reasoning: bool = False               # split <think>...</think> out of the text
    started_in_reasoning: bool = False    # the prompt opened <think> (the R1 template does)
    budget: int | None = None             # reasoning tokens allowed before </think> is forced
    # owned by the engine thread once submitted
    engine_id: str = ""
    generated: list[int] = field(default_factory=list)
    text: str = ""                        # text received from the engine so far
    reasoning_tokens: int = 0
    done: bool = False
    splitter: ReasoningSplitter | None = None
    sink: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None


class Worker:
    def __init__(self, make_engine: Callable[[], Engine], metrics: Metrics | None = None):
        self.make_engine = make_engine
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.tok = None
        self.status = "loading"           # loading -> ready -> draining -> closed | failed
        self.error: str | None = None
        self.max_batch_seen = 0
        self._inbox: queue.Queue = queue.Queue()
        self._jobs: dict[str, Job] = {}   # engine request id -> job
        self._retry: list[tuple[Job, list[int], SamplingParams]] = []   # continuations that met a full queue
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}          # events to post after this step
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._main, name="nanoseek-engine", daemon=True)
        self.on_failed: Callable[[str], None] | None = None
        self.ready = threading.Event()    # set when loaded (or failed)

    # -- event-loop side --------------------------------------------------------------------------
    def start(self) -> "Worker":
        """Start the engine thread (it loads the engine first); calling it again does nothing."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch row (read from another thread: len() of a deque is atomic)."""
        return len(self.engine.queue) + self._inbox.qsize() if self.engine else self._inbox.qsize()

    @property
    def batch_size(self) -> int:
        return len(self.engine.running) if self.engine else 0

    async def submit(self, jobs: list[Job], sink: asyncio.Queue) -> None:
        """Queue the jobs in the engine; raises QueueFull, ValueError (prompt too long) or Unavailable."""
        if self.status != "ready":
            raise Unavailable(self.error or f"the server is {self.status}")
        loop = asyncio.get_running_loop()
        for j in jobs:
            j.sink, j.loop = sink, loop
        fut = loop.create_future()
        self._inbox.put(("add", jobs, fut))
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(jobs)      # the add is ahead of this abort in the inbox, so it is undone
            raise

    def abort(self, jobs: list[Job]) -> None:
        self._inbox.put(("abort", jobs, None))

    async def run(self, jobs: list[Job]) -> AsyncIterator[Event]:
        """Submit, then yield events until every job has finished."""
        sink: asyncio.Queue = asyncio.Queue()
        await self.submit(jobs, sink)
        async for ev in self.events(jobs, sink):
            yield ev

    async def events(self, jobs: list[Job], sink: asyncio.Queue) -> AsyncIterator[Event]:
        """Events of submitted jobs until every one has finished; abort what is left on exit."""
        left = len(jobs)
        try:
            while left:
                ev = await sink.get()
                if ev.finish_reason or ev.error:
                    left -= 1
                yield ev
        finally:
            if left:
                self.abort(jobs)

    def drain(self) -> None:
        """Stop admitting new requests; the running ones go on."""
        if self.status == "ready":
            self.status = "draining"

    def close(self, timeout: float = 10.0) -> None:
        self.drain()
        self._inbox.put(("close", None, None))
        self._thread.join(timeout)
        if self.status != "failed":
            self.status = "closed"

    # -- engine thread ----------------------------------------------------------------------------
    def _main(self):
        try:
            self.engine = self.make_engine()
            self.tok = self.engine.tok
            if self.tok is None:
                raise ValueError("the model has no tokenizer (tokenizer.json or GGUF vocabulary)")
        except Exception as e:  # noqa: BLE001 - any load failure is reported, not raised in a thread
            self.status, self.error = "failed", f"loading the model failed: {e}"
            log.error(self.error)
            self.ready.set()
            if self.on_failed:
                self.on_failed(self.error)
            return
        if self.status == "loading":
            self.status = "ready"
        self.ready.set()
        while True:
            idle = not (self.engine.has_work() or self._retry)
            if not self._handle_commands(block=idle):
                break
            self._resubmit_continuations()
            if self.engine.has_work():
                self._step()
            self._flush()
        for job in list(self._jobs.values()) + [r[0] for r in self._retry]:
            self._finish(job, Event(job.index, error="the server shut down"))
        self._flush()

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False when asked to close."""
        while True:
            try:
                cmd, jobs, fut = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if cmd == "close":
                return False
            if cmd == "add":
                self._add(jobs, fut)
            elif cmd == "abort":
                for job in jobs:
                    if not job.done:
                        self.engine.abort(job.engine_id)
                        self._jobs.pop(job.engine_id, None)
                        self._retry = [r for r in self._retry if r[0] is not job]
                        job.done = True
                        self.metrics.aborted.inc()

    def _add(self, jobs: list[Job], fut: asyncio.Future):
        added = []
        try:
            for job in jobs:
                job.splitter = ReasoningSplitter(job.started_in_reasoning) if job.reasoning else None
                job.engine_id = f"job-{next(self._ids)}"
                self.engine.add_request(job.prompt_ids, job.params, request_id=job.engine_id)
                self._jobs[job.engine_id] = job
                added.append(job)
        except Exception as e:  # noqa: BLE001 - QueueFull / ValueError go back to the handler
            for job in added:
                self.engine.abort(job.engine_id)
                self._jobs.pop(job.engine_id, None)
                job.done = True
            _call(fut.get_loop(), _resolve, fut, e)
            return
        _call(fut.get_loop(), _resolve, fut, None)
        for job in jobs:   # a budget of 0 closes the reasoning before the first token
            ev = Event(job.index)
            if self._over_budget(job) and self._force_close(job, ev):
                self._post(job, ev)

    def _step(self):
        decoding = len(self.engine.running)
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 - an engine bug fails its requests, not the server
            log.exception("engine step failed")
            for job in list(self._jobs.values()):
                self.engine.abort(job.engine_id)
                self._finish(job, Event(job.index, error=f"engine error: {type(e).__name__}"))
            self.engine.queue.clear()
            for job, _, _ in self._retry:
                self._finish(job, Event(job.index, error=f"engine error: {type(e).__name__}"))
            self._retry = []
            return
        self.metrics.steps.inc()
        batch = max(decoding, len(self.engine.running))
        if batch:
            self.metrics.batch.observe(batch)
            self.max_batch_seen = max(self.max_batch_seen, batch)
        for d in deltas:
            job = self._jobs.get(d.request_id)
            if job is not None:
                self._on_delta(job, d)

    def _on_delta(self, job: Job, d):
        ev = Event(job.index, token_ids=list(d.token_ids), logprobs=d.logprobs, finish_reason=d.finish_reason)
        job.generated += d.token_ids
        job.text += d.text
        if job.splitter is None:
            ev.content = d.text
        else:
            was = job.splitter.state
            parts = job.splitter.feed(d.text) + (job.splitter.flush() if d.finish_reason else [])
            self._add_parts(ev, parts)
            if "reasoning" in (was, job.splitter.state) or any(k == "reasoning" for k, _ in parts):
                job.reasoning_tokens += len(d.token_ids)
        if d.finish_reason:
            self._finish(job, ev)
            return
        if self._over_budget(job) and not self._force_close(job, ev):
            return   # _force_close finished the job
        self._post(job, ev)

    @staticmethod
    def _over_budget(job: Job) -> bool:
        return (job.budget is not None and job.splitter is not None and job.splitter.state == "reasoning"
                and job.reasoning_tokens >= job.budget)

    def _force_close(self, job: Job, ev: Event) -> bool:
        """Replace the engine request by prompt + generated + CLOSE_THINK; False if the job ended."""
        self.engine.abort(job.engine_id)
        self._jobs.pop(job.engine_id, None)
        full = self.tok.decode(job.generated)          # text the engine still held back is lost on abort
        held = full[len(job.text):] if full.startswith(job.text) else ""
        self._add_parts(ev, job.splitter.feed(held + CLOSE_THINK))
        close_ids = self.tok.encode(CLOSE_THINK, add_special_tokens=False)
        job.text = full + CLOSE_THINK
        job.generated += close_ids
        job.reasoning_tokens += len(close_ids)
        ev.token_ids += close_ids
        if ev.logprobs is not None or job.params.logprobs:
            ev.logprobs = (ev.logprobs or []) + [0.0] * len(close_ids)   # forced: probability 1
        left = job.params.max_tokens - len(job.generated)
        if left <= 0:
            ev.finish_reason = "length"
            self._finish(job, ev)
            return False
        self._retry.append((job, job.prompt_ids + job.generated, replace(job.params, max_tokens=left)))
        return True   # the main loop submits it before the next step

    def _resubmit_continuations(self):
        waiting, self._retry = self._retry, []
        for job, ids, params in waiting:
            job.engine_id = f"job-{next(self._ids)}"
            try:
                self.engine.add_request(ids, params, request_id=job.engine_id)
            except QueueFull:
                self._retry.append((job, ids, params))
                continue
            except ValueError:          # prompt + reasoning no longer fits the context
                self._finish(job, Event(job.index, finish_reason="length"))
                continue
            self._jobs[job.engine_id] = job

    @staticmethod
    def _add_parts(ev: Event, parts):
        for kind, text in parts:
            if kind == "reasoning":
                ev.reasoning += text
            else:
                ev.content += text

    def _finish(self, job: Job, ev: Event):
        job.done = True
        self._jobs.pop(job.engine_id, None)
        self._post(job, ev)

    def _post(self, job: Job, ev: Event):
        self._outbox.setdefault(job.loop, []).append((job.sink, ev))

    def _flush(self):
        """One wake-up of the event loop per step, however many requests are in the batch."""
        for loop, items in self._outbox.items():
            _call(loop, _deliver, items)
        self._outbox = {}


def _call(loop, fn, *args):
    """loop.call_soon_threadsafe that tolerates a loop that has already closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _deliver(items):
    for sink, ev in items:
        sink.put_nowait(ev)


def _resolve(fut: asyncio.Future, exc: BaseException | None):
    if not fut.done():
        fut.set_exception(exc) if exc else fut.set_result(None)

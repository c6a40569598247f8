"""Prometheus metrics in the text exposition format, without a client library.

    m = Metrics()
    m.requests.inc(endpoint="chat", status="200")
    m.ttft.observe(0.12)
    print(m.render(gauges={"nanoseek_queue_depth": 3}))   # what GET /metrics returns

Counters and histograms are updated from the event loop and from the engine thread, so every
update takes one lock; rendering takes it too. Gauges that mirror live state (queue depth, batch
size) are read at scrape time and passed to `render`.
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class Counter:
    def __init__(self, name: str, help: str, lock: threading.Lock):
        self.name, self.help, self.lock = name, help, lock
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1, **labels):
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()) or [((), 0)]:
            lines.append(f"{self.name}{_labels(dict(key))} {v:g}")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets, lock: threading.Lock):
        self.name, self.help, self.lock = name, help, lock
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one is +Inf
        self.sum, self.count, self.max = 0.0, 0, 0.0

    def observe(self, v: float):
        with self.lock:
            i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
            self.counts[i] += 1
            self.sum += v
            self.count += 1
            self.max = max(self.max, v)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for b, c in zip(self.buckets + ("+Inf",), self.counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{b}"}} {cum}')
        lines += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Everything the server exports; `render` adds the live gauges."""

    def __init__(self):
        lock = self.lock = threading.Lock()
        self.requests = Counter("nanoseek_requests_total", "HTTP requests by endpoint and status code", lock)
        self.prompt_tokens = Counter("nanoseek_prompt_tokens_total", "prompt tokens of finished requests", lock)
        self.completion_tokens = Counter("nanoseek_completion_tokens_total", "tokens generated", lock)
        self.reasoning_tokens = Counter("nanoseek_reasoning_tokens_total", "tokens generated inside <think>", lock)
        self.aborted = Counter("nanoseek_aborted_requests_total", "requests cancelled by a client disconnect", lock)
        self.steps = Counter("nanoseek_engine_steps_total", "engine steps (one batched forward each)", lock)
        self.ttft = Histogram("nanoseek_time_to_first_token_seconds", "request arrival to first token",
                              LATENCY_BUCKETS, lock)
        self.latency = Histogram("nanoseek_request_duration_seconds", "request arrival to last token",
                                 LATENCY_BUCKETS, lock)
        self.batch = Histogram("nanoseek_batch_size", "requests decoded together per engine step",
                               BATCH_BUCKETS, lock)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """gauges: name -> (help, value)."""
        with self.lock:
            lines = []
            for m in (self.requests, self.prompt_tokens, self.completion_tokens, self.reasoning_tokens,
                      self.aborted, self.steps, self.ttft, self.latency, self.batch):
                lines += m.render()
            for name, (help, value) in gauges.items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"

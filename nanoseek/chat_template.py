"""Chat templates from model files, compiled once and rendered in a bounded Jinja sandbox.

    t = ChatTemplate(source)                          # NanoseekError if it does not compile
    text = t.render(messages=[...], add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
                    max_chars=1 << 22, seconds=5.0)   # NanoseekError past either bound

A template comes with the weights, so it is code written by someone else. transformers renders it
in jinja2's ImmutableSandboxedEnvironment (no file or attribute access beyond plain data); this adds
what the sandbox does not bound: time and memory. Every call, filter, attribute lookup, binary
operator and `range` step checks a per-render deadline, and sizes are checked before they are
built: `'x' * n`, `n ** m`, `'%9999999d' % 1`, `s.replace(a, b)`, `center(n)` and any string or
list result larger than `max_chars` are refused. The output is streamed and cut at `max_chars`.
A loop with an empty body over data the template already holds (no call, no lookup) is the one
thing only the caller's timeout can stop: the server renders in a worker thread and stops
waiting for it (nanoseek/serve/app.py).
"""

from __future__ import annotations

import functools
import re
import threading
import time

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import NanoseekError

MAX_CHARS = 1 << 22          # 4M characters: far above any real prompt the context could hold
SECONDS = 5.0
MAX_RANGE = 100_000          # jinja2's own sandbox bound for range()
_WIDE_FORMAT = re.compile(r"\d{7,}")   # a width or precision of a million or more in a format string
_state = threading.local()


class TemplateLimit(TemplateError):
    """The template went past its time or size bound."""


def _tick():
    if time.monotonic() > getattr(_state, "deadline", float("inf")):
        raise TemplateLimit(f"the chat template ran longer than {_state.seconds:g} s")


def _limit() -> int:
    return getattr(_state, "max_chars", MAX_CHARS)


def _check_size(value):
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > _limit():
        raise TemplateLimit(f"the chat template built a value longer than {_limit()} characters")
    return value


def _check_args(args, kwargs):
    """No integer argument past the size bound (widths, repeat counts), one level into tuples."""
    for a in (*args, *kwargs.values()):
        for v in (a if isinstance(a, (tuple, list)) else (a,)):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > _limit():
                raise TemplateLimit(f"the chat template used the number {str(v)[:20]}, past its bound")
        if isinstance(a, str) and _WIDE_FORMAT.search(a) and ("%" in a or "{" in a):
            raise TemplateLimit("the chat template used a format width past its bound")


def _replace_size(s: str, old: str, new: str, count=-1) -> int:
    n = s.count(old) if old else len(s) + 1
    n = n if count is None or count < 0 else min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


class _Range:
    """range() whose iteration checks the deadline (nested loops over it stay stoppable)."""

    def __init__(self, *args):
        _check_args(args, {})
        self.r = range(*args)
        if len(self.r) > MAX_RANGE:
            raise TemplateLimit(f"range() of {len(self.r)} items is past the bound of {MAX_RANGE}")

    def __iter__(self):
        for i in self.r:
            _tick()
            yield i

    def __len__(self):
        return len(self.r)

    def __getitem__(self, i):
        return self.r[i]


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.filters = {name: _bounded(f) for name, f in self.filters.items()}
        self.globals["range"] = _Range

        def raise_exception(message):
            raise TemplateError(message)
        self.globals["raise_exception"] = raise_exception

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * max(n, 0) > _limit():
                    raise TemplateLimit("the chat template repeated a value past its size bound")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit("the chat template raised a number to a power past its bound")
        elif operator == "%" and isinstance(left, str):
            _check_args((left, right), {})
        elif operator == "+" and isinstance(left, (str, list)) and isinstance(right, type(left)):
            if len(left) + len(right) > _limit():
                raise TemplateLimit("the chat template concatenated values past its size bound")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        _tick()
        _check_args(args, kwargs)
        if getattr(__obj, "__name__", None) == "replace" and isinstance(getattr(__obj, "__self__", None), str):
            if len(args) >= 2 and all(isinstance(a, str) for a in args[:2]) and \
                    _replace_size(__obj.__self__, *args[:3]) > _limit():
                raise TemplateLimit("the chat template's replace() would build a value past its size bound")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _tick()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        _tick()
        return _check_size(super().getitem(obj, argument))


def _bounded(f):
    @functools.wraps(f)   # keeps jinja's pass_context / pass_environment marks
    def g(*args, **kwargs):
        _tick()
        _check_args(args[1:], kwargs)
        if f.__name__ == "do_replace" and len(args) >= 4 and all(isinstance(a, str) for a in args[1:4]) \
                and _replace_size(*args[1:4]) > _limit():
            raise TemplateLimit("the chat template's replace filter would build a value past its size bound")
        return _check_size(f(*args, **kwargs))
    return g


@functools.lru_cache(maxsize=None)
def _env() -> BoundedSandbox:
    return BoundedSandbox()


class ChatTemplate:
    """A template compiled once; `render` is safe to call from several threads."""

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise NanoseekError("the chat template must be a string")
        try:
            self.template = _env().from_string(source)
        except TemplateError as e:
            raise NanoseekError(f"the chat template does not compile: {e}") from None
        self.source = source

    def render(self, max_chars: int = MAX_CHARS, seconds: float = SECONDS, **context) -> str:
        _state.deadline, _state.seconds, _state.max_chars = time.monotonic() + seconds, seconds, max_chars
        out, size = [], 0
        try:
            for chunk in self.template.generate(**context):
                size += len(chunk)
                if size > max_chars:
                    raise TemplateLimit(f"the chat template's output is longer than {max_chars} characters")
                out.append(chunk)
                _tick()
        except TemplateError as e:      # raise_exception(), a bound, an undefined name
            raise NanoseekError(f"the chat template failed: {e}") from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, ZeroDivisionError,
                OverflowError, RecursionError, MemoryError) as e:
            raise NanoseekError(f"the chat template failed: {type(e).__name__}: {str(e)[:200]}") from None
        finally:
            _state.deadline = float("inf")
        return "".join(out)

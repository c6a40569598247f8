"""JSON Lines, read and written in one place: data files, training logs, kept traces.

    rows = read_jsonl("data.jsonl")                      # a bad line: NanoseekError "data.jsonl:7: not JSON (...)"
    rows = read_jsonl(traces, errors="torn_tail")        # a torn last line (a killed append) is dropped
    rows = read_jsonl(log, errors="stop")                # a log: the first bad line ends it
    rows = read_jsonl(log, errors="skip")                # a report: bad lines (and bad bytes) are passed over
    for n, row in iter_jsonl(path): ...                  # with line numbers, for per-line checks
    value = read_json("eval.json")                       # one JSON file; None if missing or torn
    write_jsonl(path, rows)                              # atomic, fsynced
    append_jsonl(path, rows, fsync=True)                 # appended, durable before the next step
    log = JsonlLog(path); log.write(row); log.close()    # an open log, flushed per line

Lines are UTF-8 JSON values separated by "\\n"; blank lines are skipped. Written with
ensure_ascii=False, so Chinese chains of thought stay readable in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import atomic_write
from .errors import NanoseekError


def line(row) -> str:
    """One JSONL line of `row`, newline included."""
    return json.dumps(row, ensure_ascii=False) + "\n"


ERRORS = ("strict", "torn_tail", "stop", "skip")


def iter_jsonl(path: str | os.PathLike, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line. A line that is not JSON raises NanoseekError naming
    the file and line ("strict"), unless it is the last one ("torn_tail": cut short by a kill), or ends
    the file ("stop"), or is passed over ("skip", which also reads undecodable bytes as U+FFFD)."""
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}")
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8", errors="replace" if errors == "skip" else "strict").splitlines()
    except FileNotFoundError:
        raise NanoseekError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{path}: unreadable ({e})") from None
    last = max((n for n, s in enumerate(lines, 1) if s.strip()), default=0)
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            if errors == "skip":
                continue
            if errors == "stop" or (errors == "torn_tail" and n == last):
                return
            raise NanoseekError(f"{path}:{n}: not JSON ({e.msg}, column {e.colno})") from None
        yield n, value


def read_jsonl(path: str | os.PathLike, errors: str = "strict") -> list:
    """Every line's value (see iter_jsonl)."""
    return [row for _, row in iter_jsonl(path, errors)]


def read_json(path: str | os.PathLike):
    """One JSON file's value, or None if it is missing, unreadable or torn (a report never fails on one
    bad part of a killed run)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_jsonl(path: str | os.PathLike, rows: Iterable) -> None:
    """Replace `path` with `rows`, atomically and durably."""
    atomic_write(path, "".join(map(line, rows)))


def append_jsonl(path: str | os.PathLike, rows: Iterable, fsync: bool = False) -> None:
    """Append `rows` to `path` (created if missing); with fsync, durable when this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(map(line, rows)))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


class JsonlLog:
    """An open JSONL file that a run appends to, one flushed line per record."""

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        self.path = Path(path)
        self.f = open(self.path, mode, encoding="utf-8")

    def write(self, row) -> None:
        self.f.write(line(row))
        self.f.flush()

    def close(self) -> None:
        self.f.close()

"""Atomic writes: a reader (or a resumed run) sees the old contents or the new, never half a file.

    atomic_write(path, text_or_bytes)          # small files: JSON state, markers, PNGs, logs
    write_json(path, obj)                      # indented, UTF-8, trailing newline
    with atomic_file(path) as f: ...           # a binary file written piece by piece
    with atomic_dir(path) as tmp: ...          # a whole directory (model weights, checkpoints)

Each writes a temp sibling (`.NAME.tmp-*`, in the same directory so the rename cannot cross file
systems) and renames it over `path` only when the writing succeeded; on failure the temp is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import NanoseekError


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` (flushed and fsynced first) when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace `path` with `data` (a str is written as UTF-8) atomically."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as indented UTF-8 JSON with a trailing newline, atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


class atomic_dir:
    """Write into a temp sibling directory; rename it over `path` only when the block succeeds."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = True):
        self.path, self.overwrite = Path(path), overwrite

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise NanoseekError(f"{self.path} exists; refusing to overwrite")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return False

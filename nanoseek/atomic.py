"""Atomic writes: a reader (or a resumed run) sees the old contents or the new, never half a file.

    atomic_write(path, text_or_bytes)          # small files: JSON state, markers, PNGs, logs
    write_json(path, obj)                      # indented, UTF-8, trailing newline
    with atomic_file(path) as f: ...           # a binary file written piece by piece
    with atomic_dir(path) as tmp: ...          # a whole directory (model weights, checkpoints)

Each writes a temp sibling (`.NAME.tmp-*`, in the same directory so the rename cannot cross file
systems) and renames it over `path` only when the writing succeeded; on failure the temp is removed.
Durable against a power cut, not only a crash: every file (and a directory's own entry list) is
fsynced before the rename, and the parent directory after it, so the new name never points at
data the disk has not got. A directory replaced in place is first moved to a unique
`.NAME.old-*` sibling; leftovers of an earlier interrupted replace are removed, never reused.
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
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (names created, renamed, removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows, where directories cannot be opened; NTFS journals renames itself
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and /proc-like mounts) refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every directory bottom-up (their entries)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


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
        try:
            fsync_tree(self.tmp)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        parent = self.path.parent
        for stale in parent.glob(f".{self.path.name}.old-*"):  # an earlier replace interrupted midway
            shutil.rmtree(stale, ignore_errors=True)
        if self.path.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise NanoseekError(f"{self.path} exists; refusing to overwrite")
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=parent))
            os.replace(self.path, old / "x")   # into a fresh, unique directory: never blocked by a leftover
            os.replace(self.tmp, self.path)
            fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        fsync_dir(parent)
        return False

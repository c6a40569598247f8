"""Resumable training checkpoints, each one a loadable Hugging Face model directory.

    out/checkpoints/step-00000500/
        config.json, model.safetensors, tokenizer.json, ...   nanoseek.save: `nanoseek.load(dir)` works
        optimizer.pt        AdamW state (tensors, numbers and strings only: torch.load(weights_only=True))
        rng.pt              torch (and CUDA) RNG states
        trainer_state.json  step, data-sampler position, model config, training arguments, last metrics

        manifest.json       size and sha256 of every other file, written last

A checkpoint is built in a temp directory next to its final name, fsynced, and renamed into place
when complete (atomic.py `atomic_dir`), so a crash leaves either the previous checkpoints or a
`.step-*.tmp-*` directory that `latest()` ignores. A checkpoint torn anyway (a disk that lied about
fsync, a copy cut short) fails its manifest: `latest()` warns and falls back to the one before.
Only the last `keep` checkpoints up to the one just written are kept (never a newer, torn one's
successor: a resumed run that fell back overwrites the torn step when it gets there).

    path = save(root, step, model, tok, optimizer_state, rng, trainer_state, keep=3)
    path = latest(root)                       # None if there is no complete, intact checkpoint
    ckpt = read(path)                         # Checkpoint(model_state, optimizer, rng, trainer_state)
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..config import ModelConfig
from ..errors import NanoseekError
from ..weights import save as save_model
from ..weights.hf import from_disk_names, read_config, read_tensors, safetensors_files

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model_state: dict[str, torch.Tensor]   # nanoseek parameter names
    optimizer: dict
    rng: dict
    trainer_state: dict


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first (temp and half-written dirs are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(path: Path) -> dict[str, dict]:
    """{relative file name: {"bytes", "sha256"}} of every file of the checkpoint but the manifest."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` is torn (a file missing, cut short or changed), or None if intact.
    Checkpoints written before manifests existed are taken as they are."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{STATE_FILE} is unreadable"
        return f"{MANIFEST} is missing" if state.get("manifest") else None
    try:
        want = json.loads((path / MANIFEST).read_text())
        if not all(isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
                   for m in want.values()):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # JSONDecodeError is a ValueError
        return f"{MANIFEST} is unreadable"
    for name, meta in want.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, not {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(root: Path) -> Path | None:
    """The newest intact checkpoint under root; each torn newer one is skipped with a warning."""
    for _, path in reversed(step_dirs(root)):
        problem = verify(path)
        if problem is None:
            return path
        print(f"nanoseek: warning: checkpoint {path} is torn ({problem}); falling back to the one before",
              file=sys.stderr)
    return None


def remove_stale_temp_dirs(root: Path) -> None:
    """Leftovers of a checkpoint write that was killed halfway."""
    if Path(root).is_dir():
        for p in Path(root).iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def save(root: Path, step: int, model, tokenizer, optimizer_state: dict, rng: dict, trainer_state: dict,
         keep: int = 3) -> Path:
    """Write step-<step>/ atomically, then delete all but the newest `keep` checkpoints."""
    path = Path(root) / f"step-{step:08d}"
    with atomic_dir(path) as tmp:  # fsynced, then renamed into place
        save_model(model, tokenizer, tmp)  # replaces tmp by a complete HF directory
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step, "manifest": True}, indent=2) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest(tmp), indent=2) + "\n")
    if keep > 0:  # the newest `keep` up to this step; a newer (torn) one is overwritten when its step comes
        for _, old in [d for d in step_dirs(root) if d[0] <= step][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read(path: Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        cfg = read_config(path)
        tensors = from_disk_names(read_tensors(safetensors_files(path)), cfg)
        if cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as e:
        raise NanoseekError(f"{path}: unreadable checkpoint ({e})") from None
    return Checkpoint(path, cfg, tensors, optimizer, rng, state)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Model config fields that differ (dtype bookkeeping ignored)."""
    da, db = a.to_hf_config(), b.to_hf_config()
    skip = {"torch_dtype", "dtype"}
    return sorted(k for k in set(da) | set(db) if k not in skip and da.get(k) != db.get(k))

"""Resumable training checkpoints, each one a loadable Hugging Face model directory.

    out/checkpoints/step-00000500/
        config.json, model.safetensors, tokenizer.json, ...   nanoseek.save: `nanoseek.load(dir)` works
        optimizer.pt        AdamW state (tensors, numbers and strings only: torch.load(weights_only=True))
        rng.pt              torch (and CUDA) RNG states
        trainer_state.json  step, data-sampler position, model config, training arguments, last metrics

A checkpoint is built in a temp directory next to its final name and renamed into place when
complete (atomic.py `atomic_dir`), so a crash leaves either the previous checkpoints or a
`.step-*.tmp-*` directory that `latest()` ignores. Only the last `keep` checkpoints are kept.

    path = save(root, step, model, tok, optimizer_state, rng, trainer_state, keep=3)
    path = latest(root)                       # None if there is no complete checkpoint
    ckpt = read(path)                         # Checkpoint(model_state, optimizer, rng, trainer_state)
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir, atomic_write
from ..config import ModelConfig
from ..errors import NanoseekError
from ..weights import save as save_model
from ..weights.hf import from_disk_names, read_config, read_tensors, safetensors_files

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


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


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


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
    with atomic_dir(path) as tmp:
        save_model(model, tokenizer, tmp)  # replaces tmp by a complete HF directory
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
    if keep > 0:
        for _, old in step_dirs(root)[:-keep]:
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


def truncate_log(path: Path, step: int | None) -> None:
    """Keep the lines of a JSONL log up to `step` (all of them dropped when step is None): a resumed
    run rewrites what came after its checkpoint. A torn last line ends the kept part. Atomic."""
    path = Path(path)
    kept = []
    if step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a torn last line
    atomic_write(path, "".join(k + "\n" for k in kept))

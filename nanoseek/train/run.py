"""The training-run scaffold that pretrain, sft and grpo share: the run directory and its resume
checks, the metrics log, the progress bar, the lr schedule, the amp choice and the final save.

    out = run_dir(a.out)                                    # created, writable, or exit 2
    last = resume_point(out, a.resume, "sft")               # newest intact checkpoint or None
    check_same(last, saved_bound, bound, "an exact resume needs the same data and --seed")
    log = MetricsLog(out / "metrics.jsonl", start if last else None)   # lines past the checkpoint dropped
    bar = Progress(total, start, "sft", enabled=a.progress); bar.say("...")
    set_lr(optimizer, lr_at(step, total, a.lr, warmup, a.schedule))
    save_final(out / "final", model, tok, {"stage": "sft", ...})     # training.json inside, atomic

setup_cpu_training() (the CLI calls it for training commands) runs three: keep_freed_memory() stops
glibc from handing large freed blocks back to the kernel, whose fresh pages then fault in on every
step; use_cpu_kernels() trains with nanoseek's C++ kernels on CPU (attention, RMSNorm, SwiGLU, MoE
gate and dispatch); choose_cpu_gemm() picks oneDNN or PyTorch's default for fp32 products.

OUT/ holds checkpoints/ (checkpoint.py), metrics.jsonl and final/ (an HF directory with training.json,
written as one atomic, fsynced unit: a crash leaves the old final/ or the new one, never a model
without its training record).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..errors import NanoseekError
from ..jsonl import JsonlLog, read_jsonl, write_jsonl
from . import checkpoint


def run_dir(out: str | Path) -> Path:
    """The output directory, created; NanoseekError if it cannot be written."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise NanoseekError(f"{out}: cannot write the output directory ({e.strerror or e})") from None
    return out


def resume_point(out: Path, resume: bool, command: str, main: bool = True) -> Path | None:
    """The checkpoint to continue from: None for a fresh run. Checkpoints without --resume are an error
    (a run never overwrites another); with it, the newest intact one (checkpoint.latest skips a torn
    one with a warning), and the leftovers of a checkpoint write that was killed are removed."""
    root = Path(out) / "checkpoints"
    existing = checkpoint.step_dirs(root)
    if existing and not resume:
        raise NanoseekError(f"{out} already has checkpoints (latest {existing[-1][1].name}); pass --resume to "
                            f"continue or choose another --out")
    if not resume:
        return None
    last = checkpoint.latest(root)
    if main:
        checkpoint.remove_stale_temp_dirs(root)
        if last is None:
            print(f"nanoseek {command}: no checkpoint in {root}; starting from step 0", file=sys.stderr)
    return last


def check_same(last: Path, saved: dict, now: dict, hint: str) -> None:
    """The settings an exact resume depends on must not have changed since checkpoint `last`."""
    changed = [k for k in now if saved.get(k) != now[k]]
    if changed:
        raise NanoseekError(f"{last} was trained with different {', '.join(changed)}; {hint}")


def use_amp(dtype: str, device: torch.device) -> bool:
    """--dtype bf16, or auto on a CUDA device with bf16: bf16 autocast; else fp32."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks up to 1 GiB for reuse (process-wide; True if it took).

    By default a block over its mmap threshold (dynamic, at most 32 MiB) is mapped on allocation and
    unmapped on free, so a training step's large tensors ([2048, 4096] logits: exactly 32 MiB) come
    back as fresh pages that fault in, zeroed by the kernel, every step. Measured on the tiny V3's
    pretraining step (2 cores, AVX-512): cross-entropy forward + backward 45 -> 10 ms, minor faults
    per process 2.3M -> 0.2M, the step 5-12% faster. A user's own MALLOC_MMAP_THRESHOLD_ wins."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def use_cpu_kernels() -> bool:
    """Training (and its rollouts) on CPU use nanoseek's C++ kernels when they are built (built now if not:
    once per machine, ~1 min): attention for fp32 passes with gradients (model.attention.attend; the
    speedrun's pretraining shape, [16, 8, 128, 24] with its document mask, forward + backward: 5.2 ms
    against SDPA's 10.3), and RMSNorm, the SwiGLU, the MoE gate and its dispatch plan in fp32 and bf16
    (model.cpu_kernels). True if installed."""
    from ..infer import kernels
    from ..model import cpu_kernels
    cpu_kernels.installed = kernels if kernels.available() else None
    return cpu_kernels.installed is not None


def choose_cpu_gemm() -> str:
    """fp32 CPU products by oneDNN or PyTorch's default (model.cpu_kernels.choose_gemm: measured, ~20 ms;
    the run's header line says which, cpu_kernels.gemm)."""
    from ..model import cpu_kernels
    try:
        return cpu_kernels.choose_gemm()[0]
    except ValueError as e:
        raise NanoseekError(str(e)) from None


def setup_cpu_training() -> None:
    """What every training command sets up before it trains (the CLI, and scripts that train in process):
    keep_freed_memory, use_cpu_kernels, choose_cpu_gemm."""
    keep_freed_memory()
    use_cpu_kernels()
    choose_cpu_gemm()


class MetricsLog(JsonlLog):
    """OUT/metrics.jsonl (or another JSONL log), one line per step; on resume, the lines past the
    checkpoint's step are dropped first, so the log reads as if the run had never stopped."""

    def __init__(self, path: Path, resume_step: int | None):
        truncate_log(path, resume_step)
        super().__init__(path, "a")


def truncate_log(path: Path, step: int | None) -> None:
    """Keep the records of a JSONL log up to `step` (none when step is None): a resumed run rewrites what
    came after its checkpoint. A torn line (a kill mid-write) ends the kept part. Atomic."""
    kept = []
    if step is not None and Path(path).is_file():
        kept = [r for r in read_jsonl(path, errors="stop") if r.get("step", 0) <= step]
    write_jsonl(path, kept)


class Progress:
    """A tqdm bar (when enabled) and `say`, which prints above the bar or to stderr."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def save_final(final: Path, model, tok, summary: dict) -> None:
    """OUT/final: the model as an HF directory plus training.json, renamed into place as one unit."""
    from ..weights import save as save_model
    with atomic_dir(final) as tmp:
        save_model(model, tok, tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

"""The C++ kernels the model's layers call on CPU once installed: `installed` is nanoseek.infer.kernels
after train.run.use_cpu_kernels (every training command calls it), else None and the layers run
PyTorch's ops and SDPA. The same functions either way (tests/test_ffn_kernels.py, test_norm_kernel.py,
test_rope_kernel.py; the training attention: tests/test_model.py).
The layers ask `kernels_for(tensor)`; this module imports nothing of nanoseek's, so imports still only
go down (model -> infer would not).

The model's linear layers are `Linear`: nn.Linear whose fp32 CPU products go through oneDNN where
`choose_gemm` (train.run.choose_cpu_gemm: every training command) measured it faster than PyTorch's default, MKL. MKL
runs its AVX2 code on AMD CPUs: 100 GFLOP/s of one AVX-512 Zen 5 core, where oneDNN reaches 200-240
(2026-12-07); training commands say which they picked in their first line (`gemm`)."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

installed = None
onednn = False           # fp32 CPU products through oneDNN (choose_gemm)
gemm = "PyTorch's default"  # what choose_gemm picked and why, for a run's header line
ONEDNN_MIN_ROWS = 32     # fewer rows (decode): oneDNN's ~9 us per call costs more than its speed saves


def kernels_for(t: torch.Tensor):
    """The installed kernels where they apply to t (CPU, fp32 or bf16, not inside torch.compile, which fuses
    these ops itself), else None."""
    k = installed
    if (k is None or t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16)
            or torch.compiler.is_compiling()):
        return None
    return k


def onednn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b^T (+ bias) by oneDNN; a and b may be transposed views (copied contiguous first)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = onednn_linear(dy, weight.t()) if ctx.needs_input_grad[0] else None
        dw = onednn_linear(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for fp32 on CPU where choose_gemm picked it (not under autocast, whose
    bf16 casts F.linear applies, nor inside torch.compile)."""
    if (onednn and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and (bias is None or bias.dtype == torch.float32) and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose product is `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def choose_gemm(setting: str | None = None) -> tuple[str, float]:
    """Route fp32 CPU products through oneDNN if it runs a training step's three products at least 1.3x
    faster than PyTorch's default here (a margin, so that a machine where the two are close keeps one
    choice run after run). NANOSEEK_CPU_GEMM=torch|onednn|auto (default auto) overrides. Returns the
    choice and oneDNN's measured speed-up (0 when not measured)."""
    global onednn, gemm
    setting = setting or os.environ.get("NANOSEEK_CPU_GEMM", "auto")
    if setting not in ("auto", "torch", "onednn"):
        raise ValueError(f"NANOSEEK_CPU_GEMM must be auto, torch or onednn, not {setting!r}")
    ratio, why = 0.0, "NANOSEEK_CPU_GEMM"
    if setting != "torch":
        try:
            ratio = _onednn_speedup()
        except (RuntimeError, AttributeError):  # a build without oneDNN's linear
            setting, why = "torch", "this torch has no oneDNN linear"
    if setting == "auto":
        why = f"oneDNN measured {ratio:.2f}x PyTorch's default here"
    onednn = setting == "onednn" or (setting == "auto" and ratio >= 1.3)
    gemm = f"{'oneDNN' if onednn else 'PyTorch (MKL)'} ({why})"
    return ("onednn" if onednn else "torch"), ratio


def _onednn_speedup(rows: int = 256, width: int = 256, rounds: int = 5) -> float:
    """PyTorch's time over oneDNN's for x @ W^T, dy @ W and dy^T @ x at one training-like shape (best of
    alternating rounds, ~20 ms in all)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(rows, width, generator=g) for _ in range(3))
    sides = {"torch": lambda: (F.linear(x, w), dy @ w, dy.t() @ x),
             "onednn": lambda: (onednn_linear(x, w), onednn_linear(dy, w.t()), onednn_linear(dy.t(), x.t()))}
    best = dict.fromkeys(sides, float("inf"))
    for f in sides.values():
        f()
    for _ in range(rounds):
        for name, f in sides.items():
            t0 = time.perf_counter()
            f(), f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["torch"] / best["onednn"]


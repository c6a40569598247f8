"""Resolve MKL's vector-math dispatch before worker threads race to it (imported by nanoseek/__init__).

On CPU, PyTorch hands contiguous float unary ops (cos, sin, exp, log, tanh, sqrt, ...) to MKL's VML,
each intra-op thread calling it on its chunk. oneMKL picks each function's kernel lazily at its first
call; when that first call runs on two threads at once, one thread can run a low-accuracy kernel for
its whole chunk (pytorch/pytorch#188792, open; fixed upstream by oneMKL >= 2025.0). Measured here with
torch 2.13 on 2 threads: the first `cos` of a fresh process was off by 1.5e-4 (about 2,500 ulp) on half
its elements in 9 of 20 processes. In the speedrun this hit RoPE's cos table in pretraining's first
step, so the same seed on the same machine gave different models run to run. One 1-element call per
function on this thread (below the 2,048-element grain, so never split) settles every dispatch first.

    import nanoseek   # does it (nanoseek/__init__ imports this module first)
"""

from __future__ import annotations

import torch

# the unary ops torch 2.13 routes to VML (its vms*/vmd* imports), in both precisions
VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
           "sqrt", "tan", "tanh", "trunc")


def warm_up() -> None:
    """One single-threaded call of every VML function, float32 and float64 (microseconds; calling it
    again is harmless)."""
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(x)


warm_up()  # at import, before any other nanoseek module can run multi-threaded float math

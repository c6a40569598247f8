"""The C++ decode kernel (kernels.cpp): weight-only GEMV/GEMM for fp16, bf16, int8 and int4 weights
with fp32 activations, as `torch.ops.nanoseek.wmm`.

Built at first use with torch.utils.cpp_extension (ninja, a C++ compiler, -O3 -march=native) into
~/.cache/nanoseek/kernels (or $NANOSEEK_KERNEL_CACHE), once per machine and torch version; later
runs load the built library in well under a second. Without a compiler, or with
NANOSEEK_KERNELS=0, `available()` is False and the quantized linears use PyTorch's own kernels.

    from nanoseek.infer import kernels
    if kernels.available():
        y = torch.ops.nanoseek.wmm(x, w, scales, None, kernels.F16)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

F16, BF16, I8, I4, F32 = range(5)  # weight formats, as kernels.cpp's enum Kind
SOURCE = Path(__file__).with_name("kernels.cpp")
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("NANOSEEK_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoseek", "kernels")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + platform.machine().encode())
    # -march=native: a cache shared between machines (NFS home) must not mix CPUs
    key.update(open("/proc/cpuinfo", "rb").read().split(b"\n\n")[0] if os.path.exists("/proc/cpuinfo") else b"")
    return Path(base) / key.hexdigest()[:16]


def _build() -> bool:
    if os.environ.get("NANOSEEK_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        from torch.utils import cpp_extension
        out = _cache_dir()
        out.mkdir(parents=True, exist_ok=True)
        lib = out / "nanoseek_kernels.so"
        if lib.exists():
            torch.ops.load_library(str(lib))
        else:
            cpp_extension.load("nanoseek_kernels", [str(SOURCE)], build_directory=str(out), is_python_module=False,
                               extra_cflags=["-O3", "-march=native", "-ffast-math"], verbose=False)
        _register_fake()
        return True
    except Exception as e:  # no compiler, no ninja, an unknown CPU: PyTorch's kernels still work
        log.warning("nanoseek: C++ decode kernels unavailable (%s); using PyTorch's kernels", str(e).splitlines()[0])
        return False


def _register_fake():
    """Shapes for torch.compile's tracing (the op itself is opaque to inductor)."""
    @torch.library.register_fake("nanoseek::wmm")
    def _(x, w, scales, bias, kind):
        return x.new_empty(x.shape[0], w.shape[0])


def available() -> bool:
    """True when torch.ops.nanoseek.wmm is loaded (built now on the first call if needed)."""
    if "ok" not in _state:
        _state["ok"] = _build()
    return bool(_state["ok"])


def vector_width() -> int:
    """Floats per SIMD vector the kernel was built for (16 AVX-512, 8 AVX2, 4 otherwise)."""
    return int(torch.ops.nanoseek.vector_width()) if available() else 0

"""The C++ kernels (kernels.cpp): weight-only GEMV/GEMM for fp16, bf16, int8 and int4 weights with
fp32 activations (`torch.ops.nanoseek.wmm`), attention for decode (`decode_attention`) and fused
attention for training on short windows (`attention`, forward and backward).

Built at first use with torch.utils.cpp_extension (ninja, a C++ compiler, -O3 -march=native) into
~/.cache/nanoseek/kernels (or $NANOSEEK_KERNEL_CACHE), once per machine and torch version; later
runs load the built library in well under a second. The build runs in a temporary directory under
a lock and is renamed into place, so processes starting together build it once and never load a
half-written file; it needs no network. Without a compiler, or with NANOSEEK_KERNELS=0,
`available()` is False, the quantized linears use PyTorch's own kernels, and Engine.path says so.

    from nanoseek.infer import kernels
    if kernels.available():
        y = torch.ops.nanoseek.wmm(x, w, scales, None, kernels.F16)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

F16, BF16, I8, I4, F32 = range(5)  # weight formats, as kernels.cpp's enum Kind
SOURCE = Path(__file__).with_name("kernels.cpp")
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("NANOSEEK_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoseek", "kernels")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + platform.machine().encode()
                         + " ".join(_cflags()).encode())
    # -march=native: a cache shared between machines (NFS home) must not mix CPUs; the CPU's model
    # and flags say which one (not the whole record: its "cpu MHz" changes from run to run)
    if os.path.exists("/proc/cpuinfo"):
        first = open("/proc/cpuinfo", "rb").read().split(b"\n\n")[0].splitlines()
        key.update(b"\n".join(line for line in first if line.split(b":")[0].strip() in (b"model name", b"flags")))
    return Path(base) / key.hexdigest()[:16]


def _march() -> str:
    """-march for the build: the machine's own, or $NANOSEEK_KERNEL_MARCH (e.g. haswell, to run the
    AVX2 code paths on an AVX-512 machine)."""
    return os.environ.get("NANOSEEK_KERNEL_MARCH") or "native"


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is a header template around `#pragma omp parallel`; without the flag
    # it runs on one thread (the OpenMP runtime is torch's own, already loaded)
    return ["-O3", f"-march={_march()}", "-ffast-math", "-fopenmp"]


def _build() -> bool:
    if os.environ.get("NANOSEEK_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("nanoseek: no C++ compiler (%s), so no C++ decode kernels; using PyTorch's kernels",
                    os.environ.get("CXX", "c++"))
        return False
    try:
        out = _cache_dir()
        out.mkdir(parents=True, exist_ok=True)
        lib = out / "nanoseek_kernels.so"
        loaded = False
        if not lib.exists():
            with _lock(out / "build.lock"):  # another process may be building the same library
                if not lib.exists():
                    _compile_into(lib)
                    loaded = True
        if not loaded:
            torch.ops.load_library(str(lib))
        _register_fake()
        return True
    except Exception as e:  # no compiler, no ninja, an unknown CPU: PyTorch's kernels still work
        log.warning("nanoseek: C++ decode kernels unavailable (%s); using PyTorch's kernels", str(e).splitlines()[0])
        return False


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` for as long as the block runs (released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps a half-written library unseen
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile_into(lib: Path) -> None:
    """Build (and load) the library in a private temporary directory, then rename it to `lib` in
    one step, so no process ever loads a half-written file."""
    from torch.utils import cpp_extension
    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) puts it beside python
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    tmp = tempfile.mkdtemp(prefix="build-", dir=lib.parent)
    try:
        built = cpp_extension.load("nanoseek_kernels", [str(SOURCE)], build_directory=tmp, is_python_module=False,
                                   extra_cflags=_cflags(), verbose=False)
        os.replace(built, lib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _register_fake():
    """Shapes for torch.compile's tracing (the op itself is opaque to inductor)."""
    @torch.library.register_fake("nanoseek::wmm")
    def _(x, w, scales, bias, kind):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("nanoseek::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape[0], 1, q.shape[2], v.shape[3])


def available() -> bool:
    """True when torch.ops.nanoseek.wmm is loaded (built now on the first call if needed)."""
    if "ok" not in _state:
        _state["ok"] = _build()
    return bool(_state["ok"])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one new token per row against its cached keys and values (kernels.cpp): q
    [B, 1, H, D] fp32, k [B, S, G, D], v [B, S, G, Dv] fp32 or fp16 (GQA: G divides H), mask [B, 1, 1, S]
    bool -> [B, 1, H, Dv]. The KVCache hook for fp32 and fp16 caches on CPU (KVCache.decode_attention)."""
    return torch.ops.nanoseek.decode_attention(q, k, v, mask, scale)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = torch.ops.nanoseek.attention_fwd(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.nanoseek.attention_bwd(dout.contiguous(), q, k, v, out, lse, mask, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Attention for training on short windows, forward and backward (kernels.cpp): q [B, H, T, D],
    k [B, G, S, D], v [B, G, S, Dv] fp32 on CPU (GQA: G divides H); mask [B or 1, 1, T, S] bool
    (True = attend) or None for causal -> [B, H, T, Dv]. Each query visits only the keys between its
    mask row's first and last allowed one, so a packed window's document mask costs what its
    documents need. A row with no allowed key outputs 0 (SDPA: NaN)."""
    m = (torch.empty(0, dtype=torch.bool) if mask is None
         else mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])[:, 0].contiguous())
    return _Attention.apply(q.contiguous(), k.contiguous(), v.contiguous(), m, float(scale))


def vector_width() -> int:
    """Floats per SIMD vector the kernel was built for (16 AVX-512, 8 AVX2, 4 otherwise)."""
    return int(torch.ops.nanoseek.vector_width()) if available() else 0


AMX_MIN_ROWS = 16  # kernels.cpp's AMX_MIN_M: from this many rows of x, AMX tiles (where amx())


def amx() -> bool:
    """Does the kernel multiply fp16, bf16, int8 and int4 weights by 16 and more rows of x on AMX tiles (a CPU
    with AMX, built there, NANOSEEK_AMX not 0)? Decode at batch 1 reads weights with vector code either way."""
    if "amx" not in _state:
        _state["amx"] = bool(torch.ops.nanoseek.amx()) if available() else False
    return _state["amx"]

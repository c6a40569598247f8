"""The C++ kernels (kernels.cpp, ffn.cpp, moe.cpp, norm.cpp, rope.cpp): weight-only GEMV/GEMM for fp16, bf16,
int8 and int4 weights with fp32 activations (`torch.ops.nanoseek.wmm`), attention for decode
(`decode_attention`) and fused attention for training on short windows (`attention`, forward and
backward); the SwiGLU (`silu_mul`, `swiglu`), the MoE gate, its GEMM and the dispatch plan (`moe_route`,
`gate_logits`, `moe_plan`), the whole MoE layer with its fused experts (`moe_layer`), RMSNorm
(`rms_norm`) and MLA's rotated queries and keys laid out for the attention kernel (`mla_qkv`), for
training and inference.

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
SOURCES = [Path(__file__).with_name(n) for n in ("kernels.cpp", "ffn.cpp", "moe.cpp", "norm.cpp", "rope.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("NANOSEEK_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoseek", "kernels")
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode()
                         + platform.machine().encode() + " ".join(_cflags()).encode())
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
        built = cpp_extension.load("nanoseek_kernels", [str(p) for p in SOURCES], build_directory=tmp,
                                   is_python_module=False, extra_cflags=_cflags(), verbose=False)
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


class _SiluMul(torch.autograd.Function):
    """silu(g) * u on [rows, I]; the gradients of g and u come back as the two halves of one [rows, 2I]
    buffer (no zeros, no cat)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return torch.ops.nanoseek.swiglu_fwd(g, u, None)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dgu, _ = torch.ops.nanoseek.swiglu_bwd(dh.contiguous(), g, u, None, False)
        return dgu[:, :g.shape[1]], dgu[:, g.shape[1]:]


def _graph(*ts) -> bool:
    """Does autograd record this call? If not, the op runs without its Function (a few us less per call)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (ffn.cpp): one pass forward and one backward; g, u [..., I] fp32 or bf16 on CPU."""
    shape, I = g.shape, g.shape[-1]
    if not _graph(g, u):
        return torch.ops.nanoseek.swiglu_fwd(g.reshape(-1, I), u.reshape(-1, I), None).view(shape)
    return _SiluMul.apply(g.reshape(-1, I), u.reshape(-1, I)).view(shape)


class _Packed(torch.autograd.Function):
    """gu = [g | u] [rows, 2I] -> silu(g) * u (* rw [rows, 1]); the gradient of gu is one tensor."""

    @staticmethod
    def forward(ctx, gu, rw):
        g, u = gu.chunk(2, dim=-1)
        ctx.save_for_backward(g, u, rw)
        return torch.ops.nanoseek.swiglu_fwd(g, u, rw)

    @staticmethod
    def backward(ctx, dh):
        g, u, rw = ctx.saved_tensors
        rw_grad = rw is not None and ctx.needs_input_grad[1]
        dgu, drw = torch.ops.nanoseek.swiglu_bwd(dh.contiguous(), g, u, rw, rw_grad)
        return dgu, (drw.view(rw.shape).to(rw.dtype) if rw_grad else None)


def swiglu(gu: torch.Tensor, rw: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up (* rw [rows, 1]) for gu = [gate | up] [rows, 2I] (ffn.cpp), fp32 or bf16 on CPU;
    the gradient of gu is one tensor (eager's chunk would cat the two halves' gradients)."""
    if not _graph(gu, rw):
        return torch.ops.nanoseek.swiglu_fwd(*gu.chunk(2, dim=-1), rw)
    return _Packed.apply(gu, rw)


ROUTE_METHODS = {"greedy": 0, "noaux_tc": 1, "group_limited_greedy": 2}


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, k, n_group, topk_group, method, sigmoid, norm, scaling):
        s, w, idx = torch.ops.nanoseek.moe_route(logits, bias, k, n_group, topk_group, method, sigmoid, norm, scaling)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        ctx.save_for_backward(s, idx)
        ctx.args = (sigmoid, norm, scaling)
        return w, idx, s

    @staticmethod
    def backward(ctx, dw, _didx, ds):
        s, idx = ctx.saved_tensors
        return (torch.ops.nanoseek.moe_route_bwd(dw, ds, s, idx, *ctx.args),) + (None,) * 8


def _route_args(k: int, n_group: int, topk_group: int, method: str, scoring: str, norm: bool, scaling: float):
    """The gate's settings as the C++ op takes them."""
    return k, n_group, topk_group, ROUTE_METHODS.get(method, 0), scoring == "sigmoid", norm, float(scaling)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_group: int, topk_group: int, method: str,
              scoring: str, norm: bool, scaling: float):
    """DeepSeek's gate after its GEMM (ffn.cpp), one task per token: logits [N, E] fp32 -> (weights [N, k]
    normalised and scaled, expert indices [N, k] best first, affinities [N, E]); the same function as
    nanoseek.model.moe.Gate's PyTorch ops, gradients included (ties in the choice go to the lower index)."""
    args = (logits, bias, *_route_args(k, n_group, topk_group, method, scoring, norm, scaling))
    if not _graph(logits):
        s, w, idx = torch.ops.nanoseek.moe_route(*args)
        return w, idx, s
    return _Route.apply(*args)


class _GateLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.ops.nanoseek.gate_logits(x, w)

    @staticmethod
    def backward(ctx, dl):
        dx, dw = torch.ops.nanoseek.gate_logits_bwd(dl, *ctx.saved_tensors)
        return dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None


def gate_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The MoE gate's logits x [N, H] @ w [E, H]^T in fp32 for fp32 or bf16 x and w (ffn.cpp), as
    F.linear(x.float(), w.float()) computes them; gradients for both in their own dtypes. H must be a
    multiple of vector_width()."""
    if not _graph(x, w):
        return torch.ops.nanoseek.gate_logits(x, w)
    return _GateLogits.apply(x, w)


def moe_plan(indices: torch.Tensor, n_experts: int, pad: int):
    """(token, slot, pair, counts, padded counts) of nanoseek.model.moe.sort_pairs, and the tokens per expert,
    by one counting sort (ffn.cpp)."""
    return torch.ops.nanoseek.moe_plan(indices, n_experts, pad)


def _moe_forward(x, gate_w, bias, route, w1, w2, sg, su, sd):
    """The layer's ops in order: (y, the experts' saved rows, affinities, weights, indices, plan, load)."""
    op = torch.ops.nanoseek
    s, w, idx = op.moe_route(op.gate_logits(x, gate_w), bias, *route)
    token, _, pair, load, rows = op.moe_plan(idx, w1.shape[0], 1)
    y, *saved = op.moe_experts(x, w, token, pair, rows, w1, w2, sg, su, sd)
    return y, saved, s, w, idx, (token, pair, rows), load


class _MoELayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, bias, route, w1, w2, sg, su, sd):
        y, saved, s, w, idx, plan, load = _moe_forward(x, gate_w, bias, route, w1, w2, sg, su, sd)
        ctx.mark_non_differentiable(load)
        ctx.set_materialize_grads(False)  # no balance loss: the affinities' gradient stays None
        ctx.save_for_backward(x, gate_w, w, s, idx, *plan, w1, w2, sg, su, sd, *saved)
        ctx.route = route
        return y, s, load

    @staticmethod
    def backward(ctx, dy, ds, _dload):
        x, gate_w, w, s, idx, token, pair, rows, w1, w2, sg, su, sd, *saved = ctx.saved_tensors
        op = torch.ops.nanoseek
        dy = torch.zeros_like(x) if dy is None else dy.contiguous()
        dx, dweights, *dws = op.moe_experts_bwd(dy, x, w, token, pair, rows, w1, w2, sg, su, sd, *saved)
        _, _, _, _, sigmoid, norm, scaling = ctx.route
        dl = op.moe_route_bwd(dweights, ds, s, idx, sigmoid, norm, scaling)
        _, dgate = op.gate_logits_bwd(dl, x, gate_w, dx)  # the gate's part of dx added onto the experts'
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dgate if need[1] else None, None, None,
                *(g if n and g.numel() else None for g, n in zip(dws, need[4:])))


def moe_layer(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None, route: tuple, w1: torch.Tensor,
              w2: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None):
    """A whole DeepSeekMoE layer as one autograd node (ffn.cpp, moe.cpp), fp32, or bf16 where moe_bf16(): the
    gate's GEMM (gate_w [E, H]), DeepSeek's routing (`route`: moe_route's settings from k to scaling, bias for
    the choice only), the dispatch plan and the experts, y[n] = shared(x[n]) + Σ_j w[n, j] · expert_j(x[n]),
    for x [N, H], the stacked experts w1 = gate_up_proj [E, 2I, H], w2 = down_proj [E, H, I] and the shared
    expert's (gate [Is, H], up [Is, H], down [H, Is]) or None, all of x's dtype; H, I and Is multiples of
    vector_width(). Returns (y [N, H], affinities [N, E] fp32, tokens per expert [E]); the backward runs the
    three ops' backwards in one go (weight gradients summed in fp32, bf16 rounded once) and adds the gate's
    part of x's gradient onto the experts' in place, with no autograd add or graph nodes between them."""
    sg, su, sd = shared if shared is not None else (None, None, None)
    args = (x.contiguous(), gate_w, bias, _route_args(*route), w1, w2, sg, su, sd)
    if not _graph(x, gate_w, w1, w2, sg, su, sd):
        y, _, s, _, _, _, load = _moe_forward(*args)
        return y, s, load
    return _MoELayer.apply(*args)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        y, rstd = torch.ops.nanoseek.rms_norm_fwd(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, rstd = ctx.saved_tensors
        dx, dw = torch.ops.nanoseek.rms_norm_bwd(g.contiguous(), x, w, rstd, ctx.needs_input_grad[1])
        return dx, (dw.to(w.dtype) if dw is not None else None), None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w over the last dim (norm.cpp), fp32 or bf16 (x and w alike) on CPU; bf16
    rounds the normalised x before the weight, as nanoseek.model.attention.RMSNorm's reference does."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not _graph(x2, w):
        return torch.ops.nanoseek.rms_norm_fwd(x2, w, float(eps))[0].view(x.shape)
    return _RMSNorm.apply(x2, w, float(eps)).view(x.shape)


class _MLAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_pe, cos, sin, interleave):
        ctx.save_for_backward(cos, sin)
        ctx.interleave, ctx.dn = interleave, q.shape[-1] - k_pe.shape[-1]
        return torch.ops.nanoseek.mla_qkv(q, kv, k_pe, cos, sin, interleave)

    @staticmethod
    def backward(ctx, dqh, dkh, dvh):
        cos, sin = ctx.saved_tensors
        dq, dkv, dk_pe = torch.ops.nanoseek.mla_qkv_bwd(dqh, dkh, dvh, cos, sin, ctx.interleave, ctx.dn)
        return dq, dkv, dk_pe, None, None, None


def mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleave: bool):
    """MLA's attention inputs in one pass (rope.cpp), fp32 on CPU: q [B, T, H, dn + dr] with its rope dims
    rotated, k = [k_nope | the rotated k_pe shared by every head], v, as [B, H, T, D] tensors for
    `attention`; kv [B, T, H, dn + dv], k_pe [B, T, dr] (unrotated), cos / sin [B or 1, T, dr / 2]."""
    B, T = q.shape[:2]
    cos, sin = cos.expand(B, T, -1).contiguous(), sin.expand(B, T, -1).contiguous()
    return _MLAQKV.apply(q, kv, k_pe, cos, sin, bool(interleave))


def vector_width() -> int:
    """Floats per SIMD vector the kernel was built for (16 AVX-512, 8 AVX2, 4 otherwise)."""
    if "w" not in _state:
        _state["w"] = int(torch.ops.nanoseek.vector_width()) if available() else 0
    return _state["w"]


def moe_bf16() -> bool:
    """Does moe.cpp's experts op take bf16 layers (built for a CPU with AVX512_BF16's vdpbf16ps)?"""
    if "moe_bf16" not in _state:
        _state["moe_bf16"] = bool(torch.ops.nanoseek.moe_bf16()) if available() else False
    return _state["moe_bf16"]


def attention_max_head() -> int:
    """The largest head size `attention` takes: 16 vectors."""
    return 16 * vector_width()


AMX_MIN_ROWS = 16  # kernels.cpp's AMX_MIN_M: from this many rows of x, AMX tiles (where amx())


def amx() -> bool:
    """Does the kernel multiply fp16, bf16, int8 and int4 weights by 16 and more rows of x on AMX tiles (a CPU
    with AMX, built there, NANOSEEK_AMX not 0)? Decode at batch 1 reads weights with vector code either way."""
    if "amx" not in _state:
        _state["amx"] = bool(torch.ops.nanoseek.amx()) if available() else False
    return _state["amx"]

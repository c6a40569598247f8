"""Quantization of linear layers for inference: fp16 and bf16 weights, int8 per output channel,
int4 per group of 32 (weight-only), and w8a8 (int8 weights, activations quantized to int8 on the fly).

Decode at small batch is bound by reading weights, so storing them in fewer bits is what makes it
fast. The weight-only modes keep activations in float; on CPU they run in nanoseek's C++ GEMV
(kernels.py, built at first use; fp16 stays on fbgemm's packed fp16 GEMM where PyTorch has it),
elsewhere a dequantize-then-matmul fallback keeps the same numbers. w8a8 is what llama.cpp does on
CPU (its Q4/Q8 dot products read 8-bit activations): fbgemm's dynamic int8 GEMM quantizes each
call's input with one scale for the whole call, so a row's numbers can depend on what shares its
batch, and models with outlier activation channels lose accuracy: SmolLM2-135M's perplexity goes
131 -> 296 (benchmarks/quantize.py), so w8a8 is a speed experiment, not a default.

Linears that read the same input (q/k/v, gate/up, MLA's two down-projections) are packed into one
matrix, so a decode step makes one call per group instead of two or three: the first sibling
computes the packed product, the others slice it (see `Packed`). The MoE's stacked routed experts
become one MLP per expert first (`LoopExperts`), each quantized like any other SwiGLU; the MoE then
runs them with its per-expert loop. Keeping the stacked experts in float instead was slower
(small preset, int8, batch 8: 311 against 523-537 tok/s; batch 1 within the machine's noise).

    quantize(model, "w8a8")      # in place; returns the model
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, LoopExperts
from . import kernels

# fbgemm's fp16 and int8 kernels are deprecated in favour of torchao; torch is pinned, so stay quiet
warnings.filterwarnings("ignore", message=".*(fbgemm|quantize_per|quantized tensor).*deprecated", category=UserWarning)

# the packed int8/int4 CPU kernels are GEMV-speed only: above this many rows (prefill, big batches)
# dequantizing and running the float GEMM is many times faster (benchmarks/decode.py)
PACKED_MAX_ROWS = 4
_EMPTY = torch.empty(0)

# kv_b_proj is read as a matrix by the absorbed MLA decode; the gate stays exact for routing
SKIP = ("kv_b_proj",)


def _kernel_ok(x: torch.Tensor) -> bool:
    """The C++ kernel takes fp32 activations on CPU (kernels.py builds it at first use)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] % 16 == 0
            and kernels.available())


def _linear_out(y: torch.Tensor, shape, out_features: int, dtype) -> torch.Tensor:
    return y.to(dtype).view(*shape[:-1], out_features)


class FP16Linear(nn.Module):
    """Weights rounded to fp16 (fp32 activations), run by fbgemm's packed fp16 GEMM where PyTorch
    has fbgemm (x86), else nanoseek's C++ kernel. End to end on the AVX-512 box fbgemm decoded
    43-45 tok/s at batch 1 against the kernel's 39 (2026-12-04, docs/benchmarks.md), so it stays;
    but 16 rows and more go to the kernel on an AMX CPU, whose tiles take them with activations
    rounded to 16 significant bits (as the int8 mode's), so a near-tie in the logits may fall the other
    way at batch 32 than at batch 1."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.register_buffer("weight_fp16", w.half())
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(w) if w.device.type == "cpu" else None
        self.bias = linear.bias
        self._zero_bias = torch.zeros(w.shape[0], device=w.device) if linear.bias is None else None
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight_fp16.float()

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if (self.packed is None or torch.compiler.is_compiling() or (len(x2) >= kernels.AMX_MIN_ROWS and kernels.amx())) and _kernel_ok(x):
            # fbgemm's packed matrix is opaque to torch.compile: a compiled step reads the fp16 weights
            # with the C++ kernel, as does a batch of 16 rows or more on AMX
            return _linear_out(torch.ops.nanoseek.wmm(x2, self.weight_fp16, _EMPTY, self.bias, kernels.F16),
                               shape, self.out_features, x.dtype)
        if self.packed is not None and x.device.type == "cpu":
            bias = self.bias.float() if self.bias is not None else self._zero_bias
            y = torch.fbgemm_linear_fp16_weight(x2.float(), self.packed, bias)
        else:
            y = F.linear(x2, self.weight_fp16.to(x.dtype), self.bias)
        return _linear_out(y, shape, self.out_features, x.dtype)


class BF16Linear(nn.Module):
    """Weights rounded to bf16, fp32 activations (more exact than a bf16 model, whose activations
    are bf16 too; 16 significant bits from 16 rows on an AMX CPU, see FP16Linear); the C++ kernel,
    else a dequantize-then-matmul fallback."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight_bf16.float()

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if _kernel_ok(x):
            y = torch.ops.nanoseek.wmm(x2, self.weight_bf16, _EMPTY, self.bias, kernels.BF16)
        else:
            y = F.linear(x2, self.weight_bf16.to(x.dtype), self.bias)
        return _linear_out(y, shape, self.out_features, x.dtype)


class Int8Linear(nn.Module):
    """Symmetric int8, one scale per output channel, float activations (rounded to 16 bits by the C++
    kernel; 16 rows and more on AMX tiles give the same numbers as one row at a time)."""

    def __init__(self, linear: nn.Linear, scale_dtype: torch.dtype | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(scale_dtype or linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if _kernel_ok(x):
            return _linear_out(torch.ops.nanoseek.wmm(x2, self.weight_int8, self.scales.float(), self.bias, kernels.I8),
                               shape, self.out_features, x.dtype)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and len(x2) <= PACKED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit groups along the input dimension with an fp16 scale and minimum per group
    (llama.cpp's Q4_1: 5 bits per weight). A group's 32 codes sit in 16 bytes, byte i holding
    element i in its low nibble and element i + 16 in its high one (the C++ kernel's layout). The
    kernel multiplies the codes as integers by the activations rounded to 15 bits per group (within
    2^-16 of the group's largest value: SmolLM2's perplexity is that of float activations)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32):
        super().__init__()
        if group_size != 32:
            raise ValueError("int4 uses groups of 32")
        w = linear.weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // 32, 32)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15.0).half().float().clamp(min=1e-8)  # rounded as stored
        lo = lo.half().float()
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)  # [N, K/32, 32]
        self.register_buffer("q4", (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2).contiguous())
        self.register_buffer("scale_min", torch.stack([scale, lo]).half())  # [2, N, K/32]
        self.group_size, self.bias = 32, linear.bias
        self.in_features, self.out_features = K, N

    def dequantize(self) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        b = self.q4.view(N, K // 32, 16)
        q = torch.cat([b & 15, b >> 4], dim=-1).float()
        scale, lo = self.scale_min.float()
        return (q * scale[..., None] + lo[..., None]).view(N, K)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if _kernel_ok(x):
            y = torch.ops.nanoseek.wmm(x2, self.q4, self.scale_min, self.bias, kernels.I4)
        else:  # no compiler: dequantize per call (slow, same numbers)
            y = F.linear(x2, self.dequantize().to(x.dtype), self.bias)
        return _linear_out(y, shape, self.out_features, x.dtype)


class W8A8Linear(Int8Linear):
    """Int8Linear's weights, run by fbgemm's GEMM that quantizes the activations per call (dynamic)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, scale_dtype=torch.float32)  # fbgemm takes fp32 (double) scales
        self.packed = None
        if self.weight_int8.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            scale = self.scales.double()
            zero = torch.zeros_like(scale, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.weight_int8, scale, zero, 0)
            bias = None if linear.bias is None else linear.bias.detach().float()
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed is not None and x.device.type == "cpu":
            # reduce_range: 7-bit activations, or AVX2's u8*s8 pair sums saturate int16
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, True).to(x.dtype)
        else:  # elsewhere: the same int8 weights, float activations
            y = F.linear(x2, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*shape[:-1], self.out_features)


class Packed(nn.Module):
    """Stands in for one of several linears that read the same input. All of them share one
    quantized matrix (their weights stacked); the first call for an input computes the whole
    product and the siblings called next on the same tensor slice their columns from it."""

    def __init__(self, shared: "_PackedProduct", start: int, stop: int, last: bool):
        super().__init__()
        self.shared, self.start, self.stop, self.last = shared, start, stop, last

    def forward(self, x):
        y = self.shared(x)[..., self.start:self.stop]
        if self.last:  # the models call siblings in order: drop the memo (a prefill's would pin memory)
            self.shared.forget()
        return y


class _PackedProduct(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear
        self._last = [None, None]  # (input, product); a list, so updating it skips Module.__setattr__

    def __call__(self, x):
        if self._last[0] is not x:
            self._last[:] = x, self.linear(x)
        return self._last[1]

    def forget(self):
        self._last[:] = None, None


# sibling linears of one module that always read the same input
PACK = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))


def _quantized(linear: nn.Linear, mode: str, group_size: int) -> nn.Module | None:
    if mode == "int4":
        if linear.in_features % 32 or group_size != 32:
            return None  # whole groups of 32 only; keep these in float
        return Int4Linear(linear, group_size)
    return MODES[mode](linear)


def _stack(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([lin.weight.detach() for lin in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if out.bias is not None:
        out.bias.data.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    return out


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 32, pack: bool = True) -> nn.Module:
    """Replace every nn.Linear (but SKIP) by its quantized version, in place; with `pack`, siblings
    reading the same input share one packed matrix."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    for module in list(model.modules()):  # stacked routed experts -> one MLP each, quantized below
        if isinstance(getattr(module, "experts", None), Experts):
            module.experts = LoopExperts.unstacked(module.experts)
    for module in list(model.modules()):
        children = dict(module.named_children())
        for group in PACK if pack else ():
            names = [n for n in group if n in children]
            linears = [children[n] for n in names]
            if (len(linears) < 2 or not all(isinstance(lin, nn.Linear) for lin in linears)
                    or len({lin.bias is None for lin in linears}) > 1):
                continue
            q = _quantized(_stack(linears), mode, group_size)
            if q is None:
                continue
            shared, start = _PackedProduct(q), 0
            for i, (n, lin) in enumerate(zip(names, linears)):
                setattr(module, n, Packed(shared, start, start + lin.out_features, last=i == len(names) - 1))
                start += lin.out_features
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in SKIP:
                q = _quantized(child, mode, group_size)
                if q is not None:
                    setattr(module, child_name, q)
    return model


def best_lossless_mode(device: str = "cpu") -> str | None:
    """The weight format a lossless-enough fast path uses on this machine: fp16 weights (+0.01%
    perplexity on SmolLM2; fp16 keeps 3 more mantissa bits than bf16 for the same bytes) read by
    nanoseek's C++ kernel (any x86 with a compiler) or fbgemm's fp16 GEMM; None elsewhere (CUDA,
    ARM without fbgemm: keep the model's own dtype)."""
    if device != "cpu":
        return None
    if kernels.available() or "fbgemm" in torch.backends.quantized.supported_engines:
        return "fp16"
    return None


def compiles(model: nn.Module) -> bool:
    """Can torch.compile trace this model's decode step? Not with w8a8: fbgemm's dynamic int8 linear
    has no correct fake (shape) kernel, so tracing it fails."""
    return not any(isinstance(m, W8A8Linear) for m in model.modules())


def describe(model: nn.Module, compiled: bool = False) -> str:
    """One line on how this model decodes: weight formats and the kernel that reads them (a compiled
    step reads fp16 weights with the C++ kernel, not fbgemm)."""
    kinds = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, (FP16Linear, BF16Linear, Int8Linear, Int4Linear, W8A8Linear))})
    dev = next(model.parameters()).device
    if not kinds:
        return f"{model.dtype if hasattr(model, 'dtype') else 'float'} weights, PyTorch kernels on {dev.type}"
    if (kinds == ["FP16Linear"] and dev.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            and not (compiled and kernels.available())):
        kernel = "fbgemm fp16 GEMM" + (f"; from {kernels.AMX_MIN_ROWS} rows nanoseek C++ kernel on AMX tiles"
                                       if kernels.amx() else "")
    elif kinds == ["W8A8Linear"] and dev.type == "cpu":
        kernel = "fbgemm dynamic int8 GEMM"
    elif dev.type == "cpu" and kernels.available():
        kernel = f"nanoseek C++ kernel ({torch.backends.cpu.get_cpu_capability()}, {kernels.vector_width()} lanes"
        kernel += f"; AMX tiles from {kernels.AMX_MIN_ROWS} rows)" if kernels.amx() and "W8A8Linear" not in kinds else ")"
    else:
        kernel = "PyTorch kernels (no C++ kernel)"
    return f"{'+'.join(kinds)} on {dev.type}, {kernel}"


MODES = {"fp16": FP16Linear, "bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}

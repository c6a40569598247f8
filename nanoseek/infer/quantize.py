"""Quantization of linear layers for inference: fp16 (packed), int8 per output channel, int4 per
group (weight-only), and w8a8 (int8 weights, activations quantized to int8 on the fly).

Decode at small batch is bound by reading weights, so storing them in fewer bits is what makes it
fast. The weight-only modes keep activations in float; on CPU their matmuls run in PyTorch's packed
kernels (fbgemm's fp16 GEMM, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`), elsewhere a
dequantize-then-matmul fallback keeps the same numbers. w8a8 is what llama.cpp does on CPU (its
Q4/Q8 dot products read 8-bit activations): fbgemm's dynamic int8 GEMM quantizes each call's input
with one scale for the whole call, so a row's numbers can depend on what shares its batch, and
models with outlier activation channels lose accuracy: SmolLM2-135M's perplexity goes 108 -> 285
(benchmarks/quantize.py), so w8a8 is a speed experiment, not a default. Which mode pays depends on
the CPU: on an AVX2-only machine fp16 is the fast lossless one (benchmarks/decode.py).

Linears that read the same input (q/k/v, gate/up, MLA's two down-projections) are packed into one
matrix, so a decode step makes one call per group instead of two or three: the first sibling
computes the packed product, the others slice it (see `Packed`). The MoE's stacked routed experts
become one MLP per expert first (`LoopExperts`), each quantized like any other SwiGLU; the MoE then
runs them with its per-expert loop.

    quantize(model, "w8a8")      # in place; returns the model
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, LoopExperts

# fbgemm's fp16 and int8 kernels are deprecated in favour of torchao; torch is pinned, so stay quiet
warnings.filterwarnings("ignore", message=".*(fbgemm|quantize_per|quantized tensor).*deprecated", category=UserWarning)

# the packed int8/int4 CPU kernels are GEMV-speed only: above this many rows (prefill, big batches)
# dequantizing and running the float GEMM is many times faster (benchmarks/decode.py)
PACKED_MAX_ROWS = 4

# kv_b_proj is read as a matrix by the absorbed MLA decode; the gate stays exact for routing
SKIP = ("kv_b_proj",)


class FP16Linear(nn.Module):
    """Weights rounded to fp16 and packed for fbgemm's fp16 GEMM (fp32 activations)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.register_buffer("weight_fp16", w.half())
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(w) if w.device.type == "cpu" else None
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight_fp16.float()

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.packed is not None and x.device.type == "cpu":
            bias = self.bias if self.bias is not None else torch.zeros(self.out_features)
            y = torch.fbgemm_linear_fp16_weight(x2.float(), self.packed, bias.float()).to(x.dtype)
        else:
            y = F.linear(x2, self.weight_fp16.to(x.dtype), self.bias)
        return y.view(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
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
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and len(x2) <= PACKED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit groups along the input dimension (as torchao / gpt-fast store them)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, inner_k_tiles: int = 8):
        super().__init__()
        w = linear.weight.detach().float()
        N, K = w.shape
        g = w.view(N, K // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo).clamp(min=1e-6) / 15.0)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
        # kernel convention: w = (q - 8) * scale + zero  =>  zero = lo + 8 * scale
        zero = lo + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles))
        self.register_buffer("q", q.to(torch.uint8))
        self.group_size, self.bias = group_size, linear.bias
        self.in_features, self.out_features = K, N

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # [N, K/g]
        q = self.q.float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and len(x2) <= PACKED_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group_size, self.scales_and_zeros.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


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
        if linear.in_features % group_size or linear.out_features % 16:
            return None  # the packed int4 kernel needs whole groups and N % 16 == 0; keep these in float
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


MODES = {"fp16": FP16Linear, "int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}

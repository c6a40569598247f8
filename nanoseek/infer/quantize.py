"""Weight-only quantization of linear layers: fp16 (packed), int8 per output channel, int4 per group.

Decode at small batch is bound by reading weights, so storing them in fewer bits is what makes it
fast; activations stay in float. On CPU the matmuls run in PyTorch's packed kernels
(fbgemm's fp16 GEMM, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`); elsewhere a
dequantize-then-matmul fallback keeps the same numbers. Which one pays depends on the CPU:
on an AVX2-only machine fbgemm fp16 is the fast one (see benchmarks/decode.py).

    quantize(model, "fp16")      # in place; returns the model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
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
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.packed, self.group_size, self.scales_and_zeros.to(x.dtype))
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def quantize(model: nn.Module, mode: str = "int8", group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear (but SKIP) by its weight-only quantized version, in place."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name in SKIP:
                continue
            if mode == "int4" and (child.in_features % group_size or child.out_features % 16):
                continue  # the packed int4 kernel needs whole groups and N % 16 == 0; keep these in float
            new = Int4Linear(child, group_size) if mode == "int4" else MODES[mode](child)
            setattr(module, child_name, new)
    return model


MODES = {"fp16": FP16Linear, "int8": Int8Linear, "int4": Int4Linear}

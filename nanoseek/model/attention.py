"""Attention: RMSNorm, RoPE (+YaRN, linear, llama3 scaling), Multi-head Latent Attention, GQA.

MLA (DeepSeek-V2 §2.1) compresses keys and values of a token into one latent
c_kv = RMSNorm(W_dkv h) of `kv_lora_rank` values plus one rotary key k_pe of `qk_rope_head_dim`
values shared by all heads; that pair is all the KV cache holds. Two ways to attend:

* naive (training, prefill): expand the latent into per-head keys and values with `kv_b_proj`
  and run ordinary attention;
* absorbed (decode): fold the key half of `kv_b_proj` into the query and the value half into the
  output, so scores are taken directly against the cached latents and nothing is expanded.

Both give the same numbers (tests/test_model.py checks 1e-5 in fp32).

Training on CPU: once the training commands install nanoseek's C++ kernels (model/cpu_kernels.py,
train.run.use_cpu_kernels), fp32 CPU passes with gradients attend with its kernel for short windows
(infer/kernels.py: attention) instead of SDPA. Its queries visit only the keys their mask allows,
as runs: a packed window's document mask costs what its documents need, where SDPA's flash kernel
scores every block up to the diagonal. MLA then also rotates and lays out q, k, v in one C++ pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_mscale
from . import cpu_kernels
from .cpu_kernels import Linear, kernels_for


def _fused_for(device: torch.device, dtype: torch.dtype) -> bool:
    return cpu_kernels.installed is not None and device.type == "cpu" and dtype == torch.float32


def training_attention(device: torch.device, dtype: torch.dtype) -> str:
    """Which attention a training pass on this device and dtype runs (for the run's header line)."""
    return "nanoseek fused CPU kernel" if _fused_for(device, dtype) else "SDPA"


def fused_applies(q: torch.Tensor, D: int, Dv: int, mask: torch.Tensor | None) -> bool:
    """Does the fused CPU kernel take this pass? A training pass (autograd on) in fp32 on CPU, head sizes
    within its limit, a bool mask shared by the heads or none (causal), not inside torch.compile."""
    return (_fused_for(q.device, q.dtype) and torch.is_grad_enabled()
            and max(D, Dv) <= cpu_kernels.installed.attention_max_head()
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1))
            and not torch.compiler.is_compiling())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           pad_v: bool = False) -> torch.Tensor:
    """Attention over [B, T, heads, D] tensors -> [B, T, H, Dv]: the fused CPU kernel where it applies (a
    training pass in fp32 on CPU with a bool mask shared by the heads, or causal), else SDPA (GQA when k
    and v have fewer heads; pad_v: v padded to q's head size, which SDPA's fused kernels need)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    Dv = v.shape[-1]
    if k.dtype == v.dtype == q.dtype and fused_applies(q, q.shape[-1], Dv, mask):
        return cpu_kernels.installed.attention(q, k, v, mask, scale).transpose(1, 2)
    pad = q.shape[-1] - Dv
    if pad_v and pad > 0:  # SDPA's fused (flash) kernels need equal sizes, else the math path: [B, H, T, S]
        v = F.pad(v, (0, pad))  # scores in memory, 2x slower forward + backward on CPU
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)[..., :Dv]




class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = kernels_for(x)
        if k is not None and self.weight.dtype == x.dtype:  # one C++ pass each way (norm.cpp)
            return k.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op (decode is op-bound)
        # normalize in fp32 and scale in the input dtype, as the reference implementations do
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


# ---------------------------------------------------------------------------------- RoPE
def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rotary dims and the attention factor applied to cos/sin."""
    dim, base = cfg.rope_dim, float(cfg.rope_theta)
    # explicit cpu: models are built under torch.device('meta') when loading weights
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs, kind = cfg.rope_scaling or {}, cfg.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        # YaRN (Peng et al. 2023): interpolate low frequencies by `factor`, keep high ones,
        # blend linearly between the dims that rotate beta_slow..beta_fast times in the original context.
        old = rs["original_max_position_embeddings"]
        factor = rs.get("factor") or cfg.max_position_embeddings / old
        beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            attention_factor = (yarn_mscale(factor, m) / yarn_mscale(factor, m_all)
                                if m and m_all else yarn_mscale(factor))
        return inv_freq, float(attention_factor)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed on the fly (no max-length buffer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.interleave = cfg.rope_interleave
        self._device_inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        inv = self._device_inv_freq.get(positions.device)
        if inv is None:
            inv = self._device_inv_freq[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv  # [B, T, d/2]
        return ((freqs.cos() * self.attention_factor).to(dtype),
                (freqs.sin() * self.attention_factor).to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, T, heads, d] by cos/sin [B, T, d/2].

    interleave=True rotates pairs (x0,x1),(x2,x3),... as DeepSeek's weights expect; False rotates
    (x_i, x_{i+d/2}) as llama/qwen2 (HF layout) do.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------- MLA
class MLA(nn.Module):
    """Multi-head Latent Attention with HF/DeepSeek parameter names."""

    # below this many new tokens per step, attend in latent space (decode); above, expand (prefill)
    absorb_max_tokens = 16
    # pad v to q's head size for SDPA's fused kernels (see _naive); False computes the exact FLOPs of the
    # math (tests/test_cost.py counts them), at the math path's speed
    pad_v = True

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        H, nh, bias = cfg.hidden_size, self.n_heads, cfg.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = Linear(H, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, nh * (self.d_nope + self.d_rope), bias=False)
        else:
            self.q_proj = Linear(H, nh * (self.d_nope + self.d_rope), bias=False)
        self.kv_a_proj_with_mqa = Linear(H, self.kv_lora_rank + self.d_rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, nh * (self.d_nope + self.d_v), bias=False)
        self.o_proj = Linear(nh * self.d_v, H, bias=bias)
        self.absorb: bool | None = None  # None = choose by step size; True/False to force a path

    def forward(self, x, cos, sin, positions, cache=None, mask=None):
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_rope)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        short = (cache is not None or mask is not None) and T <= self.absorb_max_tokens
        absorb = self.absorb if self.absorb is not None else short
        kernels = kernels_for(q)
        if (cache is None and not absorb and kernels is not None
                and fused_applies(q, self.d_nope + self.d_rope, self.d_v, mask)):
            return self.o_proj(self._fused(kernels, q, c_kv, k_pe, cos, sin, mask))
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, self.interleave)[:, :, 0]
        if cache is not None:
            c_kv, k_pe, mask = cache.update(self.layer_idx, positions, c_kv, k_pe)
        if absorb:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.d_v))

    def _fused(self, kernels, q, c_kv, k_pe, cos, sin, mask):
        """A training pass on CPU: rotate, broadcast the rope key and lay out q, k, v for the attention kernel
        in one C++ pass each way (rope.cpp), where PyTorch's ops split, rotate, concatenate and transpose
        (and their backward concatenates the split gradients). -> [B, T, nh * d_v]."""
        B, T = q.shape[:2]
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.d_nope + self.d_v)
        qh, kh, vh = kernels.mla_qkv(q, kv, k_pe, cos, sin, self.interleave)
        out = kernels.attention(qh, kh, vh, mask, self.scale)  # [B, H, T, d_v]
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v)

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return attend(q, k, v, mask, self.scale, pad_v=self.pad_v)  # [B, T, nh, d_v]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, c_kv)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.scale
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1, dtype=torch.float32).to(c_kv.dtype)
        o_latent = torch.einsum("bhts,bsr->bthr", p, c_kv)
        return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)


# ---------------------------------------------------------------------------------- GQA
class GQA(nn.Module):
    """Grouped-query attention (llama, qwen2): HF names q_proj/k_proj/v_proj/o_proj."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.softmax_scale
        qkv_bias = cfg.attention_bias or cfg.model_type == "qwen2"
        H = cfg.hidden_size
        self.q_proj = Linear(H, self.n_heads * self.hd, bias=qkv_bias)
        self.k_proj = Linear(H, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = Linear(H, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * self.hd, H, bias=cfg.attention_bias)
        self.interleave = cfg.rope_interleave

    def forward(self, x, cos, sin, positions, cache=None, mask=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.hd), cos, sin, self.interleave)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd), cos, sin, self.interleave)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if cache is not None:
            k, v, mask = cache.update(self.layer_idx, positions, k, v)
        if cache is not None and T == 1 and cache.decode_attention is not None:
            out = cache.decode_attention(q, k, v, mask, self.scale)                     # [B, 1, H, D]
        else:  # a cache may hold fp16 keys and values for fp32 queries (see the engine)
            out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, self.scale)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.hd))

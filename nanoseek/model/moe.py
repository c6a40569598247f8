"""DeepSeekMoE: the gate, routed experts and shared experts (DeepSeek-V2 §2.2, V3 §2.1.2).

Gate, DeepSeek-V3 (`scoring_func="sigmoid"`, `topk_method="noaux_tc"`):
  s = sigmoid(W_g h)                          affinities
  choose top-k of s + b                       b = e_score_correction_bias, for selection only
    (with n_group > 1: keep the `topk_group` groups whose top-2 biased scores sum highest;
     other groups are masked with -inf, as DeepSeek's own inference code does)
  weights = s[top-k] / sum(s[top-k]) * routed_scaling_factor

Gate, DeepSeek-V2 (`softmax`): s = softmax(W_g h); `greedy` top-k, or `group_limited_greedy`
(groups ranked by their max score). transformers masks dropped groups with 0.0 there; with
softmax scores > 0 that picks the same experts as -inf, which is what we use everywhere.

Dispatch sorts the (token, expert) pairs by expert, so each expert's rows are one contiguous slice.
Two ways to run the experts on their slices, both a loop over experts at most, never over tokens:
  grouped  two grouped GEMMs (`F.grouped_mm`: [gate; up] of every expert, then down) over all the
           slices, the experts' weights stacked on the fly; the gate weight multiplies the
           intermediate activation (I wide) rather than the output (H wide): same product, less traffic
  loop     each expert that got rows, once, on its slice (also what quantized experts run)
Stacking copies all E·3·H·I expert weights per call, so the grouped GEMMs pay only when there are
enough rows per copied weight: in training from rows ≥ E·H·I / 1024, in inference (no gradient)
from rows ≥ E·H·I / 64; below that (decode, small batches, prefill of larger models) the loop.
Both thresholds are the crossovers measured on the tiny and small presets
(docs/benchmarks.md#moe-vs-dense); `MoE.GROUPED = True / False` forces a path.

`MoE(x)` returns `(y, Routing(scores, load))`, as DeepSeek's Gate returns (weights, indices): the
module keeps no training state. Training reads the routing for the sequence-wise balance loss and
the auxiliary-loss-free bias update (nanoseek/train/objective.py); inference drops it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class Routing(NamedTuple):
    """What one MoE call routed."""
    scores: torch.Tensor   # the gate's affinities s [*batch_dims, E], fp32, with their graph
    load: torch.Tensor     # tokens routed to each expert [E] (detached counts)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":  # auxiliary-loss-free balancing bias (V3 §2.1.2)
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x [N, H] -> (weights [N, k] fp32, expert indices [N, k], affinities [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method in ("noaux_tc", "group_limited_greedy"):
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


def grouped_mm_applies(x: torch.Tensor, experts: nn.ModuleList) -> bool:
    """F.grouped_mm's conditions: plain bias-free Linear experts (not quantized), 16-byte row
    strides, and a device where it has a kernel for the dtype (CPU: any float; CUDA: bf16)."""
    if not hasattr(F, "grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    e = experts[0]
    if not (isinstance(e, MLP) and all(type(m) is nn.Linear and m.bias is None
                                       for m in (e.gate_proj, e.up_proj, e.down_proj))):
        return False
    align = 16 // x.element_size()
    return e.gate_proj.in_features % align == 0 and e.gate_proj.out_features % align == 0


def grouped_swiglu(xs: torch.Tensor, counts: torch.Tensor, experts, rw: torch.Tensor | None = None) -> torch.Tensor:
    """expert_e(xs) (times rw [rows, 1], if given) for rows sorted by expert (counts[e] rows each),
    as two grouped GEMMs; `experts` holds the E experts the counts refer to."""
    dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
    w1 = torch.cat([torch.stack([e.gate_proj.weight for e in experts]),
                    torch.stack([e.up_proj.weight for e in experts])], dim=1).to(dtype)   # [E, 2I, H]
    w2 = torch.stack([e.down_proj.weight for e in experts]).to(dtype)                     # [E, H, I]
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = F.grouped_mm(xs.to(dtype), w1.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    h = F.silu(gate) * up
    return F.grouped_mm(h if rw is None else h * rw.to(dtype), w2.transpose(1, 2), offs=offs)


class MoE(nn.Module):
    GROUPED: bool | None = None  # None: grouped GEMMs where they pay (see the docstring); True / False: forced

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(self.n_experts))
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x)
        y, load = self.dispatch(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape), Routing(scores.view(*shape[:-1], scores.shape[-1]), load)

    def use_grouped(self, rows: int, x: torch.Tensor, experts=None) -> bool:
        """Grouped GEMMs for `rows` (token, expert) rows over `experts` (default: all of them)?"""
        experts = self.experts if experts is None else experts
        if self.GROUPED is False or not grouped_mm_applies(x, experts):
            return False
        e = experts[0].gate_proj
        return bool(self.GROUPED) or rows * (1024 if torch.is_grad_enabled() else 64) >= \
            len(experts) * e.in_features * e.out_features

    def dispatch(self, x, weights, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_k weight_k · expert_k(x) per token, tokens per expert [E])."""
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // self.top_k
        xs, rw = x[token], weights.flatten()[order, None]
        if self.use_grouped(flat.numel(), x):
            ys = grouped_swiglu(xs, counts, self.experts, rw)
        else:
            outs, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    outs.append(self.experts[e](xs[start:start + n]))
                    start += n
            ys = torch.cat(outs) * rw.to(outs[0].dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype)), counts.detach()

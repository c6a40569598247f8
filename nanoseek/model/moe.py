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

Routed experts are stored stacked, as transformers 5 stores them (`Experts`: gate_up_proj [E, 2I, H],
down_proj [E, H, I]); checkpoints keep the Hugging Face per-expert names (nanoseek/weights/hf.py).
Dispatch sorts the (token, expert) pairs by expert, so each expert's rows are one contiguous slice:
  gather   rows = x[token] (`Gather`; its backward sums each token's k rows back: `gather_sum`).
           On CPU in bf16 / fp16 each expert's slice is padded to a multiple of 32 rows in this
           gather (`sort_pairs`: oneDNN sets up every new GEMM shape, and routings change every
           step); a padding row has routing weight 0, so it adds nothing either way.
  experts  two grouped GEMMs (`F.grouped_mm`: [gate; up] of every expert, then down) over all the
           slices, straight from the stacked weights; the gate weight multiplies the intermediate
           activation (I wide) rather than the output (H wide): same product, less traffic.
           `MoE.COMPILE = True` runs the SwiGLU between them through torch.compile (opt-in)
  combine  shared experts' output + each token's k rows (`Combine`: `gather_sum`, an
           `F.embedding_bag` sum over the inverse order; its backward is a gather by token): no
           scatter-add either way
With the C++ kernels installed (model/cpu_kernels.py; the training commands install them), the gate (its
GEMM too), the sort and the SwiGLU run in C++ (infer/ffn.cpp): the same functions, a few passes instead
of ~60 small ops; in fp32, and in bf16 on a CPU with AVX512_BF16, gather, experts and combine are one
C++ op each way (infer/moe.cpp, `MoE.FUSED`), and the whole layer (gate, plan, experts) one autograd node
(kernels.moe_layer; docs/benchmarks.md#moe-vs-dense).
Where `F.grouped_mm` does not apply (rows not 16-byte multiples, CUDA in fp32, other devices) or
`MoE.GROUPED = False`, a loop runs each expert that got rows once, on its slice (never a loop over
tokens); quantized experts (infer/quantize.py) are one MLP each (`LoopExperts`) and take the loop.

`MoE(x)` returns `(y, Routing(scores, load))`, as DeepSeek's Gate returns (weights, indices): the
module keeps no training state. Training reads the routing for the sequence-wise balance loss and
the auxiliary-loss-free bias update (nanoseek/train/objective.py); inference drops it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cpu_kernels import Linear, kernels_for, linear

PLAIN = (nn.Linear, Linear)  # a linear layer as built, not quantized


class Routing(NamedTuple):
    """What one MoE call routed."""
    scores: torch.Tensor   # the gate's affinities s [*batch_dims, E], fp32, with their graph
    load: torch.Tensor     # tokens routed to each expert [E] (detached counts)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u: one C++ pass each way where kernels_for applies (eager makes three forward, three back)."""
    k = kernels_for(g)
    return k.silu_mul(g, u) if k is not None and u.dtype == g.dtype else F.silu(g) * u


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x):
        g, u = self.gate_proj, self.up_proj
        if (torch.is_grad_enabled() and type(g) in PLAIN and type(u) in PLAIN and g.bias is None
                and kernels_for(x) is not None):
            # training: one GEMM for both (and one for x's gradient, no add), the C++ SwiGLU on its two
            # halves; not in inference, where decode would copy the two weights for every token
            gu = linear(x, torch.cat([g.weight, u.weight]))
            return self.down_proj(swiglu(gu.view(-1, gu.shape[-1])).view(*gu.shape[:-1], -1))
        return self.down_proj(silu_mul(g(x), u(x)))


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
        """x [N, H] -> (weights [N, k] fp32, expert indices [N, k], affinities [N, E] fp32). The logits are
        fp32 sums under autocast too (as transformers' DeepSeek-V3 router computes them)."""
        k = kernels_for(x)
        if k is not None and self.weight.dtype == x.dtype and x.shape[-1] % k.vector_width() == 0:
            logits = k.gate_logits(x, self.weight)  # no fp32 copies of x and the weight (ffn.cpp; autocast-free)
        else:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.weight.float())
        k = kernels_for(logits)
        if k is not None:  # the same function in one C++ task per token
            return k.moe_route(logits, self.e_score_correction_bias, *self.route_args())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        with torch.no_grad():  # the choice of experts carries no gradient: no autograd graph for it
            indices = self.choose(scores)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores

    def route_args(self) -> tuple:
        """The routing's settings, as the C++ kernels take them (k through the scaling factor)."""
        return (self.top_k, self.n_group, self.topk_group, self.topk_method, self.scoring_func, self.norm_topk_prob,
                self.routed_scaling_factor)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The top-k experts per row of scores [N, E] (biased, group-limited): indices [N, k]."""
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
        return choice.topk(self.top_k, dim=-1).indices


class Gather(torch.autograd.Function):
    """rows = x[token] (token = order // k: the (token, expert) pairs sorted by expert). The backward
    sums each token's k rows, found through `inv` (order's inverse): a gather-and-sum, no scatter-add."""

    @staticmethod
    def forward(ctx, x, token, inv, k: int):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return gather_sum(g, inv, ctx.k), None, None, None


class Combine(torch.autograd.Function):
    """base + Σ_j ys[inv[n·k + j]] per token n: each token's k expert rows (sorted by expert) added
    onto `base` (the shared experts' output). The backward is a gather by token."""

    @staticmethod
    def forward(ctx, ys, base, inv, token, k: int):
        ctx.save_for_backward(token)
        ctx.has_base = base is not None
        return gather_sum(ys, inv, k, base)

    @staticmethod
    def backward(ctx, g):
        token, = ctx.saved_tensors
        return g.index_select(0, token), (g if ctx.has_base else None), None, None, None


def gather_sum(rows: torch.Tensor, inv: torch.Tensor, k: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j rows[inv[n·k + j]] (+ base[n]) per token n, without materialising the gathered rows:
    `F.embedding_bag` in sum mode, each bag a token's k rows (on CPU 1.7-5.5x faster than
    index_select and k - 1 adds, docs/benchmarks.md#moe-vs-dense)."""
    y = F.embedding_bag(inv.view(-1, k), rows, mode="sum")
    return y if base is None else y.add_(base)


def swiglu(gu: torch.Tensor, rw: torch.Tensor | float | None = None) -> torch.Tensor:
    """silu(gate) * up (* rw) for gu = [gate | up] along the last dim."""
    k = kernels_for(gu)
    if k is not None and gu.dim() == 2 and (rw is None or isinstance(rw, torch.Tensor)):
        return k.swiglu(gu, rw)
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate) * up
    return h if rw is None else h * rw


_COMPILED: dict = {}


def compiled_swiglu(gu: torch.Tensor, rw: torch.Tensor | None = None) -> torch.Tensor:
    """`swiglu` through torch.compile (inductor's C++ on CPU): one kernel forward and one backward
    instead of eager's passes over the strided gate and up halves (bf16 silu on a strided half is
    4x its cost on a contiguous one here). Compiled once per process and shape class (a few seconds,
    docs/benchmarks.md#moe-vs-dense); where compiling fails (no C++ compiler), eager, with a warning."""
    f = _COMPILED.get("swiglu")
    if f is None:
        f = _COMPILED["swiglu"] = torch.compile(swiglu)
    if f is not swiglu:
        try:
            return f(gu, rw)
        except Exception as e:  # the compiler, not the math: eager computes the same function
            warnings.warn(f"torch.compile of the MoE SwiGLU failed, running it eagerly: {str(e)[:200]}")
            _COMPILED["swiglu"] = swiglu
    return swiglu(gu, rw)


PAD_ROWS = 32


def padded_layout(counts: torch.Tensor, n: int, pad: int):
    """Where the n rows sorted by expert (counts[e] rows each) go when each expert's slice is padded to
    a multiple of `pad` rows: (dest [n]: each row's new position, padded counts [E], total rows)."""
    if pad == 1:
        return torch.arange(n, device=counts.device), counts, n
    padded = (counts + pad - 1) // pad * pad
    expert = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # padded start - start, per expert
    return torch.arange(n, device=counts.device) + shift[expert], padded, int(padded.sum())


def sort_pairs(flat: torch.Tensor, counts: torch.Tensor, k: int, pad: int = 1):
    """The experts' rows: the N·k (token, expert) pairs (flat = indices.flatten()) sorted by expert,
    each expert's slice padded to a multiple of `pad` rows (padded_layout). Returns
      token [rows]   the token each row reads (a padding row reads token N - 1: any real row will do,
                     since its routing weight is 0, so it adds nothing forward or backward)
      slot  [N·k]    the row of each pair (the inverse of the sort)
      pair  [rows]   the pair each row holds; N·k for a padding row
      rows per expert [E]
    Padding here, in the gather, rather than after it (pad_slices) writes each row once."""
    n_pairs = len(flat)
    order = flat.argsort(stable=True)
    dest, padded, rows = padded_layout(counts, n_pairs, pad)
    pair = order if pad == 1 else order.new_full((rows,), n_pairs).index_copy_(0, dest, order)
    token = (pair // k).clamp_max_(n_pairs // k - 1)
    slot = torch.empty_like(order).scatter_(0, order, dest)
    return token, slot, pair, padded


def pad_slices(xs: torch.Tensor, rw: torch.Tensor | None, counts: torch.Tensor):
    """Each expert's slice of the sorted rows padded with zero rows to a multiple of PAD_ROWS:
    (padded xs, padded rw, padded counts, dest: where each original row went). On CPU, oneDNN sets up
    every new bf16 GEMM shape anew: 512 x 512 x 256 took 1.35 ms at a fresh row count against 0.19 ms
    at a repeated one (AMX Xeon, 2026-12-06), and an expert's row count changes at every step;
    padded, the shapes repeat. Zero rows (and their zero routing weights) add nothing to any gradient."""
    dest, padded, rows = padded_layout(counts, len(xs), PAD_ROWS)
    xp = xs.new_zeros(rows, xs.shape[1]).index_copy(0, dest, xs)
    rp = None if rw is None else rw.new_zeros(rows, rw.shape[1]).index_copy(0, dest, rw)
    return xp, rp, padded, dest


class Experts(nn.Module):
    """The routed experts, stacked as transformers 5 stores them: gate_up_proj [E, 2I, H] (expert e's
    gate_proj rows, then its up_proj rows), down_proj [E, H, I]. On disk they keep the Hugging Face
    names (`mlp.experts.{e}.gate_proj.weight`, ...): nanoseek/weights/hf.py converts."""

    def __init__(self, n: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init, expert by expert in Hugging Face order (gate, up, down): the
        same numbers, from the same random stream, as one MLP per expert."""
        if self.gate_up_proj.device.type == "meta":
            return
        I = self.down_proj.shape[2]
        for e in range(len(self)):
            for w in (self.gate_up_proj[e, :I], self.gate_up_proj[e, I:], self.down_proj[e]):
                nn.init.kaiming_uniform_(w, a=5 ** 0.5)

    def __len__(self) -> int:
        return self.gate_up_proj.shape[0]

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the experts compute x in: autocast's, else x's."""
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def pad_rows(self, x: torch.Tensor) -> int:
        """Rows each expert's slice is padded to a multiple of for the grouped GEMMs: PAD_ROWS in 16-bit
        on CPU (oneDNN's per-shape setup, pad_slices), else 1."""
        return PAD_ROWS if x.device.type == "cpu" and self.dtype_for(x).itemsize == 2 else 1

    def grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """F.grouped_mm's conditions: a device where it has a kernel for the dtype (CPU: any float;
        CUDA: bf16) and 16-byte row strides."""
        if not hasattr(F, "grouped_mm") or x.device.type not in ("cpu", "cuda"):
            return False
        if x.device.type == "cuda" and x.dtype != torch.bfloat16:
            return False
        align = 16 // x.element_size()
        _, two_i, h = self.gate_up_proj.shape
        return h % align == 0 and (two_i // 2) % align == 0

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, rw: torch.Tensor | None = None,
                grouped: bool = True, compiled: bool = False) -> torch.Tensor:
        """expert_e(xs) (times rw [rows, 1], if given) for rows sorted by expert, counts[e] rows each;
        the gate weight multiplies the intermediate activation (I wide) rather than the output (H wide):
        the same product, less traffic. `compiled`: the SwiGLU between the grouped GEMMs through
        torch.compile (`compiled_swiglu`)."""
        dtype = self.dtype_for(xs)
        w1, w2, xs = self.gate_up_proj.to(dtype), self.down_proj.to(dtype), xs.to(dtype)
        rw = None if rw is None else rw.to(dtype)
        if grouped:  # two grouped GEMMs over all the slices
            dest = None
            if self.pad_rows(xs) > 1 and bool((counts % PAD_ROWS).any()):
                xs, rw, counts, dest = pad_slices(xs, rw, counts)  # MoE.dispatch pads in its gather
            offs = counts.cumsum(0).to(torch.int32)
            gu = F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)
            h = compiled_swiglu(gu, rw) if compiled else swiglu(gu, rw)
            ys = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)
            return ys if dest is None else ys.index_select(0, dest)
        # each expert that got rows, once, on its slice; unbind: one stacked gradient, not E
        outs = []
        for w_gu, w_d, xe, n in zip(w1.unbind(0), w2.unbind(0), xs.split(counts.tolist()), counts.tolist()):
            if n:
                outs.append(linear(swiglu(linear(xe, w_gu)), w_d))
        ys = torch.cat(outs) if outs else xs.new_zeros(0, w2.shape[1])
        return ys if rw is None else ys * rw

    def one_token(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[j] · expert_{indices[j]}(x) for one token x [1, H] (decode at batch 1): the k
        chosen experts' weights used in place, no sort, gather or grouped GEMM over empty groups."""
        y = None
        for e, w in zip(indices.tolist(), weights.tolist()):
            out = F.linear(swiglu(F.linear(x, self.gate_up_proj[e]), w), self.down_proj[e])
            y = out if y is None else y.add_(out)
        return y


class LoopExperts(nn.ModuleList):
    """The routed experts as one MLP each (what infer/quantize.py turns into quantized linears):
    run by the per-expert loop."""

    @classmethod
    def unstacked(cls, experts: Experts) -> "LoopExperts":
        _, two_i, h = experts.gate_up_proj.shape
        out = cls()
        for w_gu, w_d in zip(experts.gate_up_proj.detach(), experts.down_proj.detach()):
            m = MLP(h, two_i // 2).to(device=w_gu.device, dtype=w_gu.dtype)
            m.gate_proj.weight.data.copy_(w_gu[:two_i // 2])
            m.up_proj.weight.data.copy_(w_gu[two_i // 2:])
            m.down_proj.weight.data.copy_(w_d)
            out.append(m)
        return out

    def grouped_mm_applies(self, x) -> bool:
        return False

    def forward(self, xs, counts, rw=None, grouped: bool = False, compiled: bool = False):
        outs = [self[e](xe) for e, (xe, n) in enumerate(zip(xs.split(counts.tolist()), counts.tolist())) if n]
        ys = torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])
        return ys if rw is None else ys * rw.to(ys.dtype)


class MoE(nn.Module):
    GROUPED: bool | None = None  # None: grouped GEMMs wherever F.grouped_mm applies; False: the loop forced
    COMPILE: bool = False  # True: the grouped path's SwiGLU through torch.compile (opt-in: a first-call cost)
    FUSED: bool = True  # the C++ experts (infer/moe.cpp) where they apply; False: the grouped path with its C++ parts

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(self.n_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        k = self.fused_kernels(x)
        if k is not None:  # the gate, its plan, and gather, experts, SwiGLU and combine in one C++ op each way
            g, s, dt = self.gate, self.shared_experts, self.experts.dtype_for(x)
            c = lambda t: t.to(dt)  # noqa: E731  (autocast: bf16 copies of fp32 weights; their gradients flow back in fp32)
            shared = None if s is None else (c(s.gate_proj.weight), c(s.up_proj.weight), c(s.down_proj.weight))
            with torch.autocast(x.device.type, enabled=False):
                y, scores, load = k.moe_layer(c(x), c(g.weight), g.e_score_correction_bias, g.route_args(),
                                              c(self.experts.gate_up_proj), c(self.experts.down_proj), shared)
        else:
            weights, indices, scores = self.gate(x)
            base = self.shared_experts(x) if self.shared_experts is not None else None
            y, load = self.dispatch(x, weights, indices, base)
        return y.view(shape), Routing(scores.view(*shape[:-1], scores.shape[-1]), load)

    def fused_kernels(self, x: torch.Tensor):
        """The C++ kernels, if they run this layer whole (gate, plan and experts: ffn.cpp, moe.cpp): installed,
        fp32, or bf16 on a CPU with AVX512_BF16 (a bf16 layer, or fp32 weights under CPU bf16 autocast, as
        `--dtype bf16` trains: the layer then runs as a bf16 one), weights (the gate's too) of x's dtype
        without autocast, the stacked experts and a plain shared MLP, widths in whole vectors, more than one
        token (one token in decode takes its k experts' weights in place: Experts.one_token)."""
        k = kernels_for(x)
        if not self.FUSED or k is None or len(x) < 2 or type(self.experts) is not Experts:  # kernels_for: fp32/bf16
            return None
        dt = self.experts.dtype_for(x)
        allowed = (dt, torch.float32) if torch.is_autocast_enabled(x.device.type) else (dt,)  # autocast casts fp32
        if (dt not in (torch.float32, torch.bfloat16) or (dt == torch.bfloat16 and not k.moe_bf16())
                or self.experts.gate_up_proj.dtype not in allowed or self.gate.weight.dtype not in allowed):
            return None
        s, w = self.shared_experts, k.vector_width()
        if s is not None and not (type(s) is MLP and all(type(m) in PLAIN and m.bias is None and
                                                          m.weight.dtype in allowed and m.weight.shape[0] % w == 0
                                                          for m in (s.gate_proj, s.up_proj, s.down_proj))):
            return None
        _, two_i, h = self.experts.gate_up_proj.shape
        return k if h % w == 0 and (two_i // 2) % w == 0 else None

    def use_grouped(self, x: torch.Tensor) -> bool:
        """Grouped GEMMs for x's rows? Wherever F.grouped_mm applies: with the experts stored stacked
        it beats the per-expert loop at every size measured, decode included (one token aside, see
        dispatch; docs/benchmarks.md#moe-vs-dense)."""
        return self.GROUPED is not False and self.experts.grouped_mm_applies(x)

    def dispatch(self, x, weights, indices, base=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(base + Σ_k weight_k · expert_k(x) per token, tokens per expert [E])."""
        grad = torch.is_grad_enabled()
        if len(x) == 1 and not grad and isinstance(self.experts, Experts):  # decode at batch 1
            y = self.experts.one_token(x, weights[0], indices[0])
            return (y if base is None else base + y), torch.bincount(indices[0], minlength=self.n_experts)
        grouped = self.use_grouped(x)
        pad = self.experts.pad_rows(x) if grouped else 1
        k = kernels_for(x)
        if k is not None:  # one counting sort in C++
            token, slot, pair, counts, rows_per_expert = k.moe_plan(indices, self.n_experts, pad)
        else:
            flat = indices.flatten()
            counts = torch.bincount(flat, minlength=self.n_experts)
            token, slot, pair, rows_per_expert = sort_pairs(flat, counts, self.top_k, pad)
        rw = F.pad(weights.flatten(), (0, 1))[pair, None]  # padding rows (pair = N·k) get weight 0
        xs = Gather.apply(x, token, slot, self.top_k) if grad else x.index_select(0, token)
        ys = self.experts(xs, rows_per_expert, rw, grouped, self.COMPILE).to(x.dtype)
        y = Combine.apply(ys, base, slot, token, self.top_k) if grad else gather_sum(ys, slot, self.top_k, base)
        return y, counts.detach()

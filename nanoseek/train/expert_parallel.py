"""Expert parallelism for DeepSeekMoE: the routed experts split across ranks, all-to-all dispatch.

    torchrun --nproc_per_node 2 -m nanoseek pretrain --out runs/ep --expert-parallel

    info = dist.init()
    model = Transformer(cfg)                  # the full model (load a checkpoint into it first)
    shard_experts(model, info)                # rank r keeps experts [r·L, (r+1)·L), L = E / world
    wrapped = dist.wrap(model, info)          # DDP for everything else; it leaves the experts alone

Layout (DeepSeek-V3 §3.2 trains with expert parallelism across nodes; GShard's all-to-all): every
rank is a data-parallel rank with its own micro-batch, and an expert-parallel rank owning E / world
routed experts. The gate, attention, shared experts and embeddings are replicated (DDP averages
their gradients); each routed expert lives on one rank only: rank r's `mlp.experts.gate_up_proj` /
`down_proj` hold rows [r·L, (r+1)·L) of the stacked experts, under the same names as in one process.

One MoE layer on one rank, with its own N tokens (ExpertParallelMoE.dispatch):
  1. the (replicated) gate picks top-k experts per token; the (token, expert) pairs are sorted by
     expert, so they are grouped by owner rank too
  2. all-to-all of the per-expert counts: how many rows each rank will send to each of my experts
  3. all-to-all of the rows (uneven splits): the rows for my experts, by source rank then expert
  4. regroup them by local expert and run each local expert once on its slice
  5. the reverse all-to-all brings each row's output home; weight by the gate, add per token
Both row exchanges are differentiable (AllToAll: the backward is the reverse exchange of the
gradient), so an expert's gradient sums the contributions of every rank's loss. DDP averages the
replicated gradients over ranks; a hook divides the experts' gradients by the world size, so
every gradient is that of the mean of the ranks' losses, as in plain DDP.

Every rank must run every forward and backward (the exchanges are collectives), also for
evaluation and generation. gloo implements all_to_all_single with uneven splits on CPU (checked
with torch 2.13), NCCL on GPUs, so there is no fallback exchange. Checkpoints gather the experts
onto rank 0 (full_state_dict, full_optimizer_state: the ranks' slices concatenated in rank order):
a checkpoint is the full model, which resumes with or without expert parallelism and any world size
that divides E (local_optimizer_state takes this rank's slice of a full optimizer state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import NanoseekError
from ..model.moe import MoE

if TYPE_CHECKING:  # dist.py imports this module for the expert-parallel paths
    from .dist import DistInfo

EXPERT_FLAG = "_nanoseek_expert_parallel"  # set on each routed-expert parameter of a sharded model


class AllToAll(torch.autograd.Function):
    """all_to_all_single of the rows of x: in_splits[r] rows go to rank r, out_splits[r] come from it."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are split across the ranks (see the module docstring)."""

    def setup(self, rank: int, world: int, group=None) -> None:
        if self.n_experts % world:
            raise NanoseekError(f"expert parallelism needs n_routed_experts ({self.n_experts}) divisible by "
                                f"the number of processes ({world})")
        self.rank, self.world, self.group = rank, world, group
        self.n_local = self.n_experts // world
        self.first = rank * self.n_local
        mine = slice(self.first, self.first + self.n_local)
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self.experts, name)
            setattr(self.experts, name, torch.nn.Parameter(w.data[mine].clone(), requires_grad=w.requires_grad))
        self.last_received: torch.Tensor | None = None  # rows received from each rank in the last call

    def fused_kernels(self, x):  # the experts are split across the ranks: the all-to-all path
        return None

    def dispatch(self, x, weights, indices, base=None):
        W, L = self.world, self.n_local
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // self.top_k
        # recv_counts[s * L + j]: rows rank s sends to my local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(W, L)
        send_splits = counts.view(W, L).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        self.last_received = recv_counts.sum(1).detach()
        rows = all_to_all(x[token], recv_splits, send_splits, self.group)
        # received rows are grouped by source rank, then expert: regroup by expert
        local = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_counts.flatten())
        by_expert = local.argsort(stable=True)
        rows = rows[by_expert]
        # the same kernels as one process; with no rows at all the (empty) graph stays: the backward
        # exchange is a collective that every rank must join
        out = self.experts(rows, recv_counts.sum(0), None, self.use_grouped(rows)) if len(rows) else rows
        out = out[torch.argsort(by_expert)]                      # back to (source rank, expert) order
        ys = all_to_all(out, send_splits, recv_splits, self.group)
        ys = ys * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x) if base is None else base
        return y.index_add(0, token, ys), counts.detach()


def shard_experts(model: torch.nn.Module, info: DistInfo, group=None) -> list[ExpertParallelMoE]:
    """Turn every MoE layer of `model` (main layers and MTP blocks) into an ExpertParallelMoE in
    place, keeping this rank's experts; call it on the full model before dist.wrap and the optimizer."""
    if not getattr(model.config, "is_moe", False):
        raise NanoseekError("--expert-parallel needs a MoE model (n_routed_experts > 0)")
    rank, world = info.rank, info.world
    if world == 1:
        return []  # one process holds every expert: nothing to split
    layers = []
    for m in model.modules():
        if type(m) is MoE:
            m.__class__ = ExpertParallelMoE  # same state, same names; only dispatch changes
            m.setup(rank, world, group)
            layers.append(m)
    scale = 1.0 / world
    for m in layers:
        for p in m.experts.parameters():
            setattr(p, EXPERT_FLAG, True)
            # an expert's gradient arrives summed over the ranks' losses; DDP averages the rest
            p.register_hook(lambda g: g * scale)
    info.expert_parallel = True
    return layers


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, EXPERT_FLAG, False)


def expert_names(model: torch.nn.Module) -> set[str]:
    """This rank's routed-expert parameter names (as in model.state_dict())."""
    return {n for n, p in model.named_parameters() if is_expert_param(p)}


def _gather_to_main(obj, info: DistInfo) -> list:
    out = [None] * info.world if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _concat_ranks(parts: list) -> torch.Tensor:
    return torch.cat(parts) if torch.is_tensor(parts[0]) and parts[0].dim() else parts[0]


def full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full model state dict (every expert) on rank 0, {} elsewhere; every rank must call it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    names = expert_names(model)
    gathered = _gather_to_main({k: state[k] for k in names}, info)
    if not info.main:
        return {}
    for k in names:  # each rank's slice of the stacked experts, in rank order
        state[k] = torch.cat([part[k] for part in gathered])
    return state


def full_optimizer_state(model: torch.nn.Module, state: dict, info: DistInfo) -> dict:
    """Concatenate the ranks' slices of the experts' optimizer state (exp_avg, exp_avg_sq) in a
    name-keyed optimizer state (from get_optimizer_state_dict with full_state_dict=True) on rank 0,
    {} elsewhere."""
    names = expert_names(model)
    cpu = lambda v: v.detach().cpu() if torch.is_tensor(v) else v  # noqa: E731
    mine = {k: {s: cpu(v) for s, v in st.items()} for k, st in state["state"].items() if k in names}
    gathered = _gather_to_main(mine, info)
    if not info.main:
        return {}
    merged = {"state": {k: {s: cpu(v) for s, v in st.items()} for k, st in state["state"].items()},
              "param_groups": [dict(g, params=list(g["params"])) for g in state["param_groups"]]}
    for k in mine:
        merged["state"][k] = {s: _concat_ranks([part[k][s] for part in gathered]) for s in mine[k]}
    return merged


def local_optimizer_state(model: torch.nn.Module, state: dict, info: DistInfo) -> dict:
    """This rank's slice of the experts' entries of a full name-keyed optimizer state (to resume)."""
    names = expert_names(model)
    params = dict(model.named_parameters())
    out = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
    for k in names & set(state["state"]):
        L = params[k].shape[0]
        out["state"][k] = {s: v[info.rank * L:(info.rank + 1) * L] if torch.is_tensor(v) and v.dim() else v
                           for s, v in state["state"][k].items()}
    return out

"""torchrun support: process group, DDP or FSDP2 wrapping, collectives, full state dicts.

    torchrun --nproc_per_node 2 -m nanoseek pretrain --preset tiny --out runs/ddp           # DDP
    torchrun --nproc_per_node 8 -m nanoseek pretrain --preset small --out runs/fsdp --fsdp  # FSDP2

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on one process.
NCCL when CUDA is present (one GPU per local rank), gloo on CPU.

DDP: gradients are averaged across ranks; find_unused_parameters stays on for MoE models (the
routed experts are stacked tensors, so an expert no token picked gets a zero gradient, not none;
the flag is kept for safety and costs one extra pass over the autograd graph). Buffers (the gate's
e_score_correction_bias) are not broadcast: every rank applies the same update from the
all-reduced expert load, so they stay identical.

FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder block (and each MTP module's block) is
its own shard group, then the root. Checkpoints gather full (unsharded) state dicts onto rank 0.

Expert parallelism (expert_parallel.py, after shard_experts): DDP ignores the routed experts (each
rank owns different ones); checkpoints gather them onto rank 0; clip_grad_norm sums the experts'
squared norms over the ranks. Not combined with FSDP2.

Optimizer states are keyed by parameter name in every mode, so a checkpoint written by one
process, DDP, FSDP2 or expert parallelism resumes under any of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    fsdp: bool = False
    expert_parallel: bool = False      # set by expert_parallel.shard_experts

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world <= 1:
        dev = torch.device(device or ("cuda" if cuda else "cpu"))
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if cuda else None)
    return DistInfo(rank, world, local, dev, backend)


def wrap(model: torch.nn.Module, info: DistInfo, fsdp: bool = False) -> torch.nn.Module:
    if not info.enabled:
        return model
    if fsdp:
        if info.expert_parallel:
            from ..errors import NanoseekError
            raise NanoseekError("--expert-parallel works with DDP, not with --fsdp")
        from torch.distributed.fsdp import fully_shard
        # the MTP module's own norms run outside its forward (transformer.mtp_logits), so only its
        # block gets a shard group; the norms and eh_proj stay with the root
        for block in list(model.model.layers) + [m.block for m in model.mtp]:
            fully_shard(block)
        fully_shard(model)
        info.fsdp = True
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    # no buffer broadcast in forward (torch >= 2.13 renames the flag)
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
            else {"broadcast_buffers": False})
    if info.expert_parallel:  # each rank's routed experts are its own: no broadcast, no averaging
        from .expert_parallel import expert_names
        DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_names(model)))
    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
               find_unused_parameters=model.config.is_moe, **sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= info.world
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------- state dicts
def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state. A forward without backward (the greedy
    samples) leaves the root's parameters unsharded (the root does not reshard after forward), and
    then model.named_parameters() are not the optimizer's parameters: the state-dict helpers below
    would fail to map the optimizer state to names (a KeyError on the parameter id)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full model state dict (on CPU), whatever the wrapping; with FSDP2 on rank 0 only
    (every rank must call it: the shards are gathered)."""
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        _reshard(model)
        return get_model_state_dict(model, options=_options(cpu_offload=True))
    if info.expert_parallel:
        from .expert_parallel import full_state_dict
        return full_state_dict(unwrap(model), info)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_state(model: torch.nn.Module, state: dict, info: DistInfo) -> None:
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        _reshard(model)
        set_model_state_dict(model, state, options=_options())
        return
    unwrap(model).load_state_dict(state, strict=True)


def optimizer_state(model, optimizer, info: DistInfo) -> dict:
    """The full optimizer state on CPU, keyed by parameter name (not by the optimizer's parameter
    index) in every mode, so a checkpoint written by one process, DDP or FSDP2 resumes in any other.
    With FSDP2 the full state is on rank 0 only; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    if info.fsdp:
        _reshard(model)
    if info.expert_parallel:  # every rank keeps its state (cpu_offload would keep rank 0's only)
        from .expert_parallel import full_optimizer_state
        state = get_optimizer_state_dict(model, optimizer, options=_options())
        return full_optimizer_state(unwrap(model), state, info)
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, info: DistInfo) -> None:
    """Load a full (name-keyed) optimizer state on every rank; each FSDP2 rank keeps its shard."""
    if all(isinstance(k, int) for k in state.get("state", {})) and all(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"]):
        optimizer.load_state_dict(state)  # index-keyed, as optimizer.state_dict() writes it
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    if info.fsdp:
        _reshard(model)
    if info.expert_parallel:  # this rank's rows of the stacked experts' state
        from .expert_parallel import local_optimizer_state
        state = local_optimizer_state(unwrap(model), state, info)
    set_optimizer_state_dict(model, optimizer, state, options=_options())


def clip_grad_norm(model: torch.nn.Module, max_norm: float, info: DistInfo) -> float:
    """Clip the gradients to a total norm of max_norm; returns the norm before clipping, the same
    on every rank. With expert parallelism the experts differ per rank: their squared norms are
    summed over the ranks (the replicated parameters' gradients are already equal everywhere)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not info.expert_parallel:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    from .expert_parallel import is_expert_param
    experts = [p.grad for p in params if is_expert_param(p)]
    shared = [p.grad for p in params if not is_expert_param(p)]
    zero = torch.zeros((), device=params[0].device)
    sq_experts = torch.nn.utils.get_total_norm(experts) ** 2 if experts else zero
    all_reduce(sq_experts, info)
    sq_shared = torch.nn.utils.get_total_norm(shared) ** 2 if shared else zero
    norm = (sq_experts + sq_shared).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def grad_sync(model: torch.nn.Module, info: DistInfo, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce unless `sync` (the last one)."""
    import contextlib
    if not info.enabled or sync:
        return contextlib.nullcontext()
    if info.fsdp:
        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return no_sync()
    return model.no_sync()

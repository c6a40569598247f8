"""Expert parallelism (nanoseek/train/expert_parallel.py) against one process.

    .venv/bin/python -m pytest -q tests/test_dist.py

Two gloo processes under torchrun each hold half of the routed experts and half of the batch; the
reference is the unsharded model on the whole batch in this process. Compared within 1e-5: the
logits (training forward, and eval forward after one step), the gradients (replicated ones after
DDP's average, each rank's experts after the all-to-all backward), the clipped norm, and the
checkpoint state gathered onto rank 0 (model and optimizer, which resumes in one process).
This file is also the worker: `torchrun --nproc_per_node 2 tests/test_dist.py OUT_DIR`.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.train import dist  # noqa: E402
from nanoseek.train.expert_parallel import ExpertParallelMoE, shard_experts  # noqa: E402
from nanoseek.train.objective import moe_layers, mtp_loss, next_token_loss  # noqa: E402
from nanoseek.train.optim import adamw  # noqa: E402

CLIP, LR = 0.5, 1e-2  # a clip below the gradient norm, so the clipping itself is compared
# Adam's first step is lr * g / (|g| + eps): with the default eps a 1e-9 difference in a 1e-8
# gradient moves a weight by ~lr; a larger eps keeps the step a smooth function of the gradient
EPS = 1e-3


def tiny_moe(**kw) -> ModelConfig:
    base = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, routed_scaling_factor=2.5,
                norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=2,
                first_k_dense_replace=1, num_nextn_predict_layers=1)
    return ModelConfig(**{**base, **kw})


def build():
    """The model, the batch [4, 9] and a (seeded) nonzero balancing bias: the same in every process."""
    torch.manual_seed(0)
    model = Transformer(tiny_moe())
    for m in moe_layers(model):
        m.gate.e_score_correction_bias.normal_(0, 0.05)
    batch = torch.randint(0, 97, (4, 9))
    return model, batch


def loss_of(model, window):
    logits, mtp = model(window[:, :-1], return_mtp=True)
    return logits, next_token_loss(logits, window) + 0.3 * mtp_loss(mtp, window)


def worker(out: Path) -> None:
    info = dist.init()
    torch.set_num_threads(1)
    model, batch = build()
    mine = batch.chunk(info.world)[info.rank]
    layers = shard_experts(model, info)
    wrapped = dist.wrap(model, info)
    optimizer = adamw(model, LR, eps=EPS)
    logits, loss = loss_of(wrapped, mine)
    loss.backward()
    res = {"logits": logits.detach(), "received": torch.stack([m.last_received for m in layers]),
           "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    res["norm"] = torch.tensor(dist.clip_grad_norm(model, CLIP, info))
    optimizer.step()
    model.eval()
    with torch.no_grad():
        res["eval_logits"] = model(mine[:, :-1])
    state = dist.model_state(wrapped, info)
    opt_state = dist.optimizer_state(wrapped, optimizer, info)
    # resume: the full (gathered) optimizer state broadcast back, each rank keeps its experts' rows
    opt_state = dist.broadcast_object(opt_state, info)
    model.zero_grad(set_to_none=True)  # as in a fresh process
    again = adamw(model, LR, eps=EPS)
    dist.load_optimizer_state(wrapped, again, opt_state, info)
    mine = {n: p for n, p in model.named_parameters()}
    res["resumed"] = {n: again.state[p]["exp_avg"] for n, p in mine.items() if p in again.state}
    res["own"] = {n: optimizer.state[p]["exp_avg"] for n, p in mine.items() if p in optimizer.state}
    torch.save(res, out / f"rank{info.rank}.pt")
    if info.main:
        torch.save({"model": state, "optimizer": opt_state}, out / "full.pt")
    dist.shutdown(info)


@pytest.fixture(scope="module")
def expert_parallel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # a timeout kills the workers too
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    return [load("rank0.pt"), load("rank1.pt")], load("full.pt")


@pytest.fixture(scope="module")
def reference():
    """One process, the whole model, the whole batch: loss = mean of the two halves' losses."""
    model, batch = build()
    optimizer = adamw(model, LR, eps=EPS)
    logits, loss = loss_of(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        eval_logits = model(batch[:, :-1])
    return {"logits": logits.detach(), "grads": grads, "norm": norm, "eval_logits": eval_logits,
            "model": model, "optimizer": optimizer}


def is_routed(name: str) -> bool:
    return ".experts." in name  # the stacked routed experts: experts.gate_up_proj / experts.down_proj


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_expert_parallel_forward_matches_one_process(expert_parallel_run, reference):
    ranks, _ = expert_parallel_run
    close(torch.cat([r["logits"] for r in ranks]), reference["logits"])
    # both ranks' tokens really travelled: each rank received rows from the other, in each MoE layer
    for r, res in enumerate(ranks):
        assert res["received"].shape == (2, 2) and (res["received"][:, 1 - r] > 0).all()


def test_expert_parallel_gradients_match_one_process(expert_parallel_run, reference):
    ranks, _ = expert_parallel_run
    ref = reference["grads"]
    for r, res in enumerate(ranks):
        routed = [n for n in res["grads"] if is_routed(n)]
        assert routed and all(res["grads"][n].shape[0] == 2 for n in routed)  # rank r holds experts 2r, 2r+1
        shared = [n for n in ref if not is_routed(n)]
        assert set(shared) <= set(res["grads"])
        for n, g in res["grads"].items():
            close(g, ref[n][2 * r:2 * r + 2] if is_routed(n) else ref[n])
    close(ranks[0]["norm"], reference["norm"])
    close(ranks[1]["norm"], reference["norm"])


def test_expert_parallel_step_and_gathered_checkpoint(expert_parallel_run, reference):
    ranks, full = expert_parallel_run
    close(torch.cat([r["eval_logits"] for r in ranks]), reference["eval_logits"])
    ref_model, ref_opt = reference["model"], reference["optimizer"]
    state = ref_model.state_dict()
    assert set(full["model"]) == set(state)
    for k, v in state.items():
        close(full["model"][k], v)
    # the gathered optimizer state (name-keyed, every expert) loads into a one-process model
    model = Transformer(ref_model.config)
    model.load_state_dict(full["model"])
    optimizer = adamw(model, LR, eps=EPS)
    dist.load_optimizer_state(model, optimizer, full["optimizer"], dist.DistInfo())
    ours, theirs = optimizer.state_dict()["state"], ref_opt.state_dict()["state"]
    assert len(ours) == len(theirs) == len(list(model.parameters()))
    for i in theirs:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            close(ours[i][key], theirs[i][key])
    # and it resumes under expert parallelism: each rank takes back exactly its own state
    for res in ranks:
        assert set(res["resumed"]) == set(res["own"]) and any(is_routed(n) for n in res["own"])
        for n, v in res["own"].items():
            close(res["resumed"][n], v)


def test_shard_experts_refuses_what_it_cannot_split():
    with pytest.raises(NanoseekError, match="divisible"):
        shard_experts(Transformer(tiny_moe()), dist.DistInfo(rank=0, world=3))
    dense = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(NanoseekError, match="MoE"):
        shard_experts(Transformer(dense), dist.DistInfo(rank=0, world=2))
    # one process: nothing to split, the model is left as it is
    model, _ = build()
    assert shard_experts(model, dist.DistInfo()) == []
    assert not any(isinstance(m, ExpertParallelMoE) for m in model.modules())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

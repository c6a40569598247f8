"""The fused MoE experts (nanoseek/infer/moe.cpp) against the layer's formula in float64: the output and
every gradient (input, routing weights, routed and shared expert weights), with and without a shared
expert, at widths that leave partial register tiles in every pass, an expert with no rows and one with
more rows than a weight-gradient block; the same result on 1 and 2 threads; the MoE module with the
kernels installed takes this path and equals its PyTorch path, also under CPU bf16 autocast (`--dtype bf16`);
a bad dispatch plan is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.infer import kernels
from nanoseek.model import cpu_kernels
from nanoseek.model.moe import MoE

from conftest import assert_close_scaled, randomize

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")


def layer(shared: bool, n: int = 400, seed: int = 0):
    """A layer whose widths leave partial tiles everywhere: H = 5W, I = 5W, Is = 2W (W floats per vector),
    6 experts, k = 2; expert 0 takes every token (more rows than moe.cpp's KC = 256), expert 5 none."""
    W = kernels.vector_width()
    H, I, Is, E, k = 5 * W, 5 * W, 2 * W, 6, 2
    g = torch.Generator().manual_seed(seed)
    t = {"x": torch.randn(n, H, generator=g), "w1": torch.randn(E, 2 * I, H, generator=g) / H ** 0.5,
         "w2": torch.randn(E, H, I, generator=g) / I ** 0.5, "weights": torch.rand(n, k, generator=g) + 0.1}
    if shared:
        t.update(sg=torch.randn(Is, H, generator=g) / H ** 0.5, su=torch.randn(Is, H, generator=g) / H ** 0.5,
                 sd=torch.randn(H, Is, generator=g) / Is ** 0.5)
    idx = torch.stack([torch.zeros(n, dtype=torch.long), torch.randint(1, E - 1, (n,), generator=g)], 1)
    return t, idx


def formula(t: dict, idx: torch.Tensor) -> torch.Tensor:
    """y[n] = shared(x[n]) + Σ_j weights[n, j] · down_e(silu(gate_e x[n]) · up_e x[n]), e = idx[n, j], every
    token through every expert (einsum), then the chosen ones picked: no sort, no gather of rows."""
    I = t["w2"].shape[2]
    gu = torch.einsum("nh,ejh->nej", t["x"], t["w1"])
    out = torch.einsum("nei,ehi->neh", F.silu(gu[..., :I]) * gu[..., I:], t["w2"])
    y = (out.gather(1, idx[..., None].expand(-1, -1, out.shape[2])) * t["weights"][..., None]).sum(1)
    if "sg" in t:
        y = y + (F.silu(t["x"] @ t["sg"].T) * (t["x"] @ t["su"].T)) @ t["sd"].T
    return y


class Experts(torch.autograd.Function):
    """moe.cpp's experts op and its backward, alone (the model reaches them through kernels.moe_layer, whose
    routing makes the weights; here the test gives them)."""

    @staticmethod
    def forward(ctx, x, weights, w1, w2, sg, su, sd, token, pair, counts):
        y, *saved = torch.ops.nanoseek.moe_experts(x, weights, token, pair, counts, w1, w2, sg, su, sd)
        ctx.save_for_backward(x, weights, token, pair, counts, w1, w2, sg, su, sd, *saved)
        return y

    @staticmethod
    def backward(ctx, dy):  # dx, dweights, dw1, dw2 and the shared expert's three (empty without one)
        grads = torch.ops.nanoseek.moe_experts_bwd(dy.contiguous(), *ctx.saved_tensors)
        return tuple(g if need and g.numel() else None for g, need in zip(grads, ctx.needs_input_grad)) + (None,) * 3


def experts(t: dict, token, pair, rows) -> torch.Tensor:
    return Experts.apply(t["x"], t["weights"], t["w1"], t["w2"], t.get("sg"), t.get("su"), t.get("sd"), token, pair,
                         rows)


def fused(t: dict, idx: torch.Tensor) -> torch.Tensor:
    token, _, pair, _, rows = kernels.moe_plan(idx, t["w1"].shape[0], 1)
    return experts(t, token, pair, rows)


def grads(f, t: dict, idx, dy, dtype) -> tuple[torch.Tensor, dict]:
    leaves = {n: v.detach().to(dtype).requires_grad_() for n, v in t.items()}
    y = f(leaves, idx)
    y.backward(dy.to(dtype))
    return y.detach(), {n: v.grad for n, v in leaves.items()}


@pytest.mark.parametrize("shared", [True, False])
def test_fused_experts_equal_the_formula(shared):
    t, idx = layer(shared)
    dy = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(9))
    want, want_g = grads(formula, t, idx, dy, torch.float64)
    got, got_g = grads(fused, t, idx, dy, torch.float32)
    assert_close_scaled(got, want, 2e-6, "output")
    assert set(got_g) == set(want_g)
    for n in want_g:
        assert_close_scaled(got_g[n], want_g[n], 2e-6, f"grad of {n}")
    assert float(got_g["w1"][5].abs().max()) == 0 and float(got_g["w2"][5].abs().max()) == 0  # no rows: zero


def test_thread_count_does_not_change_the_sums():
    """Tokens' rows add up in a fixed order (shared expert, then experts by index) whatever the threads."""
    t, idx = layer(True, n=300, seed=1)
    dy = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(grads(fused, t, idx, dy, torch.float32))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_no_grad_call_equals_the_graph_call():
    """kernels.moe_layer without a graph (inference: the ops alone) and with one (its autograd node) compute the
    same layer."""
    t, _ = layer(True, n=50, seed=3)
    g = torch.Generator().manual_seed(4)
    gate_w, bias = torch.randn(6, t["x"].shape[1], generator=g) / 8, torch.rand(6, generator=g) / 10
    route = (2, 2, 1, "noaux_tc", "sigmoid", True, 2.5)
    args = lambda v: (v["x"], gate_w, bias, route, v["w1"], v["w2"], (v["sg"], v["su"], v["sd"]))  # noqa: E731
    with torch.no_grad():
        a = kernels.moe_layer(*args(t))
    b = kernels.moe_layer(*args({n: v.clone().requires_grad_() for n, v in t.items()}))
    assert b[0].grad_fn is not None
    for u, v in zip(a, b):
        assert torch.equal(u, v.detach())


def test_bad_plan_is_refused():
    t, idx = layer(False, n=20)
    token, _, pair, _, rows = kernels.moe_plan(idx, 6, 1)
    bad = token.clone()
    bad[3] = 20  # a token past x's rows
    with pytest.raises(RuntimeError, match="out of range"):
        experts(t, bad, pair, rows)
    with pytest.raises(RuntimeError, match="counts"):
        experts(t, token, pair, rows + 1)


def test_moe_module_takes_the_fused_path_and_equals_pytorch(monkeypatch):
    """A V3 MoE block (group-limited sigmoid gate, a shared expert) in training: with the kernels installed
    the layer runs as one C++ node (spied), and the output and every gradient equal the PyTorch path's, with
    a loss on the affinities too (as the sequence-wise balance loss reads them)."""
    W = kernels.vector_width()
    cfg = ModelConfig(hidden_size=4 * W, moe_intermediate_size=2 * W, n_routed_experts=8, num_experts_per_tok=2,
                      n_shared_experts=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                      routed_scaling_factor=2.5, norm_topk_prob=True)
    moe = randomize(MoE(cfg), seed=0, std=0.1)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    x = torch.randn(3, 70, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ds = torch.randn(*x.shape[:2], 8, generator=torch.Generator().manual_seed(3))
    calls = []
    real = kernels.moe_layer
    monkeypatch.setattr(kernels, "moe_layer", lambda *a: calls.append(1) or real(*a))
    out = {}
    for installed in (None, kernels):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y, routing = moe(xi)
        ((y * dy).sum() + (routing.scores * ds).sum()).backward()
        out[installed is not None] = [y.detach(), xi.grad, routing.load] + [p.grad for p in moe.parameters()]
    assert calls == [1]
    assert torch.equal(out[True][2], out[False][2])  # the same routing
    for a, b in zip(out[True], out[False]):
        assert_close_scaled(a, b, 1e-5)


bf16_only = pytest.mark.skipif(not kernels.moe_bf16(), reason="the CPU has no AVX512_BF16")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want|"""
    return float((got.double() - want).abs().max() / want.abs().max())


@bf16_only
@pytest.mark.parametrize("shared", [True, False])
def test_bf16_experts_equal_the_formula(shared):
    """bf16 layer (vdpbf16ps tiles, fp32 sums): against the float64 formula on the same bf16 values, every
    result within a few bf16 roundings (2^-8 = 0.0039 each: gu, h and the output are rounded) of the
    largest value; fp32 routing weights get an fp32 gradient, the rest bf16."""
    t, idx = layer(shared)
    t = {n: v if n == "weights" else v.bfloat16().double() for n, v in t.items()}
    dy = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(9)).bfloat16()
    want, want_g = grads(formula, t, idx, dy.double(), torch.float64)
    leaves = {n: (v.float() if n == "weights" else v.bfloat16()).requires_grad_() for n, v in t.items()}
    y = fused(leaves, idx)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and rel_err(y, want) < 1e-2
    for n, v in leaves.items():
        assert v.grad.dtype == v.dtype
        assert rel_err(v.grad, want_g[n]) < 1e-2, n
    assert float(leaves["w1"].grad[5].abs().max()) == 0  # no rows: zero


@bf16_only
def test_bf16_thread_count_does_not_change_the_sums():
    t, idx = layer(True, n=300, seed=1)
    dy = torch.randn(t["x"].shape, generator=torch.Generator().manual_seed(2))
    t = {n: v if n == "weights" else v.bfloat16() for n, v in t.items()}
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
            y = fused(leaves, idx)
            y.backward(dy.bfloat16())
            out.append([y.detach()] + [v.grad for v in leaves.values()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@bf16_only
def test_bf16_moe_module_takes_the_fused_path(monkeypatch):
    """A bf16 V3 MoE block in training takes moe.cpp's bf16 path (spied), and its output and gradients are
    as close to the fp32 block's as PyTorch's bf16 path is (both within bf16 roundings)."""
    W = kernels.vector_width()
    cfg = ModelConfig(hidden_size=4 * W, moe_intermediate_size=2 * W, n_routed_experts=8, num_experts_per_tok=2,
                      n_shared_experts=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                      routed_scaling_factor=2.5, norm_topk_prob=True)
    moe = randomize(MoE(cfg), seed=0, std=0.1)
    x = torch.randn(3, 70, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    calls = []
    real = kernels.moe_layer
    monkeypatch.setattr(kernels, "moe_layer", lambda *a: calls.append(a[0].dtype) or real(*a))

    def run(m, installed, dtype):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        m.zero_grad(set_to_none=True)
        xi = x.to(dtype).detach().clone().requires_grad_()
        y, _ = m(xi)
        y.backward(dy.to(dtype))
        return [y.detach(), xi.grad] + [p.grad for p in m.parameters() if p.grad is not None]

    moe = moe.bfloat16().float()  # bf16-exact weights for all three
    want = run(moe, None, torch.float32)
    low = moe.bfloat16()
    got = run(low, kernels, torch.bfloat16)
    ref = run(low, None, torch.bfloat16)
    assert calls == [torch.bfloat16]
    for g, r, w in zip(got, ref, want):
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(r, w))


def autocast_block(seed: int = 0) -> tuple[MoE, torch.Tensor, torch.Tensor]:
    """A V3 MoE block with fp32 (master) weights, bf16-exact, and an input and output gradient."""
    W = kernels.vector_width()
    cfg = ModelConfig(hidden_size=4 * W, moe_intermediate_size=2 * W, n_routed_experts=8, num_experts_per_tok=2,
                      n_shared_experts=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                      routed_scaling_factor=2.5, norm_topk_prob=True)
    moe = randomize(MoE(cfg), seed=seed, std=0.1).bfloat16().float()
    x = torch.randn(3, 70, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).bfloat16().float()
    return moe, x, dy


def run_block(moe: MoE, x: torch.Tensor, dy: torch.Tensor, amp: bool) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y, routing = moe(xi)
    assert routing.scores.dtype == torch.float32  # the gate's affinities stay fp32 under autocast
    y.float().backward(dy)
    return [y.detach().float(), xi.grad] + [p.grad for p in moe.parameters() if p.grad is not None]


def test_gate_under_autocast_with_the_kernels(monkeypatch):
    """`--dtype bf16` on CPU trains under bf16 autocast: the gate's logits stay fp32 (they had come out bf16
    from F.linear, and the C++ routing refused them), and the block (unfused here) trains, its gradients
    fp32, close to the fp32 block's."""
    moe, x, dy = autocast_block()
    monkeypatch.setattr(cpu_kernels, "installed", kernels)
    monkeypatch.setattr(MoE, "FUSED", False)
    want = run_block(moe, x, dy, amp=False)
    got = run_block(moe, x, dy, amp=True)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and rel_err(g, w) < 3e-2


@bf16_only
def test_autocast_takes_the_fused_bf16_path(monkeypatch):
    """Under CPU bf16 autocast the block runs moe.cpp's bf16 path on bf16 copies of its fp32 weights (spied)
    and lands as close to the fp32 block as a bf16 block does; the weights' gradients are fp32."""
    moe, x, dy = autocast_block()
    monkeypatch.setattr(cpu_kernels, "installed", kernels)
    calls = []
    real = kernels.moe_layer
    monkeypatch.setattr(kernels, "moe_layer", lambda *a: calls.append(a[0].dtype) or real(*a))
    want = run_block(moe, x, dy, amp=False)
    got = run_block(moe, x, dy, amp=True)
    low = run_block(copy.deepcopy(moe).bfloat16(), x.bfloat16(), dy.bfloat16(), amp=False)
    assert calls == [torch.float32, torch.bfloat16, torch.bfloat16]
    for g, b, w in zip(got, low, want):
        assert g.dtype == torch.float32 and rel_err(g, w) < max(1e-2, 1.5 * rel_err(b.float(), w))

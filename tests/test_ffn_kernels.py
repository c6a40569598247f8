"""The C++ feed-forward kernels (nanoseek/infer/ffn.cpp): the SwiGLU against its formula in float64, the
MoE gate and dispatch plan against the PyTorch ops they replace (nanoseek/model/moe.py), gradients
included; the MoE block and the dense MLP with the kernels installed, against the same module without."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_scaled
from test_model import tiny_v3
from nanoseek.config import ModelConfig
from nanoseek.infer import kernels
from nanoseek.model import cpu_kernels
from nanoseek.model import moe as moe_mod

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")


def swiglu_reference(g, u, rw, dh):
    """h = silu(g) u rw and its gradients by autograd, in float64."""
    g, u, rw = (t.detach().double().requires_grad_() for t in (g, u, rw))
    h = F.silu(g) * u * rw
    h.backward(dh.double())
    return h.detach(), g.grad, u.grad, rw.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(37, 19), (64, 64), (3, 5)])  # 19, 5: a part-filled last vector
def test_swiglu_equals_its_formula(dtype, rows, width):
    """Both entry points: gu = [g | u] with routing weights (the experts' gradient is one [rows, 2I]
    tensor) and silu_mul on separate g, u. Inputs span the sigmoid's range (|x| up to 12)."""
    gen = torch.Generator().manual_seed(rows * width)
    gu = (torch.randn(rows, 2 * width, generator=gen) * 4).clamp(-12, 12).to(dtype)
    rw = torch.rand(rows, 1, generator=gen).to(dtype)
    dh = torch.randn(rows, width, generator=gen).to(dtype)
    g, u = gu[:, :width], gu[:, width:]
    h_ref, dg_ref, du_ref, drw_ref = swiglu_reference(g, u, rw, dh)
    # fp32: the kernel's e^x is within ~2e-7 relative; bf16: one rounding of each output (2^-8), math in fp32
    tol = 2e-6 if dtype == torch.float32 else 2 ** -7
    gu1, rw1 = gu.clone().requires_grad_(), rw.clone().requires_grad_()
    h = kernels.swiglu(gu1, rw1)
    h.backward(dh)
    assert h.dtype == dtype and gu1.grad.dtype == dtype and rw1.grad.dtype == dtype
    assert_close_scaled(h, h_ref, tol, "h")
    assert_close_scaled(gu1.grad[:, :width], dg_ref, tol, "dg")
    assert_close_scaled(gu1.grad[:, width:], du_ref, tol, "du")
    assert_close_scaled(rw1.grad, drw_ref, tol, "drw")
    g2, u2 = g.clone().requires_grad_(), u.clone().requires_grad_()
    h2 = kernels.silu_mul(g2.view(1, rows, width), u2.view(1, rows, width))  # any leading dims
    (h2.view(rows, width) * rw).backward(dh)
    assert_close_scaled(h2.view(rows, width) * rw, h_ref, tol, "silu_mul")
    assert_close_scaled(g2.grad, dg_ref, tol, "silu_mul dg")
    assert_close_scaled(u2.grad, du_ref, tol, "silu_mul du")


GATES = {  # (config, logits scale): V3's sigmoid with groups, its real shape, V2's softmax variants
    "v3 groups": dict(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                      scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5),
    "v3 real": dict(model_type="deepseek_v3", n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                    scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5),
    "v3 no norm": dict(model_type="deepseek_v3", n_routed_experts=16, num_experts_per_tok=3, n_group=1, topk_group=1,
                       scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=False, routed_scaling_factor=1.0),
    "v2 greedy": dict(model_type="deepseek_v2", n_routed_experts=16, num_experts_per_tok=4, scoring_func="softmax",
                      topk_method="greedy", routed_scaling_factor=16.0),
    "v2 group limited": dict(model_type="deepseek_v2", n_routed_experts=16, num_experts_per_tok=3, n_group=4,
                             topk_group=2, scoring_func="softmax", topk_method="group_limited_greedy",
                             routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("case", GATES)
def test_gate_kernel_equals_pytorch_ops(case, monkeypatch):
    """The C++ gate against Gate's PyTorch ops on 400 random tokens: the same experts (rows whose k-th
    and next choice are closer than 1e-5, where rounding may order them differently, are left out), the
    same weights and affinities, and the same gradient of the logits through both outputs."""
    cfg = ModelConfig(hidden_size=16, **GATES[case])
    gate = moe_mod.Gate(cfg)
    gen = torch.Generator().manual_seed(len(case))
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.copy_(torch.rand(cfg.n_routed_experts, generator=gen) * 0.2 - 0.1)
    x = torch.randn(400, 16, generator=gen)
    dw = torch.randn(400, cfg.num_experts_per_tok, generator=gen)
    ds = torch.randn(400, cfg.n_routed_experts, generator=gen)
    runs = []
    for installed in (None, kernels):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        gate.zero_grad()
        xg = x.clone().requires_grad_()
        w, idx, s = gate(xg)
        # the weights in expert order, so the two sides' order of equal-ranked experts cannot matter
        order = idx.argsort(dim=1)
        ((w.gather(1, order) * dw).sum() + (s * ds).sum()).backward()
        runs.append((w.gather(1, order).detach(), idx.gather(1, order), s.detach(), xg.grad, gate.weight.grad.clone(),
                     idx))
    (w0, i0, s0, gx0, gw0, raw0), (w1, i1, s1, gx1, gw1, raw1) = runs
    assert raw1.dtype == torch.long and raw1.shape == raw0.shape
    with torch.no_grad():  # the margin between the k-th choice and the next, from the reference's own scores
        choice = s0 + (gate.e_score_correction_bias if gate.e_score_correction_bias is not None else 0)
        top = choice.topk(min(cfg.num_experts_per_tok + 1, cfg.n_routed_experts), dim=1).values
        clear = (top[:, -2] - top[:, -1]).abs() > 1e-5
    assert clear.float().mean() > 0.9
    assert torch.equal(i0[clear], i1[clear])
    # the kernel sums each logit's H products in another order than F.linear: logits up to ~15 differ by a
    # few fp32 roundings (~1e-6), and the affinities by as much
    assert_close_scaled(s1, s0, 1e-5, "affinities")
    assert_close_scaled(w1[clear], w0[clear], 1e-5, "weights")
    if bool(clear.all()):
        assert_close_scaled(gx1, gx0, 1e-5, "input grad")
        assert_close_scaled(gw1, gw0, 1e-5, "router grad")


def choose_stable(choice: torch.Tensor, k: int, n_group: int, topk_group: int, method: str) -> torch.Tensor:
    """The top-k experts per row, every tie to the lower index (stable sorts): the kernel's rule."""
    def top(v, n):
        return torch.sort(-v, dim=-1, stable=True).indices[..., :n]
    if n_group > 1:
        grouped = choice.view(len(choice), n_group, -1)
        if method == "noaux_tc":
            score = (-torch.sort(-grouped, dim=-1).values[..., :2]).sum(-1)
        else:
            score = grouped.amax(-1)
        closed = torch.ones_like(score, dtype=torch.bool).scatter_(1, top(score, topk_group), False)
        choice = grouped.masked_fill(closed[..., None], -1e30).flatten(1)
    return top(choice, k)


@pytest.mark.parametrize("case", ["v3 groups", "v3 no norm", "v2 group limited"])
def test_route_lanes_equal_one_token_at_a_time(case):
    """The gate routes whole vectors of tokens at once (one per lane) and the rest one by one: a token gets
    the same experts, weights and affinities, bit for bit, either way, and ties (logits on a coarse grid)
    go to the lower index, group scores included."""
    cfg = GATES[case]
    E, k, G = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg.get("n_group", 1)
    n = 3 * kernels.vector_width()
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randint(-6, 7, (n, E), generator=gen) / 4.0).float()
    logits = torch.cat([logits, logits[:5]])  # the last 5 rows, copies of the first 5, routed one by one
    bias = torch.randint(-2, 3, (E,), generator=gen) / 64.0
    w, idx, s = kernels.moe_route(logits, bias, k, G, cfg.get("topk_group", 1), cfg["topk_method"],
                                  cfg["scoring_func"], cfg.get("norm_topk_prob", False), cfg["routed_scaling_factor"])
    for t in (w, idx, s):
        assert torch.equal(t[n:], t[:5])
    want = choose_stable(s.double() + bias.double(), k, G, cfg.get("topk_group", 1), cfg["topk_method"])
    assert torch.equal(idx, want)


def test_gate_kernel_without_the_weights_gradient():
    """Only the affinities carry a gradient (the balance loss alone): the weights' gradient is None,
    not zeros, and the logits' gradient is ds s (1 - s)."""
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w, idx, s = kernels.moe_route(logits, None, 2, 1, 1, "noaux_tc", "sigmoid", True, 2.5)
    ds = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    (s * ds).sum().backward()
    sig = logits.detach().sigmoid()
    assert_close_scaled(logits.grad, ds * sig * (1 - sig), 1e-6)
    assert torch.equal(idx, sig.topk(2, dim=1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_logits_equal_the_product(dtype):
    """The gate's GEMM (x @ w^T in fp32 sums) against float64 on the same values: 13 experts (a pass of 8 and
    a part-filled one), H = 3 vectors (a column block of 2 and one of 1); gradients of x and w in their dtype."""
    H, gen = 3 * kernels.vector_width(), torch.Generator().manual_seed(3)
    x, w = (torch.randn(n, H, generator=gen).to(dtype) for n in (70, 13))
    dl = torch.randn(70, 13, generator=gen)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = kernels.gate_logits(xg, wg)
    logits.backward(dl)
    x64, w64, dl64 = x.double(), w.double(), dl.double()
    assert logits.dtype == torch.float32 and xg.grad.dtype == wg.grad.dtype == dtype
    assert_close_scaled(logits, x64 @ w64.T, 1e-5, "logits")  # fp32 sums of exact products
    rounding = 1e-5 if dtype == torch.float32 else 2 ** -8  # the gradients are rounded to their dtype
    assert_close_scaled(xg.grad, dl64 @ w64, rounding, "dx")
    assert_close_scaled(wg.grad, dl64.T @ x64, rounding, "dw")
    into = torch.randn(70, H, generator=gen).to(dtype)  # x's gradient from elsewhere, added onto in place
    want = into.double() + dl64 @ w64
    none, dw = torch.ops.nanoseek.gate_logits_bwd(dl, x, w, into)
    assert none is None and dw.dtype == dtype
    assert_close_scaled(into, want, rounding, "dx added")


@pytest.mark.parametrize("pad", [1, 2, 32])
def test_dispatch_plan_equals_sort_pairs(pad):
    """The counting sort against sort_pairs (stable argsort, then padding) and bincount, including
    experts that get no rows."""
    idx = torch.randint(0, 12, (97, 3), generator=torch.Generator().manual_seed(pad))
    idx[:, 0] = idx[:, 0].clamp_max(9)  # experts 10 and 11 rarer; some may be empty
    flat = idx.flatten()
    counts = torch.bincount(flat, minlength=12)
    want = moe_mod.sort_pairs(flat, counts, 3, pad)
    token, slot, pair, got_counts, padded = kernels.moe_plan(idx, 12, pad)
    assert torch.equal(got_counts, counts)
    for got, ref, what in zip((token, slot, pair, padded), want, ("token", "slot", "pair", "padded")):
        assert torch.equal(got, ref), what
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.moe_plan(idx, 8, 1)


def test_training_pass_with_the_kernels_equals_pytorch(monkeypatch):
    """A training pass of a tiny V3 (MLA, MoE with its gate, shared expert and grouped experts, dense
    first layer, MTP), with the kernels installed and without: loss and every gradient, fp32."""
    torch.manual_seed(0)
    model = tiny_v3()
    x = torch.randint(0, 97, (3, 23), generator=torch.Generator().manual_seed(1))
    runs = []
    for installed in (None, kernels):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        model.zero_grad()
        logits, (mtp,) = model(x, return_mtp=True)
        loss = logits.logsumexp(-1).mean() + mtp.square().mean()
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, grads) = runs
    assert got == pytest.approx(ref, rel=1e-5) and grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close_scaled(grads[n], ref_grads[n], 1e-5, n)


def test_bf16_moe_block_with_the_kernels_equals_pytorch(monkeypatch):
    """One bf16 MoE block (each expert's slice padded to 32 rows) with the kernels and without: output
    and gradients within bf16 rounding (the kernel keeps silu(g) in fp32 where eager rounds it first)."""
    moe = tiny_v3().model.layers[1].mlp.to(torch.bfloat16)
    x = torch.randn(4, 37, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    runs = []
    for installed in (None, kernels):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y, routing = moe(xg)
        (y.float().square().sum() + routing.scores.sum()).backward()
        runs.append([t.float() for t in (y, xg.grad, moe.gate.weight.grad, moe.experts.gate_up_proj.grad,
                                         moe.experts.down_proj.grad, moe.shared_experts.up_proj.weight.grad)])
    for got, ref, what in zip(*runs, ("output", "input", "router", "gate_up", "down", "shared up")):
        assert_close_scaled(got, ref, 3e-2, what)


def test_no_grad_calls_compute_the_same():
    """Without autograd the ops run without their Functions: the same numbers as with them."""
    gen = torch.Generator().manual_seed(7)
    gu, rw = torch.randn(40, 38, generator=gen), torch.rand(40, 1, generator=gen)
    logits, w = torch.randn(40, 8, generator=gen), torch.rand(19, generator=gen)
    x = torch.randn(40, 19, generator=gen)
    calls = (lambda a: kernels.swiglu(a[0], a[1]), lambda a: kernels.silu_mul(a[0][:, :19], a[0][:, 19:]),
             lambda a: kernels.moe_route(a[2], None, 2, 2, 1, "noaux_tc", "sigmoid", True, 2.5),
             lambda a: kernels.rms_norm(a[3], a[4], 1e-6))
    for f in calls:
        with_graph = f([t.clone().requires_grad_() for t in (gu, rw, logits, x, w)])
        with torch.no_grad():
            without = f([gu, rw, logits, x, w])
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (with_graph, without))):
            assert torch.equal(a.detach(), b)

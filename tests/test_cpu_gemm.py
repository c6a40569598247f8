"""fp32 CPU products through oneDNN (nanoseek/model/cpu_kernels.py: linear, Linear, choose_gemm): the
output and all three gradients against PyTorch's F.linear in float64, the fall-backs (few rows, autocast,
bf16) computing exactly what F.linear does, a whole model's training pass against the same model
without, the choice and its override, and the CLI's one-line error for a bad override."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_scaled
from test_model import tiny_v3
from nanoseek.model import cpu_kernels

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def onednn(monkeypatch):
    """oneDNN on for the test, its calls counted."""
    calls = []
    real = cpu_kernels.onednn_linear

    def counted(*a):
        calls.append(a[0].shape)
        return real(*a)
    monkeypatch.setattr(cpu_kernels, "onednn", True)
    monkeypatch.setattr(cpu_kernels, "onednn_linear", counted)
    return calls


def reference(x, w, b, dy):
    """F.linear and its gradients by autograd in float64."""
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    y = F.linear(x, w, b)
    y.backward(dy.double())
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("shape,bias", [((70, 96), True), ((3, 40, 33), False), ((2, 17, 64), True)])
def test_linear_equals_its_formula(onednn, shape, bias):
    """3-D inputs, odd widths, a bias: y, dx, dW, db within fp32 rounding of float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = torch.randn(48, shape[-1], generator=g).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_() if bias else None
    dy = torch.randn(*shape[:-1], 48, generator=g)
    y = cpu_kernels.linear(x, w, b)
    y.backward(dy)
    assert len(onednn) == 3  # forward, dx, dW
    want = reference(x, w, b, dy)
    for got, ref, what in zip((y, x.grad, w.grad, None if b is None else b.grad), want, ("y", "dx", "dW", "db")):
        if ref is not None:
            assert got.dtype == torch.float32
            assert_close_scaled(got, ref, 1e-5, what)


def test_only_the_gradients_asked_for(onednn):
    """A frozen weight: no dW product."""
    x = torch.randn(64, 32).requires_grad_()
    w = torch.randn(16, 32)
    cpu_kernels.linear(x, w).sum().backward()
    assert len(onednn) == 2
    assert_close_scaled(x.grad, w.sum(0).expand(64, 32), 1e-5)


def test_fallbacks_are_pytorchs_own(onednn):
    """Fewer rows than ONEDNN_MIN_ROWS (decode), bf16, and fp32 under bf16 autocast run F.linear itself."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 32, generator=g)
    few = torch.randn(cpu_kernels.ONEDNN_MIN_ROWS - 1, 32, generator=g)
    assert torch.equal(cpu_kernels.linear(few, w), F.linear(few, w))
    many = torch.randn(64, 32, generator=g)
    assert torch.equal(cpu_kernels.linear(many.bfloat16(), w.bfloat16()), F.linear(many.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = cpu_kernels.linear(many, w), F.linear(many, w)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert onednn == []


def test_model_training_pass_equals_pytorchs(onednn, monkeypatch):
    """The tiny V3 (MLA, MoE, MTP): loss and every parameter's gradient as with PyTorch's products."""
    model = tiny_v3().train()
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))

    def grads(use_onednn):
        monkeypatch.setattr(cpu_kernels, "onednn", use_onednn)
        model.zero_grad()
        logits, (mtp,) = model(ids, return_mtp=True)
        loss = (F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                + F.cross_entropy(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten()))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = grads(False)
    assert onednn == []
    loss1, g1 = grads(True)
    assert len(onednn) > 20  # the projections, the shared experts, the heads: forward and backward
    assert_close_scaled(loss1, loss0, 1e-5, "loss")
    assert g0.keys() == g1.keys()
    for n in g0:
        assert_close_scaled(g1[n], g0[n], 1e-4, n)


def test_choice_and_override(monkeypatch):
    """torch / onednn force the choice; auto measures (a positive speed-up); anything else is refused;
    a torch without oneDNN's linear keeps its own products."""
    monkeypatch.setattr(cpu_kernels, "onednn", False)
    monkeypatch.setattr(cpu_kernels, "gemm", cpu_kernels.gemm)
    assert cpu_kernels.choose_gemm("onednn")[0] == "onednn" and cpu_kernels.onednn
    assert cpu_kernels.choose_gemm("torch") == ("torch", 0.0) and not cpu_kernels.onednn
    choice, speedup = cpu_kernels.choose_gemm("auto")
    assert speedup > 0 and (choice == "onednn") == (speedup >= 1.3) == cpu_kernels.onednn
    with pytest.raises(ValueError, match="NANOSEEK_CPU_GEMM"):
        cpu_kernels.choose_gemm("mkl")

    def missing():
        raise RuntimeError("no mkldnn::_linear_pointwise")
    monkeypatch.setattr(cpu_kernels, "_onednn_speedup", missing)  # a torch built without it
    assert cpu_kernels.choose_gemm("auto") == ("torch", 0.0) and "no oneDNN" in cpu_kernels.gemm
    assert not cpu_kernels.onednn


def test_cli_bad_override_is_a_one_line_error(tmp_path):
    env = {"NANOSEEK_CPU_GEMM": "fast", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "nanoseek", "eval", "--help"], env=env, capture_output=True, text=True)
    assert r.returncode == 0  # --help needs no choice
    r = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--out", str(tmp_path / "run"), "--steps", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["nanoseek: error: NANOSEEK_CPU_GEMM must be auto, torch or onednn, not 'fast'"]
    assert not (tmp_path / "run").exists()

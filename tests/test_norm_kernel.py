"""RMSNorm's C++ kernel (nanoseek/infer/norm.cpp) against its formula in float64 and against the model's
RMSNorm on PyTorch's ops: output, the input's and the weight's gradients, fp32 and bf16."""

import pytest
import torch

from conftest import assert_close_scaled
from nanoseek.infer import kernels
from nanoseek.model import cpu_kernels
from nanoseek.model.attention import RMSNorm

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")


def reference(x, w, eps, g):
    """y = x / sqrt(mean(x^2) + eps) * w and its gradients by autograd, float64."""
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w
    y.backward(g.double())
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 50, 128), (7, 19), (300, 32)])  # 19: a part-filled last vector; 300 rows: parts
def test_rms_norm_equals_its_formula(dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1])
    D = shape[-1]
    # rows of a wider tensor (as MLA normalises c_kv, a slice of its projection's output): strided rows
    x = (torch.randn(*shape[:-1], D + 5, generator=gen) * 3)[..., :D].to(dtype)
    w = (torch.rand(D, generator=gen) + 0.5).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    want, dx_want, dw_want = reference(x, w, 1e-6, g)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = kernels.rms_norm(xg, wg, 1e-6)
    y.backward(g)
    assert y.dtype == dtype and xg.grad.dtype == dtype and wg.grad.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6  # bf16: two roundings of the output, inputs rounded
    assert_close_scaled(y, want, tol, "y")
    assert_close_scaled(xg.grad, dx_want, tol, "dx")
    assert_close_scaled(wg.grad, dw_want, tol * (1 if dtype == torch.float32 else 4), "dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_rms_norm_with_the_kernel_equals_pytorch(dtype, monkeypatch):
    """The model's RMSNorm with the kernel installed (as training runs it) and without: bf16 rounds the
    normalised x before the weight in both, so they agree to a bf16 rounding, fp32 to float rounding."""
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 33, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = torch.randn(4, 33, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    runs = []
    for installed in (None, kernels):
        monkeypatch.setattr(cpu_kernels, "installed", installed)
        norm.zero_grad()
        xg = x.clone().requires_grad_()
        y = norm(xg)
        y.backward(g)
        runs.append((y.detach().float(), xg.grad.float(), norm.weight.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for got, ref, what in zip(runs[1], runs[0], ("y", "dx", "dw")):
        assert_close_scaled(got, ref, tol * (8 if what == "dw" and dtype == torch.bfloat16 else 1), what)


def test_rms_norm_without_the_weights_gradient():
    """A frozen weight: only dx is computed, and it still equals the formula's."""
    x = torch.randn(10, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.rand(24, generator=torch.Generator().manual_seed(3))
    g = torch.randn(10, 24, generator=torch.Generator().manual_seed(4))
    kernels.rms_norm(x, w, 1e-5).backward(g)
    _, dx, _ = reference(x, w, 1e-5, g)
    assert w.grad is None
    assert_close_scaled(x.grad, dx, 1e-5)

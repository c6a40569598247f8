"""MLA's queries, keys and values laid out for the training attention kernel in one C++ pass
(nanoseek/infer/rope.cpp) against PyTorch's ops (split, apply_rope, expand, cat, transpose), both RoPE
layouts, gradients included; and a training pass of MLA models with and without it."""

import pytest
import torch

from conftest import assert_close_scaled
from nanoseek.infer import kernels
from nanoseek.model.attention import apply_rope

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")


def reference(q, kv, k_pe, cos, sin, interleave, dn):
    """What MLA's PyTorch path computes before attention, as [B, H, T, D] tensors."""
    H = q.shape[2]
    q_nope, q_pe = q.split([dn, q.shape[-1] - dn], dim=-1)
    q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, interleave)), dim=-1)
    k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, interleave)[:, :, 0]
    k_nope, v = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, H, -1)), dim=-1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("batch_cos", [True, False])  # cos / sin per row, or one table for the batch
def test_mla_qkv_equals_pytorch_ops(interleave, batch_cos):
    gen = torch.Generator().manual_seed(int(interleave) * 2 + int(batch_cos))
    B, T, H, dn, dr, dv = 3, 11, 4, 8, 6, 5
    q = torch.randn(B, T, H, dn + dr, generator=gen)
    kv = torch.randn(B, T, H, dn + dv, generator=gen)
    k_pe = torch.randn(B, T, dr, generator=gen)
    ang = torch.rand(B if batch_cos else 1, T, dr // 2, generator=gen) * 6
    cos, sin = ang.cos() * 1.3, ang.sin() * 1.3  # a YaRN-like attention factor: not a pure rotation
    grads = [torch.randn(B, H, T, d, generator=gen) for d in (dn + dr, dn + dr, dv)]
    runs = []
    for f in (lambda *a: reference(*a, dn), lambda q, kv, kp, c, s, il: kernels.mla_qkv(q, kv, kp, c, s, il)):
        ins = [t.clone().requires_grad_() for t in (q, kv, k_pe)]
        outs = f(*ins, cos, sin, interleave)
        sum((o * g).sum() for o, g in zip(outs, grads)).backward()
        runs.append(([o.detach() for o in outs], [t.grad for t in ins]))
    (ref_out, ref_grad), (out, grad) = runs
    for got, want, what in zip(out + grad, ref_out + ref_grad, ("q", "k", "v", "dq", "dkv", "dk_pe")):
        assert got.shape == want.shape, what
        assert_close_scaled(got, want, 1e-6, what)


def test_mla_training_pass_with_the_kernel_equals_pytorch(monkeypatch):
    """A training pass of a tiny V3 with a document mask: with the C++ layer kernels and the fused
    attention (MLA then takes rope.cpp's path) against PyTorch's ops and SDPA: loss and every gradient."""
    import nanoseek
    from nanoseek.config import preset
    from nanoseek.model import cpu_kernels
    from nanoseek.train.pretrain import document_mask
    from nanoseek.train.run import use_cpu_kernels
    monkeypatch.setattr(cpu_kernels, "installed", None)
    torch.manual_seed(0)
    model = nanoseek.Transformer(preset("tiny").replace(vocab_size=64, num_hidden_layers=2))
    x = torch.randint(2, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    x[:, [9, 25]] = 1
    calls = []
    original = kernels.mla_qkv
    monkeypatch.setattr(kernels, "mla_qkv", lambda *a: calls.append(1) or original(*a))
    runs = []
    for install in (False, True):
        if install:
            assert use_cpu_kernels()
        model.zero_grad()
        logits, (mtp,) = model(x, mask=document_mask(x, 1), return_mtp=True)
        loss = logits.logsumexp(-1).mean() + mtp.square().mean()
        loss.backward()
        runs.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 3  # two layers and the MTP module took the C++ path
    (ref, ref_grads), (got, grads) = runs
    assert got == pytest.approx(ref, rel=1e-5) and grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close_scaled(grads[n], ref_grads[n], 1e-5, n)

"""Quantization: the packed CPU kernels equal their dequantized weights, packing sibling linears
changes nothing, and a quantized model stays close to the float model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quantize import FP16Linear, Int4Linear, Int8Linear, Packed, W8A8Linear, quantize

from test_model import tiny_llama


@pytest.mark.parametrize("cls,tol", [(FP16Linear, 1e-3), (Int8Linear, 0.01), (Int4Linear, 0.15)])
def test_packed_kernel_equals_dequantized_weights(cls, tol):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    q = cls(lin)
    for rows in (3, 7):  # decode rows take the packed kernel, prefill rows the dequantized GEMM
        x = torch.randn(rows, 256)
        assert torch.allclose(q(x), F.linear(x, q.dequantize(), lin.bias), atol=1e-5)
    # and the quantization error itself is bounded: int8 ~ 1/254 of the row range, int4 ~ 1/30 of a group's
    w = lin.weight.detach()
    assert (q.dequantize() - w).abs().max() <= tol * w.abs().max()


def test_w8a8_is_the_int8_weights_times_8bit_activations():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    x = torch.randn(7, 256)
    q = W8A8Linear(lin)
    exact = F.linear(x, q.dequantize(), lin.bias)
    # activations rounded to 7 bits with one scale per call: a few % of the output's range
    assert (q(x) - exact).abs().max() <= 0.03 * exact.abs().max()
    w = lin.weight.detach()
    assert (q.dequantize() - w).abs().max() <= 0.01 * w.abs().max()


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4", "w8a8"])
def test_packing_siblings_changes_nothing(mode):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    plain, packed = quantize(copy.deepcopy(model), mode, pack=False), quantize(copy.deepcopy(model), mode)
    assert sum(isinstance(m, Packed) for m in packed.modules()) == 5 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(packed(x), plain(x), atol=1e-5)
    # after a forward no packed product stays cached (a long prefill's would pin memory)
    assert all(m.shared._last[0] is None for m in packed.modules() if isinstance(m, Packed))


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4", "w8a8"])
def test_quantized_model_runs_in_the_engine(mode):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).log_softmax(-1)
        quantize(model, mode)
        got = model(x).log_softmax(-1)
    assert sum(isinstance(m, (FP16Linear, Int8Linear, Int4Linear, W8A8Linear)) for m in model.modules()) > 0
    # KL(float || quantized) per token stays small
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert kl < {"fp16": 1e-4, "int8": 0.02, "int4": 0.5, "w8a8": 0.02}[mode]
    out = Engine(model, max_seq_len=64).generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 5


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_quantized_moe_runs_each_expert_on_its_own_quantized_weights(mode):
    """The stacked routed experts become one quantized SwiGLU each; the quantized MoE layer equals
    the float layer whose stacked experts hold the dequantized weights (prefill rows: dequantized GEMMs)."""
    from nanoseek.model.moe import LoopExperts
    from test_model import tiny_v3
    model = tiny_v3(hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    moe = model.model.layers[1].mlp
    ref, orig = copy.deepcopy(moe), copy.deepcopy(moe)
    quantize(model, mode)
    assert isinstance(moe.experts, LoopExperts) and len(moe.experts) == moe.n_experts
    with torch.no_grad():
        for e, mlp in enumerate(moe.experts):
            ref.experts.gate_up_proj[e] = mlp.gate_proj.shared.linear.dequantize()  # packed [gate; up]
            ref.experts.down_proj[e] = mlp.down_proj.dequantize()
        ref.shared_experts.gate_proj.weight.copy_(moe.shared_experts.gate_proj.shared.linear.dequantize()[:32])
        ref.shared_experts.up_proj.weight.copy_(moe.shared_experts.gate_proj.shared.linear.dequantize()[32:])
        ref.shared_experts.down_proj.weight.copy_(moe.shared_experts.down_proj.dequantize())
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
        got, want = moe(x)[0], ref(x)[0]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # and they are the float experts' weights, each within its mode's rounding
    tol = {"fp16": 1e-3, "int8": 0.01, "int4": 0.15}[mode]
    for name in ("gate_up_proj", "down_proj"):
        w, q = getattr(orig.experts, name), getattr(ref.experts, name)
        assert 0 < (q - w).abs().max() <= tol * w.abs().max(), name

"""Logits parity with transformers on tiny random configs, in both directions.

transformers -> nanoseek: `save_pretrained` output loads with `nanoseek.load`, equal logits (on PyTorch's
ops, and with the C++ layer kernels installed).
nanoseek -> transformers: `nanoseek.save` output loads with `AutoModelForCausalLM`, equal logits.
"""

import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import nanoseek
from nanoseek.config import ModelConfig

from conftest import assert_close_scaled, randomize

MLA = dict(vocab_size=101, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, max_position_embeddings=256,
           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)

CASES = {
    # V3: q_lora, group-limited routing (n_group > 1), one dense first layer
    "v3_qlora_groups": ("DeepseekV3Config", dict(MLA, q_lora_rank=24, n_group=4, topk_group=2,
                                                 first_k_dense_replace=1, num_nextn_predict_layers=0)),
    # V3 without q_lora, 2 shared experts, non-interleaved rope, no dense layer
    "v3_no_qlora": ("DeepseekV3Config", dict(MLA, q_lora_rank=None, n_group=1, topk_group=1,
                                             n_shared_experts=2, first_k_dense_replace=0,
                                             rope_interleave=False, num_nextn_predict_layers=0)),
    # V3 with YaRN (mscale != mscale_all_dim exercises both the cos/sin factor and the softmax mscale)
    "v3_yarn": ("DeepseekV3Config", dict(MLA, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=2,
                                         num_nextn_predict_layers=0, rope_theta=10000.0,
                                         rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7,
                                                       "original_max_position_embeddings": 16})),
    "v2_greedy": ("DeepseekV2Config", dict(MLA, q_lora_rank=None, topk_method="greedy",
                                           first_k_dense_replace=1, routed_scaling_factor=1.5)),
    "v2_group_limited": ("DeepseekV2Config", dict(MLA, q_lora_rank=24, topk_method="group_limited_greedy",
                                                  n_group=4, topk_group=2, first_k_dense_replace=0,
                                                  routed_scaling_factor=16.0)),
    "llama_tied": ("LlamaConfig", dict(vocab_size=101, hidden_size=48, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)),
    "llama_untied_bias_llama3rope": ("LlamaConfig", dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", dict(vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_theta=1000000.0)),
}


def hf_model(case):
    cls, kw = CASES[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw), dtype=torch.float32)
    return randomize(model.eval())


def tokens(vocab=101, batch=2, seq=37):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["pytorch", "c++"])
def layer_ops(request, monkeypatch):
    """The model's layers on PyTorch's ops, or with the C++ RMSNorm, SwiGLU and MoE gate installed as the
    training commands install them (nanoseek/model/cpu_kernels.py)."""
    from nanoseek.infer import kernels
    from nanoseek.model import cpu_kernels
    if request.param == "c++":
        if not kernels.available():
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(cpu_kernels, "installed", kernels)
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_nanoseek(case, tmp_path, layer_ops):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path)
    ours, _ = nanoseek.load(tmp_path)
    x = tokens()
    with torch.no_grad():
        expected = ref(x).logits
        got = ours(x)
    assert got.shape == expected.shape
    assert_close_scaled(got, expected, 1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_to_transformers(case, tmp_path):
    hf = hf_model(case)
    cfg = ModelConfig.from_hf_config(hf.config.to_dict())
    ours = randomize(nanoseek.Transformer(cfg).eval(), seed=3)
    nanoseek.save(ours, None, tmp_path, max_shard_bytes=20_000)  # force several shards + index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert_close_scaled(ours(x), ref(x).logits, 1e-4)


def test_v3_with_mtp_saves_layer_after_last_and_transformers_still_loads(tmp_path):
    """DeepSeek stores MTP as model.layers.{num_hidden_layers}; transformers ignores it, we keep it."""
    cls, kw = CASES["v3_qlora_groups"]
    cfg = ModelConfig.from_hf_config(getattr(transformers, cls)(**dict(kw, num_nextn_predict_layers=1)).to_dict())
    ours = randomize(nanoseek.Transformer(cfg).eval())
    nanoseek.save(ours, None, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = cfg.num_hidden_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
              "mlp.gate.weight", "mlp.experts.0.up_proj.weight"):
        assert f"model.layers.{L}.{k}" in keys
    back, _ = nanoseek.load(tmp_path)
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x = tokens()
    with torch.no_grad():
        la, ma = ours(x, return_mtp=True)
        lb, mb = back(x, return_mtp=True)
    assert torch.equal(ma[0], mb[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close_scaled(la, ref(x).logits, 1e-4)


@pytest.mark.parametrize("path", ["grouped", "compiled", "loop", "c++", "c++ unfused"])
def test_moe_block_equals_transformers_deepseek_v3_moe(path, monkeypatch):
    """One MoE block, same weights, against transformers' DeepseekV3MoE (its eager per-expert loop):
    outputs and the gradients of the input, the router and the experts, fp32. "compiled": the grouped
    path with its SwiGLU through torch.compile (MoE.COMPILE); "c++": with the C++ kernels installed, as
    the training commands install them (the whole layer as one node: the gate and dispatch plan of
    infer/ffn.cpp, the fused experts of infer/moe.cpp); "c++ unfused": the same without the fused experts (grouped GEMMs, C++ SwiGLU)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    from nanoseek.infer import kernels
    from nanoseek.model import cpu_kernels
    from nanoseek.model.moe import MoE
    calls = []
    if path.startswith("c++"):
        if not kernels.available():
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(cpu_kernels, "installed", kernels)
        monkeypatch.setattr(MoE, "FUSED", path == "c++")
        real = kernels.moe_layer
        monkeypatch.setattr(kernels, "moe_layer", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(MoE, "GROUPED", path != "loop")
    monkeypatch.setattr(MoE, "COMPILE", path == "compiled")
    cls, kw = CASES["v3_qlora_groups"]
    hf_cfg = getattr(transformers, cls)(**dict(kw, routed_scaling_factor=2.5, norm_topk_prob=True))
    hf_cfg._experts_implementation = "eager"
    ref = randomize(DeepseekV3MoE(hf_cfg), seed=2)
    ours = MoE(ModelConfig.from_hf_config(hf_cfg.to_dict()))
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.gate.e_score_correction_bias.copy_(ref.gate.e_score_correction_bias)
        ours.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)  # the same stacked layout
        ours.experts.down_proj.copy_(ref.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_experts, n).weight.copy_(getattr(ref.shared_experts, n).weight)
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(5))
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, _ = ours(xo)
    want = ref(xr)
    (y * dy).sum().backward()
    (want * dy).sum().backward()
    assert_close_scaled(y, want, 1e-5, "output")
    assert_close_scaled(xo.grad, xr.grad, 1e-5, "input grad")
    assert_close_scaled(ours.gate.weight.grad, ref.gate.weight.grad, 1e-5, "router grad")
    assert_close_scaled(ours.experts.gate_up_proj.grad, ref.experts.gate_up_proj.grad, 1e-5, "experts' gate/up grad")
    assert_close_scaled(ours.experts.down_proj.grad, ref.experts.down_proj.grad, 1e-5, "experts' down grad")
    assert_close_scaled(ours.shared_experts.down_proj.weight.grad, ref.shared_experts.down_proj.weight.grad, 1e-5)
    assert len(calls) == (path == "c++")  # hidden 32, intermediate 16: whole vectors on AVX2 and AVX-512

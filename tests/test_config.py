"""ModelConfig round-trips real config.json files of each family; presets and their headline numbers."""

import json

import pytest

from nanoseek.config import ModelConfig, preset
from nanoseek.errors import NanoseekError

# config.json files as published (DeepSeek-R1 and DeepSeek-V2.5 on the Hugging Face hub, abridged
# of auto_map only where noted; Qwen2.5-1.5B-Instruct; SmolLM2-135M-Instruct).
DEEPSEEK_R1 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
DEEPSEEK_V25 = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1536,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 60, "num_key_value_heads": 128,
    "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy",
    "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 102400,
}
QWEN25_15B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
    "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
}


@pytest.mark.parametrize("real", [DEEPSEEK_R1, DEEPSEEK_V25, QWEN25_15B, SMOLLM2_135M],
                         ids=["deepseek_r1", "deepseek_v2.5", "qwen2.5", "smollm2"])
def test_real_configs_round_trip(real):
    cfg = ModelConfig.from_hf_config(json.loads(json.dumps(real)))
    out = cfg.to_hf_config()
    for k, v in real.items():
        assert out[k] == v, k  # every key of the original survives with its value
    assert ModelConfig.from_hf_config(out) == cfg


def test_real_configs_parse_to_the_right_architecture():
    r1 = ModelConfig.from_hf_config(DEEPSEEK_R1)
    assert r1.is_mla and r1.is_moe and r1.scoring_func == "sigmoid" and r1.num_nextn_predict_layers == 1
    assert [r1.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert r1 == preset("deepseek-v3").replace(extra=r1.extra)
    v2 = ModelConfig.from_hf_config(DEEPSEEK_V25)
    assert v2.scoring_func == "softmax" and v2.topk_method == "group_limited_greedy"
    q = ModelConfig.from_hf_config(QWEN25_15B)
    assert not q.is_mla and not q.is_moe and q.head_dim == 128 and q.tie_word_embeddings
    assert q.kv_cache_values_per_token() == 2 * 2 * 128


def test_transformers5_rope_parameters_are_read():
    d = dict(SMOLLM2_135M)
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    cfg = ModelConfig.from_hf_config(d)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None


def test_yarn_softmax_scale_matches_deepseek_formula():
    # DeepSeek: softmax_scale = qk_head_dim^-0.5 * (0.1 * mscale * ln(factor) + 1)^2
    import math
    cfg = preset("deepseek-v3")
    m = 0.1 * 1.0 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


def test_unsupported_architecture_and_unknown_preset():
    with pytest.raises(NanoseekError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(NanoseekError, match="unknown preset"):
        preset("huge")


def test_tiny_preset_is_a_few_million_params_of_deepseek_v3():
    cfg = preset("tiny")
    total, active = cfg.num_params()
    assert cfg.model_type == "deepseek_v3" and cfg.is_moe and cfg.num_nextn_predict_layers == 1
    assert 1e6 < total < 1e7 and active < total


# -- validation: one clear NanoseekError naming the field, before anything is built -------------------
@pytest.mark.parametrize("change, words", [
    ({"hidden_size": 0}, "hidden_size must be an integer in [1,"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be"),
    ({"num_hidden_layers": 10**8}, "num_hidden_layers must be an integer in [1, 4096]"),
    ({"vocab_size": "32000"}, "vocab_size must be"),
    ({"num_attention_heads": 2.5}, "num_attention_heads must be"),
    ({"num_attention_heads": True}, "num_attention_heads must be"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": float("nan")}, "rope_theta must be a positive number"),
    ({"rope_theta": 10**400}, "rope_theta must be a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"hidden_act": "gelu"}, "hidden_act must be one of silu"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id must be"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2}}, "'dynamic' is not supported"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be null or an object"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be null or an integer in [1,"),
    ({"num_key_value_heads": 2}, "num_attention_heads=9 is not a multiple of num_key_value_heads=2"),
    ({"num_attention_heads": 7, "num_key_value_heads": 7}, "hidden_size=576 is not divisible by num_attention_heads=7"),
    ({"head_dim": 63}, "rotary dimension must be even"),
])
def test_bad_llama_values_are_refused_naming_the_field(change, words):
    with pytest.raises(NanoseekError) as e:
        ModelConfig.from_hf_config({**SMOLLM2_135M, **change})
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, words", [
    ({"n_routed_experts": 250}, "n_routed_experts=250 is not divisible by n_group=8"),
    ({"topk_group": 9}, "topk_group=9 is larger than n_group=8"),
    ({"n_group": 256, "topk_group": 4}, "leaves 1 per group"),
    ({"n_group": 64, "topk_group": 1},
     "num_experts_per_tok=8 is more than the 4 experts in the topk_group=1 kept groups"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be an integer in [1,"),
    ({"n_routed_experts": -1}, "n_routed_experts must be null or an integer in [0,"),
    ({"qk_rope_head_dim": 63}, "rotary dimension must be even"),
    ({"scoring_func": "relu"}, "scoring_func must be one of softmax, sigmoid"),
    ({"q_lora_rank": 0}, "q_lora_rank must be null or an integer"),
])
def test_bad_deepseek_values_are_refused_naming_the_field(change, words):
    with pytest.raises(NanoseekError) as e:
        ModelConfig.from_hf_config({**DEEPSEEK_R1, **change})
    assert words in str(e.value)


def test_group_routing_edges_that_are_valid_still_load():
    # 8 experts in 4 groups of 2, keep 2 groups: 4 reachable experts, top-4 is allowed
    ModelConfig.from_hf_config({**DEEPSEEK_R1, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                                "num_experts_per_tok": 4})
    # V2's group_limited_greedy scores a group by its best expert, so one expert per group is fine
    ModelConfig.from_hf_config({**DEEPSEEK_V25, "n_routed_experts": 8, "n_group": 8, "topk_group": 6})
    with pytest.raises(NanoseekError, match="not divisible by n_group"):   # but the groups must still divide
        ModelConfig.from_hf_config({**DEEPSEEK_V25, "n_routed_experts": 7})


@pytest.mark.parametrize("doc", [[1, 2], "x", None, {"text_config": [1]},
                                 {**SMOLLM2_135M, "rope_theta": None, "rope_parameters": [1]}])
def test_config_json_that_is_not_an_object_is_refused(doc):
    with pytest.raises(NanoseekError):
        ModelConfig.from_hf_config(doc)


def test_llama_configs_may_leave_deepseek_fields_null():
    cfg = ModelConfig.from_hf_config({**SMOLLM2_135M, "kv_lora_rank": None, "qk_rope_head_dim": None,
                                      "n_group": None, "scoring_func": None, "routed_scaling_factor": None})
    assert not cfg.is_mla and not cfg.is_moe and cfg.head_dim == 64

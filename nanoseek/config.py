"""ModelConfig: one dataclass for every architecture nanoseek runs, plus presets.

Field names are the Hugging Face config.json names (which are DeepSeek's names: `kv_lora_rank`,
`qk_rope_head_dim`, `routed_scaling_factor`, ...), so a reader can hold this next to the paper
and next to a real config.json.

    from nanoseek.config import ModelConfig, preset
    cfg = preset("tiny")                            # DeepSeek-V3 architecture, a few M params
    cfg = ModelConfig.from_hf_config(json.load(open("config.json")))
    json.dump(cfg.to_hf_config(), open("config.json", "w"))
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NanoseekError

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 768            # dense FFN (llama/qwen2 and DeepSeek's first dense layers)
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # GQA; None = num_attention_heads
    head_dim: int | None = None             # llama/qwen2; None = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool | None = None     # pairs (x0,x1),(x2,x3)...; None = True for DeepSeek, False else
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # Multi-head Latent Attention (DeepSeek-V2 §2.1)
    q_lora_rank: int | None = None          # None = plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_routed_experts: int | None = None     # None = dense model
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_intermediate_size: int = 256
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"           # V3: sigmoid; V2: softmax
    topk_method: str = "greedy"             # V3: noaux_tc; V2: greedy | group_limited_greedy
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    # Multi-token prediction (DeepSeek-V3 §2.2)
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)  # config.json keys we don't use, kept for round trips

    def __post_init__(self):
        if not isinstance(self.model_type, str) or self.model_type not in ARCHITECTURES:
            raise NanoseekError(f"unsupported architecture {self.model_type!r}; "
                                f"supported: {', '.join(ARCHITECTURES)}")
        check_fields(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_interleave is None:
            self.rope_interleave = self.model_type in ("deepseek_v3", "deepseek_v2")
        if self.is_mla:
            self.head_dim = self.qk_rope_head_dim  # what transformers records for deepseek
        elif self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_shapes(self)

    # -- derived ------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v3", "deepseek_v2")

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling or {}
        return rs.get("rope_type", rs.get("type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d), times YaRN's mscale² when the context is extended (DeepSeek-V2 App. / YaRN)."""
        d = self.qk_head_dim if self.is_mla else self.head_dim
        scale = d ** -0.5
        rs = self.rope_scaling or {}
        if self.is_mla and self.rope_type == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def kv_cache_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per token per layer, the shapes of the two cached tensors: MLA's latent c_kv [kv_lora_rank] and
        shared rotary key k_pe [qk_rope_head_dim] (DeepSeek-V2 §2.1), or GQA's K and V [kv_heads, head_dim]."""
        if self.is_mla:
            return (self.kv_lora_rank,), (self.qk_rope_head_dim,)
        return ((self.num_key_value_heads, self.head_dim),) * 2

    def kv_cache_values_per_token(self) -> int:
        """Values cached per token per layer: the MLA latent + shared rope key, or K and V."""
        return sum(math.prod(s) for s in self.kv_cache_shapes())

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.kv_cache_values_per_token() * self.num_hidden_layers * bytes_per_value

    # -- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise NanoseekError(f"config.json must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "text_config" in d and "model_type" not in d:
            if not isinstance(d["text_config"], dict):
                raise NanoseekError("config: text_config must be an object")
            d = dict(d["text_config"])
        model_type = d.get("model_type")
        if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
            raise NanoseekError(f"unsupported architecture {str(model_type)[:40]!r} in config.json; "
                                f"supported: {', '.join(ARCHITECTURES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw: dict[str, Any] = {}
        # transformers >= 5 writes rope_parameters; real hub files write rope_theta + rope_scaling.
        rp = d.pop("rope_parameters", None)
        if rp:
            if not isinstance(rp, dict):
                raise NanoseekError("config: rope_parameters must be an object")
            rp = dict(rp)
            kw["rope_theta"] = rp.pop("rope_theta", cls.rope_theta)
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = rp
        if d.get("dtype") and not d.get("torch_dtype"):
            d["torch_dtype"] = d.pop("dtype")
        extra = {}
        for k, v in d.items():
            if k in names:
                kw[k] = v
            else:
                extra[k] = v
        for k in ("head_dim",):  # derived for deepseek; transformers writes it anyway
            if model_type in ("deepseek_v3", "deepseek_v2") and k in kw:
                extra[k] = kw.pop(k)
        # defaults that differ by family, applied only when config.json does not say
        fam = {
            "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                rope_interleave=True, n_group=1, topk_group=1),
            "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", rope_interleave=True),
            "llama": dict(rope_interleave=False, n_routed_experts=None),
            "qwen2": dict(rope_interleave=False, n_routed_experts=None),
        }[model_type]
        for k, v in fam.items():
            kw.setdefault(k, v)
        if model_type == "deepseek_v2":
            kw["rope_interleave"] = True  # V2 rotates complex pairs, always
        for k in ("n_group", "topk_group"):
            if kw.get(k) is None:
                kw[k] = 1
        if model_type in ("llama", "qwen2"):
            kw["n_routed_experts"] = None
        cfg = cls(**kw, extra=extra)
        return cfg

    def to_hf_config(self) -> dict:
        d: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        common = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
                  "max_position_embeddings", "rope_theta", "rope_scaling", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"]
        if self.model_type in ("llama", "qwen2"):
            common += ["head_dim"]
            if self.model_type == "llama":
                common += ["attention_bias", "mlp_bias"]
        else:
            common += ["attention_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                       "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                       "n_shared_experts", "moe_intermediate_size", "n_group", "topk_group",
                       "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method",
                       "first_k_dense_replace", "moe_layer_freq"]
            if self.model_type == "deepseek_v3":
                common += ["num_nextn_predict_layers", "rope_interleave"]
        for k in common:
            d[k] = getattr(self, k)
        for k, v in self.extra.items():
            d.setdefault(k, v)
        d["architectures"] = self.extra.get("architectures", d["architectures"])
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- parameter counts (cost.py turns them into FLOPs, bytes and dollars) ----------------------
    def attention_matmul_weights(self) -> int:
        """Matmul weights of one attention layer (biases and norms are not matmuls)."""
        H, nh = self.hidden_size, self.num_attention_heads
        if self.is_mla:
            r, q = self.kv_lora_rank, nh * self.qk_head_dim
            q_w = H * self.q_lora_rank + self.q_lora_rank * q if self.q_lora_rank else H * q
            return (q_w + H * (r + self.qk_rope_head_dim) + r * nh * (self.qk_nope_head_dim + self.v_head_dim)
                    + nh * self.v_head_dim * H)
        hd = self.head_dim
        return H * hd * (nh + 2 * self.num_key_value_heads) + nh * hd * H

    def ffn_matmul_weights(self, layer: int, active: bool = True) -> dict[str, int]:
        """FFN matmul weights of layer `layer` by kind: those one token passes through (active), or all."""
        H = self.hidden_size
        if not self.is_moe_layer(layer):
            return {"dense_ffn": 3 * H * self.intermediate_size}
        expert = 3 * H * self.moe_intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        return {"moe_gate": self.n_routed_experts * H, "moe_shared": self.n_shared_experts * expert,
                "moe_routed": routed * expert}

    def num_params(self) -> tuple[int, int]:
        """(total, active per token) parameters of the main model, MTP modules excluded."""
        H, V = self.hidden_size, self.vocab_size
        attn_norms = ((self.q_lora_rank or 0) + self.kv_lora_rank) if self.is_mla else 0  # q_a, kv_a norms
        attn = self.attention_matmul_weights() + attn_norms
        total = active = 0
        for i in range(self.num_hidden_layers):
            base = attn + 2 * H  # + input and post-attention norms
            total += base + sum(self.ffn_matmul_weights(i, active=False).values())
            active += base + sum(self.ffn_matmul_weights(i).values())
        emb = V * H * (1 if self.tie_word_embeddings else 2) + H
        return total + emb, active + emb


# -- validation: every config.json value is checked before a module is built ------------------------
# Ceilings far above any published model (DeepSeek-V3: 61 layers, 7168 wide, 256 experts, 129K vocab)
# that keep a hostile config.json from building billions of modules before the weights are compared.
_POSITIVE = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 22,
             "num_hidden_layers": 4096, "num_attention_heads": 4096, "max_position_embeddings": 1 << 30}
_MLA_POSITIVE = {"kv_lora_rank": 1 << 16, "qk_rope_head_dim": 1 << 14, "v_head_dim": 1 << 14}
_MOE_POSITIVE = {"num_experts_per_tok": 1 << 16, "moe_intermediate_size": 1 << 22, "n_group": 1 << 16,
                 "topk_group": 1 << 16, "moe_layer_freq": 4096}
_OPTIONAL_POSITIVE = {"num_key_value_heads": 4096, "head_dim": 1 << 14, "q_lora_rank": 1 << 20}
_NON_NEGATIVE = {"first_k_dense_replace": 4096, "num_nextn_predict_layers": 64}
_MLA_NON_NEGATIVE = {"qk_nope_head_dim": 1 << 14}
_MOE_NON_NEGATIVE = {"n_shared_experts": 1 << 16}
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_MOE_BOOLS = ("norm_topk_prob",)
_CHOICES = {"hidden_act": ("silu",)}
_MOE_CHOICES = {"scoring_func": ("softmax", "sigmoid"), "topk_method": ("greedy", "group_limited_greedy", "noaux_tc")}
_ROPE_KEYS = {"linear": ("factor",), "yarn": ("original_max_position_embeddings",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v) and abs(v) < 1e300          # math.isfinite(10**400) raises OverflowError


def check_fields(cfg: ModelConfig) -> None:
    """Each value alone: type, sign and a sane ceiling (NanoseekError naming the field).

    MLA fields are checked for DeepSeek models only, MoE fields when there are routed experts:
    a llama config.json may carry them as null."""
    def need(ok: bool, name: str, what: str):
        if not ok:
            raise NanoseekError(f"config: {name} must be {what}, got {str(getattr(cfg, name))[:40]!r}")

    moe = cfg.n_routed_experts
    need(moe is None or (_is_int(moe) and 0 <= moe <= 1 << 16), "n_routed_experts",
         f"null or an integer in [0, {1 << 16}]")
    mla, moe = cfg.model_type in ("deepseek_v3", "deepseek_v2"), bool(moe)
    for name, hi in {**_POSITIVE, **(_MLA_POSITIVE if mla else {}), **(_MOE_POSITIVE if moe else {})}.items():
        v = getattr(cfg, name)
        need(_is_int(v) and 1 <= v <= hi, name, f"an integer in [1, {hi}]")
    for name, hi in _OPTIONAL_POSITIVE.items():
        v = getattr(cfg, name)
        need(v is None or (_is_int(v) and 1 <= v <= hi), name, f"null or an integer in [1, {hi}]")
    non_negative = {**_NON_NEGATIVE, **(_MLA_NON_NEGATIVE if mla else {}), **(_MOE_NON_NEGATIVE if moe else {})}
    for name, hi in non_negative.items():
        v = getattr(cfg, name)
        need(_is_int(v) and 0 <= v <= hi, name, f"an integer in [0, {hi}]")
    for name in _POSITIVE_FLOATS + (("routed_scaling_factor",) if moe else ()):
        v = getattr(cfg, name)
        need(_is_number(v) and v > 0, name, "a positive number")
    for name in _BOOLS + (_MOE_BOOLS if moe else ()):
        need(isinstance(getattr(cfg, name), bool), name, "true or false")
    need(cfg.rope_interleave is None or isinstance(cfg.rope_interleave, bool), "rope_interleave", "true or false")
    for name, allowed in {**_CHOICES, **(_MOE_CHOICES if moe else {})}.items():
        v = getattr(cfg, name)
        need(isinstance(v, str) and v in allowed, name, "one of " + ", ".join(allowed))
    for name in ("bos_token_id", "pad_token_id"):
        need(getattr(cfg, name) is None or _is_int(getattr(cfg, name)), name, "null or an integer")
    eos = cfg.eos_token_id
    need(eos is None or _is_int(eos) or (isinstance(eos, list) and all(map(_is_int, eos))), "eos_token_id",
         "null, an integer or a list of integers")
    need(cfg.torch_dtype is None or isinstance(cfg.torch_dtype, str), "torch_dtype", "null or a string")
    need(isinstance(cfg.extra, dict), "extra", "a dict")
    _check_rope_scaling(cfg.rope_scaling)
    if not cfg.is_mla and cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise NanoseekError(f"config: hidden_size={cfg.hidden_size} is not divisible by "
                            f"num_attention_heads={cfg.num_attention_heads} (and no head_dim is given)")


def _check_rope_scaling(rs) -> None:
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise NanoseekError(f"config: rope_scaling must be null or an object, got {str(rs)[:40]!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", *_ROPE_KEYS):
        raise NanoseekError(f"config: rope_scaling type {str(kind)[:40]!r} is not supported; "
                            f"supported: default, {', '.join(_ROPE_KEYS)}")
    for key in _ROPE_KEYS.get(kind, ()):
        if not (_is_number(rs.get(key)) and rs[key] > 0):
            raise NanoseekError(f"config: rope_scaling.{key} must be a positive number for {kind} rope")
    for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if rs.get(key) is not None and not (_is_number(rs[key]) and rs[key] >= 0):
            raise NanoseekError(f"config: rope_scaling.{key} must be a non-negative number")


def check_shapes(cfg: ModelConfig) -> None:
    """The values together: heads that divide, even rotary dims, experts that the routing can pick."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % kv:
        raise NanoseekError(f"config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if cfg.head_dim < 1 or cfg.rope_dim % 2:
        raise NanoseekError(f"config: the rotary dimension must be even and >= 2, got {cfg.rope_dim}")
    if not cfg.is_moe:
        return
    E, k, groups, keep = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    if E % groups:
        raise NanoseekError(f"config: n_routed_experts={E} is not divisible by n_group={groups}")
    if keep > groups:
        raise NanoseekError(f"config: topk_group={keep} is larger than n_group={groups}")
    per_group = E // groups
    grouped = groups > 1 and cfg.topk_method in ("noaux_tc", "group_limited_greedy")
    if grouped and cfg.topk_method == "noaux_tc" and per_group < 2:
        raise NanoseekError(f"config: group routing scores each group by its top-2 experts, but n_routed_experts="
                            f"{E} in n_group={groups} leaves {per_group} per group")
    reachable = keep * per_group if grouped else E
    if k > reachable:
        raise NanoseekError(f"config: num_experts_per_tok={k} is more than the {reachable} experts "
                            f"{'in the topk_group=' + str(keep) + ' kept groups' if grouped else 'there are'}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _deepseek_v3_real() -> ModelConfig:
    """DeepSeek-V3 / R1 as published (671B total, 37B active): for cost and shape math only."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1, moe_intermediate_size=2048,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", first_k_dense_replace=3,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")


def _deepseek_v3_small(vocab_size: int, hidden: int, layers: int, heads: int, experts: int,
                       top_k: int, groups: int, topk_group: int) -> ModelConfig:
    """The DeepSeek-V3 architecture scaled down: MLA + sigmoid-gated MoE + shared expert + MTP."""
    return ModelConfig(
        model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=hidden,
        intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=2048, q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4,
        qk_nope_head_dim=hidden // heads, qk_rope_head_dim=hidden // heads // 2,
        v_head_dim=hidden // heads, n_routed_experts=experts, num_experts_per_tok=top_k,
        n_shared_experts=1, moe_intermediate_size=hidden // 2, n_group=groups, topk_group=topk_group,
        routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", first_k_dense_replace=1, num_nextn_predict_layers=1,
        bos_token_id=0, eos_token_id=1)


PRESETS = {
    "tiny": lambda: _deepseek_v3_small(4096, 128, 4, 8, 8, 2, 2, 1),
    "small": lambda: _deepseek_v3_small(16384, 512, 8, 8, 16, 4, 4, 2),
    "deepseek-v3": _deepseek_v3_real,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise NanoseekError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def load_config(model: str) -> ModelConfig:
    """A preset name, an HF model directory, or a config.json file."""
    if model in PRESETS:
        return preset(model)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise NanoseekError(f"{model}: not a preset ({', '.join(PRESETS)}), a model directory or a config.json")
    try:
        return ModelConfig.from_hf_config(json.loads(p.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{p}: not a JSON config ({e})") from None
    except TypeError as e:
        raise NanoseekError(f"{p}: config does not fit ModelConfig ({e})") from None


def dense_variant(cfg: ModelConfig, arch: str) -> ModelConfig:
    """A llama / qwen2 model with the preset's width, depth and heads (no MLA, no MoE, no MTP)."""
    return ModelConfig(model_type=arch, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
                       rope_interleave=False)

"""The one map between Hugging Face state-dict names and llama.cpp's GGUF tensor names, both ways.

    from nanoseek.weights.gguf_names import gguf_name, hf_name
    gguf_name("model.layers.3.self_attn.kv_a_proj_with_mqa.weight")   # "blk.3.attn_kv_a_mqa.weight"
    hf_name("blk.3.exp_probs_b.bias")           # "model.layers.3.mlp.gate.e_score_correction_bias"

weights/gguf_writer.py names with `gguf_name`, weights/gguf.py with `hf_name`; both read the
tables below (llama.cpp's gguf-py `tensor_mapping.py` lists the same pairs). Besides renaming,
llama.cpp's converter (`convert_hf_to_gguf.py`) reshapes three things, done and undone here:

- llama (not qwen2, not deepseek2) q_proj / k_proj rows: HF's rotate-half order -> interleaved
  pairs (`permute_rope`, `LlamaModel.permute`); `unpermute_rope` is the inverse.
- deepseek2 MLA: `kv_b_proj` [heads * (nope + v), kv_lora_rank] is split per head into
  `attn_k_b` = k half transposed [heads, kv_lora_rank, nope] and `attn_v_b` [heads, v, kv_lora_rank]
  (`split_kv_b`, the converter's `k_b_proj` / `v_b_proj`), so llama.cpp absorbs them into the
  query and the output and caches only the latent. Older files hold the unsplit `attn_kv_b`;
  the reader takes either (`merge_kv_b`).
- deepseek2 MoE: the routed experts' weights are stacked [experts, out, in] into one
  `ffn_{gate,up,down}_exps` tensor per layer (`stack_experts`; the reader keeps them stacked and
  weights/hf.py's `stack_experts` fuses gate and up into the model's `gate_up_proj`).
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import NanoseekError

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
# per block: HF name after `model.layers.N.` (without .weight / .bias) -> GGUF name after `blk.N.`
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    # llama / qwen2 attention and dense FFN (also DeepSeek's leading dense layers)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    # MLA
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
    "self_attn.kv_b_proj": "attn_kv_b", "self_attn.k_b_proj": "attn_k_b", "self_attn.v_b_proj": "attn_v_b",
    # DeepSeekMoE: router, its correction bias, stacked routed experts, shared experts
    "mlp.gate": "ffn_gate_inp", "mlp.gate.e_score_correction": "exp_probs_b",
    "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BIAS_SUFFIX = "e_score_correction_bias"  # HF spells this one bias as part of the name


def gguf_name(hf: str) -> str:
    """Hugging Face state-dict name -> llama.cpp tensor name (after split_kv_b / stack_experts)."""
    if hf in _TOP:
        return _TOP[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    if m:
        rest = m[2]
        base, kind = (rest[: -len("_bias")], "bias") if rest.endswith(_BIAS_SUFFIX) else rest.rsplit(".", 1)
        if kind in ("weight", "bias") and base in _LAYER:
            return f"blk.{m[1]}.{_LAYER[base]}.{kind}"
    raise NanoseekError(f"no GGUF name for tensor {hf!r}")


def hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (before merge_kv_b / unstack_experts); None if unknown."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m[2] not in _LAYER_BACK:
        return None
    base = _LAYER_BACK[m[2]]
    if base.endswith("e_score_correction"):
        return f"model.layers.{m[1]}.{base}_bias" if m[3] == "bias" else None
    return f"model.layers.{m[1]}.{base}.{m[3]}"


# -- the reshapes --------------------------------------------------------------------------------------
def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, rows (2, d/2) -> (d/2, 2), halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rope`: interleaved pairs -> halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_kv_b(w: np.ndarray, n_head: int, d_nope: int, d_v: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b_proj [heads*(nope+v), r] -> (k_b [heads, r, nope], v_b [heads, v, r]), as the converter does."""
    kv = w.reshape(n_head, d_nope + d_v, w.shape[-1])
    return np.ascontiguousarray(kv[:, :d_nope].swapaxes(1, 2)), np.ascontiguousarray(kv[:, d_nope:])


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """The inverse of `split_kv_b`."""
    n_head, r, d_nope = k_b.shape
    if v_b.ndim != 3 or v_b.shape[0] != n_head or v_b.shape[2] != r:
        raise NanoseekError(f"attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not fit together")
    kv = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)
    return np.ascontiguousarray(kv.reshape(n_head * (d_nope + v_b.shape[1]), r))


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def stack_experts(state: dict[str, np.ndarray], n_experts: int) -> dict[str, np.ndarray]:
    """`mlp.experts.E.gate_proj.weight` (E = 0..n-1) -> one `mlp.experts.gate_proj.weight` [n, out, in]."""
    out, groups = {}, {}
    for k, v in state.items():
        m = _EXPERT.fullmatch(k)
        if m:
            groups.setdefault((int(m[1]), m[3]), {})[int(m[2])] = v
        else:
            out[k] = v
    for (layer, proj), experts in groups.items():
        if sorted(experts) != list(range(n_experts)):
            raise NanoseekError(f"layer {layer}: {proj} of {len(experts)} experts, expected {n_experts}")
        out[f"model.layers.{layer}.mlp.experts.{proj}.weight"] = np.stack([experts[e] for e in range(n_experts)])
    return out

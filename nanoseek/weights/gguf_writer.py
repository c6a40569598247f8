"""Write a dense llama / qwen2 model and its tokenizer as a GGUF file that llama.cpp runs.

    from nanoseek.weights.gguf_writer import write_gguf
    write_gguf(model, tok, "model-f16.gguf", outtype="f16")     # or "q8_0", "f32"

`nanoseek export MODEL --format gguf` calls this. What llama.cpp's own converter
(convert_hf_to_gguf.py, `LlamaModel`) does, done here from a nanoseek model:
- Names: `model.layers.N.self_attn.q_proj.weight` -> `blk.N.attn_q.weight` and so on; no
  `output.weight` when the embeddings are tied (llama.cpp then reuses `token_embd`).
- llama only (not qwen2): the rows of every head of q_proj / k_proj go from Hugging Face's
  rotate-half order (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to interleaved pairs (x_0, y_0, x_1, y_1, ...),
  the order llama.cpp's rope for llama rotates: `LlamaModel.permute`, with the KV head count for
  k_proj. weights/gguf.py undoes exactly this on the way in. (A nanoseek model built with
  `rope_interleave=True` already has that order and is written as is; qwen2, which llama.cpp
  rotates in halves, gets the inverse in that case.)
- Types: 1-D tensors (norms, biases) stay F32; matrices are F16, or Q8_0 (32-value blocks,
  `gguf.quants.quantize`) when the row length is a multiple of 32, else F16.
- RoPE: default, linear (`rope.scaling.type`) and llama3 (a `rope_freqs.weight` tensor of
  per-dimension divisors, as the converter writes for Llama 3.1) are written; YaRN / dynamic
  scaling for llama is refused rather than silently changed.
- Tokenizer: byte-level BPE only (`tokenizer.ggml.model = "gpt2"`): tokens in id order, merges,
  token types (added special tokens CONTROL, other added tokens USER_DEFINED), bos / eos / pad,
  add_bos_token and the chat template. `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer
  regex that splits text like ours: `Tokenizer.train_bpe` uses ByteLevel(use_regex=True), the
  GPT-2 split, which is llama.cpp's "gpt-2"; SmolLM2 splits digits first, "smollm"; Qwen2 and
  Llama 3 tokenizers are "qwen2" and "llama-bpe". Anything else is refused.
The file is written to a temp sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import NanoseekError
from .gguf_names import gguf_name, permute_rope, split_kv_b, stack_experts, unpermute_rope

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2"}
OUTTYPES = ("f16", "q8_0", "f32")

# Pre-tokenizer regexes of Hugging Face tokenizer.json files, by llama.cpp's name for them.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_SPLIT_NAMES = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def pre_tokenizer_name(tk) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a `tokenizers.Tokenizer` whose text splitting it matches."""
    spec = json.loads(tk.to_str())
    if (spec.get("model") or {}).get("type") != "BPE":
        raise NanoseekError("GGUF export needs a byte-level BPE tokenizer; this one is "
                            f"{(spec.get('model') or {}).get('type')!r}")
    pre = spec.get("pre_tokenizer") or {}

    def byte_level(p, regex):
        return (p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex
                and not p.get("add_prefix_space", False))

    if byte_level(pre, True):
        return "gpt-2"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if items and len(items) == 2:
        first, second = items
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
            return "smollm"
        if (first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
                and byte_level(second, False)):
            name = _SPLIT_NAMES.get((first.get("pattern") or {}).get("Regex"))
            if name:
                return name
    raise NanoseekError("the tokenizer's pre-tokenizer has no llama.cpp equivalent known to nanoseek "
                        f"({json.dumps(pre)[:200]}); llama.cpp would split text differently")


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """tokens, token types, merges and the pre-tokenizer name for `tokenizer.ggml.*`."""
    from gguf import TokenType

    tk = tok.tk
    vocab = tk.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1 if vocab else 0
    if n > vocab_size:
        raise NanoseekError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    tokens = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [int(TokenType.NORMAL)] * vocab_size
    for i, added in tk.get_added_tokens_decoder().items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # model rows past the tokenizer (padded vocab), as llama.cpp's converter names them
            tokens[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    merges = (json.loads(tk.to_str()).get("model") or {}).get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(tk)}


def _llama3_rope_factors(cfg) -> np.ndarray:
    """Per-dimension-pair divisors of the rope frequency (llama.cpp's `rope_freqs.weight`)."""
    from ..model.attention import rope_frequencies

    scaled, _ = rope_frequencies(cfg)
    plain, _ = rope_frequencies(cfg.replace(rope_scaling=None))
    return (plain.double() / scaled.double()).float().numpy()


def check_gguf_config(cfg) -> None:
    """Refuse, in one line, a config that llama.cpp would run differently from nanoseek."""
    if cfg.model_type not in GGUF_ARCHITECTURES:
        raise NanoseekError(f"GGUF export supports {', '.join(GGUF_ARCHITECTURES)}; not {cfg.model_type}")
    rope = cfg.rope_type
    if not cfg.is_mla:
        if rope not in ("default", "linear", "llama3") or (rope == "llama3" and cfg.model_type != "llama"):
            raise NanoseekError(f"GGUF export: rope scaling {rope!r} for {cfg.model_type} is not supported "
                                "(default, linear and llama's llama3 are)")
        return
    rs = cfg.rope_scaling or {}
    problems = []
    if rope not in ("default", "yarn"):
        problems.append(f"rope scaling {rope!r} (default and yarn are supported)")
    elif rope == "yarn" and (rs.get("mscale_all_dim") is None or rs.get("mscale", 1.0) != rs["mscale_all_dim"]
                             or rs.get("attention_factor") is not None):
        problems.append("YaRN without mscale == mscale_all_dim (llama.cpp scales attention as DeepSeek's "
                        "checkpoints do, by mscale_all_dim only)")
    elif rope == "yarn" and ((rs.get("beta_fast") or 32) != 32 or (rs.get("beta_slow") or 1) != 1
                             or not rs.get("truncate", True)):
        problems.append("YaRN with beta_fast / beta_slow other than 32 / 1 or truncate=false (llama.cpp's "
                        "deepseek2 uses DeepSeek's values)")
    if cfg.attention_bias:
        problems.append("attention biases (llama.cpp's deepseek2 has none)")
    if cfg.is_moe and cfg.moe_layer_freq != 1:
        problems.append(f"moe_layer_freq={cfg.moe_layer_freq} (llama.cpp makes every layer after the dense ones MoE)")
    if cfg.is_moe and not cfg.n_shared_experts:
        problems.append("no shared expert (llama.cpp's deepseek2 requires one)")
    if cfg.num_hidden_layers in (26, 27) and cfg.q_lora_rank:
        problems.append(f"q_lora_rank with {cfg.num_hidden_layers} layers (llama.cpp takes that depth for "
                        "DeepSeek-V2-Lite, which has none)")
    if problems:
        raise NanoseekError(f"GGUF export of {cfg.model_type}: llama.cpp cannot run " + "; ".join(problems))


def write_gguf(model, tok, path, outtype: str = "f16", name: str | None = None,
               license: str | None = None) -> Path:
    """Write `model` (llama, qwen2, deepseek_v3 / deepseek_v2) and `tok` to the GGUF file `path`, atomically."""
    import gguf
    from gguf import LlamaFileType

    cfg = model.config
    check_gguf_config(cfg)
    if outtype not in OUTTYPES:
        raise NanoseekError(f"unknown GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    if tok is None:
        raise NanoseekError("GGUF export needs the model's tokenizer (no tokenizer.json found)")
    vocab = tokenizer_metadata(tok, cfg.vocab_size)
    tensors = gguf_tensors(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, GGUF_ARCHITECTURES[cfg.model_type])
        w.add_name(name or "nanoseek model")
        if license:
            w.add_license(license)
        (_deepseek2_metadata if cfg.is_mla else _dense_metadata)(w, cfg, gguf)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                         "f32": LlamaFileType.ALL_F32}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer_metadata(w, tok, cfg, vocab)
        for gname, t in tensors.items():
            _add_tensor(w, gname, t, outtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:  # durable before it takes the name
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are for sharing
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dense_metadata(w, cfg, gguf) -> None:
    """llama / qwen2 hyperparameters under `{arch}.*`, as the converter's LlamaModel / Qwen2Model write them."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def _deepseek2_metadata(w, cfg, gguf) -> None:
    """deepseek2 hyperparameters, as the converter's DeepseekV2Model writes them (MLA as MQA of one KV head)."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA attends over the one shared latent
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.is_moe else cfg.num_hidden_layers)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)  # llama.cpp requires the key; 0 = plain attn_q
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # the cached latent + rope key
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)  # per head once decompressed
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size if cfg.is_moe else cfg.intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts if cfg.is_moe else 0)
    if cfg.is_moe:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_scale(float(cfg.routed_scaling_factor))
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        # llama.cpp requires used < count; keeping every group is the same as no groups
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.topk_method != "greedy":
            if cfg.topk_method == "group_limited_greedy":
                warnings.warn("llama.cpp ranks expert groups by their top-2 sum (DeepSeek-V3); this "
                              "DeepSeek-V2 model ranks them by their maximum, so routing can differ")
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)
    if cfg.rope_type == "yarn":
        rs = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        # 0.1 * mscale_all_dim: the converter's convention for deepseek2 ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))


def _tokenizer_metadata(w, tok, cfg, vocab: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, token in (("bos", tok.bos_token), ("eos", tok.eos_token), ("pad", tok.pad_token)):
        i = tok.token_to_id(token)
        if i is None:
            i = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}[key]
            i = i[0] if isinstance(i, list) else i
        if i is not None:
            getattr(w, f"add_{key}_token_id")(int(i))
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """float32 arrays under llama.cpp's names, in the converter's order; MTP modules left out."""
    from .hf import to_disk_names

    cfg = model.config
    L = cfg.num_hidden_layers
    state = {}
    for k, v in to_disk_names(model.state_dict(), cfg).items():
        m = re.match(r"model\.layers\.(\d+)\.", k)
        if m and int(m[1]) >= L:
            continue  # MTP modules: llama.cpp's deepseek2 converter skips them too
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        state[k] = v.detach().to("cpu", torch.float32).numpy()
    if cfg.is_mla:
        state = _mla_layout(state, cfg)
    else:
        for k in state:
            heads = (cfg.num_attention_heads if ".self_attn.q_proj." in k else
                     cfg.num_key_value_heads if ".self_attn.k_proj." in k else None)
            if heads and cfg.model_type == "llama" and not cfg.rope_interleave:
                state[k] = permute_rope(state[k], heads)    # rotate-half rows -> llama.cpp's interleaved pairs
            elif heads and cfg.model_type == "qwen2" and cfg.rope_interleave:
                state[k] = unpermute_rope(state[k], heads)  # interleaved rows -> rotate-half (NEOX rope)
    out = {gguf_name(k): np.ascontiguousarray(state[k]) for k in sorted(state, key=_tensor_order)}
    if cfg.rope_type == "llama3":
        out["rope_freqs.weight"] = _llama3_rope_factors(cfg)
    return out


def _mla_layout(state: dict, cfg) -> dict:
    """deepseek2: kv_b_proj split into k_b / v_b, experts stacked, rope rows in interleaved pairs."""
    nh, d_nope, d_rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    out = stack_experts(state, cfg.n_routed_experts) if cfg.is_moe else dict(state)
    for k in list(out):
        w = out[k]
        if not cfg.rope_interleave and k.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            # llama.cpp's deepseek2 rope (like DeepSeek's checkpoints) rotates adjacent pairs
            heads = w.reshape(nh, d_nope + d_rope, -1).copy()
            heads[:, d_nope:] = permute_rope(heads[:, d_nope:].reshape(nh * d_rope, -1), nh).reshape(nh, d_rope, -1)
            out[k] = heads.reshape(w.shape)
        elif not cfg.rope_interleave and k.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            w = w.copy()
            w[cfg.kv_lora_rank:] = permute_rope(w[cfg.kv_lora_rank:], 1)
            out[k] = w
        elif k.endswith("self_attn.kv_b_proj.weight"):
            del out[k]
            prefix = k.removesuffix("kv_b_proj.weight")
            out[prefix + "k_b_proj.weight"], out[prefix + "v_b_proj.weight"] = split_kv_b(w, nh, d_nope, cfg.v_head_dim)
    return out


def _tensor_order(hf_name: str):
    """token_embd, the blocks in order, output_norm, output: llama.cpp's converter's order."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _add_tensor(w, name: str, t: np.ndarray, outtype: str):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    # 1-D tensors (norms, biases, exp_probs_b) and the router stay F32, as the converter keeps them
    if t.ndim == 1 or outtype == "f32" or name.endswith("ffn_gate_inp.weight"):
        w.add_tensor(name, t.astype(np.float32))
    elif outtype == "q8_0" and t.shape[-1] % 32 == 0:
        w.add_tensor(name, quantize(t, Q.Q8_0), raw_dtype=Q.Q8_0)
    else:
        w.add_tensor(name, t.astype(np.float16))

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
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import NanoseekError

GGUF_ARCHITECTURES = ("llama", "qwen2")
OUTTYPES = ("f16", "q8_0", "f32")

_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# Pre-tokenizer regexes of Hugging Face tokenizer.json files, by llama.cpp's name for them.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_SPLIT_NAMES = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def gguf_name(hf_name: str) -> str:
    """Hugging Face state-dict name -> llama.cpp tensor name."""
    base, _, kind = hf_name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{kind}"
    parts = base.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}.{kind}"
    raise NanoseekError(f"no GGUF name for tensor {hf_name!r}")


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, rows (2, d/2) -> (d/2, 2), halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_rope`: interleaved pairs -> halves."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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


def write_gguf(model, tok, path, outtype: str = "f16", name: str | None = None,
               license: str | None = None) -> Path:
    """Write `model` (llama or qwen2 architecture) and `tok` to the GGUF file `path`, atomically."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType

    from .hf import to_disk_names

    cfg = model.config
    if cfg.model_type not in GGUF_ARCHITECTURES:
        raise NanoseekError(
            f"GGUF export supports the dense {' and '.join(GGUF_ARCHITECTURES)} architectures; this model is "
            f"{cfg.model_type} ({cfg.architecture}). Export it with --format hf; llama.cpp's own "
            "convert_hf_to_gguf.py maps DeepSeek's MLA + MoE to its 'deepseek2' architecture.")
    if outtype not in OUTTYPES:
        raise NanoseekError(f"unknown GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    if tok is None:
        raise NanoseekError("GGUF export needs the model's tokenizer (no tokenizer.json found)")
    rope = cfg.rope_type
    if rope not in ("default", "linear", "llama3") or (rope == "llama3" and cfg.model_type != "llama"):
        raise NanoseekError(f"GGUF export: rope scaling {rope!r} for {cfg.model_type} is not supported "
                            "(default, linear and llama's llama3 are)")
    vocab = tokenizer_metadata(tok, cfg.vocab_size)
    arch = cfg.model_type
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or "nanoseek model")
        if license:
            w.add_license(license)
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
        if rope == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                         "f32": LlamaFileType.ALL_F32}[outtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

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

        state = to_disk_names(model.state_dict(), cfg)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        for hf_name in sorted(state, key=_tensor_order):
            t = state[hf_name].detach().to("cpu", torch.float32).numpy()
            heads = (cfg.num_attention_heads if ".self_attn.q_proj." in hf_name else
                     cfg.num_key_value_heads if ".self_attn.k_proj." in hf_name else None)
            if heads and arch == "llama" and not cfg.rope_interleave:
                t = permute_rope(t, heads)      # rotate-half rows -> llama.cpp's interleaved pairs
            elif heads and arch == "qwen2" and cfg.rope_interleave:
                t = unpermute_rope(t, heads)    # interleaved rows -> rotate-half (llama.cpp's NEOX rope)
            _add_tensor(w, gguf_name(hf_name), np.ascontiguousarray(t), outtype, Q)
        if rope == "llama3":
            w.add_tensor("rope_freqs.weight", _llama3_rope_factors(cfg))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _tensor_order(hf_name: str):
    """token_embd, the blocks in order, output_norm, output: llama.cpp's converter's order."""
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), hf_name)
    return (0 if "embed_tokens" in hf_name else 2, 0, hf_name)


def _add_tensor(w, name: str, t: np.ndarray, outtype: str, Q):
    from gguf.quants import quantize

    if t.ndim == 1 or outtype == "f32":
        w.add_tensor(name, t.astype(np.float32))
    elif outtype == "q8_0" and t.shape[-1] % 32 == 0:
        w.add_tensor(name, quantize(t, Q.Q8_0), raw_dtype=Q.Q8_0)
    else:
        w.add_tensor(name, t.astype(np.float16))

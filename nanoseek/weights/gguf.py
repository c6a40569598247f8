"""GGUF files (llama.cpp's format) read into a Hugging Face style config, state dict and tokenizer.

    from nanoseek.weights.gguf import read_gguf
    g = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    g.config                      # a config.json dict: model_type llama, qwen2 or deepseek_v3 / _v2, sizes, rope
    g.tensors                     # {"model.embed_tokens.weight": float32 tensor, ...}: HF names and layouts
    g.tokenizer.encode("hi").ids  # a `tokenizers.Tokenizer` (byte-level BPE)
    g.chat_template, g.special_tokens

`nanoseek.load("model.gguf")` builds a model from this. Every tensor is dequantized to float32
(F32/F16/BF16 directly; Q4_0, Q4_1, Q8_0 and the other block formats with `gguf.quants`, vectorized).

What llama.cpp's converter changed, and what is undone here (names and reshapes: weights/gguf_names.py,
the one map the writer uses too):
- Names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight` and so on (`hf_name`).
- llama (not qwen2): the rows of each head of q_proj / k_proj are reordered from HF's rotate-half
  layout (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to interleaved pairs (x_0, y_0, x_1, y_1, ...) for
  llama.cpp's rope; `unpermute_rope` puts them back, so the tensors equal the original checkpoint.
- deepseek2 (DeepSeek-V2 / V3): `attn_k_b` + `attn_v_b` are merged back into `kv_b_proj` (or the
  older unsplit `attn_kv_b` is taken as is), stacked `ffn_*_exps` are split into one tensor per
  expert, `exp_probs_b` is the router's `e_score_correction_bias`; the config comes from the
  deepseek2 keys (`_deepseek2_config`). MTP modules are not in such files.
- Tied embeddings: there is no `output.weight`; then `tie_word_embeddings` is True and no
  `lm_head.weight` is returned.

Tokenizer: the vocabulary and merges come from `tokenizer.ggml.*`; tokens marked CONTROL become special
added tokens (`<|im_start|>` is one id), USER_DEFINED ones plain added tokens. The pre-tokenizer follows
`tokenizer.ggml.pre` as llama.cpp does. That differs from transformers' GGUF loader (5.23) for
`smollm` (SmolLM2): transformers does not know that name and falls back to the GPT-2 split, which keeps
whitespace in front of a digit ("\\n\\n4" -> "\\n", "\\n", "4"), while llama.cpp and SmolLM2's own
tokenizer.json split every digit off first ("\\n\\n", "4"). We follow llama.cpp and the original model.
BOS: `tokenizer.ggml.add_bos_token` (False for SmolLM2: no BOS, as in transformers and llama.cpp) goes
to `config["add_bos_token"]`, and the tokenizer's post-processor adds BOS only when it is True. Without
the flag we take llama.cpp's default: BOS for llama-3 style vocabularies, none for other byte-level BPE.
Control tokens outside the byte alphabet (DeepSeek's `<｜User｜>`) stay whole, as in llama.cpp;
transformers 5.23 drops them from its added tokens and cuts them into bytes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..config import ModelConfig
from ..errors import NanoseekError
from .gguf_names import hf_name, merge_kv_b, unpermute_rope

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "deepseek2": "DeepseekV3ForCausalLM"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
MAX_COUNT = 1 << 20  # layers, heads, experts, widths: anything larger is a damaged or hostile header

# How each `tokenizer.ggml.pre` splits text before BPE (llama.cpp's llama-vocab.cpp, same names).
_GPT2_SPLIT = "gpt2"
_DIGITS_THEN_GPT2 = "digits"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_PRE_TOKENIZERS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "mpt", "olmo", "jais"], _GPT2_SPLIT),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], _QWEN2_SPLIT),
    **dict.fromkeys(["llama3", "llama-bpe", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
}
_LLAMA3_PRES = {"llama3", "llama-bpe", "llama-v3", "falcon3", "pixtral"}  # llama.cpp: ignore_merges, BOS


@dataclass
class GGUFContents:
    config: dict                        # config.json-style dict (+ add_bos_token / add_eos_token)
    tensors: dict[str, torch.Tensor]    # HF state-dict names, float32, HF shapes and layouts
    tokenizer: Tokenizer | None         # None only when the file has no vocabulary
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)  # bos_token / eos_token / pad_token / unk_token


def _header(path: Path):
    """(reader, metadata, HF config dict) of a GGUF file, checked before any tensor is read."""
    reader = _open(path)
    meta = read_metadata(path, reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NanoseekError(f"{path}: unsupported GGUF architecture {arch!r}; "
                            f"supported: {', '.join(ARCHITECTURES)}")
    by_name = {t.name: t for t in reader.tensors}
    config = _deepseek2_config(path, meta, by_name) if arch == "deepseek2" else _config(path, meta, arch, by_name)
    try:
        ModelConfig.from_hf_config(config)     # sizes that cannot build a model: refused before any dequant
    except NanoseekError as e:
        raise NanoseekError(f"{path}: {e}") from None
    return reader, meta, config


def read_gguf_config(path) -> ModelConfig:
    """The model's shape from a GGUF file's metadata alone (no tensor is dequantized)."""
    return ModelConfig.from_hf_config(_header(Path(path))[2])


def read_gguf(path) -> GGUFContents:
    """Config, float32 HF-named tensors and tokenizer of a llama / qwen2 / deepseek2 GGUF file."""
    path = Path(path)
    reader, meta, config = _header(path)
    arch = meta.get("general.architecture")
    tensors, mla_halves = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":  # llama-3.1 style rope scaling, baked into per-dim factors
                warnings.warn(f"{path}: ignoring rope_freqs.weight (llama-3.1 rope scaling is not reconstructed)")
                continue
            raise NanoseekError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        w = _dequantize(path, t)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope(w, config["num_key_value_heads"])
        elif name.endswith((".k_b_proj.weight", ".v_b_proj.weight")):
            mla_halves[name] = w
            continue
        # routed experts stay stacked (`mlp.experts.gate_proj.weight` [E, I, H]): the model stores them so
        tensors[name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))
    for k in sorted(mla_halves):  # deepseek2: attn_k_b + attn_v_b -> kv_b_proj
        if k.endswith(".k_b_proj.weight"):
            v = k.replace("k_b_proj", "v_b_proj")
            if v not in mla_halves:
                raise NanoseekError(f"{path}: {k} has no matching attn_v_b")
            tensors[k.replace("k_b_proj", "kv_b_proj")] = torch.from_numpy(merge_kv_b(mla_halves[k], mla_halves[v]))
    if config.get("topk_method") == "noaux_tc":  # llama.cpp routes without a bias when the file has none
        for k in [k for k in tensors if k.endswith(".mlp.gate.weight")]:
            tensors.setdefault(k.replace(".weight", ".e_score_correction_bias"), torch.zeros(config["n_routed_experts"]))
    tokenizer, special = _tokenizer(path, meta)
    return GGUFContents(config, tensors, tokenizer, meta.get("tokenizer.chat_template"), special)


# -- metadata validation: absurd or mistyped values are refused before anything large is built ------
_COUNTS = {"block_count": 4096, "embedding_length": 1 << 20, "feed_forward_length": 1 << 22,
           "attention.head_count": 4096, "attention.head_count_kv": 4096, "context_length": 1 << 30,
           "attention.key_length": 1 << 14, "attention.value_length": 1 << 14, "vocab_size": 1 << 24,
           "rope.scaling.original_context_length": 1 << 30}
_POSITIVE = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id")


def read_metadata(path: Path, reader) -> dict:
    """The key/value metadata as Python values, each known key checked for its type and range."""
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = _value(f)
        except Exception as e:  # noqa: BLE001 - a damaged field fails deep in numpy
            raise NanoseekError(f"{path}: unreadable GGUF metadata field {key[:60]!r} ({type(e).__name__})") from None
    check_metadata(path, meta)
    return meta


def check_metadata(path: Path, meta: dict) -> None:
    def bad(key, what):
        raise NanoseekError(f"{path}: GGUF metadata {key} = {str(meta[key])[:40]!r} is not {what}")

    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise NanoseekError(f"{path}: GGUF metadata general.architecture is missing or not a string")
    for key, hi in _COUNTS.items():
        v = meta.get(f"{arch}.{key}")
        if v is not None and not isinstance(v, list) and not (type(v) is int and 1 <= v <= hi):
            bad(f"{arch}.{key}", f"a count in [1, {hi}]")
    for key in _POSITIVE:
        v = meta.get(f"{arch}.{key}")
        if v is not None and not (type(v) in (int, float) and 0 < v < float("inf")):
            bad(f"{arch}.{key}", "a positive number")
    for key in _TOKEN_IDS:
        if meta.get(f"tokenizer.ggml.{key}") is not None and type(meta[f"tokenizer.ggml.{key}"]) is not int:
            bad(f"tokenizer.ggml.{key}", "an integer")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            bad(key, "a list of strings")
    types, tokens = meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.tokens") or []
    if types is not None and not (isinstance(types, list) and len(types) == len(tokens)
                                  and all(type(t) is int for t in types)):
        bad("tokenizer.ggml.token_type", "a list of integers, one per token")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            bad(key, "a string")


# -- reading ------------------------------------------------------------------------------------------
def _open(path: Path):
    from gguf import GGUFReader

    if not path.exists():
        raise NanoseekError(f"{path}: no such file")
    if not path.is_file():
        raise NanoseekError(f"{path}: not a file (expected a .gguf file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise NanoseekError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader fails deep in numpy/struct on a short or damaged file
        size = path.stat().st_size
        raise NanoseekError(f"{path}: truncated or corrupt GGUF file ({size:,} bytes); "
                            f"could not read its header and tensor table ({type(e).__name__}: {e})") from None


def _value(f):
    """A metadata field as a Python value: str, int, float, bool or a list of them."""
    from gguf import GGUFValueType

    def scalar(kind, part):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part[0].item()
        # float32 metadata as its shortest decimal (1e-05, not 9.999999747378752e-06)
        return float(str(np.float32(v))) if kind == GGUFValueType.FLOAT32 else v

    if f.types[0] == GGUFValueType.ARRAY:
        return [scalar(f.types[-1], f.parts[i]) for i in f.data]
    return scalar(f.types[0], f.parts[f.data[0]])


def _dequantize(path: Path, t) -> np.ndarray:
    """float32 array in PyTorch order (ggml lists dimensions fastest first, so the shape is reversed)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type in (Q.F32, Q.F16):
        w = t.data
    elif t.tensor_type == Q.BF16:  # the upper half of a float32
        w = (np.ascontiguousarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise NanoseekError(f"{path}: tensor {t.name} uses {t.tensor_type.name}, "
                                "which this version of the gguf package cannot dequantize") from None
    return np.asarray(w, dtype=np.float32).reshape(shape)


def _config(path: Path, meta: dict, arch: str, tensors: dict) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    required = {"embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
                "block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads"}
    missing = [f"{arch}.{k}" for k in required if get(k) is None]
    if missing:
        raise NanoseekError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    sizes = {hf: get(k) for k, hf in required.items()}
    if any(isinstance(v, list) for v in sizes.values()) or isinstance(get("attention.head_count_kv"), list):
        raise NanoseekError(f"{path}: per-layer sizes (lists in the metadata) are not supported")
    for k, hf in required.items():  # before anything is built from them
        sizes[hf] = _count(path, f"{arch}.{k}", sizes[hf])
    for k in ("attention.head_count_kv", "attention.key_length"):
        if get(k) is not None:
            _count(path, f"{arch}.{k}", get(k))
    cfg = {"model_type": arch, "architectures": [ARCHITECTURES[arch]], **sizes}
    heads = cfg["num_attention_heads"]
    embed = tensors.get("token_embd.weight")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or (
        int(embed.shape[1]) if embed is not None else None)
    cfg.update(
        vocab_size=vocab,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or cfg["hidden_size"] // heads,
        hidden_act="silu",
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        max_position_embeddings=get("context_length", 2048),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=None,
        tie_word_embeddings="output.weight" not in tensors,
        torch_dtype="float32",
    )
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    kind = get("rope.scaling.type")
    if kind and kind != "none":
        cfg["rope_scaling"] = {"rope_type": kind, "factor": get("rope.scaling.factor", 1.0)}
        if get("rope.scaling.original_context_length"):
            cfg["rope_scaling"]["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
    cfg["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    cfg["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
    cfg["add_bos_token"], cfg["add_eos_token"] = _adds_bos_eos(meta)
    return cfg


def _deepseek2_config(path: Path, meta: dict, tensors: dict) -> dict:
    """A DeepSeek-V3 config.json from llama.cpp's deepseek2 keys (the writer's `_deepseek2_metadata`).

    The file holds what llama.cpp runs, so that is what comes back: rope in interleaved pairs,
    group routing by top-2 sums (V3's noaux_tc; a zero correction bias when the file has none),
    no MTP modules. Files without the `_mla` keys (older converters) give per-head widths under
    key_length / value_length and hold the unsplit attn_kv_b.
    """
    def get(key, default=None):
        return meta.get(f"deepseek2.{key}", default)

    required = ["embedding_length", "feed_forward_length", "block_count", "attention.head_count",
                "attention.kv_lora_rank", "rope.dimension_count"]
    missing = [f"deepseek2.{k}" for k in required if get(k) is None]
    if missing:
        raise NanoseekError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    counts = {k: _count(path, f"deepseek2.{k}", get(k)) for k in required}
    rope = counts["rope.dimension_count"]
    k_len = _count(path, "deepseek2.attention.key_length_mla", get("attention.key_length_mla", get("attention.key_length")))
    v_len = _count(path, "deepseek2.attention.value_length_mla",
                   get("attention.value_length_mla", get("attention.value_length")))
    if k_len <= rope:
        raise NanoseekError(f"{path}: key length {k_len} leaves no room beside {rope} rope dimensions")
    experts = _count(path, "deepseek2.expert_count", get("expert_count", 0), minimum=0)
    layers = counts["block_count"]
    groups = _count(path, "deepseek2.expert_group_count", get("expert_group_count", 1) or 1)
    sigmoid = get("expert_gating_func") == 2  # llama.cpp: 1 softmax, 2 sigmoid; absent = softmax
    has_bias = any(name.endswith("exp_probs_b.bias") for name in tensors)
    v3 = sigmoid or has_bias or groups > 1
    embed = tensors.get("token_embd.weight")
    cfg = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "vocab_size": get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or (
            int(embed.shape[1]) if embed is not None else None),
        "hidden_size": counts["embedding_length"], "intermediate_size": counts["feed_forward_length"],
        "num_hidden_layers": layers, "num_attention_heads": counts["attention.head_count"],
        "num_key_value_heads": counts["attention.head_count"], "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": get("context_length", 4096), "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": None, "rope_interleave": True, "attention_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors, "torch_dtype": "float32",
        "q_lora_rank": _count(path, "deepseek2.attention.q_lora_rank", get("attention.q_lora_rank", 0), minimum=0) or None, "kv_lora_rank": counts["attention.kv_lora_rank"],
        "qk_nope_head_dim": k_len - rope, "qk_rope_head_dim": rope, "v_head_dim": v_len,
        "num_nextn_predict_layers": 0,
    }
    if experts:
        dense = _count(path, "deepseek2.leading_dense_block_count", get("leading_dense_block_count", 0), minimum=0)
        cfg.update(
            n_routed_experts=experts, first_k_dense_replace=dense, moe_layer_freq=1,
            num_experts_per_tok=_count(path, "deepseek2.expert_used_count", get("expert_used_count")),
            n_shared_experts=_count(path, "deepseek2.expert_shared_count", get("expert_shared_count", 0), minimum=0),
            moe_intermediate_size=_count(path, "deepseek2.expert_feed_forward_length",
                                         get("expert_feed_forward_length")),
            routed_scaling_factor=get("expert_weights_scale", 1.0) or 1.0,
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            scoring_func="sigmoid" if sigmoid else "softmax",
            topk_method="noaux_tc" if v3 else "greedy",
            n_group=groups,
            topk_group=_count(path, "deepseek2.expert_group_used_count", get("expert_group_used_count", 1) or 1))
    else:
        cfg.update(n_routed_experts=None)
    if get("rope.scaling.type") == "yarn":
        mscale_all = float(f"{(get('rope.scaling.yarn_log_multiplier') or 0.0) / 0.1:.6g}")  # written as 0.1 * it
        cfg["rope_scaling"] = {"type": "yarn", "factor": get("rope.scaling.factor", 1.0),
                               "original_max_position_embeddings": get("rope.scaling.original_context_length"),
                               "mscale": mscale_all, "mscale_all_dim": mscale_all, "beta_fast": 32, "beta_slow": 1}
    elif get("rope.scaling.type") not in (None, "none"):
        raise NanoseekError(f"{path}: rope scaling {get('rope.scaling.type')!r} is not supported for deepseek2")
    cfg["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
    cfg["eos_token_id"] = meta.get("tokenizer.ggml.eos_token_id")
    cfg["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
    cfg["add_bos_token"], cfg["add_eos_token"] = _adds_bos_eos(meta)
    return cfg


def _count(path: Path, key: str, value, minimum: int = 1) -> int:
    """A size from the metadata, refused unless a plain integer in [minimum, MAX_COUNT]."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        raise NanoseekError(f"{path}: {key} = {value!r} is not a count between {minimum} and {MAX_COUNT:,}")
    return value


def _adds_bos_eos(meta: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS: the file's flags, else llama.cpp's default for the vocabulary."""
    bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.pre") in _LLAMA3_PRES)
    return bool(bos), bool(meta.get("tokenizer.ggml.add_eos_token", False))


# -- tokenizer ----------------------------------------------------------------------------------------
def _tokenizer(path: Path, meta: dict) -> tuple[Tokenizer | None, dict]:
    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if not tokens:
        warnings.warn(f"{path}: no vocabulary in the file (tokenizer.ggml.tokens); no tokenizer")
        return None, dict.fromkeys(["bos_token", "eos_token", "pad_token", "unk_token"])
    if kind != "gpt2":
        raise NanoseekError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    pre = meta.get("tokenizer.ggml.pre", "default")
    split = _PRE_TOKENIZERS.get(pre)
    if split is None:
        warnings.warn(f"{path}: unknown pre-tokenizer {pre!r}; splitting text like GPT-2")
        split = _GPT2_SPLIT
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a few files repeat a token; the first id wins, as in llama.cpp
    if any(len(m) != 2 for m in merges):
        raise NanoseekError(f"{path}: GGUF metadata tokenizer.ggml.merges has an entry that is not 'left right'")
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRES))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions (a merge of unknown tokens)
        raise NanoseekError(f"{path}: the GGUF vocabulary does not make a BPE tokenizer ({str(e)[:100]})") from None
    gpt2_regex = split in (_GPT2_SPLIT, _DIGITS_THEN_GPT2)  # ByteLevel's own regex is GPT-2's
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if split is _DIGITS_THEN_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is _GPT2_SPLIT:
        tk.pre_tokenizer = byte_level
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id")}
    add_bos, add_eos = _adds_bos_eos(meta)
    bos = [special["bos_token"]] if add_bos and special["bos_token"] else []
    eos = [special["eos_token"]] if add_eos and special["eos_token"] else []
    if bos or eos:  # transformers' add_special_tokens=True behaviour, also for the bare tokenizer
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join(bos + ["$A"] + eos), pair=" ".join(bos + ["$A"] + eos + bos + ["$B"] + eos),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)])
    return tk, special

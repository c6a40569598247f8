"""Load and save models: `load(path)` for HF directories and .gguf files, `save(...)` for HF directories.

    model, tok = nanoseek.load("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = nanoseek.load("runs/tiny/final", dtype=torch.bfloat16)
    nanoseek.save(model, tok, "out/")      # transformers.AutoModelForCausalLM loads it
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..config import ModelConfig
from ..errors import NanoseekError
from ..model.transformer import Transformer
from .hf import (dequant_fp8, from_disk_names, read_config, read_tensors,
                 safetensors_files, to_disk_names, write_safetensors)

GGUF_MAGIC = b"GGUF"


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype=None, device=None) -> Transformer:
    """A Transformer holding exactly `tensors` (on-disk names); a clear error for any mismatch."""
    state = from_disk_names(tensors, cfg)
    if cfg.num_nextn_predict_layers and not any(k.startswith("mtp.") for k in state):
        warnings.warn("config has num_nextn_predict_layers but the checkpoint has no MTP weights; "
                      "loading without MTP modules")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise NanoseekError(f"weights do not match the config: {len(missing)} tensors missing, "
                            f"e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise NanoseekError(f"weights do not match the config: {len(unexpected)} unexpected tensors, "
                            f"e.g. {', '.join(unexpected[:3])}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise NanoseekError(f"weights do not match the config: tensor {k} has shape "
                                f"{list(state[k].shape)} in the checkpoint but the config expects {list(v.shape)}")
    dtype = dtype or torch.float32
    for k, v in state.items():
        if v.is_floating_point():
            keep_fp32 = k.endswith("e_score_correction_bias")
            state[k] = v.to(dtype=torch.float32 if keep_fp32 else dtype)
    model.load_state_dict(state, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device) if device is not None else model


def load(path, dtype: torch.dtype | None = None, device=None):
    """(model, tokenizer) from an HF-style directory or a .gguf file; tokenizer may be None."""
    from ..tokenizer import Tokenizer

    p = Path(path)
    if not p.exists():
        raise NanoseekError(f"{path}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise NanoseekError(f"{path}: not a GGUF file and not a model directory")
        from .gguf import read_gguf
        g = read_gguf(p)
        cfg = ModelConfig.from_hf_config(g.config)
        tok = Tokenizer.from_gguf(g) if g.tokenizer is not None else None
        return build_model(cfg, g.tensors, dtype, device).eval(), tok
    cfg = read_config(p)
    tensors = read_tensors(safetensors_files(p))
    if any(k.endswith("_scale_inv") for k in tensors):
        block = fp8_block_size(cfg.extra.get("quantization_config"))
        tensors = dequant_fp8(tensors, block)
    tok = Tokenizer.from_dir(p) if (p / "tokenizer.json").is_file() else None
    return build_model(cfg, tensors, dtype, device).eval(), tok


def fp8_block_size(qc) -> int:
    """quantization_config.weight_block_size[0] (DeepSeek-V3: [128, 128]), validated."""
    block = (qc or {}).get("weight_block_size", [128, 128]) if isinstance(qc, (dict, type(None))) else None
    if not (isinstance(block, list) and block and all(type(b) is int and 1 <= b <= 1 << 16 for b in block)):
        raise NanoseekError("config: quantization_config.weight_block_size must be a list of positive integers")
    return block[0]


def save(model: Transformer, tokenizer, path, max_shard_bytes: int = 2 * 1024**3,
         metadata: dict | None = None, overwrite: bool = True) -> Path:
    """Write an HF-style directory (config.json, safetensors [+ index], tokenizer files) atomically."""
    cfg = model.config
    hf = cfg.to_hf_config()
    hf.pop("quantization_config", None)  # weights are written dequantized
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    from ..version import __version__
    meta = {"nanoseek_version": __version__, **(metadata or {})}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        write_safetensors(to_disk_names(model.state_dict(), cfg), tmp, max_shard_bytes, meta)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(path)

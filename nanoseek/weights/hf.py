"""Hugging Face style model directories: config.json + (sharded) safetensors.

    cfg, tensors = read_hf_dir("path/to/model")          # names as on disk
    write_hf_dir(model, "out/")                           # config.json, shards, index

Handled on load: `model.safetensors` or shards listed in `model.safetensors.index.json`;
DeepSeek's FP8 checkpoints (e4m3 weights with a `weight_scale_inv` per 128×128 block) are
dequantized; MTP layers stored as `model.layers.{num_hidden_layers + k}.*` are mapped to our
`mtp.k.*`. Writes are atomic: everything goes to a temp directory that is renamed into place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import NanoseekError

INDEX = "model.safetensors.index.json"
MTP_OWN = ("enorm", "hnorm", "eh_proj", "shared_head.norm")  # MTP tensors that are not the block's
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main embed / head


def read_config(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise NanoseekError(f"{path}: no config.json (expected a Hugging Face model directory or a .gguf file)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise NanoseekError(f"{f}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_config(d)


def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise NanoseekError(f"{index}: malformed index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NanoseekError(f"{path}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise NanoseekError(f"{f}: shard listed in {INDEX} is missing")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    tensors[k] = st.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise NanoseekError(f"{f}: unreadable safetensors file, truncated or corrupt ({e})") from None
    return tensors


def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
                      dtype=torch.float32) -> torch.Tensor:
    """DeepSeek-V3 FP8: w[i, j] = fp8[i, j] * scale_inv[i // block, j // block]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def dequant_fp8(tensors: dict[str, torch.Tensor], block: int = 128) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        s = tensors.get(k + "_scale_inv") if k.endswith(".weight") else None
        out[k] = dequant_fp8_block(v, s, block) if s is not None else v
    return out


def from_disk_names(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """On-disk (HF/DeepSeek) names -> our state-dict names."""
    L, out = cfg.num_hidden_layers, {}
    for k, v in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m and int(m.group(1)) >= L:
            depth, rest = int(m.group(1)) - L, m.group(2)
            if rest in MTP_SHARED:
                continue  # the same embedding / head as the main model
            k = f"mtp.{depth}.{rest}" if rest.startswith(MTP_OWN) else f"mtp.{depth}.block.{rest}"
        if k.endswith("rotary_emb.inv_freq"):
            continue
        out[k] = v
    return out


def to_disk_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L, out = cfg.num_hidden_layers, {}
    for k, v in state.items():
        m = re.match(r"mtp\.(\d+)\.(block\.)?(.*)", k)
        if m:
            k = f"model.layers.{L + int(m.group(1))}.{m.group(3)}"
        out[k] = v
    for d in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + d}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        out[f"model.layers.{L + d}.shared_head.head.weight"] = state["lm_head.weight"]
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int,
                      metadata: dict | None = None):
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than a shard."""
    shards, size, total = [[]], 0, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
        total += n
    meta = {"format": "pt", **(metadata or {})}
    seen: dict[int, str] = {}
    def materialize(k):  # safetensors refuses shared storage: copy tensors seen before
        t = tensors[k].detach().cpu().contiguous()
        ptr = t.data_ptr()
        if ptr in seen:
            t = t.clone()
        seen[ptr] = k
        return t
    if len(shards) == 1:
        save_file({k: materialize(k) for k in shards[0]}, str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: materialize(k) for k in keys}, str(out / name), metadata=meta)
        weight_map.update({k: name for k in keys})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

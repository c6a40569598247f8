"""Hugging Face style model directories: config.json + (sharded) safetensors.

    cfg, tensors = read_hf_dir("path/to/model")          # names as on disk
    write_hf_dir(model, "out/")                           # config.json, shards, index

Handled on load: `model.safetensors` or shards listed in `model.safetensors.index.json`;
DeepSeek's FP8 checkpoints (e4m3 weights with a `weight_scale_inv` per 128×128 block) are
dequantized; MTP layers stored as `model.layers.{num_hidden_layers + k}.*` are mapped to our
`mtp.k.*`. Routed experts are stored per expert on disk (`mlp.experts.{e}.gate_proj.weight`, as
DeepSeek and transformers write them) and stacked in the model (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]): `from_disk_names` stacks them (also GGUF's already stacked
`mlp.experts.gate_proj.weight` [E, I, H]), `to_disk_names` splits them. Writes are atomic: everything goes to a temp directory that is renamed into place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

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
    return ModelConfig.from_hf_config(read_json(f))


def read_json(f: Path):
    """A JSON file's value; NanoseekError for bad UTF-8 or bad JSON (the caller checks the shape)."""
    try:
        return json.loads(f.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise NanoseekError(f"{f}: not valid JSON ({str(e)[:100]})") from None


def shard_names(index: Path) -> list[str]:
    """The shard files an index lists: plain relative paths inside the model directory, never '..' or absolute."""
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise NanoseekError(f"{index}: malformed index (expected {{\"weight_map\": {{tensor name: shard file name}}}})")
    names = sorted(set(weight_map.values()))
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if (not name or name.startswith(("/", "\\")) or PureWindowsPath(name).drive or ".." in parts
                or "\0" in name or not name.endswith(".safetensors")):
            raise NanoseekError(f"{index}: shard {name[:80]!r} is not a .safetensors file inside the model directory")
    return names


def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        files = [path / f for f in shard_names(index)]
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
    if scale_inv.dim() != 2 or tuple(scale_inv.shape) != (-(-rows // block), -(-cols // block)):
        raise NanoseekError(f"FP8 scale of shape {list(scale_inv.shape)} does not match a {rows}x{cols} weight "
                            f"in {block}x{block} blocks")
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def dequant_fp8(tensors: dict[str, torch.Tensor], block: int = 128) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        s = tensors.get(k + "_scale_inv") if k.endswith(".weight") else None
        if s is not None and v.dim() != 2:
            raise NanoseekError(f"{k}: an FP8 weight must be 2-D, got shape {list(v.shape)}")
        out[k] = dequant_fp8_block(v, s, block) if s is not None else v
    return out


_PER_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight")


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert (HF) or per-projection stacked (GGUF) routed-expert weights -> the model's
    `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; other tensors unchanged."""
    out, groups = {}, {}
    for k, v in tensors.items():
        m = _PER_EXPERT.fullmatch(k)
        if m:
            groups.setdefault(m[1], {}).setdefault(m[3], {})[int(m[2])] = v
            continue
        m = _STACKED.fullmatch(k)
        if m:
            groups.setdefault(m[1], {})[m[2]] = v
            continue
        out[k] = v
    for prefix, projs in groups.items():
        if set(projs) != {"gate_proj", "up_proj", "down_proj"}:
            raise NanoseekError(f"{prefix}: routed experts need gate_proj, up_proj and down_proj, "
                                f"found {', '.join(sorted(projs))}")
        stacked = {}
        for proj, w in projs.items():
            dims = {t.dim() for t in w.values()} if isinstance(w, dict) else {w.dim() - 1}
            if dims != {2}:
                raise NanoseekError(f"{prefix}: {proj} expert weights must be matrices, got {sorted(dims)[0]} dims")
            if isinstance(w, dict):
                if sorted(w) != list(range(len(w))):
                    missing = sorted(set(range(max(w) + 1)) - set(w))
                    raise NanoseekError(f"{prefix}: {proj} of expert {missing[0]} is missing")
                if len({tuple(t.shape) for t in w.values()}) > 1:
                    raise NanoseekError(f"{prefix}: {proj} has experts of different shapes")
                w = torch.stack([w[e] for e in range(len(w))])
            stacked[proj] = w
        g, u, d = stacked["gate_proj"].shape, stacked["up_proj"].shape, stacked["down_proj"].shape
        if not (g == u and g[0] == d[0] and (g[1], g[2]) == (d[2], d[1])):
            raise NanoseekError(f"{prefix}: expert shapes gate {list(g)}, up {list(u)}, down {list(d)} "
                                f"do not fit together")
        out[f"{prefix}.gate_up_proj"] = torch.cat([stacked["gate_proj"], stacked["up_proj"]], dim=1)
        out[f"{prefix}.down_proj"] = stacked["down_proj"]
    return out


def unstack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of stack_experts: the model's stacked experts -> per-expert HF names (views)."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", k)
        if not m:
            out[k] = v
        elif m[2] == "down_proj":
            out.update({f"{m[1]}.{e}.down_proj.weight": w for e, w in enumerate(v.unbind(0))})
        else:
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{m[1]}.{e}.gate_proj.weight"], out[f"{m[1]}.{e}.up_proj.weight"] = gate[e], up[e]
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
    return stack_experts(out)


def to_disk_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L, out = cfg.num_hidden_layers, {}
    for k, v in unstack_experts(state).items():
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
    def materialize(k):  # safetensors refuses shared storage: copy tensors seen before, and views
        t = tensors[k].detach().cpu().contiguous()  # of a larger tensor (one expert of a stack)
        ptr = t.data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
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

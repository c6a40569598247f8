"""`nanoseek export`: publish open weights as a Hugging Face directory or a GGUF file.

    nanoseek export runs/distill/final --format hf --out release/ --license mit --name nanoseek-r1-tiny
    nanoseek export runs/distill/final --format gguf --outtype q8_0 --out release-gguf/
    nanoseek export SmolLM2-135M-Instruct.Q4_1.gguf --format hf --out smollm2-hf/   # license read from the file

    from nanoseek.export import export_hf, export_gguf
    model, tok = nanoseek.load("runs/distill/final")
    export_hf(model, tok, "release/", license="mit", name="nanoseek-r1-tiny", source="runs/distill/final")
    export_gguf(model, tok, "release-gguf/", outtype="f16")   # or a path ending in .gguf: just the file

`hf` writes what `nanoseek.save` writes (config.json with the architecture transformers knows,
sharded safetensors + index, tokenizer.json + tokenizer_config.json with the chat template), plus
generation_config.json (DeepSeek-R1's recommended sampling: temperature 0.6, top-p 0.95), LICENSE
and a README.md model card (architecture, total / active parameters, KV-cache bytes per token,
training and evaluation read from a `training.json` / `eval.json` next to the model, intended use,
how to load). vLLM and SGLang load the same directory: same config.json and tensor names as the
upstream architecture, DeepSeek rope rows in interleaved pairs (`engine_layout`), at least two
experts per group (`check_engine_config`). Safetensors metadata records `license` and `nanoseek_version`.

`gguf` writes a llama.cpp file: llama / qwen2 (the distilled student, SmolLM2) and DeepSeek-V3 / V2
(the MoE model the speedrun trains) as llama.cpp's `deepseek2`, F16, Q8_0 or F32 (see
weights/gguf_writer.py; MTP modules are left out). Given a directory it also writes README.md and LICENSE.

Everything is built in a temp directory next to `--out`, sealed (a `.nanoseek-export` marker listing
the files, directories 0755, files 0644, fsynced) and renamed into place, so a failed export leaves
nothing half-written. An existing `--out` is replaced only with `--force`, and only when it is empty
or a previous export whose marker lists every file in it; never the current directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

from .atomic import atomic_dir
from .args import HelpFormatter
from .errors import NanoseekError

LICENSES = ("mit", "apache-2.0", "llama3", "other")
FORMATS = ("hf", "gguf")
R1_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


# -- the two exports --------------------------------------------------------------------------------
def export_hf(model, tok, out, license: str = "mit", force: bool = False, name: str | None = None,
              source=None) -> Path:
    """A Hugging Face directory with weights, tokenizer, generation_config.json, LICENSE and README.md."""
    from . import __version__, save

    license = _check_license(license)
    out = check_out(Path(out), force)
    check_engine_config(model.config)
    name = name or out.name
    model = engine_layout(model)
    with atomic_dir(out) as tmp:  # built in a temp sibling, renamed over `out`
        save(model, tok, tmp, metadata={"license": license, "nanoseek_version": __version__, "name": name})
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model, tok), indent=2) + "\n")
        (tmp / "LICENSE").write_text(license_text(license, name))
        (tmp / "README.md").write_text(model_card(model, tok, license, name, "hf", source, out.name))
        seal(tmp, "hf")
    return out


def export_gguf(model, tok, out, outtype: str = "f16", force: bool = False, name: str | None = None,
                license: str | None = None, source=None) -> Path:
    """A GGUF file (`out` ends in .gguf) or a directory with the .gguf, README.md and LICENSE."""
    from .weights.gguf_writer import write_gguf

    if license is not None:
        license = _check_license(license)
    out = check_out(Path(out), force, single_gguf=Path(out).suffix == ".gguf")
    if out.suffix == ".gguf":
        return write_gguf(model, tok, out, outtype, name=name, license=license)
    name = name or out.name
    file = f"{_slug(name)}-{outtype.upper()}.gguf"
    license = license or "mit"
    with atomic_dir(out) as tmp:  # built in a temp sibling, renamed over `out`
        write_gguf(model, tok, tmp / file, outtype, name=name, license=license)
        (tmp / "LICENSE").write_text(license_text(license, name))
        (tmp / "README.md").write_text(model_card(model, tok, license, name, "gguf", source, out.name, file, outtype))
        seal(tmp, "gguf")
    return out / file


MARKER = ".nanoseek-export"  # JSON in every exported directory: version, format and the files written


def check_out(out: Path, force: bool, single_gguf: bool = False) -> Path:
    """The absolute output path, or a one-line refusal.

    Never the current directory or one that holds it. An existing .gguf file is replaced only with
    --force and only if it is a GGUF file; an existing directory only with --force and only if it is
    empty or a previous export (its MARKER lists every file in it): never an arbitrary tree.
    """
    out = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise NanoseekError(f"--out {out} is the current directory or holds it; name a new directory, "
                            "e.g. --out release/")
    if not out.exists():
        return out
    if single_gguf:
        if out.is_dir():
            raise NanoseekError(f"{out} is a directory, not a .gguf file")
        if not force:
            raise NanoseekError(f"{out} exists; use --force to replace it")
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise NanoseekError(f"{out} is not a GGUF file; refusing to replace it")
        return out
    if not out.is_dir():
        raise NanoseekError(f"{out} exists and is not a directory")
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())
    if not present and not any(out.iterdir()):
        return out
    if not force:
        raise NanoseekError(f"{out} exists and is not empty; use --force to replace a previous export")
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise NanoseekError(f"{out} is not a previous nanoseek export (no {MARKER} listing its files); "
                            "refusing to replace it: remove it yourself or choose another --out") from None
    foreign = [p for p in present if p != MARKER and p not in listed]
    if foreign:
        raise NanoseekError(f"{out} holds files the previous export did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it")
    return out


def seal(tmp: Path, fmt: str) -> None:
    """Finish an export directory before it is renamed into place: the marker listing its files,
    permissions for sharing (directories 0755, files 0644), every file fsynced."""
    from . import __version__

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    (tmp / MARKER).write_text(json.dumps({"nanoseek_version": __version__, "format": fmt, "files": files},
                                         indent=2) + "\n")
    for p in [tmp, *tmp.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755)
        else:
            os.chmod(p, 0o644)
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def check_engine_config(cfg) -> None:
    """What vLLM and SGLang need to run a DeepSeek export by its config.json (see docs/open-weights.md)."""
    if cfg.is_moe and cfg.n_group > 1 and cfg.n_routed_experts // cfg.n_group < 2:
        raise NanoseekError(f"n_group={cfg.n_group} leaves {cfg.n_routed_experts // cfg.n_group} expert per group; "
                            "group routing (vLLM, SGLang, DeepSeek's code) scores a group by its top-2 experts")


def engine_layout(model):
    """The same model in the rope layout the engines assume for its architecture (a copy if it differs).

    transformers' Llama and Qwen2 rotate halves (x_i, x_{i+d/2}); vLLM and SGLang run DeepSeek's
    MLA rope on interleaved pairs (x_2i, x_2i+1) whatever config.json says. A nanoseek model built the
    other way gets the rows of each q / k head (for MLA: the rope rows of q and of kv_a_proj_with_mqa)
    reordered, which gives exactly the same logits.
    """
    cfg = model.config
    if cfg.is_mla == bool(cfg.rope_interleave):
        return model
    import torch

    from .weights import build_model
    from .weights.gguf_names import permute_rope, unpermute_rope
    from .weights.hf import to_disk_names

    state = to_disk_names(model.state_dict(), cfg)
    nh, d_nope, d_rope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    for k, v in state.items():
        if cfg.is_mla and k.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            heads = v.reshape(nh, d_nope + d_rope, -1).clone()
            heads[:, d_nope:] = permute_rope(heads[:, d_nope:].reshape(nh * d_rope, -1), nh).reshape(nh, d_rope, -1)
            state[k] = heads.reshape(v.shape)
        elif cfg.is_mla and k.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            state[k] = torch.cat([v[:r], permute_rope(v[r:], 1)])
        elif not cfg.is_mla and (".self_attn.q_proj." in k or ".self_attn.k_proj." in k):
            heads = cfg.num_attention_heads if ".q_proj." in k else cfg.num_key_value_heads
            state[k] = unpermute_rope(v, heads)  # interleaved pairs -> halves
    out = build_model(cfg.replace(rope_interleave=cfg.is_mla), state, dtype=model.dtype, device=model.device)
    return out.train(model.training)


# -- generation_config.json, LICENSE ----------------------------------------------------------------
def generation_config(model, tok) -> dict:
    cfg = model.config

    def tid(token, fallback):
        i = tok.token_to_id(token) if tok is not None else None
        return fallback if i is None else i
    g = {"bos_token_id": tid(tok and tok.bos_token, cfg.bos_token_id),
         "eos_token_id": tid(tok and tok.eos_token, cfg.eos_token_id)}
    pad = tid(tok and tok.pad_token, cfg.pad_token_id)
    if pad is not None:
        g["pad_token_id"] = pad
    return {k: v for k, v in g.items() if v is not None} | R1_SAMPLING


def license_text(license: str, name: str = "this model") -> str:
    year = datetime.date.today().year
    if license == "mit":
        return _license_file("MIT.txt").format(year=year, holder=f"the {name} authors")
    if license == "apache-2.0":
        return _license_file("Apache-2.0.txt")
    if license == "llama3":
        return (f"{name} is a derivative of Meta Llama 3 and is distributed under the Meta Llama 3\n"
                "Community License Agreement: https://llama.meta.com/llama3/license/\n\n"
                "Put the agreement's full text in this file before publishing, and follow its\n"
                "attribution and acceptable-use terms (\"Built with Meta Llama 3\").\n")
    return (f"{name}: license terms not chosen by nanoseek (--license other).\n\n"
            "Replace this file with the terms under which the weights are distributed before publishing.\n")


def _license_file(name: str) -> str:
    """A license text shipped as package data (nanoseek/licenses/): MIT is the SPDX / OSI text with
    {year} and {holder} to fill in; Apache-2.0 is https://www.apache.org/licenses/LICENSE-2.0.txt
    verbatim (md5 3b83ef96387f14655fc854ddc3c6bd57; tests/test_export.py checks it)."""
    from importlib.resources import files
    return files("nanoseek").joinpath("licenses", name).read_text(encoding="utf-8")


def _check_license(license: str) -> str:
    if license not in LICENSES:
        raise NanoseekError(f"unknown license {license!r}; choose one of: {', '.join(LICENSES)}")
    return license


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


# -- the model card ---------------------------------------------------------------------------------
def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:g} bytes"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v, ensure_ascii=False)
        return s if len(s) <= 120 else s[:117] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def read_json_near(source, filename: str):
    """`filename` in the model directory (or next to the .gguf file), else in its parent; None if absent."""
    if source is None:
        return None
    p = Path(source)
    for d in ([p, p.parent] if p.is_dir() else [p.parent]):
        f = d / filename
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise NanoseekError(f"{f}: not valid JSON ({e})") from None
    return None


def architecture_rows(cfg) -> list[tuple[str, str]]:
    rows = [("type", f"{cfg.model_type} (`{cfg.architecture}`)")]
    if cfg.is_moe:
        dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        rows.append(("layers", f"{cfg.num_hidden_layers} ({dense} dense, {cfg.num_hidden_layers - dense} MoE)"))
    else:
        rows.append(("layers", str(cfg.num_hidden_layers)))
    rows.append(("hidden size", str(cfg.hidden_size)))
    if cfg.is_mla:
        q = f"q_lora_rank {cfg.q_lora_rank}" if cfg.q_lora_rank else "no q compression"
        rows.append(("attention", f"MLA (Multi-head Latent Attention): {cfg.num_attention_heads} heads, "
                                  f"kv_lora_rank {cfg.kv_lora_rank}, {q}, qk_nope_head_dim {cfg.qk_nope_head_dim}, "
                                  f"qk_rope_head_dim {cfg.qk_rope_head_dim}, v_head_dim {cfg.v_head_dim}"))
    else:
        kind = "GQA" if cfg.num_key_value_heads < cfg.num_attention_heads else "MHA"
        rows.append(("attention", f"{kind}: {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} "
                                  f"key/value heads, head_dim {cfg.head_dim}"))
    if cfg.is_moe:
        gate = f"{cfg.scoring_func} gate, {cfg.topk_method}"
        if cfg.n_group > 1:
            gate += f", {cfg.n_group} groups (top {cfg.topk_group})"
        rows.append(("experts", f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok} per token, {gate}, "
                                f"routed_scaling_factor {cfg.routed_scaling_factor:g}) + {cfg.n_shared_experts} "
                                f"shared; expert FFN {cfg.moe_intermediate_size}, dense FFN {cfg.intermediate_size}"))
    else:
        rows.append(("experts", f"none (dense SwiGLU FFN {cfg.intermediate_size})"))
    rows.append(("MTP depth", f"{cfg.num_nextn_predict_layers} (multi-token prediction modules)"
                 if cfg.num_nextn_predict_layers else "0 (no multi-token prediction modules)"))
    rows.append(("vocabulary", str(cfg.vocab_size)))
    rope = f"RoPE θ={cfg.rope_theta:g}"
    if cfg.rope_scaling:
        rope += f", {cfg.rope_type} scaling ×{cfg.rope_scaling.get('factor', 1):g}"
    rows.append(("context", f"{cfg.max_position_embeddings} positions, {rope}"))
    rows.append(("tied embeddings", "yes" if cfg.tie_word_embeddings else "no"))
    return rows


def _table(rows, header=("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def training_section(training) -> str:
    if not training:
        return "Not recorded (no `training.json` next to the model)."
    if not isinstance(training, dict):
        return "```json\n" + json.dumps(training, indent=2, ensure_ascii=False)[:4000] + "\n```"
    first = [k for k in ("stage", "data", "dataset", "datasets", "corpus", "tokens", "steps", "step", "max_steps")
             if k in training]
    rows = [(k, _value(training[k])) for k in first + [k for k in training if k not in first]]
    return _table(rows, ("", "")) + "\n\n(from `training.json`)"


def eval_section(evals) -> str:
    if not evals:
        return "Not recorded (no `eval.json` next to the model)."
    rows: list[tuple[str, dict]] = []
    if isinstance(evals, dict):
        for task, v in evals.items():
            rows.append((task, v if isinstance(v, dict) else {"score": v}))
    elif isinstance(evals, list) and all(isinstance(r, dict) for r in evals):
        for r in evals:
            r = dict(r)
            task = r.pop("task", r.pop("name", "?"))
            rows.append((str(task), r))
    else:
        return "```json\n" + json.dumps(evals, indent=2, ensure_ascii=False)[:4000] + "\n```"
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    lines = ["| task | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for task, r in rows:
        lines.append(f"| {_value(task)} | " + " | ".join(_value(r[c]) if c in r else "" for c in cols) + " |")
    return "\n".join(lines) + "\n\n(from `eval.json`)"


def model_card(model, tok, license: str, name: str, fmt: str = "hf", source=None, repo: str | None = None,
               gguf_file: str | None = None, outtype: str = "f16") -> str:
    """README.md with YAML front matter for the Hugging Face Hub."""
    from . import __version__
    from .tokenizer import ASSISTANT, THINK

    cfg = model.config
    total, active = cfg.num_params()
    stored = sum(p.numel() for p in model.parameters())
    kv = cfg.kv_cache_bytes_per_token(2)
    repo = repo or name
    tags = ["nanoseek", cfg.model_type] + (["moe"] if cfg.is_moe else []) + (["mla"] if cfg.is_mla else [])
    tags += ["mtp"] if cfg.num_nextn_predict_layers else []
    tags += ["gguf"] if fmt == "gguf" else []
    template = (tok.chat_template or "") if tok is not None else ""
    r1 = ASSISTANT in template and THINK in template  # DeepSeek-R1's convention (R1_TEMPLATE or a variant)
    tags += ["reasoning"] if r1 else []
    front = ["---", f"license: {license}"]
    if license == "other":
        front += ["license_name: other", "license_link: LICENSE"]
    if fmt == "hf":
        front.append("library_name: transformers")
    front += ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags] + ["---"]

    cache_what = (f"the compressed latent c_kv ({cfg.kv_lora_rank} values) and the shared rotary key "
                  f"({cfg.qk_rope_head_dim} values)" if cfg.is_mla else
                  f"a key and a value per KV head ({cfg.num_key_value_heads} × {cfg.head_dim} each)")
    ctx = cfg.max_position_embeddings
    arch_name = {"deepseek_v3": "DeepSeek-V3", "deepseek_v2": "DeepSeek-V2", "llama": "Llama",
                 "qwen2": "Qwen2"}[cfg.model_type]
    files = (f"`{gguf_file}` ({outtype.upper()} weights; tokenizer and chat template inside)" if fmt == "gguf" else
             f"`config.json`, safetensors weights ({str(model.dtype).removeprefix('torch.')}), "
             "`tokenizer.json`, `tokenizer_config.json` (with the chat template), `generation_config.json`")
    chat = ("The DeepSeek-R1 convention: `<｜User｜>question<｜Assistant｜>`, and the assistant turn opens with "
            "`<think>\\n`, so the model writes its reasoning, closes it with `</think>`, then answers. "
            "Reasoning of earlier turns is dropped from the history. Recommended sampling (DeepSeek-R1): "
            "temperature 0.6, top-p 0.95" + (", the defaults in `generation_config.json`." if fmt == "hf" else ".")
            if r1 else
            "The tokenizer's own chat template (`tokenizer_config.json` / GGUF metadata) is used by "
            "`apply_chat_template`." if tok is not None and tok.chat_template else
            "No chat template: plain text completion.")
    mtp = (f"\nThe {cfg.num_nextn_predict_layers} MTP module(s) are stored as DeepSeek stores them, as "
           f"`model.layers.{cfg.num_hidden_layers}.*` onwards: transformers does not use them; engines that "
           "support DeepSeek-V3's MTP can use them for speculative decoding." if cfg.num_nextn_predict_layers else "")
    if fmt == "gguf" and cfg.num_nextn_predict_layers:
        mtp = (f"\n\nThe source's {cfg.num_nextn_predict_layers} MTP (multi-token prediction) module(s) are not "
               "in this file: llama.cpp's deepseek2 architecture does not run them. The Hugging Face export keeps them.")
    hf_gguf = ("# (transformers' GGUF loader has no deepseek2: use the Hugging Face export there)" if cfg.is_mla else
               f'# transformers: AutoModelForCausalLM.from_pretrained("{repo}", gguf_file="{gguf_file}")')
    if fmt == "hf":
        usage = f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}")
prompt = tok.apply_chat_template([{{"role": "user", "content": "What is 12 + 7?"}}],
                                 tokenize=False, add_generation_prompt=True)
ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, max_new_tokens=256)   # sampling defaults from generation_config.json
print(tok.decode(out[0, ids.shape[1]:]))
```

```python
import nanoseek
model, tok = nanoseek.load("{repo}")
```

```bash
nanoseek chat --model {repo} --temperature 0.6 --top-p 0.95
```

vLLM and SGLang read the same directory (`config.json` and tensor names as upstream {arch_name}).{mtp}'''
    else:
        usage = f'''```bash
llama-cli -m {repo}/{gguf_file} -cnv --temp 0.6 --top-p 0.95
llama-server -m {repo}/{gguf_file} --port 8080 --jinja   # OpenAI-compatible API
```

```python
from llama_cpp import Llama
llm = Llama(model_path="{repo}/{gguf_file}")
print(llm.create_chat_completion([{{"role": "user", "content": "What is 12 + 7?"}}]))
```

```python
import nanoseek
model, tok = nanoseek.load("{repo}/{gguf_file}")
{hf_gguf}
```{mtp}'''
    origin = f" from `{'/'.join(Path(source).resolve().parts[-2:])}`" if source else ""  # no local paths
    active_note = (f"active counts the shared and the top-{cfg.num_experts_per_tok} routed experts of each MoE layer."
                   if cfg.is_moe else "a dense model: every parameter is active for every token.")
    return "\n".join(front) + f"""

# {name}

A {arch_name}-architecture language model ({_fmt(total)} parameters, {_fmt(active)} active per token),
exported{origin} by nanoseek {__version__} on {datetime.date.today().isoformat()}.
Files: {files}.

## Architecture

{_table(architecture_rows(cfg), ("", ""))}

## Parameters

| | |
| --- | --- |
| total (main model) | {total:,} |
| active per token | {active:,} |
| stored (incl. MTP modules) | {stored:,} |

Total and active follow `ModelConfig.num_params()`: embeddings and head included, MTP modules excluded;
{active_note}

## KV cache

{kv:,} bytes per token in bf16 ({cfg.kv_cache_values_per_token()} values per layer × {cfg.num_hidden_layers} layers × 2 bytes):
each layer caches {cache_what}. At the full context of {ctx:,} tokens: {_bytes(kv * ctx)} per sequence.

## Training

{training_section(read_json_near(source, "training.json"))}

## Evaluation

{eval_section(read_json_near(source, "eval.json"))}

## Chat format

{chat}

## Intended use and limitations

For research and education: studying the DeepSeek-V3 / R1 recipe (MLA, DeepSeekMoE, multi-token
prediction, reinforcement learning on verifiable rewards, distillation) at a scale one can afford.
Models trained with nanoseek are small and trained briefly on narrow data (see Training): they make
mistakes, including confident wrong reasoning, have had no safety tuning, and are not meant for
decisions that matter or for production use. Check the outputs, and evaluate the model on your own
task before relying on it.

## How to use

{usage}

## License

`{license}`: see `LICENSE`.
"""


# -- CLI --------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "export", help="publish open weights: a Hugging Face directory (with model card) or a GGUF file",
        formatter_class=HelpFormatter,
        description="Export a model (HF directory, training checkpoint or .gguf) for publication.\n\n"
                    "formats and what each supports:\n"
                    "  hf    every architecture (deepseek_v3, deepseek_v2, llama, qwen2), MTP modules kept:\n"
                    "        config.json + safetensors + tokenizer + generation_config.json + LICENSE + README.md;\n"
                    "        loads in transformers, vLLM and SGLang (DeepSeek: noaux_tc routing, interleaved rope)\n"
                    "  gguf  llama.cpp / Ollama / LM Studio, F16, Q8_0 or F32 (--outtype), + README.md + LICENSE:\n"
                    "        llama, qwen2 (dense) and deepseek_v3 / deepseek_v2 as llama.cpp's 'deepseek2'\n"
                    "        (MLA as attn_k_b / attn_v_b, stacked experts; MTP modules are left out, llama.cpp\n"
                    "        does not run them); YaRN with DeepSeek's settings, not other rope scalings for MLA\n"
                    "The format follows --out when it ends in .gguf. An existing --out is replaced only with --force,\n"
                    "and only if it is empty or a previous export; nothing is half-written on failure.\n\n"
                    "examples:\n"
                    "  nanoseek export runs/distill/final --format hf --out release/ --license mit\n"
                    "  nanoseek export runs/grpo/final --out release/tiny-r1-Q8_0.gguf --outtype q8_0\n"
                    "  nanoseek export runs/distill/final --format gguf --outtype q8_0 --out release-gguf/\n"
                    "  nanoseek export SmolLM2-135M-Instruct.Q4_1.gguf --format hf --out smollm2-hf/")
    s.add_argument("model", metavar="MODEL", help="HF-style directory (or training checkpoint) or .gguf file")
    s.add_argument("--format", choices=FORMATS, default=None,
                   help="hf or gguf (default: gguf when --out ends in .gguf, else hf)")
    s.add_argument("--out", required=True, help="output directory (gguf: a path ending in .gguf writes just the file)")
    s.add_argument("--license", choices=LICENSES, default=None,
                   help="default: the license recorded in MODEL (GGUF general.license, safetensors metadata), else mit")
    s.add_argument("--name", default=None, help="model name for the card and metadata (default: the --out name)")
    s.add_argument("--force", action="store_true", help="replace --out if it is empty or a previous export")
    s.add_argument("--outtype", choices=["f16", "q8_0", "f32"], default="f16", help="gguf tensor type (default f16)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="hf weight dtype (default: the source's torch_dtype, float32 for .gguf)")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    import torch

    from . import load

    src, out = Path(args.model), Path(args.out)
    fmt = args.format or ("gguf" if out.suffix == ".gguf" else "hf")
    if fmt == "hf" and out.suffix == ".gguf":
        raise NanoseekError(f"--out {args.out} ends in .gguf but --format is hf; drop --format or pick a directory")
    if not src.exists():
        raise NanoseekError(f"{args.model}: no such file or directory")
    out = check_out(out, args.force, single_gguf=fmt == "gguf" and out.suffix == ".gguf")
    if src.is_dir():  # fail before loading the weights
        from .weights.gguf_writer import check_gguf_config
        from .weights.hf import read_config
        cfg = read_config(src)
        check_gguf_config(cfg) if fmt == "gguf" else check_engine_config(cfg)
    dtype = DTYPES.get(args.dtype or "") or source_dtype(src)
    license = args.license or source_license(src) or "mit"
    print(f"loading {src} ({dtype}) ...", file=sys.stderr)
    model, tok = load(src, dtype=getattr(torch, dtype))
    if tok is None:
        if fmt == "gguf":
            raise NanoseekError(f"{src}: no tokenizer.json; a GGUF file needs the tokenizer")
        print(f"warning: {src} has no tokenizer.json; the export will have none", file=sys.stderr)
    total, active = model.config.num_params()
    print(f"{model.config.architecture}: {total:,} parameters ({active:,} active); writing {fmt} "
          f"({license}) to {out} ...", file=sys.stderr)
    if fmt == "hf":
        path = export_hf(model, tok, out, license=license, force=args.force, name=args.name, source=src)
    else:
        path = export_gguf(model, tok, out, outtype=args.outtype, force=args.force, name=args.name,
                           license=license, source=src)
    shown = out if out.is_dir() else path
    files = sorted(p for p in shown.iterdir() if p.name != MARKER) if shown.is_dir() else [shown]
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {shown}: {len(files)} file{'s' * (len(files) != 1)}, {_bytes(size)}")
    for p in files:
        print(f"  {p.name}")
    return 0


def source_dtype(src: Path) -> str:
    """torch_dtype recorded in the source's config.json (float32 for GGUF, which is dequantized)."""
    f = src / "config.json"
    if src.is_dir() and f.is_file():
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError:
            return "float32"
        return DTYPES.get(str(d.get("torch_dtype") or d.get("dtype") or "float32"), "float32")
    return "float32"


def source_license(src: Path) -> str | None:
    """A license the source already records: GGUF `general.license` or safetensors metadata `license`."""
    found = None
    if src.is_file():
        try:
            from gguf import GGUFReader
            f = GGUFReader(src).fields.get("general.license")
            found = bytes(f.parts[f.data[0]]).decode() if f is not None else None
        except Exception:  # an unreadable file fails properly in load()
            return None
    elif src.is_dir():
        from safetensors import safe_open
        for f in sorted(src.glob("*.safetensors"))[:1]:
            try:
                with safe_open(str(f), framework="pt") as st:
                    found = (st.metadata() or {}).get("license")
            except Exception:
                return None
    found = (found or "").strip().lower()
    return found if found in LICENSES else ("other" if found else None)

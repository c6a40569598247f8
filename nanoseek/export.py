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
upstream architecture. Safetensors metadata records `license` and `nanoseek_version`.

`gguf` writes a llama.cpp file for the dense llama / qwen2 models (the distilled student, SmolLM2):
F16 or Q8_0 (see weights/gguf_writer.py). Given a directory it also writes README.md and LICENSE.

Everything is built in a temp directory next to `--out` and renamed into place, so a failed export
leaves nothing half-written; a non-empty `--out` is refused unless `--force` (then it is replaced).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from .atomic import atomic_dir
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
    out = Path(out)
    check_out(out, force)
    name = name or out.resolve().name
    model = rotate_half_layout(model)
    with atomic_dir(out) as tmp:  # built in a temp sibling, renamed over `out`
        save(model, tok, tmp, metadata={"license": license, "nanoseek_version": __version__, "name": name})
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model, tok), indent=2) + "\n")
        (tmp / "LICENSE").write_text(license_text(license, name))
        (tmp / "README.md").write_text(model_card(model, tok, license, name, "hf", source, out.name))
    return out


def export_gguf(model, tok, out, outtype: str = "f16", force: bool = False, name: str | None = None,
                license: str | None = None, source=None) -> Path:
    """A GGUF file (`out` ends in .gguf) or a directory with the .gguf, README.md and LICENSE."""
    from .weights.gguf_writer import write_gguf

    out = Path(out)
    if license is not None:
        license = _check_license(license)
    if out.suffix == ".gguf":
        if out.exists() and not force:
            raise NanoseekError(f"{out} exists; use --force to replace it")
        if out.is_dir():
            raise NanoseekError(f"{out} is a directory, not a .gguf file")
        return write_gguf(model, tok, out, outtype, name=name, license=license)
    check_out(out, force)
    name = name or out.resolve().name
    file = f"{_slug(name)}-{outtype.upper()}.gguf"
    license = license or "mit"
    with atomic_dir(out) as tmp:  # built in a temp sibling, renamed over `out`
        write_gguf(model, tok, tmp / file, outtype, name=name, license=license)
        (tmp / "LICENSE").write_text(license_text(license, name))
        (tmp / "README.md").write_text(model_card(model, tok, license, name, "gguf", source, out.name, file, outtype))
    return out / file


def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty existing output directory (or a file in its place) unless forced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NanoseekError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not force:
        raise NanoseekError(f"{out} exists and is not empty; use --force to replace it")


def rotate_half_layout(model):
    """The same model in Hugging Face's llama / qwen2 rope layout (a no-op unless built with rope_interleave).

    transformers' Llama and Qwen2 rotate (x_i, x_{i+d/2}); a nanoseek GQA model built with
    `rope_interleave=True` rotates pairs (x_2i, x_2i+1). Reordering the rows of each q / k head
    turns one into the other exactly, so the exported directory gives the same logits.
    """
    cfg = model.config
    if cfg.is_mla or not cfg.rope_interleave:
        return model
    from .weights import build_model
    from .weights.hf import to_disk_names

    state = to_disk_names(model.state_dict(), cfg)
    for k, v in state.items():
        heads = (cfg.num_attention_heads if ".self_attn.q_proj." in k else
                 cfg.num_key_value_heads if ".self_attn.k_proj." in k else None)
        if heads:  # per head, rows (d/2, 2) -> (2, d/2)
            state[k] = v.reshape(heads, v.shape[0] // heads // 2, 2, *v.shape[1:]).transpose(1, 2).reshape(v.shape)
    out = build_model(cfg.replace(rope_interleave=False), state, dtype=model.dtype, device=model.device)
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
        return MIT.format(year=year, holder=f"the {name} authors")
    if license == "apache-2.0":
        return APACHE_2_0
    if license == "llama3":
        return (f"{name} is a derivative of Meta Llama 3 and is distributed under the Meta Llama 3\n"
                "Community License Agreement: https://llama.meta.com/llama3/license/\n\n"
                "Put the agreement's full text in this file before publishing, and follow its\n"
                "attribution and acceptable-use terms (\"Built with Meta Llama 3\").\n")
    return (f"{name}: license terms not chosen by nanoseek (--license other).\n\n"
            "Replace this file with the terms under which the weights are distributed before publishing.\n")


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
```

```python
from llama_cpp import Llama
llm = Llama(model_path="{repo}/{gguf_file}")
print(llm.create_chat_completion([{{"role": "user", "content": "What is 12 + 7?"}}]))
```

```python
import nanoseek
model, tok = nanoseek.load("{repo}/{gguf_file}")
# transformers: AutoModelForCausalLM.from_pretrained("{repo}", gguf_file="{gguf_file}")
```'''
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a model (HF directory, training checkpoint or .gguf) for publication:\n"
                    "  hf    config.json + safetensors + tokenizer + generation_config.json + LICENSE + README.md\n"
                    "  gguf  a llama.cpp file (dense llama / qwen2 models), F16 or Q8_0, + README.md + LICENSE\n"
                    "A non-empty --out is refused unless --force; nothing is half-written on failure.\n\n"
                    "examples:\n"
                    "  nanoseek export runs/distill/final --format hf --out release/ --license mit\n"
                    "  nanoseek export runs/distill/final --format gguf --outtype q8_0 --out release-gguf/\n"
                    "  nanoseek export SmolLM2-135M-Instruct.Q4_1.gguf --format hf --out smollm2-hf/")
    s.add_argument("model", metavar="MODEL", help="HF-style directory (or training checkpoint) or .gguf file")
    s.add_argument("--format", choices=FORMATS, default="hf", help="hf (default) or gguf")
    s.add_argument("--out", required=True, help="output directory (gguf: a path ending in .gguf writes just the file)")
    s.add_argument("--license", choices=LICENSES, default=None,
                   help="default: the license recorded in MODEL (GGUF general.license, safetensors metadata), else mit")
    s.add_argument("--name", default=None, help="model name for the card and metadata (default: the --out name)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.add_argument("--outtype", choices=["f16", "q8_0", "f32"], default="f16", help="gguf tensor type (default f16)")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="hf weight dtype (default: the source's torch_dtype, float32 for .gguf)")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    import torch

    from . import load

    src, out = Path(args.model), Path(args.out)
    if not src.exists():
        raise NanoseekError(f"{args.model}: no such file or directory")
    if args.format == "gguf" and out.suffix == ".gguf":
        if out.exists() and not args.force:
            raise NanoseekError(f"{out} exists; use --force to replace it")
    else:
        check_out(out, args.force)
    if args.format == "gguf" and src.is_dir():  # fail before loading the weights
        from .weights.gguf_writer import GGUF_ARCHITECTURES
        from .weights.hf import read_config
        cfg = read_config(src)
        if cfg.model_type not in GGUF_ARCHITECTURES:
            raise NanoseekError(f"{src}: GGUF export supports the dense {' and '.join(GGUF_ARCHITECTURES)} "
                                f"architectures, not {cfg.model_type} ({cfg.architecture}); use --format hf")
    dtype = DTYPES.get(args.dtype or "") or source_dtype(src)
    license = args.license or source_license(src) or "mit"
    print(f"loading {src} ({dtype}) ...", file=sys.stderr)
    model, tok = load(src, dtype=getattr(torch, dtype))
    if tok is None:
        if args.format == "gguf":
            raise NanoseekError(f"{src}: no tokenizer.json; a GGUF file needs the tokenizer")
        print(f"warning: {src} has no tokenizer.json; the export will have none", file=sys.stderr)
    total, active = model.config.num_params()
    print(f"{model.config.architecture}: {total:,} parameters ({active:,} active); writing {args.format} "
          f"({license}) to {out} ...", file=sys.stderr)
    if args.format == "hf":
        path = export_hf(model, tok, out, license=license, force=args.force, name=args.name, source=src)
    else:
        path = export_gguf(model, tok, out, outtype=args.outtype, force=args.force, name=args.name,
                           license=license, source=src)
    shown = out if out.is_dir() else path
    files = sorted(shown.iterdir()) if shown.is_dir() else [shown]
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


# -- license texts ----------------------------------------------------------------------------------
# MIT: the SPDX / OSI text. Apache-2.0: https://www.apache.org/licenses/LICENSE-2.0.txt verbatim
# (md5 3b83ef96387f14655fc854ddc3c6bd57; tests/test_export.py checks it).
MIT = """MIT License

Copyright (c) {year} {holder}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

APACHE_2_0 = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION

   1. Definitions.

      "License" shall mean the terms and conditions for use, reproduction,
      and distribution as defined by Sections 1 through 9 of this document.

      "Licensor" shall mean the copyright owner or entity authorized by
      the copyright owner that is granting the License.

      "Legal Entity" shall mean the union of the acting entity and all
      other entities that control, are controlled by, or are under common
      control with that entity. For the purposes of this definition,
      "control" means (i) the power, direct or indirect, to cause the
      direction or management of such entity, whether by contract or
      otherwise, or (ii) ownership of fifty percent (50%) or more of the
      outstanding shares, or (iii) beneficial ownership of such entity.

      "You" (or "Your") shall mean an individual or Legal Entity
      exercising permissions granted by this License.

      "Source" form shall mean the preferred form for making modifications,
      including but not limited to software source code, documentation
      source, and configuration files.

      "Object" form shall mean any form resulting from mechanical
      transformation or translation of a Source form, including but
      not limited to compiled object code, generated documentation,
      and conversions to other media types.

      "Work" shall mean the work of authorship, whether in Source or
      Object form, made available under the License, as indicated by a
      copyright notice that is included in or attached to the work
      (an example is provided in the Appendix below).

      "Derivative Works" shall mean any work, whether in Source or Object
      form, that is based on (or derived from) the Work and for which the
      editorial revisions, annotations, elaborations, or other modifications
      represent, as a whole, an original work of authorship. For the purposes
      of this License, Derivative Works shall not include works that remain
      separable from, or merely link (or bind by name) to the interfaces of,
      the Work and Derivative Works thereof.

      "Contribution" shall mean any work of authorship, including
      the original version of the Work and any modifications or additions
      to that Work or Derivative Works thereof, that is intentionally
      submitted to Licensor for inclusion in the Work by the copyright owner
      or by an individual or Legal Entity authorized to submit on behalf of
      the copyright owner. For the purposes of this definition, "submitted"
      means any form of electronic, verbal, or written communication sent
      to the Licensor or its representatives, including but not limited to
      communication on electronic mailing lists, source code control systems,
      and issue tracking systems that are managed by, or on behalf of, the
      Licensor for the purpose of discussing and improving the Work, but
      excluding communication that is conspicuously marked or otherwise
      designated in writing by the copyright owner as "Not a Contribution."

      "Contributor" shall mean Licensor and any individual or Legal Entity
      on behalf of whom a Contribution has been received by Licensor and
      subsequently incorporated within the Work.

   2. Grant of Copyright License. Subject to the terms and conditions of
      this License, each Contributor hereby grants to You a perpetual,
      worldwide, non-exclusive, no-charge, royalty-free, irrevocable
      copyright license to reproduce, prepare Derivative Works of,
      publicly display, publicly perform, sublicense, and distribute the
      Work and such Derivative Works in Source or Object form.

   3. Grant of Patent License. Subject to the terms and conditions of
      this License, each Contributor hereby grants to You a perpetual,
      worldwide, non-exclusive, no-charge, royalty-free, irrevocable
      (except as stated in this section) patent license to make, have made,
      use, offer to sell, sell, import, and otherwise transfer the Work,
      where such license applies only to those patent claims licensable
      by such Contributor that are necessarily infringed by their
      Contribution(s) alone or by combination of their Contribution(s)
      with the Work to which such Contribution(s) was submitted. If You
      institute patent litigation against any entity (including a
      cross-claim or counterclaim in a lawsuit) alleging that the Work
      or a Contribution incorporated within the Work constitutes direct
      or contributory patent infringement, then any patent licenses
      granted to You under this License for that Work shall terminate
      as of the date such litigation is filed.

   4. Redistribution. You may reproduce and distribute copies of the
      Work or Derivative Works thereof in any medium, with or without
      modifications, and in Source or Object form, provided that You
      meet the following conditions:

      (a) You must give any other recipients of the Work or
          Derivative Works a copy of this License; and

      (b) You must cause any modified files to carry prominent notices
          stating that You changed the files; and

      (c) You must retain, in the Source form of any Derivative Works
          that You distribute, all copyright, patent, trademark, and
          attribution notices from the Source form of the Work,
          excluding those notices that do not pertain to any part of
          the Derivative Works; and

      (d) If the Work includes a "NOTICE" text file as part of its
          distribution, then any Derivative Works that You distribute must
          include a readable copy of the attribution notices contained
          within such NOTICE file, excluding those notices that do not
          pertain to any part of the Derivative Works, in at least one
          of the following places: within a NOTICE text file distributed
          as part of the Derivative Works; within the Source form or
          documentation, if provided along with the Derivative Works; or,
          within a display generated by the Derivative Works, if and
          wherever such third-party notices normally appear. The contents
          of the NOTICE file are for informational purposes only and
          do not modify the License. You may add Your own attribution
          notices within Derivative Works that You distribute, alongside
          or as an addendum to the NOTICE text from the Work, provided
          that such additional attribution notices cannot be construed
          as modifying the License.

      You may add Your own copyright statement to Your modifications and
      may provide additional or different license terms and conditions
      for use, reproduction, or distribution of Your modifications, or
      for any such Derivative Works as a whole, provided Your use,
      reproduction, and distribution of the Work otherwise complies with
      the conditions stated in this License.

   5. Submission of Contributions. Unless You explicitly state otherwise,
      any Contribution intentionally submitted for inclusion in the Work
      by You to the Licensor shall be under the terms and conditions of
      this License, without any additional terms or conditions.
      Notwithstanding the above, nothing herein shall supersede or modify
      the terms of any separate license agreement you may have executed
      with Licensor regarding such Contributions.

   6. Trademarks. This License does not grant permission to use the trade
      names, trademarks, service marks, or product names of the Licensor,
      except as required for reasonable and customary use in describing the
      origin of the Work and reproducing the content of the NOTICE file.

   7. Disclaimer of Warranty. Unless required by applicable law or
      agreed to in writing, Licensor provides the Work (and each
      Contributor provides its Contributions) on an "AS IS" BASIS,
      WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
      implied, including, without limitation, any warranties or conditions
      of TITLE, NON-INFRINGEMENT, MERCHANTABILITY, or FITNESS FOR A
      PARTICULAR PURPOSE. You are solely responsible for determining the
      appropriateness of using or redistributing the Work and assume any
      risks associated with Your exercise of permissions under this License.

   8. Limitation of Liability. In no event and under no legal theory,
      whether in tort (including negligence), contract, or otherwise,
      unless required by applicable law (such as deliberate and grossly
      negligent acts) or agreed to in writing, shall any Contributor be
      liable to You for damages, including any direct, indirect, special,
      incidental, or consequential damages of any character arising as a
      result of this License or out of the use or inability to use the
      Work (including but not limited to damages for loss of goodwill,
      work stoppage, computer failure or malfunction, or any and all
      other commercial damages or losses), even if such Contributor
      has been advised of the possibility of such damages.

   9. Accepting Warranty or Additional Liability. While redistributing
      the Work or Derivative Works thereof, You may choose to offer,
      and charge a fee for, acceptance of support, warranty, indemnity,
      or other liability obligations and/or rights consistent with this
      License. However, in accepting such obligations, You may act only
      on Your own behalf and on Your sole responsibility, not on behalf
      of any other Contributor, and only if You agree to indemnify,
      defend, and hold each Contributor harmless for any liability
      incurred by, or claims asserted against, such Contributor by reason
      of your accepting any such warranty or additional liability.

   END OF TERMS AND CONDITIONS

   APPENDIX: How to apply the Apache License to your work.

      To apply the Apache License to your work, attach the following
      boilerplate notice, with the fields enclosed by brackets "[]"
      replaced with your own identifying information. (Don't include
      the brackets!)  The text should be enclosed in the appropriate
      comment syntax for the file format. We also recommend that a
      file or class name and description of purpose be included on the
      same "printed page" as the copyright notice for easier
      identification within third-party archives.

   Copyright [yyyy] [name of copyright owner]

   Licensed under the Apache License, Version 2.0 (the "License");
   you may not use this file except in compliance with the License.
   You may obtain a copy of the License at

       http://www.apache.org/licenses/LICENSE-2.0

   Unless required by applicable law or agreed to in writing, software
   distributed under the License is distributed on an "AS IS" BASIS,
   WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
   See the License for the specific language governing permissions and
   limitations under the License.
"""

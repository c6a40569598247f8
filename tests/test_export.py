"""`nanoseek export`: checked against the tools that will read the exported files.

HF: transformers' AutoModelForCausalLM gives the same logits, AutoTokenizer the same chat prompt,
GenerationConfig the R1 sampling defaults; the card's YAML front matter, LICENSE (Apache-2.0 against
the md5 of apache.org's LICENSE-2.0.txt) and safetensors metadata. GGUF: llama.cpp (llama-cpp-python)
loads the file, tokenizes like us and decodes the same greedy tokens; transformers' GGUF loader reads
the same weights. Output directories: refused when non-empty without --force, never half-written.
"""

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek import export
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.infer.simple import generate
from nanoseek.tokenizer import Tokenizer
from nanoseek.weights.gguf_writer import pre_tokenizer_name, write_gguf

from conftest import open_llama_cpp, randomize

APACHE_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"  # https://www.apache.org/licenses/LICENSE-2.0.txt
SAMPLE = ("12 + 7 = 19. The cat's hats aren't red;  你好 <｜User｜>hi<｜Assistant｜><think>\n"
          "2024 apples\n\n\n  4 \n\tend!!")
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "<think>\n2 plus 3.\n</think>\n\n5"}, {"role": "user", "content": "And 4+4?"}],
]
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (dev extra)")


def front_matter(text: str) -> dict:
    import yaml
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def tiny_tokenizer():
    corpus = [f"{a} + {b} = {a + b}. The cat's {a} hats aren't red; 你好 {b}!\n\n  x"
              for a in range(50) for b in range(50)]
    return Tokenizer.train_bpe(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def v3(tok):
    cfg = nanoseek.preset("tiny").replace(num_nextn_predict_layers=0, vocab_size=tok.vocab_size,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return randomize(nanoseek.Transformer(cfg).eval(), std=0.1)


@pytest.fixture(scope="module")
def hf_dir(v3, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-r1"
    export.export_hf(v3, tok, out, license="apache-2.0", name="tiny-r1")
    return out


def llama_model(tok, seed=0, **kw):
    """A tiny dense llama (HF rope layout unless told otherwise) with weights large enough for varied text."""
    cfg = dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=256, rope_theta=10000.0, rope_interleave=False,
               tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return randomize(nanoseek.Transformer(ModelConfig(**{**cfg, **kw})).eval(), seed=seed, std=0.15)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def llama_cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(llm, ids, n):
    llm.reset()
    out = []
    for t in llm.generate(ids, temp=0, top_k=1, repeat_penalty=1.0):
        out.append(t)
        if len(out) == n:
            return out


def parser():
    p = argparse.ArgumentParser(prog="nanoseek")
    export.add_parser(p.add_subparsers(dest="command", required=True))
    return p


# -- Hugging Face directory -----------------------------------------------------------------------
def test_hf_export_has_the_same_logits_in_transformers(hf_dir, v3, tok):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok.encode(tok.apply_chat_template(CONVERSATIONS[1]))
    with torch.no_grad():
        expected = v3(torch.tensor([ids]))
        got = ref(torch.tensor([ids])).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_hf_export_chat_template_in_transformers(hf_dir, tok):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(hf_dir)
    for messages in CONVERSATIONS:
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(messages)


def test_hf_export_card_license_metadata_generation_config(hf_dir, v3, tok):
    from safetensors import safe_open
    from transformers import GenerationConfig

    card = (hf_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"nanoseek", "deepseek_v3", "moe", "mla", "reasoning"} <= set(meta["tags"])
    total, active = v3.config.num_params()
    for text in (f"{total:,}", f"{active:,}", f"{v3.config.kv_cache_bytes_per_token(2):,} bytes per token",
                 "MLA", "8 routed (top-2", "MTP depth | 0", "Not recorded (no `training.json`",
                 "Not recorded (no `eval.json`", "AutoModelForCausalLM.from_pretrained(\"tiny-r1\")",
                 "nanoseek.load(\"tiny-r1\")", "## Intended use and limitations", "temperature 0.6"):
        assert text in card, text
    assert hashlib.md5((hf_dir / "LICENSE").read_bytes()).hexdigest() == APACHE_MD5
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as st:
        md = st.metadata()
    assert md["license"] == "apache-2.0" and md["nanoseek_version"] == nanoseek.__version__
    g = json.loads((hf_dir / "generation_config.json").read_text())
    assert g["do_sample"] is True and g["temperature"] == 0.6 and g["top_p"] == 0.95
    assert g["bos_token_id"] == tok.bos_token_id and g["eos_token_id"] == tok.eos_token_id
    gc = GenerationConfig.from_pretrained(hf_dir)
    assert (gc.temperature, gc.top_p, gc.do_sample, gc.eos_token_id) == (0.6, 0.95, True, tok.eos_token_id)
    assert {p.name for p in hf_dir.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "generation_config.json", "LICENSE", "README.md", export.MARKER}


def test_hf_export_with_mtp_modules_loads_in_transformers(tok, tmp_path):
    """DeepSeek stores MTP as model.layers.{L}.*; transformers skips them and the logits still match."""
    from transformers import AutoModelForCausalLM

    cfg = nanoseek.preset("tiny").replace(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = randomize(nanoseek.Transformer(cfg).eval(), std=0.1)
    export.export_hf(model, tok, tmp_path / "out")
    assert "MTP depth | 1" in (tmp_path / "out" / "README.md").read_text()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = tok.encode(SAMPLE)
    with torch.no_grad():
        got = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - logits(model, ids)).max() <= 1e-4


# What vLLM and SGLang read from a DeepSeek-V3 config.json to build the model (no GPU here, so this
# path is checked up to the config): vllm/model_executor/models/deepseek_v2.py (DeepseekV2MoE,
# DeepseekV2MLAAttention, DeepseekV2DecoderLayer, DeepseekV2Model) and
# python/sglang/srt/models/deepseek_v2.py (DeepseekV2MoE's TopK, MoEGate); both read n_group and
# topk_group as attributes and run MLA's rope on interleaved pairs (is_neox_style=False).
ENGINE_FIELDS = [
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "rope_theta", "rope_scaling", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "routed_scaling_factor", "topk_method",
    "scoring_func", "n_group", "topk_group", "num_nextn_predict_layers", "tie_word_embeddings",
    "bos_token_id", "eos_token_id",
]


def test_hf_config_has_what_vllm_sglang_and_transformers_read(hf_dir, v3):
    from transformers import DeepseekV3Config

    c = json.loads((hf_dir / "config.json").read_text())
    missing = [k for k in ENGINE_FIELDS if k not in c]
    assert not missing
    assert c["architectures"] == ["DeepseekV3ForCausalLM"] and c["model_type"] == "deepseek_v3"
    assert (c["topk_method"], c["scoring_func"], c["hidden_act"], c["moe_layer_freq"]) == \
        ("noaux_tc", "sigmoid", "silu", 1)
    assert c["rope_interleave"] is True  # transformers' DeepseekV3 reads it; vLLM / SGLang assume it
    per_group = c["n_routed_experts"] // c["n_group"]
    assert c["n_routed_experts"] % c["n_group"] == 0 and per_group >= 2  # groups are scored by their top 2
    assert 1 <= c["topk_group"] <= c["n_group"] and c["num_experts_per_tok"] <= c["topk_group"] * per_group
    ref = DeepseekV3Config.from_pretrained(hf_dir)
    for k in ENGINE_FIELDS[2:] + ["rope_interleave"]:
        if k not in ("rope_theta", "rope_scaling", "topk_method", "scoring_func", "moe_layer_freq"):
            assert getattr(ref, k) == c[k], k
    assert ref.rope_parameters["rope_theta"] == c["rope_theta"]


def test_hf_export_puts_deepseek_rope_rows_in_pairs_and_refuses_single_expert_groups(tok, tmp_path):
    """A DeepSeek model built with rope in halves is written interleaved (what the engines run): same logits."""
    from transformers import AutoModelForCausalLM

    cfg = nanoseek.preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=1,
                                          rope_interleave=False)
    torch.manual_seed(1)
    model = randomize(nanoseek.Transformer(cfg).eval(), seed=1, std=0.1)
    export.export_hf(model, tok, tmp_path / "out", license="mit")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_interleave"] is True
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = tok.encode(SAMPLE)
    with torch.no_grad():
        got = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - logits(model, ids)).max() <= 1e-4
    back, _ = nanoseek.load(tmp_path / "out")  # the MTP module's rope rows were reordered too
    with torch.no_grad():
        a, b = model(torch.tensor([ids]), return_mtp=True)[1][0], back(torch.tensor([ids]), return_mtp=True)[1][0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # vLLM / SGLang need >= 2 experts per group: such a config is refused before a model exists
    with pytest.raises(NanoseekError, match="leaves 1 per group"):
        cfg.replace(n_group=8, topk_group=2)


def test_license_texts_and_card_front_matter(v3, tok):
    text = export.license_text("mit", "tiny-r1")
    assert text.startswith("MIT License\n\nCopyright (c) ") and "the tiny-r1 authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert "https://llama.meta.com/llama3/license/" in export.license_text("llama3")
    assert front_matter(export.model_card(v3, tok, "llama3", "x"))["license"] == "llama3"
    meta = front_matter(export.model_card(v3, tok, "other", "x"))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "other", "LICENSE")
    with pytest.raises(NanoseekError, match="unknown license"):
        export.export_hf(v3, tok, "unused", license="gpl")


def test_hf_export_of_interleaved_llama_is_exact_in_transformers(tok, tmp_path):
    """A GQA model built with rope_interleave=True is written in HF's rotate-half layout."""
    from transformers import AutoModelForCausalLM

    model = llama_model(tok, rope_interleave=True, tie_word_embeddings=True)
    export.export_hf(model, tok, tmp_path / "out", license="mit")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = tok.encode(SAMPLE)
    with torch.no_grad():
        got = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - logits(model, ids)).max() <= 1e-4


def test_force_replaces_only_a_previous_export_or_an_empty_directory(v3, tok, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(NanoseekError, match="not empty.*--force"):
        export.export_hf(v3, tok, out, license="mit")
    args = parser().parse_args(["export", str(tmp_path), "--out", str(out)])
    with pytest.raises(NanoseekError, match="not empty.*--force"):
        args.func(args)
    with pytest.raises(NanoseekError, match="not a previous nanoseek export"):  # an arbitrary tree, even forced
        export.export_hf(v3, tok, out, license="mit", force=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]  # no temp directories left
    (out / "notes.txt").unlink()
    export.export_hf(v3, tok, out, license="mit", force=True)  # an empty directory
    written = sorted(p.name for p in out.iterdir())
    export.export_gguf(v3, tok, out, license="apache-2.0", force=True)  # a previous export, replaced
    assert (out / "config.json").exists() is False and front_matter((out / "README.md").read_text())["license"] == \
        "apache-2.0"
    export.export_hf(v3, tok, out, license="mit", force=True)
    assert sorted(p.name for p in out.iterdir()) == written
    (out / "mine.txt").write_text("added after the export")
    with pytest.raises(NanoseekError, match="did not write.*mine.txt"):
        export.export_hf(v3, tok, out, license="mit", force=True)
    assert (out / "mine.txt").read_text() == "added after the export"
    (tmp_path / "x.gguf").write_text("not a gguf file")
    with pytest.raises(NanoseekError, match="not a GGUF file"):
        export.export_gguf(v3, tok, tmp_path / "x.gguf", force=True)
    assert (tmp_path / "x.gguf").read_text() == "not a gguf file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "x.gguf"]


def test_exports_are_world_readable_whatever_the_umask(v3, tok, tmp_path):
    import os
    import stat
    old = os.umask(0o077)
    try:
        export.export_hf(v3, tok, tmp_path / "hf", license="mit")
        export.export_gguf(v3, tok, tmp_path / "gguf", license="mit")
    finally:
        os.umask(old)
    for d in (tmp_path / "hf", tmp_path / "gguf"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        files = list(d.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files)
        listed = json.loads((d / export.MARKER).read_text())["files"]
        assert sorted(listed) == sorted(f.name for f in files if f.name != export.MARKER)


def test_failed_export_leaves_nothing_behind(v3, tok, tmp_path, monkeypatch):
    out = tmp_path / "release"
    export.export_hf(v3, tok, out, license="apache-2.0")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **kw):
        raise RuntimeError("disk full")
    monkeypatch.setattr(export, "model_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_hf(v3, tok, out, license="mit", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_hf(v3, tok, tmp_path / "new", license="mit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release"]


def test_cli_out_dot_and_out_gguf_through_subprocess(hf_dir, tmp_path):
    """`--out .` is refused in one line and leaves nothing; `--out NAME.gguf` alone writes a GGUF file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("x")
    for argv in (["--out", "."], ["--out", ".", "--force"], ["--out", "..", "--force"],
                 ["--out", "m.gguf", "--format", "hf"]):
        r = subprocess.run([sys.executable, "-m", "nanoseek", "export", str(hf_dir), *argv], cwd=work,
                           capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    r = subprocess.run([sys.executable, "-m", "nanoseek", "export", str(hf_dir), "--out", "m.gguf"], cwd=work,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (work / "m.gguf").read_bytes()[:4] == b"GGUF" and sorted(p.name for p in work.iterdir()) == \
        ["m.gguf", "mine.txt"]


def test_cli_reads_training_and_eval_json_and_keeps_the_license(hf_dir, tmp_path, capsys):
    src = tmp_path / "run" / "final"
    nanoseek.save(*nanoseek.load(hf_dir), src, metadata={"license": "apache-2.0"})
    (src.parent / "training.json").write_text(json.dumps(
        {"data": "countdown + arithmetic (R1-Zero)", "steps": 1234, "stage": "grpo", "lr": 3e-4}))
    (src / "eval.json").write_text(json.dumps({"arithmetic": {"pass@1": 0.8125, "maj@8": 0.9},
                                               "countdown": {"pass@1": 0.5}}))
    args = parser().parse_args(["export", str(src), "--out", str(tmp_path / "pub"), "--name", "r1-tiny"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    card = (tmp_path / "pub" / "README.md").read_text()
    assert front_matter(card)["license"] == "apache-2.0"  # recorded in the source's safetensors metadata
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# r1-tiny"
    for text in ("| data | countdown + arithmetic (R1-Zero) |", "| steps | 1234 |", "| lr | 0.0003 |",
                 "| task | pass@1 | maj@8 |", "| arithmetic | 0.8125 | 0.9 |", "| countdown | 0.5 |  |"):
        assert text in card, text


def test_cli_help_and_bad_input(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["export", "--help"])
    assert e.value.code == 0 and "nanoseek export" in capsys.readouterr().out
    args = parser().parse_args(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    with pytest.raises(NanoseekError, match="no such file"):
        args.func(args)
    args = parser().parse_args(["export", str(hf_dir), "--format", "hf", "--out", str(tmp_path / "o.gguf")])
    with pytest.raises(NanoseekError, match="ends in .gguf but --format is hf"):
        args.func(args)
    assert not (tmp_path / "o.gguf").exists()
    from nanoseek import cli
    choices = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "export" not in choices:
        pytest.skip("export is not wired into nanoseek/cli.py yet")
    r = subprocess.run([sys.executable, "-m", "nanoseek", "export", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--format" in r.stdout
    for what in ("deepseek_v3", "vLLM", "SGLang", "deepseek2", "MTP", "Q8_0", "attn_k_b"):
        assert what in r.stdout, what
    r = subprocess.run([sys.executable, "-m", "nanoseek", "export", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# -- GGUF -------------------------------------------------------------------------------------------
def test_gguf_refuses_unknown_pre_tokenizers(tok):
    from tokenizers import pre_tokenizers
    other = Tokenizer.train_bpe(["hello world"] * 10, vocab_size=300)
    other.tk.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(NanoseekError, match="pre-tokenizer"):
        pre_tokenizer_name(other.tk)
    assert pre_tokenizer_name(tok.tk) == "gpt-2"


def test_gguf_failure_midway_leaves_no_file(tok, tmp_path, monkeypatch):
    from nanoseek.weights import gguf_writer

    def broken(*a, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(gguf_writer, "_add_tensor", broken)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(llama_model(tok), tok, tmp_path / "m.gguf")
    with pytest.raises(OSError, match="disk full"):
        export.export_gguf(llama_model(tok), tok, tmp_path / "pub")
    assert not any(tmp_path.iterdir())


@needs_llama_cpp
def test_gguf_f16_greedy_and_tokens_equal_llama_cpp(tok, tmp_path):
    model = llama_model(tok)
    path = export.export_gguf(model, tok, tmp_path / "tiny.gguf", outtype="f16")
    llm = open_llama_cpp(path, n_threads=2, n_ctx=256, logits_all=True)
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == tok.encode(SAMPLE)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "12 + 7 = ?"}]))
    ours = generate(model, [prompt], max_new_tokens=32)[0]
    assert len(ours) == 32 and len(set(ours)) >= 8  # varied text, not one repeated token
    assert llama_cpp_greedy(llm, prompt, 32) == ours
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template


VARIANTS = {  # (architecture and config changes, outtype, max |llama.cpp - ours| on the original weights)
    "llama_tied_interleaved_llama3rope": (dict(tie_word_embeddings=True, rope_interleave=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), "f16", 0.03),
    "llama_bias_head_dim_linear_rope": (dict(attention_bias=True, mlp_bias=True, head_dim=32,
                                             rope_scaling={"rope_type": "linear", "factor": 4.0}), "f16", 0.03),
    "llama_q8_0": (dict(), "q8_0", 0.5),
    "qwen2": (dict(model_type="qwen2", num_key_value_heads=1), "f16", 0.03),
    "qwen2_interleaved_tied": (dict(model_type="qwen2", rope_interleave=True, tie_word_embeddings=True), "f32", 0.01),
}


@needs_llama_cpp
@pytest.mark.parametrize("case", list(VARIANTS))
def test_gguf_variants_logits_in_llama_cpp_and_round_trip(case, tok, tmp_path):
    changes, outtype, tol = VARIANTS[case]
    model = llama_model(tok, seed=1, **changes)
    out = export.export_gguf(model, tok, tmp_path / "pub", outtype=outtype, license="apache-2.0", name="Tiny X")
    assert out.name == f"Tiny-X-{outtype.upper()}.gguf" and out.is_file()
    assert {p.name for p in (tmp_path / "pub").iterdir()} == {out.name, "README.md", "LICENSE", export.MARKER}
    meta = front_matter((tmp_path / "pub" / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and "gguf" in meta["tags"] and "library_name" not in meta
    ids = tok.encode(SAMPLE)
    llm = open_llama_cpp(out, n_threads=2, n_ctx=256, logits_all=True)
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == ids
    theirs = llama_cpp_logits(llm, ids)
    assert np.abs(theirs - logits(model, ids)).max() <= tol
    assert llm.metadata["general.license"] == "apache-2.0"
    # nanoseek's own GGUF reader gets the written (rounded) weights back: llama.cpp agrees more closely.
    # (It does not rebuild llama3 rope scaling from rope_freqs.weight; llama.cpp, above, uses it.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back, tok2 = nanoseek.load(out)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    if model.config.rope_type != "llama3":  # Q8_0: llama.cpp also rounds the activations to 8 bits
        assert np.abs(theirs - logits(back, ids)).max() <= (tol if outtype == "q8_0" else 0.02)
    assert tok2.encode(SAMPLE) == ids and tok2.chat_template == tok.chat_template


@needs_llama_cpp
def test_gguf_loads_in_transformers(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = llama_model(tok)
    out = export.export_gguf(model, tok, tmp_path / "pub", outtype="f16")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "pub", gguf_file=out.name, dtype=torch.float32).eval()
    back, _ = nanoseek.load(out)
    ids = tok.encode(SAMPLE)
    with torch.no_grad():
        got = ref(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - logits(back, ids)).max() <= 1e-4
    assert np.abs(got - logits(model, ids)).max() <= 0.03


@pytest.mark.slow
@needs_llama_cpp
def test_smollm2_gguf_export_greedy_equals_llama_cpp(gguf_path, tmp_path, capsys):
    """The real SmolLM2-135M-Instruct: export via the CLI to F16; llama.cpp decodes our greedy tokens."""
    args = parser().parse_args(["export", str(gguf_path), "--format", "gguf", "--out", str(tmp_path / "s.gguf")])
    assert args.func(args) == 0
    model, tok = nanoseek.load(gguf_path)
    llm = open_llama_cpp(tmp_path / "s.gguf", n_threads=2, n_ctx=512)
    orig = open_llama_cpp(gguf_path, vocab_only=True)
    text = "What is 12 + 7?\n\n4 apples, 3 pears; it's 2024.  <|im_start|>Done"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text) == \
        orig.tokenize(text.encode(), add_bos=False, special=True)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert llm.metadata["general.license"] == "apache-2.0"  # carried over from the source file
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    ours = generate(model, [prompt], max_new_tokens=32)[0]
    assert "Paris" in tok.decode(ours)
    assert llama_cpp_greedy(llm, prompt, 32) == ours

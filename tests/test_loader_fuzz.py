"""Property-based fuzz of the loaders: config.json, tokenizer_config.json, the safetensors index, GGUF metadata.

Every case either loads or is refused with NanoseekError, which `nanoseek info` turns into one line
and exit code 2; no other exception (a traceback) is allowed. Hostile values: zero, negative, huge
(10^8 layers, 2^63), wrong types, NaN, lists where numbers belong, missing keys. Bounded for
`make test` (NANOSEEK_FUZZ_EXAMPLES raises the count; no deadline, no example database).
"""

import json
import os
import warnings

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoseek
from nanoseek.cli import main as cli_main

from test_model import tiny_v3
from test_serve_common import tokenizer

EXAMPLES = int(os.environ.get("NANOSEEK_FUZZ_EXAMPLES", 80))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

hostile = (st.none() | st.booleans()
           | st.sampled_from([0, -1, 1, 2, 3, 4, 7, 8, 16, 32, 97, 10**8, 2**31, 2**63, -2**63, 10**400,
                              0.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"), "", "silu", "yarn", "noaux_tc"])
           | st.integers(-4, 70) | st.floats() | st.text(max_size=8)
           | st.lists(st.integers(-1, 200), max_size=3)
           | st.dictionaries(st.sampled_from(["type", "rope_type", "factor", "beta_fast", "beta_slow", "mscale",
                                              "original_max_position_embeddings", "content", "weight_block_size",
                                              "low_freq_factor", "high_freq_factor", "name", "template"]),
                             st.integers(-2, 5000) | st.floats() | st.text(max_size=5)
                             | st.sampled_from(["yarn", "linear", "llama3", "default"]), max_size=4))
EXTRA_KEYS = ["rope_scaling", "rope_parameters", "text_config", "quantization_config", "head_dim", "dtype",
              "num_key_value_heads", "q_lora_rank", "rope_interleave"]


def mutate(draw, doc: dict, extra_keys=()) -> object:
    if draw(st.integers(0, 19)) == 0:                   # now and then, not an object at all
        return draw(hostile)
    doc = dict(doc)
    for key in draw(st.lists(st.sampled_from(sorted(doc) + list(extra_keys)), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()) and key in doc:
            del doc[key]
        else:
            doc[key] = draw(hostile)
    return doc


def info(path, capsys) -> int:
    """`nanoseek info --model PATH`: 0, or 2 with one 'nanoseek: error:' line; anything else raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli_main(["info", "--model", str(path), "--json"])
    err = capsys.readouterr().err
    assert code in (0, 2)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("nanoseek: error: "), err
    return code


# -- HF directories -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "m"
    nanoseek.save(tiny_v3(), tokenizer(), d)
    return d


@st.composite
def directories(draw, config, tok_config):
    files = {"config.json": mutate(draw, config, EXTRA_KEYS)}
    if draw(st.booleans()):
        files["tokenizer_config.json"] = mutate(draw, tok_config, ["chat_template", "add_bos_token"])
    if draw(st.integers(0, 3)) == 0:
        files["model.safetensors.index.json"] = draw(
            hostile | st.fixed_dictionaries({"weight_map": st.dictionaries(
                st.text(max_size=5), hostile | st.sampled_from(["model.safetensors", "../model.safetensors",
                                                                  "/dev/zero", "x.safetensors"]), max_size=3)}))
    return files


def test_fuzz_hf_directory(model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert info(model_dir, capsys) == 0                 # the unmutated directory loads
    codes = []

    @SETTINGS
    @given(files=directories(config, tok_config))
    def check(files):
        for name in ("config.json", "tokenizer_config.json", "model.safetensors.index.json"):
            (model_dir / name).unlink(missing_ok=True)
        (model_dir / "config.json").write_text(json.dumps(config))
        (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
        for name, doc in files.items():
            (model_dir / name).write_text(json.dumps(doc))
        codes.append(info(model_dir, capsys))
    check()
    assert 2 in codes                                    # the fuzz did reach the refusals


# -- GGUF files -------------------------------------------------------------------------------------------
T = gguf.GGUFValueType
GGUF_VALUES = st.sampled_from([
    (T.UINT32, 0), (T.UINT32, 1), (T.UINT32, 2), (T.UINT32, 4), (T.UINT32, 8), (T.UINT32, 32), (T.UINT32, 64),
    (T.UINT32, 10**8), (T.UINT32, 2**32 - 1), (T.INT32, -1), (T.UINT64, 2**63), (T.FLOAT32, 0.0),
    (T.FLOAT32, -1.0), (T.FLOAT32, float("nan")), (T.FLOAT32, float("inf")), (T.FLOAT32, 1e-5),
    (T.BOOL, True), (T.STRING, ""), (T.STRING, "gpt2"), (T.STRING, "llama"), (T.STRING, "{{ 1 }}"),
    (T.ARRAY, [1, 2]), (T.ARRAY, ["a", "b"]), (T.ARRAY, ["a b", "a"]), (T.ARRAY, ["ab"])])   # gguf writes no []
GGUF_KEYS = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "llama.attention.key_length", "llama.vocab_size", "llama.rope.scaling.type",
             "llama.rope.scaling.factor", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
             "tokenizer.ggml.pre", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token"]


def tiny_llama_gguf_metadata() -> dict:
    return {"llama.block_count": (T.UINT32, 1), "llama.context_length": (T.UINT32, 64),
            "llama.embedding_length": (T.UINT32, 32), "llama.feed_forward_length": (T.UINT32, 48),
            "llama.attention.head_count": (T.UINT32, 4), "llama.attention.head_count_kv": (T.UINT32, 2),
            "llama.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-5), "llama.rope.freq_base": (T.FLOAT32, 1e4),
            "tokenizer.ggml.model": (T.STRING, "gpt2"), "tokenizer.ggml.tokens": (T.ARRAY, ["a", "b", "ab"] + [
                f"t{i}" for i in range(7)]), "tokenizer.ggml.merges": (T.ARRAY, ["a b"]),
            "tokenizer.ggml.bos_token_id": (T.UINT32, 0), "tokenizer.ggml.eos_token_id": (T.UINT32, 1)}


def tiny_llama_gguf_tensors(hidden=32, heads=4, kv_heads=2, ffn=48, vocab=10) -> dict:
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (heads * hd, hidden), "blk.0.attn_k.weight": (kv_heads * hd, hidden),
              "blk.0.attn_v.weight": (kv_heads * hd, hidden), "blk.0.attn_output.weight": (hidden, heads * hd),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    return {k: torch.randn(s, generator=g).numpy() for k, s in shapes.items()}


def write_gguf(path, arch: str, meta: dict, tensors: dict):
    w = gguf.GGUFWriter(str(path), arch)
    for key, (vtype, value) in meta.items():
        if vtype == T.ARRAY:
            sub = T.STRING if value and isinstance(value[0], str) else T.UINT32
            w.add_key_value(key, value, vtype, sub_type=sub)
        else:
            w.add_key_value(key, value, vtype)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@st.composite
def gguf_cases(draw):
    meta = tiny_llama_gguf_metadata()
    for key in draw(st.lists(st.sampled_from(GGUF_KEYS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()) and key in meta:
            del meta[key]
        else:
            meta[key] = draw(GGUF_VALUES)
    arch = draw(st.sampled_from(["llama"] * 9 + ["qwen2", "gpt2"]))
    return arch, meta


def test_fuzz_gguf_metadata(tmp_path, capsys):
    tensors = tiny_llama_gguf_tensors()
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", tiny_llama_gguf_metadata(), tensors)
    assert info(path, capsys) == 0                      # the unmutated file loads
    codes = []

    @SETTINGS
    @given(case=gguf_cases())
    def check(case):
        arch, meta = case
        path.unlink(missing_ok=True)
        write_gguf(path, arch, meta, tensors)
        codes.append(info(path, capsys))
    check()
    assert 2 in codes


@pytest.mark.parametrize("key, value, words", [
    ("llama.block_count", (T.UINT32, 10**8), "llama.block_count = '100000000' is not a count in [1, 4096]"),
    ("llama.attention.head_count", (T.UINT32, 0), "llama.attention.head_count = '0' is not a count"),
    ("llama.attention.layer_norm_rms_epsilon", (T.FLOAT32, float("nan")), "is not a positive number"),
    ("tokenizer.ggml.bos_token_id", (T.STRING, "x"), "tokenizer.ggml.bos_token_id = 'x' is not an integer"),
])
def test_absurd_gguf_metadata_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, key, value, words):
    import nanoseek.weights.gguf as g
    meta = tiny_llama_gguf_metadata() | {key: value}
    write_gguf(tmp_path / "m.gguf", "llama", meta, tiny_llama_gguf_tensors())
    monkeypatch.setattr(g, "_dequantize", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(nanoseek.NanoseekError, match=words.replace("[", r"\[").replace("]", r"\]")):
        nanoseek.load(tmp_path / "m.gguf")

"""GGUF reading (nanoseek/weights/gguf.py) against transformers' GGUF loader and llama.cpp.

Real model: SmolLM2-135M-Instruct Q4_1 (llama, tied embeddings, rope-permuted q/k, Q4_1 + Q8_0 + F32).
Synthetic: a tiny qwen2 file written here (q/k/v biases, no permutation, F32/F16/BF16/Q4_0/Q4_1/Q8_0,
SmolLM2's vocabulary split with the qwen2 regex, plus a user-defined `<think>` and a DeepSeek-style
control token `<｜User｜>`). Each file is read once per module.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import open_llama_cpp
from nanoseek.errors import NanoseekError
from nanoseek.weights.gguf import read_gguf

gguf = pytest.importorskip("gguf")

SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。我喜欢编程和机器学习。",
    "こんにちは、世界！カタカナとひらがなと漢字。",
    "Привет, мир! Как у тебя дела?",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 😀🎉👍🏽 and flags 🇫🇷 ok",
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\n",
    "12345 + 678 = 13023, pi=3.14159, year 2024",
    "  leading and trailing spaces   ",
    "line one\r\nline two\n\n\nthree     spaces",
    "It's they'll I'M we'd ÄÖÜ ß café naïve x\u00a0y",
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
]
# Whitespace in front of a digit: SmolLM2's own tokenizer and llama.cpp split the digit off first
# (pre "smollm"); transformers' GGUF loader does not know "smollm" and uses the plain GPT-2 split.
DIGIT_AFTER_SPACE = ["a  1 b   22 c\t3", "list:\n\n1. one\n\n2. two", "x =  42"]


@pytest.fixture(scope="module")
def ours(gguf_path):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name,
        quantization_config=transformers.GgufConfig(dequantize=True))
    return model


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def llama_cpp_ids(path, texts):
    pytest.importorskip("llama_cpp")
    vocab = open_llama_cpp(path, vocab_only=True)
    try:
        return [vocab.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    finally:
        vocab.close()


def assert_same_tensors(ours_tensors, hf_state, tied):
    expected = set(hf_state) - ({"lm_head.weight"} if tied else set())
    assert set(ours_tensors) == expected
    for name, t in ours_tensors.items():
        ref = hf_state[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        torch.testing.assert_close(t, ref.float(), rtol=0, atol=1e-6, msg=name)


# -- SmolLM2 (llama) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(ours, hf_model):
    assert_same_tensors(ours.tensors, hf_model.state_dict(), tied=True)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(ours, hf_model):
    c, ref = ours.config, hf_model.config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "hidden_act"]:
        assert c[key] == getattr(ref, key), key
    assert c["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert c["rms_norm_eps"] == 1e-5  # the float32 in the file, written back as the original decimal
    assert c["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert c["tie_word_embeddings"] and "lm_head.weight" not in ours.tensors


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(ours, hf_tok):
    for text in SAMPLES:
        ids = ours.tokenizer.encode(text).ids
        assert ids == hf_tok.encode(text), text  # add_special_tokens=True on both sides
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids) == text
        assert ours.tokenizer.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.tokenizer.encode("<|im_start|>").ids == [1]
    assert ours.tokenizer.get_vocab_size() == len(hf_tok) == ours.config["vocab_size"]


@pytest.mark.slow
def test_smollm2_bos_and_special_tokens_match_transformers(ours, hf_tok):
    # add_bos_token is False in the file: neither transformers nor llama.cpp prepend <|im_start|> (id 1)
    assert ours.config["add_bos_token"] is False and hf_tok.add_bos_token is False
    assert hf_tok.encode("hi") == ours.tokenizer.encode("hi").ids == [6004]
    assert ours.special_tokens == {"bos_token": hf_tok.bos_token, "eos_token": hf_tok.eos_token,
                                   "pad_token": hf_tok.pad_token, "unk_token": hf_tok.unk_token}
    assert ours.special_tokens["eos_token"] == "<|im_end|>"
    assert ours.chat_template == hf_tok.chat_template and "<|im_start|>" in ours.chat_template


@pytest.mark.slow
def test_smollm2_tokenizer_follows_llama_cpp_where_transformers_differs(ours, hf_tok, gguf_path):
    ref = llama_cpp_ids(gguf_path, SAMPLES + DIGIT_AFTER_SPACE)
    assert [ours.tokenizer.encode(t).ids for t in SAMPLES + DIGIT_AFTER_SPACE] == ref
    for text in DIGIT_AFTER_SPACE:  # the other side: transformers keeps " 1" together, then splits it
        ids = ours.tokenizer.encode(text).ids
        assert hf_tok.encode(text) != ids, f"transformers now splits digits like llama.cpp: {text!r}; update docs"
        assert hf_tok.decode(ids) == ours.tokenizer.decode(ids) == text


# -- a synthetic qwen2 file ---------------------------------------------------------------------------
QWEN2 = dict(hidden=64, ffn=96, layers=2, heads=4, kv_heads=2)
QTYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"]


def write_qwen2(path, vocab_json, seed=0):
    """A tiny qwen2 GGUF written with gguf.GGUFWriter: every storage type, biases on q/k/v."""
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    tokens = sorted(vocab_json["model"]["vocab"], key=vocab_json["model"]["vocab"].get)
    control = {t["content"] for t in vocab_json["added_tokens"] if t["special"]}
    types = [3 if t in control else 1 for t in tokens] + [4, 3]  # + a user-defined and a control token
    tokens += ["<think>", "<｜User｜>"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab_json["model"]["merges"]]
    h, f, nh, nkv = QWEN2["hidden"], QWEN2["ffn"], QWEN2["heads"], QWEN2["kv_heads"]
    hd = h // nh
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(QWEN2["layers"]); w.add_context_length(256); w.add_embedding_length(h)
    w.add_feed_forward_length(f); w.add_head_count(nh); w.add_head_count_kv(nkv)
    w.add_rope_freq_base(1000000.0); w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("qwen2"); w.add_token_list(tokens)
    w.add_token_types(types); w.add_token_merges(merges)
    w.add_bos_token_id(0); w.add_eos_token_id(2); w.add_pad_token_id(0); w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    shapes = {"token_embd.weight": (len(tokens), h), "output_norm.weight": (h,), "output.weight": (len(tokens), h)}
    for i in range(QWEN2["layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.attn_q.weight": (nh * hd, h), f"blk.{i}.attn_q.bias": (nh * hd,),
                       f"blk.{i}.attn_k.weight": (nkv * hd, h), f"blk.{i}.attn_k.bias": (nkv * hd,),
                       f"blk.{i}.attn_v.weight": (nkv * hd, h), f"blk.{i}.attn_v.bias": (nkv * hd,),
                       f"blk.{i}.attn_output.weight": (h, nh * hd), f"blk.{i}.ffn_gate.weight": (f, h),
                       f"blk.{i}.ffn_up.weight": (f, h), f"blk.{i}.ffn_down.weight": (h, f)})
    matrices = [n for n, s in shapes.items() if len(s) == 2]
    for n, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        kind = Q[QTYPES[matrices.index(n) % len(QTYPES)]] if len(shape) == 2 else Q.F32
        if kind == Q.F32:
            w.add_tensor(n, x)
        elif kind == Q.F16:
            w.add_tensor(n, x.astype(np.float16))
        else:
            w.add_tensor(n, gguf.quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.fixture(scope="module")
def qwen2_file(ours, tmp_path_factory):
    return write_qwen2(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf", json.loads(ours.tokenizer.to_str()))


@pytest.fixture(scope="module")
def qwen2_ours(qwen2_file):
    return read_gguf(qwen2_file)


@pytest.mark.slow
def test_qwen2_tensors_and_config_equal_transformers(qwen2_file, qwen2_ours):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        qwen2_file.parent, gguf_file=qwen2_file.name, quantization_config=transformers.GgufConfig(dequantize=True))
    assert_same_tensors(qwen2_ours.tensors, model.state_dict(), tied=False)
    c, ref = qwen2_ours.config, model.config
    assert c["model_type"] == "qwen2" and c["architectures"] == ["Qwen2ForCausalLM"]
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"]:
        assert c[key] == getattr(ref, key), key
    assert c["rms_norm_eps"] == 1e-6 == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert c["rope_theta"] == ref.rope_parameters["rope_theta"] == 1e6
    assert c["head_dim"] == QWEN2["hidden"] // QWEN2["heads"] and not c["tie_word_embeddings"]
    assert "model.layers.1.self_attn.k_proj.bias" in qwen2_ours.tensors


@pytest.mark.slow
def test_qwen2_tokenizer_matches_transformers_and_llama_cpp(qwen2_file, qwen2_ours):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(qwen2_file.parent, gguf_file=qwen2_file.name)
    tk = qwen2_ours.tokenizer
    texts = SAMPLES + DIGIT_AFTER_SPACE + ["<think>\nhmm</think> 7"]
    for text in texts:  # the qwen2 split regex: transformers and llama.cpp agree here
        ids = tk.encode(text).ids
        assert ids == hf.encode(text), text
        assert tk.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text
    think = tk.encode("<think>").ids
    assert think == [len(json.loads(tk.to_str())["model"]["vocab"]) - 2]
    assert tk.decode(think, skip_special_tokens=True) == "<think>"  # user-defined: kept, not special
    # A control token outside the byte alphabet (DeepSeek's `<｜User｜>`) stays one token, as in llama.cpp;
    # transformers drops such tokens from its added tokens and cuts them into bytes.
    texts.append("<｜User｜>2+3?")
    assert [tk.encode(t).ids for t in texts] == llama_cpp_ids(qwen2_file, texts)
    assert tk.encode("<｜User｜>").ids == [tk.get_vocab_size() - 1]
    assert tk.decode(tk.encode("<｜User｜>2+3?").ids, skip_special_tokens=False) == "<｜User｜>2+3?"


# -- a synthetic llama file: the rope permutation, biases, no vocabulary ------------------------------
def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (with n_head already the kv head count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama(path, hf, heads, kv_heads, tokenizer_model=None):
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for hf_part, g_part in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                            ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                            ("mlp.down_proj", "ffn_down"),
                            ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
        for kind in ("weight", "bias"):
            names[f"model.layers.0.{hf_part}.{kind}"] = f"blk.0.{g_part}.{kind}"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(hf["model.norm.weight"].shape[0])
    w.add_feed_forward_length(hf["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_head_count(heads); w.add_head_count_kv(kv_heads); w.add_layer_norm_rms_eps(1e-5)
    if tokenizer_model:
        w.add_tokenizer_model(tokenizer_model); w.add_token_list(["<s>", "a", "b"])
    for name, t in hf.items():
        x = t.numpy()
        if ".q_proj." in name:
            x = llama_cpp_permute(x, heads)
        elif ".k_proj." in name:
            x = llama_cpp_permute(x, kv_heads)
        w.add_tensor(names[name], np.ascontiguousarray(x))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


def tiny_llama_tensors(hidden=32, heads=4, kv_heads=2, ffn=48, vocab=10):
    g = torch.Generator().manual_seed(0)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden),
              "model.layers.0.input_layernorm.weight": (hidden,),
              "model.layers.0.post_attention_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (heads * hd, hidden),
              "model.layers.0.self_attn.q_proj.bias": (heads * hd,),
              "model.layers.0.self_attn.k_proj.weight": (kv_heads * hd, hidden),
              "model.layers.0.self_attn.k_proj.bias": (kv_heads * hd,),
              "model.layers.0.self_attn.v_proj.weight": (kv_heads * hd, hidden),
              "model.layers.0.self_attn.v_proj.bias": (kv_heads * hd,),
              "model.layers.0.self_attn.o_proj.weight": (hidden, heads * hd),
              "model.layers.0.self_attn.o_proj.bias": (hidden,),
              "model.layers.0.mlp.gate_proj.weight": (ffn, hidden),
              "model.layers.0.mlp.up_proj.weight": (ffn, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, ffn)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_llama_rope_permutation_is_undone_exactly(tmp_path):
    hf = tiny_llama_tensors()
    with pytest.warns(UserWarning, match="no vocabulary"):
        g = read_gguf(write_tiny_llama(tmp_path / "tiny-llama.gguf", hf, heads=4, kv_heads=2))
    assert set(g.tensors) == set(hf)
    for name, t in hf.items():
        assert torch.equal(g.tensors[name], t), name
    c = g.config
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 8)
    assert c["attention_bias"] and not c["mlp_bias"] and not c["tie_word_embeddings"]
    assert g.tokenizer is None


def test_unsupported_tokenizer_model(tmp_path):
    p = write_tiny_llama(tmp_path / "spm.gguf", tiny_llama_tensors(), heads=4, kv_heads=2, tokenizer_model="llama")
    with pytest.raises(NanoseekError, match="tokenizer model 'llama' is not supported") as e:
        read_gguf(p)
    assert str(p) in str(e.value)


# -- errors -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(NanoseekError, match="no such file") as e:
        read_gguf(tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a model\n", b"PK\x03\x04zipfile", b"GG"])
def test_not_a_gguf_file(tmp_path, content):
    p = tmp_path / "junk.gguf"
    p.write_bytes(content)
    with pytest.raises(NanoseekError, match="not a GGUF file") as e:
        read_gguf(p)
    assert str(p) in str(e.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(NanoseekError, match="not a file"):
        read_gguf(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.5, 1e-5])  # cut in the tensor data, in the metadata
def test_truncated_real_file(gguf_path, tmp_path, fraction):
    p = tmp_path / "half.gguf"
    size = gguf_path.stat().st_size
    with open(gguf_path, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(max(8, int(size * fraction))))
    with pytest.raises(NanoseekError, match="truncated or corrupt") as e:
        read_gguf(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(NanoseekError, match="unsupported GGUF architecture 'gpt2'") as e:
        read_gguf(p)
    assert str(p) in str(e.value)
    truncated = tmp_path / "short.gguf"
    shutil.copyfile(p, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(p.stat().st_size - 16)
    with pytest.raises(NanoseekError, match="truncated or corrupt"):
        read_gguf(truncated)

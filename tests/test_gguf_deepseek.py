"""DeepSeek-V3 / V2 as llama.cpp's `deepseek2` GGUF: checked against llama.cpp itself (llama-cpp-python).

Tiny random configs (with and without q_lora_rank, grouped routing, dense first layers, tied
embeddings, YaRN, rope rows in halves, a softmax-gated V2) and a tiny model trained here for a few
dozen steps are written as F32, F16 and Q8_0 files. llama.cpp must tokenize like nanoseek, give
logits within 0.5% of the logit scale from F32 files (measured 0.1%) and within 2% at 95% of the
positions from F16 files (see the test for why not all), decode the same 32 greedy tokens from F16 (a near tie within the logit tolerance may go
to our second choice: `assert_same_greedy`),
mostly the same from Q8_0, and nanoseek must load the file back
(`nanoseek.load("x.gguf")`) with the weights written: the same logits as the model itself (F32)
or as the model with its matrices rounded to float16 (F16), to 1e-5 of the logit scale.
"""

import copy

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek.errors import NanoseekError
from nanoseek.infer.simple import generate
from nanoseek.weights.gguf_writer import write_gguf

from conftest import open_llama_cpp, randomize
from test_export import SAMPLE, llama_cpp_greedy, llama_cpp_logits, logits, needs_llama_cpp, tok  # noqa: F401

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
CASES = {  # changes to the "tiny" preset (DeepSeek-V3: q_lora_rank 64, 8 experts in 2 groups, 1 dense layer, MTP 1)
    "v3_q_lora_groups_mtp": dict(),
    "v3_no_q_lora_two_dense_tied": dict(q_lora_rank=None, first_k_dense_replace=2, tie_word_embeddings=True),
    "v3_four_groups_yarn": dict(n_group=4, topk_group=2, num_experts_per_tok=3, max_position_embeddings=16384,
                                rope_scaling=YARN),
    "v3_rope_in_halves": dict(rope_interleave=False, num_nextn_predict_layers=0),
    "v2_softmax_yarn": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1,
                            topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                            num_nextn_predict_layers=0, max_position_embeddings=16384,
                            rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
}


def deepseek(tok, seed=0, **changes):
    cfg = nanoseek.preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, **changes)
    torch.manual_seed(seed)
    return randomize(nanoseek.Transformer(cfg).eval(), seed=seed, std=0.1)


def assert_same_greedy(theirs, ours, model, prompt, tol):
    """llama.cpp's greedy tokens equal ours; only where our top two are within `tol` (the logit
    tolerance) may it take our second choice, after which the texts differ and are not compared.
    Returns how many tokens are equal (32 of 32 in every case on the machine this was written on)."""
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            step = logits(model, prompt + ours[:i])[-1]
            assert a == np.argsort(step)[-2] and step[b] - step[a] <= tol, f"token {i}: llama.cpp {a}, nanoseek {b}"
            return i
    assert len(theirs) == len(ours)
    return len(ours)


def llama(path):
    return open_llama_cpp(path, n_threads=2, n_ctx=256, logits_all=True)


def rounded_to_f16(model):
    """The model with the weights an F16 file holds: matrices in float16, norms, biases and the router in float32."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() > 1 and not name.endswith("mlp.gate.weight"):
                p.copy_(p.half().float())
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_gguf(case, tok, tmp_path):
    model = deepseek(tok, **CASES[case])
    ids = tok.encode(SAMPLE)
    for outtype, written in (("f32", model), ("f16", rounded_to_f16(model))):
        ref = logits(written, ids)
        path = write_gguf(model, tok, tmp_path / f"m-{outtype}.gguf", outtype)
        back, tok2 = nanoseek.load(path)
        assert back.config.model_type == model.config.model_type and back.config.rope_interleave
        assert back.config.num_nextn_predict_layers == 0 and not back.mtp  # llama.cpp does not run MTP
        for key in ("q_lora_rank", "n_group", "topk_group", "first_k_dense_replace", "scoring_func",
                    "norm_topk_prob", "routed_scaling_factor", "tie_word_embeddings", "rope_scaling"):
            assert getattr(back.config, key) == getattr(model.config, key), key
        assert np.abs(logits(back, ids) - ref).max() <= 1e-5 * np.abs(ref).max(), outtype
        assert tok2.encode(SAMPLE) == ids and tok2.chat_template == tok.chat_template


@needs_llama_cpp
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_runs_the_file_like_nanoseek(case, tok, tmp_path):
    model = deepseek(tok, **CASES[case])
    ids = tok.encode(SAMPLE)
    ours = logits(model, ids)
    # F32: the two implementations side by side (measured max |diff| 0.1% of the logit scale)
    f32 = llama(write_gguf(model, tok, tmp_path / "m-f32.gguf", "f32"))
    assert f32.metadata["general.architecture"] == "deepseek2"
    assert np.abs(llama_cpp_logits(f32, ids) - ours).max() <= 0.005 * np.abs(ours).max()
    # F16: llama.cpp also rounds activations to float16 in its matmuls. Where a token's routing is a
    # near tie that can pick another expert and move that position's logits by up to ~10% of the
    # scale (measured: 1 position of 44 in v2_softmax_yarn; none in the others), so the bound is on
    # 95% of the positions; the greedy text must be the same.
    f16 = llama(write_gguf(model, tok, tmp_path / "m-f16.gguf", "f16"))
    assert f16.tokenize(SAMPLE.encode(), add_bos=False, special=True) == ids
    per_position = np.abs(llama_cpp_logits(f16, ids) - logits(rounded_to_f16(model), ids)).max(-1)
    assert np.mean(per_position <= 0.02 * np.abs(ours).max()) >= 0.95
    # greedy against the weights the file holds: rounding them to float16 can move a position's logits
    # far (tiny with 8 heads, v3_no_q_lora_two_dense_tied: top logit 3.78 -> 2.78 at token 3; llama.cpp 2.78)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "12 + 7 = ?"}]))
    held = rounded_to_f16(model)
    greedy = generate(held, [prompt], max_new_tokens=32)[0]
    assert len(greedy) == 32 and len(set(greedy)) >= 8  # varied text, not one repeated token
    assert_same_greedy(llama_cpp_greedy(f16, prompt, 32), greedy, held, prompt, 0.02 * np.abs(ours).max())


def test_metadata_and_tensors_as_llama_cpp_reads_them(tok, tmp_path):
    """The keys and shapes llama.cpp's deepseek2 loader asks for (src/models/deepseek2.cpp, load_arch_*)."""
    from gguf import GGUFReader

    model = deepseek(tok)
    cfg = model.config
    r = GGUFReader(write_gguf(model, tok, tmp_path / "m.gguf", "q8_0"))
    meta = {k: f.contents() for k, f in r.fields.items()}
    want = {"leading_dense_block_count": 1, "attention.q_lora_rank": 64, "attention.kv_lora_rank": 32,
            "attention.key_length": 32 + 8, "attention.value_length": 32, "attention.key_length_mla": 16 + 8,
            "attention.value_length_mla": 16, "attention.head_count_kv": 1, "rope.dimension_count": 8,
            "expert_count": 8, "expert_used_count": 2, "expert_shared_count": 1, "expert_feed_forward_length": 64,
            "expert_gating_func": 2, "expert_group_count": 2, "expert_group_used_count": 1,
            "expert_weights_norm": True}
    assert {k: meta[f"deepseek2.{k}"] for k in want} == want
    assert meta["deepseek2.expert_weights_scale"] == pytest.approx(2.5)
    shapes = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors}
    nh, r_kv = cfg.num_attention_heads, cfg.kv_lora_rank
    # ggml dims, fastest first: attn_k_b {nope, kv_lora_rank, heads}, attn_v_b {kv_lora_rank, v, heads}
    nope, v = cfg.qk_nope_head_dim, cfg.v_head_dim   # 16, 16
    assert shapes["blk.1.attn_k_b.weight"] == ((nope, r_kv, nh), "F16")  # rows of 16: shorter than a Q8_0 block
    assert shapes["blk.1.attn_v_b.weight"] == ((r_kv, v, nh), "Q8_0")
    assert shapes["blk.1.ffn_down_exps.weight"] == ((64, 128, 8), "Q8_0")
    assert shapes["blk.1.ffn_gate_inp.weight"] == ((128, 8), "F32")  # the router stays F32
    assert shapes["blk.1.exp_probs_b.bias"] == ((8,), "F32")
    assert "blk.0.ffn_gate.weight" in shapes and "blk.0.ffn_gate_exps.weight" not in shapes
    assert not any(n.startswith("blk.4.") for n in shapes)  # the MTP module is dropped
    assert not any("attn_kv_b" in n for n in shapes)


def test_older_files_with_attn_kv_b_load(tok, tmp_path):
    """Pre-MLA converters wrote kv_b_proj unsplit (and per-head key/value lengths): still read."""
    import gguf

    model = deepseek(tok, num_nextn_predict_layers=0)
    new = write_gguf(model, tok, tmp_path / "new.gguf", "f32")
    reader = gguf.GGUFReader(new)
    w = gguf.GGUFWriter(tmp_path / "old.gguf", "deepseek2")
    skip = {"general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count",
            "deepseek2.attention.key_length_mla", "deepseek2.attention.value_length_mla"}
    for k, f in reader.fields.items():
        if k in skip:
            continue
        v = f.contents()
        if k == "deepseek2.attention.key_length":
            v = model.config.qk_head_dim
        elif k == "deepseek2.attention.value_length":
            v = model.config.v_head_dim
        w.add_key_value(k, v, f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for t in reader.tensors:
        if "attn_v_b" in t.name:
            continue
        if "attn_k_b" in t.name:
            layer = t.name.split(".")[1]
            w.add_tensor(f"blk.{layer}.attn_kv_b.weight", state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"])
        else:
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed([int(n) for n in t.shape]))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back, _ = nanoseek.load(tmp_path / "old.gguf")
    ids = tok.encode(SAMPLE)
    assert np.abs(logits(back, ids) - logits(model, ids)).max() <= 1e-5 * np.abs(logits(model, ids)).max()


@pytest.mark.parametrize("changes, message", [
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(n_shared_experts=0), "shared expert"),
    (dict(rope_scaling={**YARN, "mscale": 0.707}), "mscale"),
    (dict(rope_scaling={**YARN, "beta_fast": 16}), "beta_fast"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    (dict(attention_bias=True), "biases"),
])
def test_refuses_what_llama_cpp_would_run_differently(changes, message, tok, tmp_path):
    model = deepseek(tok, **changes)
    with pytest.raises(NanoseekError, match=message):
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


# -- a trained model --------------------------------------------------------------------------------
def train_tiny(tok):
    """The tiny V3 trained 60 Adam steps on sums like `12 + 7 = 19.`: sharper logits than random weights."""
    model = deepseek(tok, seed=3, num_nextn_predict_layers=0).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        a, b = torch.randint(0, 50, (2, 16), generator=g)
        batch = [tok.encode(" ".join(f"{x} + {y} = {x + y}." for x, y in zip(a[i:], b[i:])))[:48] for i in range(8)]
        x = torch.tensor(batch)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.5
    return model.eval()


@pytest.fixture(scope="module")
def trained(tok):
    return train_tiny(tok)


@needs_llama_cpp
def test_trained_model_f16_and_q8_0_in_llama_cpp(trained, tok, tmp_path):
    prompt = tok.encode("3 + 4 = 7. 10 + 12 = 22. 5 + 9 =")
    greedy = generate(trained, [prompt], max_new_tokens=32)[0]
    ids = prompt + greedy
    ours = logits(trained, ids)
    f16 = llama(write_gguf(trained, tok, tmp_path / "m-f16.gguf", "f16"))
    assert np.abs(llama_cpp_logits(f16, ids) - ours).max() <= 0.02 * np.abs(ours).max()
    assert_same_greedy(llama_cpp_greedy(f16, prompt, 32), greedy, trained, prompt, 0.02 * np.abs(ours).max())
    # Q8_0: 8-bit weights, and llama.cpp rounds the activations to 8 bits too; greedy text stays mostly
    # the same (measured 32 of 32 here; the bound leaves room for near-ties on other CPUs)
    q8 = llama(write_gguf(trained, tok, tmp_path / "m-q8_0.gguf", "q8_0"))
    same = sum(a == b for a, b in zip(llama_cpp_logits(q8, ids).argmax(-1), ours.argmax(-1)))
    assert same >= 0.8 * len(ids)


@pytest.mark.parametrize("key, value", [("deepseek2.block_count", 10**8), ("deepseek2.attention.head_count", 0),
                                        ("deepseek2.expert_count", 10**9), ("deepseek2.attention.kv_lora_rank", -1)])
def test_absurd_counts_are_refused_before_anything_is_built(key, value, tok, tmp_path):
    import gguf

    src = gguf.GGUFReader(write_gguf(deepseek(tok, num_nextn_predict_layers=0), tok, tmp_path / "m.gguf", "f32"))
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "deepseek2")
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        kind = gguf.GGUFValueType.INT64 if k == key else f.types[0]
        w.add_key_value(k, value if k == key else f.contents(), kind,
                        sub_type=f.types[-1] if len(f.types) > 1 else None)
    w.add_tensor("token_embd.weight", np.zeros((tok.vocab_size, 128), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NanoseekError, match=key.replace(".", r"\.")):
        nanoseek.load(tmp_path / "bad.gguf")


def test_gguf_export_card_says_the_mtp_module_is_left_out(tok, tmp_path):
    from nanoseek import export

    out = export.export_gguf(deepseek(tok), tok, tmp_path / "pub", outtype="q8_0", name="tiny v3")
    assert out.name == "tiny-v3-Q8_0.gguf"
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "1 MTP (multi-token prediction) module(s) are not in this file" in card
    assert "llama-server -m pub/tiny-v3-Q8_0.gguf" in card and "MTP depth | 1" in card


FUZZED = ["embedding_length", "block_count", "feed_forward_length", "attention.head_count",
          "attention.q_lora_rank", "attention.kv_lora_rank", "attention.key_length_mla", "attention.value_length_mla",
          "rope.dimension_count", "leading_dense_block_count", "expert_count", "expert_used_count",
          "expert_shared_count", "expert_feed_forward_length", "expert_group_count", "expert_group_used_count"]
COUNTS = [-1, 0, 1, 3, 7, 300, 2**20 + 1, 2**62]


def test_fuzzed_deepseek2_metadata_loads_or_is_refused_in_one_line(tok, tmp_path_factory):
    """Every key above set to each of COUNTS, then random pairs and triples (hypothesis, derandomized):
    the file loads, or nanoseek.load raises NanoseekError in one line (never another error)."""
    import gguf
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    d = tmp_path_factory.mktemp("fuzz")
    model = deepseek(tok, num_nextn_predict_layers=0)
    src = gguf.GGUFReader(write_gguf(model, tok, d / "m.gguf", "f32"))
    fields = {k: (f.contents(), f.types) for k, f in src.fields.items()
              if not k.startswith("GGUF.") and k != "general.architecture"}
    tensors = [(t.name, np.array(t.data).reshape(tuple(reversed([int(n) for n in t.shape])))) for t in src.tensors]

    def check(changes):
        w = gguf.GGUFWriter(d / "bad.gguf", "deepseek2")
        for k, (v, types) in fields.items():
            if k.removeprefix("deepseek2.") not in changes:
                w.add_key_value(k, v, types[0], sub_type=types[-1] if len(types) > 1 else None)
        for short, v in changes.items():
            w.add_key_value(f"deepseek2.{short}", v, gguf.GGUFValueType.INT64)
        for name, t in tensors:
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        try:
            nanoseek.load(d / "bad.gguf")
        except NanoseekError as e:
            assert "\n" not in str(e)

    for key in FUZZED:
        for value in COUNTS:
            check({key: value})

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.sampled_from(FUZZED), st.sampled_from(COUNTS), min_size=2, max_size=3))
    def combinations(changes):
        check(changes)

    combinations()

"""Weights on disk: FP8 block dequantization, and clear errors for bad input (API and CLI)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import nanoseek
from nanoseek.errors import NanoseekError
from nanoseek.weights.hf import dequant_fp8_block, to_disk_names

from test_model import tiny_v3


def test_fp8_block_dequant_equals_blockwise_reference():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 200, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(3, 2, generator=g) + 0.01  # ceil(300/128) x ceil(200/128) blocks
    ref = torch.empty(300, 200)
    for bi in range(3):  # DeepSeek-V3 inference/kernel.py semantics: each 128x128 tile times its scale
        for bj in range(2):
            tile = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            ref[tile] = w[tile].float() * s[bi, bj]
    assert torch.equal(dequant_fp8_block(w, s), ref)


def quantize_fp8(w, block):
    """Block-wise e4m3 quantization as DeepSeek's checkpoints store it (weight, weight_scale_inv)."""
    rows, cols = w.shape
    nb_r, nb_c = -(-rows // block), -(-cols // block)
    scale = torch.empty(nb_r, nb_c)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nb_r):
        for j in range(nb_c):
            tile = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            scale[i, j] = w[tile].abs().max().clamp(min=1e-12) / 448.0
            q[tile] = (w[tile] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    model = tiny_v3()
    nanoseek.save(model, None, tmp_path / "ref")
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    tensors, expected = {}, {}
    for k, v in to_disk_names(model.state_dict(), model.config).items():
        v = v.contiguous().clone()
        if k.endswith("proj.weight") and v.dim() == 2:
            q, s = quantize_fp8(v, 16)
            tensors[k], tensors[k.replace(".weight", ".weight_scale_inv")] = q, s
            expected[k] = dequant_fp8_block(q, s, block=16)
        else:
            tensors[k] = expected[k] = v
    (tmp_path / "fp8").mkdir()
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    loaded, _ = nanoseek.load(tmp_path / "fp8")
    got = to_disk_names(loaded.state_dict(), loaded.config)
    for k, v in expected.items():
        assert torch.equal(got[k], v.float()), k
    I = model.config.moe_intermediate_size
    w = model.model.layers[1].mlp.experts.gate_up_proj[0, I:]  # expert 0's up_proj
    err = (got["model.layers.1.mlp.experts.0.up_proj.weight"] - w).norm() / w.norm()
    assert 0 < err < 0.05  # e4m3 keeps 3 mantissa bits: a few percent of error, not zero


def cli(*args):
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True)


def test_missing_path(tmp_path):
    with pytest.raises(NanoseekError, match="no such file"):
        nanoseek.load(tmp_path / "nope")
    r = cli("info", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such file" in r.stderr and r.stderr.count("\n") == 1


def test_config_that_does_not_match_weights_names_tensor_and_shapes(tmp_path):
    nanoseek.save(tiny_v3(), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 12
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError, match=r"tensor model.layers.0.self_attn.kv_a_proj_with_mqa.weight has shape \[20, 32\].*expects \[16, 32\]"):
        nanoseek.load(tmp_path)
    r = cli("info", "--model", str(tmp_path))
    assert r.returncode == 2 and "[20, 32]" in r.stderr and "[16, 32]" in r.stderr


def test_missing_and_extra_tensors(tmp_path):
    nanoseek.save(tiny_v3(), None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 4  # layer 3 is now expected (and the old MTP layer 3 is a block)
    cfg["num_nextn_predict_layers"] = 0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanoseekError, match="weights do not match the config"):
        nanoseek.load(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    r = cli("info", "--model", str(tmp_path))
    assert r.returncode == 2 and "unsupported architecture 'mamba'" in r.stderr


def test_truncated_safetensors(tmp_path):
    nanoseek.save(tiny_v3(), None, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(NanoseekError, match="truncated or corrupt"):
        nanoseek.load(tmp_path)
    r = cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_save_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    model = tiny_v3()
    nanoseek.save(model, None, tmp_path / "m")
    nanoseek.save(model, None, tmp_path / "m")  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

    class Boom(Exception):
        pass

    class BadTok:
        def save(self, path):
            raise Boom()

    with pytest.raises(Boom):
        nanoseek.save(model, BadTok(), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # old copy intact, temp removed
    nanoseek.load(tmp_path / "m")


def test_cli_help_has_examples():
    for cmd in ([], ["generate"], ["chat"], ["info"], ["speedrun"]):
        r = cli(*cmd, "--help")
        assert r.returncode == 0 and "example" in r.stdout


# -- hostile or broken files: one NanoseekError, nothing read from outside the directory -------------
def _sharded(tmp_path, index_doc):
    d = tmp_path / "m"
    nanoseek.save(tiny_v3(), None, d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index_doc))
    return d


@pytest.mark.parametrize("doc, words", [
    ({"weight_map": {"lm_head.weight": "../outside.safetensors"}}, "inside the model directory"),
    ({"weight_map": {"lm_head.weight": "/etc/passwd"}}, "inside the model directory"),
    ({"weight_map": {"lm_head.weight": "sub/../../x.safetensors"}}, "inside the model directory"),
    ({"weight_map": {"lm_head.weight": "C:\\x.safetensors"}}, "inside the model directory"),
    ({"weight_map": {"lm_head.weight": "model.bin"}}, "inside the model directory"),
    ({"weight_map": {"lm_head.weight": 3}}, "malformed index"),
    ({"weight_map": [["lm_head.weight", "model.safetensors"]]}, "malformed index"),
    ([1, 2], "malformed index"),
    ({"metadata": {}}, "malformed index"),
])
def test_bad_safetensors_index_is_refused(tmp_path, doc, words):
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    d = _sharded(tmp_path, doc)
    with pytest.raises(NanoseekError) as e:
        nanoseek.load(d)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_index_that_is_not_utf8_json_is_refused(tmp_path):
    d = _sharded(tmp_path, {})
    (d / "model.safetensors.index.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(NanoseekError, match="not valid JSON"):
        nanoseek.load(d)


def test_fp8_scale_of_the_wrong_shape_is_refused():
    w = torch.zeros(300, 200).to(torch.float8_e4m3fn)
    with pytest.raises(NanoseekError, match="does not match a 300x200 weight"):
        dequant_fp8_block(w, torch.ones(2, 2))


def test_experts_stack_from_per_expert_and_from_gguf_names_and_back():
    """Disk: one tensor per expert and projection (HF, DeepSeek) or one per projection (GGUF's
    ffn_*_exps); model: gate_up_proj [E, 2I, H] = [gate; up] per expert, down_proj [E, H, I]."""
    from nanoseek.weights.hf import stack_experts, unstack_experts
    g = torch.Generator().manual_seed(0)
    E, I, H, p = 3, 4, 8, "model.layers.1.mlp.experts"
    gate, up, down = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
    per_expert = {f"{p}.{e}.{n}.weight": w[e] for e in range(E) for n, w in
                  (("gate_proj", gate), ("up_proj", up), ("down_proj", down))}
    stacked = {f"{p}.gate_proj.weight": gate, f"{p}.up_proj.weight": up, f"{p}.down_proj.weight": down}
    for disk in (per_expert, stacked):
        got = stack_experts({**disk, "other": torch.ones(1)})
        assert set(got) == {f"{p}.gate_up_proj", f"{p}.down_proj", "other"}
        assert torch.equal(got[f"{p}.gate_up_proj"][1], torch.cat([gate[1], up[1]]))
        assert torch.equal(got[f"{p}.down_proj"], down)
    back = unstack_experts(stack_experts(per_expert))
    assert set(back) == set(per_expert) and all(torch.equal(back[k], v) for k, v in per_expert.items())
    del per_expert[f"{p}.1.up_proj.weight"]
    with pytest.raises(NanoseekError, match="up_proj of expert 1 is missing"):
        stack_experts(per_expert)
    with pytest.raises(NanoseekError, match="do not fit together"):
        stack_experts({**stacked, f"{p}.down_proj.weight": down[:2]})

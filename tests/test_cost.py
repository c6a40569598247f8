"""The cost model: FLOP counts against torch's FlopCounterMode on real forward passes, DeepSeek-V3's
published training bill (Table 1 of the V3 report) and KV-cache size, and the `nanoseek cost` CLI."""

import argparse
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek import Transformer, cost
from nanoseek.config import ModelConfig, preset
from nanoseek.errors import NanoseekError


def _tiny_v3(**kw):
    return preset("tiny").replace(vocab_size=512, **kw)


LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_interleave=False)
CONFIGS = {
    "deepseek_v3 tiny (MLA + q_lora, MoE, groups, dense first layer)": lambda: _tiny_v3(),
    "deepseek_v3 plain q_proj, no shared expert": lambda: _tiny_v3(q_lora_rank=None, n_shared_experts=0),
    "llama GQA tied": lambda: ModelConfig(**LLAMA),
    "qwen2 GQA with qkv bias": lambda: ModelConfig(**{**LLAMA, "model_type": "qwen2", "tie_word_embeddings": False}),
}


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kw) -> int:
    """aten._grouped_mm (the MoE's routed experts), which FlopCounterMode's registry lacks: 2 flops per
    multiply-add. [M, K] x [E, K, N] (forward, input grad): M·K·N; [K, M] x [M, N] with groups along
    M (weight grad): K·M·N; [E, M, K] x [E, K, N]: E·M·K·N."""
    if len(a_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]


def FlopCounter():  # noqa: N802
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})


def _counted(model, ids, **kw):
    # On CPU, SDPA's fused kernel (aten._scaled_dot_product_flash_attention_for_cpu, taken when q/k/v
    # head dims match, e.g. GQA) is not in the flop counter's registry and counts 0; the math
    # backend's bmm's are counted, so pin it. (MLA, qk 48 != v 32 here, takes the math path anyway.)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounter() as fc:
        model(ids, **kw)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_flops_equal_flop_counter(name, monkeypatch):
    from nanoseek.model.attention import MLA
    monkeypatch.setattr(MLA, "pad_v", False)  # the model's math, without the zeros padded for SDPA's kernel
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    B, T = 2, 12
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    # FlopCounterMode counts SDPA's full T x T scores even with is_causal=True (no causal discount),
    # so compare with causal=False; top-k routing sends every token to exactly k experts.
    expected = B * T * cost.flops_per_token(cfg, T, causal=False)["forward"]
    assert _counted(model, ids) == pytest.approx(expected, rel=1e-12)
    if cfg.num_nextn_predict_layers:  # MTP module 1 runs on the first T-1 positions
        mtp = B * (T - 1) * cost.mtp_flops_per_token(cfg, T - 1, causal=False)
        assert _counted(model, ids, return_mtp=True) == pytest.approx(expected + mtp, rel=1e-12)


def test_backward_is_twice_forward():
    cfg = _tiny_v3()
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounter() as fwd:
            logits = model(ids)
        with FlopCounter() as bwd:
            logits.float().sum().backward()
    assert bwd.get_total_flops() == pytest.approx(2 * fwd.get_total_flops(), rel=0.02)


def test_causal_convention_counts_unmasked_pairs():
    cfg = preset("deepseek-v3")
    full = cost.flops_per_token(cfg, 4096, causal=False)["forward_breakdown"]["attention_scores"]
    causal = cost.flops_per_token(cfg, 4096)["forward_breakdown"]["attention_scores"]
    assert causal == pytest.approx(full * 4097 / (2 * 4096))
    # MLA: heads x (qk_nope + qk_rope + v) per key per layer, times 2 for multiply-add
    assert full == 61 * 2 * 128 * 4096 * (128 + 64 + 128)


def test_deepseek_v3_headline_numbers():
    cfg = preset("deepseek-v3")
    total, active = cfg.num_params()
    assert total == pytest.approx(671e9, rel=0.01) and active == pytest.approx(37e9, rel=0.03)
    kv = cost.kv_cache_bytes_per_token(cfg, bytes_per_value=2)
    assert kv["mla"] == kv["native"] == (512 + 64) * 61 * 2 == 70_272
    assert kv["mha"] == 128 * (192 + 128) * 61 * 2 and kv["mha"] > 50 * kv["mla"]
    assert kv["mla"] < kv["gqa8"] < kv["mha"]  # 8 KV heads instead of 128
    r = cost.reproduce_deepseek_v3()
    assert r["gpu_hours"]["total"] == pytest.approx(2788e3, rel=0.05)
    assert r["dollars"]["total"] == pytest.approx(5.576e6, rel=0.05)
    assert r["gpu_hours"]["pre-training"] == pytest.approx(2664e3, rel=0.05)
    # the MFU that reproduces 2,664K H800 hours exactly gives exactly those hours back
    again = cost.reproduce_deepseek_v3(mfu=r["implied_mfu_pretraining"])
    assert again["gpu_hours"]["pre-training"] == pytest.approx(2664e3, rel=1e-9)
    assert 0.3 < r["implied_mfu_pretraining"] < 0.5  # of the BF16 peak; half of that against FP8


def test_training_and_serving_scale_sensibly():
    cfg = preset("small")
    a = cost.training_cost(cfg, 1e9, "h100", mfu=0.5)
    b = cost.training_cost(cfg, 2e9, "h100", mfu=0.25)
    assert b["gpu_hours"] == pytest.approx(4 * a["gpu_hours"])
    assert cost.training_cost(cfg, 1e9, "b200", mfu=0.5)["gpu_hours"] < a["gpu_hours"]
    s = cost.serving_cost(preset("deepseek-v3"), "h800", context=32768, weight_dtype="fp8")
    free = s["gpus"] * 80e9 - s["weight_bytes"]
    assert s["max_concurrent_sequences"] == int(free // (70_272 * 32768))
    one, full = s["decode_batch_1"], s["decode_max_batch"]
    assert full["tokens_per_s"] > one["tokens_per_s"]
    assert full["dollars_per_million_tokens"] < one["dollars_per_million_tokens"]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="nanoseek")
    cost.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cost", *argv])
    return args.func(args)


def test_cli_deepseek_v3_json(capsys):
    assert _cli(["--model", "deepseek-v3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    v3 = r["deepseek_v3"]
    assert v3["gpu_hours"]["total"] == pytest.approx(2_788_000, rel=0.05)
    assert v3["dollars"]["total"] == pytest.approx(5_576_000, rel=0.05)
    assert r["serving"]["kv_bytes_per_token"]["mla"] == 70_272
    assert r["active_params"] == pytest.approx(37e9, rel=0.03)
    assert r["training"]["tokens"] == 14.8e12


def test_cli_table_plot_and_config_path(tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset("tiny").to_hf_config()))
    png = tmp_path / "plots" / "cost.png"
    assert _cli(["--model", str(d), "--tokens", "2M", "--gpu", "a100", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "KV cache bytes/token" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["cost.png"]  # no temp file left behind
    v3png = tmp_path / "v3.png"
    assert _cli(["--plot", str(v3png), "--json"]) == 0 and v3png.stat().st_size > 0


def test_cli_cpu_run(capsys):
    assert _cli(["--model", "tiny", "--gpu", "cpu", "--tokens", "10M", "--seq-len", "256", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["cpu"]["flops"] > 0 and r["training"]["gpu_hours"] > 0 and r["training"]["dollars"] >= 0


@pytest.mark.parametrize("argv", [["--gpu", "tpu9"], ["--tokens", "lots"], ["--tokens=-5B"],
                                  ["--mfu", "1.5"], ["--model", "no/such/dir"], ["--gpu", "a100", "--precision", "fp8"],
                                  ["--weight-dtype", "fp7"], ["--serve-gpus", "8"]])
def test_cli_bad_input_raises(argv):
    with pytest.raises(NanoseekError):
        _cli(argv)


def test_cost_reads_a_gguf_like_every_other_command(gguf_path):
    import json
    import subprocess
    import sys

    import nanoseek
    r = subprocess.run([sys.executable, "-m", "nanoseek", "cost", "--model", str(gguf_path), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, _ = nanoseek.load(gguf_path)
    assert json.loads(r.stdout)["total_params"] == model.config.num_params()[0] == 134_515_008
    r = subprocess.run([sys.executable, "-m", "nanoseek", "cost", "--model", "missing.gguf"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1

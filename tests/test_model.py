"""Model internals against independent references: naive vs absorbed MLA, cached decode vs full
forward, MoE dispatch vs a per-token loop, the V3 gate vs a hand-computed routing example, MTP shift."""

import math

import pytest
import torch

import nanoseek
from nanoseek.config import ModelConfig, preset
from nanoseek.infer.simple import generate
from nanoseek.model.attention import MLA
from nanoseek.model.cache import KVCache, LatentCache
from nanoseek.model.moe import Gate, MoE

from conftest import assert_close_scaled, randomize


def tiny_v3(**kw):
    base = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48,
                num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=8,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, n_group=2,
                topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
                topk_method="noaux_tc", first_k_dense_replace=1, num_nextn_predict_layers=1)
    base.update(kw)
    torch.manual_seed(0)
    return randomize(nanoseek.Transformer(ModelConfig(**base)).eval())


def tiny_llama(**kw):
    base = dict(model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, rope_interleave=False, tie_word_embeddings=True)
    base.update(kw)
    torch.manual_seed(0)
    return randomize(nanoseek.Transformer(ModelConfig(**base)).eval(), std=0.2)


def set_absorb(model, value):
    for m in model.modules():
        if isinstance(m, MLA):
            m.absorb = value


def run_cached(model, ids, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time; logits for every position."""
    B, T = ids.shape
    cache = KVCache.for_model(model.config, B, T)
    pos = torch.arange(T).expand(B, T)
    outs = [model(ids[:, :prefill], positions=pos[:, :prefill], cache=cache)]
    for t in range(prefill, T):
        outs.append(model(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache))
    return torch.cat(outs, dim=1)


@torch.no_grad()
def test_naive_and_absorbed_mla_agree():
    model = tiny_v3()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids)  # naive, no cache
    set_absorb(model, False)
    naive = run_cached(model, ids, prefill=7)
    set_absorb(model, True)
    absorbed = run_cached(model, ids, prefill=7)
    assert_close_scaled(naive, full, 1e-5)
    assert_close_scaled(absorbed, naive, 1e-5)
    # the absorbed path also serves a whole prompt at once (no cache): same numbers
    assert_close_scaled(model(ids), full, 1e-5)


@torch.no_grad()
def test_gqa_cached_decode_equals_full_forward():
    model = tiny_llama()
    ids = torch.randint(0, 97, (3, 15), generator=torch.Generator().manual_seed(0))
    assert_close_scaled(run_cached(model, ids, prefill=4), model(ids), 1e-5)


def expert_by_hand(moe, e: int, x):
    """Routed expert e as the paper writes a SwiGLU expert: W_down (silu(W_gate x) * (W_up x)),
    its three matrices read from the stacked storage ([gate; up] rows, then down)."""
    I = moe.experts.down_proj.shape[2]
    w_gate, w_up = moe.experts.gate_up_proj[e, :I], moe.experts.gate_up_proj[e, I:]
    return moe.experts.down_proj[e] @ (torch.nn.functional.silu(w_gate @ x) * (w_up @ x))


def per_token_moe(moe, flat):
    """The slow, obviously-correct reference: every token through its top-k experts, one by one."""
    weights, idx, _ = moe.gate(flat)
    rows = []
    for t in range(flat.shape[0]):
        y = moe.shared_experts(flat[t])
        for j in range(moe.top_k):
            y = y + weights[t, j] * expert_by_hand(moe, int(idx[t, j]), flat[t])
        rows.append(y)
    return torch.stack(rows), idx


@pytest.mark.parametrize("path", ["grouped", "loop", "c++"])
def test_moe_dispatch_equals_per_token_loop(path, monkeypatch):
    """Both dispatch paths (grouped GEMMs over the sorted rows; the per-expert loop that decode and
    quantized experts use), and the grouped path with the C++ gate, plan and SwiGLU installed, against
    a per-token loop: outputs and the gradients of the input, the gate and every expert (fp32,
    summation order only)."""
    from nanoseek.infer import kernels
    from nanoseek.model import cpu_kernels
    if path == "c++":
        if not kernels.available():
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(cpu_kernels, "installed", kernels)
    monkeypatch.setattr(MoE, "GROUPED", path != "loop")
    model = tiny_v3()
    moe = model.model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for run in ("ours", "reference"):
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        if run == "ours":
            y, routing = moe(xg)
            y = y.reshape(-1, 32)
        else:
            y, idx = per_token_moe(moe, xg.reshape(-1, 32))
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        grads.append((y.detach(), xg.grad, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                            for n, p in moe.named_parameters()}))
    (got, gx, gp), (ref, rx, rp) = grads
    assert_close_scaled(got, ref, 1e-5, "output")
    assert_close_scaled(gx, rx, 1e-5, "input grad")
    for n in rp:
        assert_close_scaled(gp[n], rp[n], 1e-5, f"{n} grad")
    assert rp["gate.weight"].abs().max() > 0
    assert [bool(rp["experts.down_proj"][e].abs().max() > 0) for e in range(moe.n_experts)] == \
        (routing.load > 0).tolist()  # the routed experts, and only they, learn
    assert int(routing.load.sum()) == x.shape[0] * x.shape[1] * moe.top_k
    assert routing.load.tolist() == torch.bincount(idx.flatten(), minlength=moe.n_experts).tolist()
    torch.testing.assert_close(routing.scores.reshape(-1, moe.n_experts), moe.gate(x.reshape(-1, 32))[2],
                               rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("tokens", [1, 5])
def test_moe_inference_paths_equal_per_token_loop(tokens):
    """Without gradients: one token (decode at batch 1: its k experts in place, no sort) and a few
    tokens (the sorted rows without the autograd Functions) against the per-token loop."""
    moe = tiny_v3().model.layers[1].mlp
    x = torch.randn(tokens, 1, 32, generator=torch.Generator().manual_seed(tokens))
    got, routing = moe(x)
    ref, idx = per_token_moe(moe, x.reshape(-1, 32))
    assert_close_scaled(got.reshape(-1, 32), ref, 1e-5)
    assert routing.load.tolist() == torch.bincount(idx.flatten(), minlength=moe.n_experts).tolist()



def test_moe_bf16_slices_padded_to_32_rows_change_nothing(monkeypatch):
    """On CPU the 16-bit grouped path pads each expert's slice with zero rows to a multiple of 32 (so
    oneDNN's GEMM shapes repeat): the layout by hand, then outputs and gradients against no padding."""
    from nanoseek.model import moe as moe_mod
    xs, rw = torch.arange(36.0)[:, None].repeat(1, 2), torch.ones(36, 1)
    xp, rp, padded, dest = moe_mod.pad_slices(xs, rw, torch.tensor([3, 0, 33]))
    assert padded.tolist() == [32, 0, 64] and dest.tolist() == [0, 1, 2] + list(range(32, 65))
    assert xp.shape == (96, 2) and xp[dest].equal(xs) and xp.sum() == xs.sum() and rp.sum() == 36
    monkeypatch.setattr(MoE, "GROUPED", True)
    moe = tiny_v3().model.layers[1].mlp.to(torch.bfloat16)
    x = torch.randn(4, 37, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    runs = []
    for pad in (32, 1):
        monkeypatch.setattr(moe_mod, "PAD_ROWS", pad)
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y, _ = moe(xg)
        y.float().square().sum().backward()
        runs.append([t.float() for t in (y, xg.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad)])
    for got, ref, what in zip(*runs, ("output", "input grad", "gate_up grad", "down grad")):
        assert_close_scaled(got, ref, 1e-2, what)

def test_sort_pairs_pads_each_expert_in_the_gather():
    """3 tokens, top-2, 3 experts; pairs (token, expert) = (0,2) (0,0) (1,2) (2,2) (1,1) (2,0), so
    counts [2, 1, 3]; padded to 2 rows: [2, 2, 4]. Rows by expert, in token order within an expert:
    expert 0: pairs 1, 5 | expert 1: pair 4, pad | expert 2: pairs 0, 2, 3, pad."""
    from nanoseek.model.moe import sort_pairs
    flat = torch.tensor([2, 0, 2, 2, 1, 0])
    counts = torch.bincount(flat, minlength=3)
    token, slot, pair, rows = sort_pairs(flat, counts, k=2, pad=2)
    assert rows.tolist() == [2, 2, 4]
    assert pair.tolist() == [1, 5, 4, 6, 0, 2, 3, 6]
    assert token.tolist() == [0, 2, 2, 2, 0, 1, 1, 2]  # padding rows (pair 6) read the last token
    assert slot.tolist() == [4, 0, 5, 6, 2, 1]
    token1, slot1, pair1, rows1 = sort_pairs(flat, counts, k=2)
    assert rows1.tolist() == [2, 1, 3] and pair1.tolist() == [1, 5, 4, 0, 2, 3] and slot1.tolist() == [3, 0, 4, 5, 2, 1]


def test_moe_grouped_path_falls_back_where_grouped_mm_does_not_apply(monkeypatch):
    """Hidden sizes whose rows are not 16-byte multiples: the loop runs, same numbers."""
    monkeypatch.setattr(MoE, "GROUPED", True)
    model = tiny_v3(hidden_size=30, moe_intermediate_size=10, intermediate_size=40)
    moe = model.model.layers[1].mlp
    x = torch.randn(2, 9, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = moe(x)
        ref, _ = per_token_moe(moe, x.reshape(-1, 30))
    assert_close_scaled(got.reshape(-1, 30), ref, 1e-5)


@pytest.fixture(params=["pytorch", "c++"])
def gate_impl(request, monkeypatch):
    """Gate's PyTorch ops, or the C++ gate (nanoseek/infer/ffn.cpp) installed as the training commands do."""
    from nanoseek.infer import kernels
    from nanoseek.model import cpu_kernels
    if request.param == "c++":
        if not kernels.available():
            pytest.skip("no C++ compiler")
        monkeypatch.setattr(cpu_kernels, "installed", kernels)
    return request.param


def test_v3_gate_hand_computed_routing(gate_impl):
    """8 experts in 4 groups of 2, keep 2 groups, top-2 experts, sigmoid scores s, bias b.

    choice c = s + b = [0.3, -0.2 | -0.1, -0.4 | -0.3, -0.5 | 0.2, -1.2]
    group scores (sum of top-2 of c) = [0.1, -0.5, -0.8, -1.0] -> keep groups 0 and 1
    top-2 of c among experts 0..3 -> experts 0 and 2 (c = 0.3, -0.1)
    Masking dropped groups with 0.0 instead of -inf would pick expert 4 (0.0 > -0.1): DeepSeek's
    code uses -inf, so expert 2 is right.
    weights from unbiased s: [0.8, 0.6] / 1.4 * 2.5
    """
    cfg = ModelConfig(model_type="deepseek_v3", hidden_size=8, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=4, topk_group=2, scoring_func="sigmoid", topk_method="noaux_tc",
                      norm_topk_prob=True, routed_scaling_factor=2.5)
    gate = Gate(cfg)
    s = torch.tensor([0.8, 0.3, 0.6, 0.2, 0.5, 0.4, 0.7, 0.1])
    c = torch.tensor([0.3, -0.2, -0.1, -0.4, -0.3, -0.5, 0.2, -1.2])
    with torch.no_grad():
        gate.weight.copy_(torch.eye(8))
        gate.e_score_correction_bias.copy_(c - s)
    x = torch.log(s / (1 - s))[None]  # logits whose sigmoid is s
    weights, idx, scores = gate(x)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [0, 2]
    assert torch.allclose(weights[0][order], torch.tensor([0.8, 0.6]) / 1.4 * 2.5, atol=1e-6)
    assert torch.allclose(scores[0], s, atol=1e-6)


def test_v2_gate_softmax_greedy_hand_computed(gate_impl):
    cfg = ModelConfig(model_type="deepseek_v2", hidden_size=4, n_routed_experts=4, num_experts_per_tok=2,
                      scoring_func="softmax", topk_method="greedy", routed_scaling_factor=16.0)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(4))
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = [math.exp(v) / sum(math.exp(u) for u in (1, 3, 2, 0)) for v in (1, 3, 2, 0)]
    weights, idx, _ = gate(logits)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [1, 2]
    assert torch.allclose(weights[0][order], torch.tensor([p[1], p[2]]) * 16.0, atol=1e-5)


@torch.no_grad()
def test_mtp_logits_see_exactly_one_more_token():
    """mtp_logits[0] at position i reads tokens <= i+1 (to predict i+2): changing token j moves
    positions >= j-1 and leaves positions < j-1 untouched."""
    model = tiny_v3()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    logits, (mtp,) = model(ids, return_mtp=True)
    assert logits.shape == (1, 12, 97) and mtp.shape == (1, 11, 97)
    j = 6
    ids2 = ids.clone()
    ids2[0, j] = (ids[0, j] + 1) % 97
    _, (mtp2,) = model(ids2, return_mtp=True)
    # (not bit-equal: MoE groups tokens per expert differently, so fp32 rounding differs)
    assert_close_scaled(mtp[:, : j - 1], mtp2[:, : j - 1], 1e-5)
    assert (mtp[:, j - 1] - mtp2[:, j - 1]).abs().max() > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("make", [tiny_v3, tiny_llama])
def test_simple_generate_matches_recompute_and_batches(make):
    model = make()
    prompts = [[5, 9, 2, 7, 1], [3, 3], [8, 1, 4, 4, 6, 2, 9]]
    batched = generate(model, prompts, max_new_tokens=10)
    for p, got in zip(prompts, batched):
        ids = torch.tensor([p])
        ref = []
        for _ in range(10):  # greedy by recomputing the whole sequence, no cache
            nxt = int(model(ids)[0, -1].argmax())
            ref.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert got == ref
        assert generate(model, [p], max_new_tokens=10)[0] == ref


def test_seeded_sampling_is_reproducible():
    model = tiny_llama()
    a = generate(model, [[1, 2, 3]], max_new_tokens=12, temperature=1.0, seed=7)
    b = generate(model, [[1, 2, 3]], max_new_tokens=12, temperature=1.0, seed=7)
    assert a == b


def test_latent_cache_bytes_per_token_formula():
    cfg = preset("deepseek-v3")
    # (kv_lora_rank + qk_rope_head_dim) * layers * 2 bytes = (512 + 64) * 61 * 2 = 70,272 B ≈ 70 KB
    assert cfg.kv_cache_bytes_per_token(2) == (512 + 64) * 61 * 2 == 70272
    small = tiny_v3().config
    cache = KVCache.for_model(small, 1, 8, dtype=torch.bfloat16)
    assert isinstance(cache, LatentCache) and cache.a.shape[-1] == 16 and cache.b.shape[-1] == 4
    assert cache.bytes_per_token() == (16 + 4) * 3 * 2
    assert isinstance(cache.rows(0, 1), LatentCache)
    gqa = ModelConfig(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    kv = KVCache.for_model(gqa, 1, 8)
    # K and V head-major: [layers, rows, kv_heads, max_seq_len, head_dim]
    assert type(kv) is KVCache and kv.a.shape == kv.b.shape == (2, 1, 2, 8, 8)
    assert kv.bytes_per_token() == gqa.kv_cache_bytes_per_token(4) == 2 * 2 * 8 * 2 * 4


def test_param_counts_match_modules_and_deepseek_v3_headline():
    model = tiny_v3(num_nextn_predict_layers=0)
    total, active = model.config.num_params()
    assert total == sum(p.numel() for p in model.parameters())
    t, a = preset("deepseek-v3").num_params()
    # DeepSeek-V3: 671B total, 37B activated per token (main model, without the 14B MTP module)
    assert abs(t / 1e9 - 671) < 5 and abs(a / 1e9 - 37) < 1.5


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_training_with_the_fused_cpu_attention_equals_sdpa(arch, monkeypatch):
    """The training commands swap SDPA for nanoseek's C++ attention (train.run.use_cpu_kernels):
    loss and every gradient of a training pass equal SDPA's (on PyTorch's ops), for MLA (v narrower than q, MTP) and GQA
    (2 kv heads), with a packed window's document mask and causal. No-grad passes keep SDPA."""
    from nanoseek.config import dense_variant
    from nanoseek.infer import kernels
    from nanoseek.train.pretrain import document_mask
    from nanoseek.train.run import use_cpu_kernels
    if not kernels.available():
        pytest.skip("no C++ compiler")
    calls = []
    from nanoseek.model import cpu_kernels
    monkeypatch.setattr(cpu_kernels, "installed", cpu_kernels.installed)   # restored after the test
    original = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=64, num_hidden_layers=2)
    if arch == "llama":
        cfg = dense_variant(cfg, "llama").replace(num_key_value_heads=2, bos_token_id=0, eos_token_id=1)
    model = nanoseek.Transformer(cfg)
    x = torch.randint(2, 64, (3, 40))
    x[:, [7, 19, 30]] = 1                                              # EOS: four documents per row

    def loss_and_grads(mask):
        model.zero_grad()
        out = model(x, mask=mask, return_mtp=cfg.num_nextn_predict_layers > 0)
        logits = out[0] if isinstance(out, tuple) else out
        loss = logits.logsumexp(-1).mean() + sum(m.square().mean() for m in (out[1] if isinstance(out, tuple) else []))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for mask in (document_mask(x, 1), None):
        monkeypatch.setattr(cpu_kernels, "installed", None)  # SDPA (and PyTorch's ops for the rest)
        ref_loss, ref = loss_and_grads(mask)
        assert use_cpu_kernels()
        loss, grads = loss_and_grads(mask)
        assert loss == pytest.approx(ref_loss, rel=1e-5) and grads.keys() == ref.keys()
        for n, g in grads.items():  # relative to each gradient's own size
            err, size = (g - ref[n]).abs().max().item(), ref[n].abs().max().item()
            assert err <= 1e-4 * size + 1e-12, (n, err, size)
    assert len(calls) == 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    with torch.no_grad():
        model(x)
    assert len(calls) == 2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)

"""Quantization: the packed CPU kernels equal their dequantized weights, packing sibling linears
changes nothing, and a quantized model stays close to the float model."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer import kernels
from nanoseek.infer.quantize import BF16Linear, FP16Linear, Int4Linear, Int8Linear, Packed, W8A8Linear, quantize

from test_model import tiny_llama


@pytest.mark.parametrize("cls,tol", [(FP16Linear, 1e-3), (BF16Linear, 4e-3), (Int8Linear, 0.01), (Int4Linear, 0.15)])
def test_packed_kernel_equals_dequantized_weights(cls, tol):
    torch.manual_seed(0)
    lin = nn.Linear(256, 99)  # 99 = 4 * 24 + 3: decode reads 4 quarters of the rows, then the 3 left
    q = cls(lin)
    for rows in (1, 3, 7, 32):  # decode rows take the C++ / packed kernel, prefill rows maybe another
        x = torch.randn(rows, 256)
        w = q.dequantize().double()
        ref = F.linear(x.double(), w, lin.bias.double()).float()
        atol = 2e-5 * ref.abs().max().item()
        if cls is Int8Linear:  # the int8 kernel rounds each activation row to 16 bits: half a step of max|x| / 32639
            atol += (w.abs().sum(1).max() * x.abs().max() / 65278).item()
        if cls is Int4Linear:  # the int4 kernel rounds each group of 32 activations to 15 bits: max|x| / 32639
            atol += (w.abs().sum(1).max() * x.abs().max() / 65278).item()
        assert torch.allclose(q(x), ref, atol=atol)
    # and the quantization error itself is bounded: int8 ~ 1/254 of the row range, int4 ~ 1/30 of a group's
    w = lin.weight.detach()
    assert (q.dequantize() - w).abs().max() <= tol * w.abs().max()


def test_w8a8_is_the_int8_weights_times_8bit_activations():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    x = torch.randn(7, 256)
    q = W8A8Linear(lin)
    exact = F.linear(x, q.dequantize(), lin.bias)
    # activations rounded to 7 bits with one scale per call: a few % of the output's range
    assert (q(x) - exact).abs().max() <= 0.03 * exact.abs().max()
    w = lin.weight.detach()
    assert (q.dequantize() - w).abs().max() <= 0.01 * w.abs().max()


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8", "int4", "w8a8"])
def test_packing_siblings_changes_nothing(mode):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    plain, packed = quantize(copy.deepcopy(model), mode, pack=False), quantize(copy.deepcopy(model), mode)
    assert sum(isinstance(m, Packed) for m in packed.modules()) == 5 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(packed(x), plain(x), atol=1e-5)
    # after a forward no packed product stays cached (a long prefill's would pin memory)
    assert all(m.shared._last[0] is None for m in packed.modules() if isinstance(m, Packed))


@pytest.mark.parametrize("mode", ["fp16", "bf16", "int8", "int4", "w8a8"])
def test_quantized_model_runs_in_the_engine(mode):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).log_softmax(-1)
        quantize(model, mode)
        got = model(x).log_softmax(-1)
    assert sum(isinstance(m, (FP16Linear, BF16Linear, Int8Linear, Int4Linear, W8A8Linear)) for m in model.modules()) > 0
    # KL(float || quantized) per token stays small
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert kl < {"fp16": 1e-4, "bf16": 1e-3, "int8": 0.02, "int4": 0.5, "w8a8": 0.02}[mode]
    out = Engine(model, max_seq_len=64).generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 5


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_quantized_moe_runs_each_expert_on_its_own_quantized_weights(mode):
    """The stacked routed experts become one quantized SwiGLU each; the quantized MoE layer equals
    the float layer whose stacked experts hold the dequantized weights."""
    from nanoseek.model.moe import LoopExperts
    from test_model import tiny_v3
    model = tiny_v3(hidden_size=64, moe_intermediate_size=32, intermediate_size=64)
    moe = model.model.layers[1].mlp
    ref, orig = copy.deepcopy(moe), copy.deepcopy(moe)
    quantize(model, mode)
    assert isinstance(moe.experts, LoopExperts) and len(moe.experts) == moe.n_experts
    with torch.no_grad():
        for e, mlp in enumerate(moe.experts):
            ref.experts.gate_up_proj[e] = mlp.gate_proj.shared.linear.dequantize()  # packed [gate; up]
            ref.experts.down_proj[e] = mlp.down_proj.dequantize()
        ref.shared_experts.gate_proj.weight.copy_(moe.shared_experts.gate_proj.shared.linear.dequantize()[:32])
        ref.shared_experts.up_proj.weight.copy_(moe.shared_experts.gate_proj.shared.linear.dequantize()[32:])
        ref.shared_experts.down_proj.weight.copy_(moe.shared_experts.down_proj.dequantize())
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
        got, want = moe(x)[0], ref(x)[0]
    # int8: the kernel rounds activations to int16 (2^-16 of a row's max, times up to K=64 terms) in
    # two chained layers, so it may differ from the float layer by up to ~1e-3 of the output's range
    # (int4: to 15 bits per group of 32)
    assert (got - want).abs().max() <= (1e-3 if mode in ("int8", "int4") else 1e-5) * want.abs().max()
    # and they are the float experts' weights, each within its mode's rounding
    tol = {"fp16": 1e-3, "int8": 0.01, "int4": 0.15}[mode]
    for name in ("gate_up_proj", "down_proj"):
        w, q = getattr(orig.experts, name), getattr(ref.experts, name)
        assert 0 < (q - w).abs().max() <= tol * w.abs().max(), name


def test_int4_storage_is_q4_1_groups_of_32():
    """The layout the C++ kernel reads: 16 bytes per group of 32, element i in byte i's low
    nibble, element i + 16 in its high nibble; each group's fp16 minimum and scale (w = q*s + min)."""
    w = torch.zeros(1, 64)
    w[0, :32] = torch.arange(32) / 31       # group 0: 0 .. 1 in 32 steps
    w[0, 32:] = -2.0                        # group 1: constant
    q = Int4Linear(type("L", (), {"weight": w, "bias": None, "in_features": 64, "out_features": 1})())
    scale, lo = q.scale_min.float()
    assert lo[0, 0] == 0 and abs(scale[0, 0] - 1 / 15) < 1e-4 and lo[0, 1] == -2
    codes = torch.round(w[0, :32] * 15)     # hand-computed: round(v / (1/15))
    assert q.q4[0, :16].tolist() == (codes[:16] + 16 * codes[16:]).int().tolist()
    assert torch.allclose(q.dequantize()[0, 32:], torch.full((32,), -2.0))


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
@pytest.mark.parametrize("kind,dtype", [(kernels.F16, torch.float16), (kernels.BF16, torch.bfloat16),
                                        (kernels.F32, torch.float32)])
def test_kernel_equals_float64_matmul_of_the_same_weights(kind, dtype):
    torch.manual_seed(0)
    for M, N, K in ((1, 5, 32), (4, 9, 64), (6, 33, 96), (2, 37, 64)):  # tails: M % 4, N % 4 nonzero
        x, w, b = torch.randn(M, K), torch.randn(N, K).to(dtype), torch.randn(N)
        ref = (x.double() @ w.double().T + b.double()).float()
        y = torch.ops.nanoseek.wmm(x, w, torch.empty(0), b, kind)
        assert torch.allclose(y, ref, atol=1e-5 * ref.abs().max().item())



@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
@pytest.mark.parametrize("kind,dtype", [(kernels.F16, torch.float16), (kernels.BF16, torch.bfloat16)])
def test_16_and_more_rows_are_the_weights_times_x_rounded_to_16_bits(kind, dtype):
    """From 16 rows of x on, an AMX CPU multiplies bf16 tiles (kernels.amx()): x_hi = bf16(x) and
    x_lo = bf16(x - x_hi), 8 significant bits each, so |x - x_hi - x_lo| <= 2^-16 |x|; fp16 weights
    split exactly into w_hi + w_lo, and w_lo x_lo (<= 2^-16 |w x|) left out. Each product is off by
    at most 2^-15 |w x|, the sum by 2^-15 sum |w| |x| plus fp32 accumulation (dropping x_lo would be
    2^-8). Elsewhere the float path, exact to fp32, meets the bound too."""
    torch.manual_seed(0)
    # row and column tails; 300 rows: more than one pass of 16 row blocks (prefill)
    for M, N, K in ((16, 32, 64), (17, 37, 96), (40, 70, 576), (64, 64, 32), (300, 37, 64)):
        x = torch.randn(M, K) * torch.rand(K) * 3
        w, b = (torch.randn(N, K) * 0.1).to(dtype), torch.randn(N)
        ref = x.double() @ w.double().T + b.double()
        y = torch.ops.nanoseek.wmm(x, w, torch.empty(0), b, kind).double()
        bound = 2 ** -15 * (x.double().abs() @ w.double().abs().T) + 1e-6 * ref.abs().max()
        assert ((y - ref).abs() <= bound).all(), (M, N, K, kernels.amx())

def q4_1_times_x15(x, q):
    """The int4 kernel's product by hand, in float64: each group of 32 activations rounded to
    integers |q| <= 32639 with scale max|x| / 32639, times the 4-bit codes, times both scales, plus
    the group's minimum times the sum of its (float) activations."""
    N, K = q.out_features, q.in_features
    b = q.q4.view(N, K // 32, 16).long()
    codes = torch.cat([b & 15, b >> 4], dim=-1).double()             # [N, G, 32]
    scale, lo = q.scale_min.double()                                  # [N, G]
    xg = x.double().view(len(x), K // 32, 32)
    d = xg.abs().amax(-1) / 32639                                      # [M, G]
    xq = torch.round(xg / d.clamp(min=1e-30)[..., None])
    dots = torch.einsum("mgt,ngt->mng", xq, codes)                    # integer dot per group
    return (dots * d[:, None] * scale[None]).sum(-1) + xg.sum(-1) @ lo.T


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
def test_int8_kernel_is_int8_weights_times_16_bit_activations():
    """By hand in float64: each activation row rounded to integers |q| <= L with scale max|x| / L,
    times the int8 codes, times both scales. L = 32639 where the kernel splits q into two int8 digits
    for vpdpbusd (AVX512-VNNI, K % 64 == 0), 32767 on the int16 path (AVX2, other K)."""
    torch.manual_seed(0)
    for M, N, K in ((1, 5, 64), (4, 9, 128), (6, 33, 576), (1, 7, 96), (3, 45, 1536)):
        lin = nn.Linear(K, N, bias=False)
        q = Int8Linear(lin)
        x = torch.randn(M, K) * torch.rand(K) * 3
        y = q(x).double()
        refs, w = [], q.weight_int8.double()
        for levels in (32639, 32767):
            d = x.double().abs().amax(-1, keepdim=True) / levels
            refs.append((torch.round(x.double() / d) @ w.T) * d * q.scales.double())
        # the kernel's fp32 x * (1 / scale) (built with -ffast-math) may round a value or two the other way
        step = (x.abs().max() / 32639 * (w.abs().amax(1) * q.scales.double()).max()).item()
        err = min((y - r).abs().max().item() for r in refs)
        assert err <= 1e-6 * refs[0].abs().max().item() + 2 * step, (M, N, K)



@pytest.mark.skipif(not kernels.amx(), reason="no AMX (or NANOSEEK_AMX=0)")
def test_int8_on_amx_tiles_equals_one_row_at_a_time():
    """From 16 rows on, AMX multiplies int8 weights by the same 16-bit digits of x as the one-row VNNI
    path, with exact integer sums: every row of a batch equals that row alone, bit for bit."""
    torch.manual_seed(0)
    for N, K, M in ((37, 64, 16), (70, 576, 40), (96, 1536, 32)):  # 32-row blocks and a tail; m tails
        q = Int8Linear(nn.Linear(K, N))
        x = torch.randn(M, K) * torch.rand(K) * 3
        with torch.no_grad():
            assert torch.equal(q(x), torch.cat([q(x[i:i + 1]) for i in range(M)])), (N, K, M)


@pytest.mark.skipif(not kernels.amx(), reason="no AMX (or NANOSEEK_AMX=0)")
def test_int4_on_amx_tiles_is_the_dequantized_weights_times_x_rounded_to_16_bits():
    """From 16 rows on, AMX multiplies int4 weights dequantized per group (scale code + minimum, in
    fp32) and split into two bf16 parts (within 2^-16), by x split the same way (2^-16), w_lo x_lo left
    out (2^-16): each product within 3 * 2^-16 < 2^-14 of the float64 product of the same weights."""
    torch.manual_seed(0)
    for N, K, M in ((37, 64, 16), (70, 576, 40), (45, 96, 300)):  # a 32-row tail; K = 96: 3 groups
        q = Int4Linear(nn.Linear(K, N))
        x = torch.randn(M, K) * torch.rand(K) * 3
        w = q.dequantize().double()
        ref = x.double() @ w.T + q.bias.double()
        with torch.no_grad():
            err = (q(x).double() - ref).abs()
        assert (err <= 2 ** -14 * (x.double().abs() @ w.abs().T) + 1e-6 * ref.abs().max()).all(), (N, K, M)

@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
def test_int4_kernel_is_q4_1_times_15_bit_activations():
    torch.manual_seed(0)
    for M, N, K in ((1, 5, 64), (4, 9, 128), (6, 33, 576), (3, 7, 96), (1, 45, 128)):  # tails; K = 96: 3 groups
        lin = nn.Linear(K, N, bias=False)
        q = Int4Linear(lin)
        x = torch.randn(M, K) * torch.rand(K) * 3                      # groups of unequal range
        ref = q4_1_times_x15(x, q)
        width = kernels.vector_width()  # AVX-512 packs 2 groups per vector: odd counts run in float, as do
        if width < 8 or (width == 16 and K % 64):  # CPUs without AVX2
            ref = x.double() @ q.dequantize().double().T
        assert torch.allclose(q(x).double(), ref, atol=1e-5 * ref.abs().max().item()), (M, N, K)


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_is_softmax_qk_v_over_the_unmasked_keys(cache_dtype):
    """The decode attention kernel against the formula in float64: per query head h (GQA: kv head
    h // (H / G)), softmax over the keys the mask lets through of q.k * scale, times V. Rows read
    from a larger cache (strided views), rows of different lengths, head sizes on each code path
    (1, 2, 4, 8 vectors, and 24 / Dv != D on the plain loop). An fp16 cache: the same formula on its
    fp16 values (the queries stay fp32)."""
    torch.manual_seed(0)
    width = kernels.vector_width()
    for B, H, G, S, D, Dv in ((1, 9, 3, 150, 64, 64), (3, 8, 8, 37, 24, 24), (2, 4, 1, 5, width, width),
                              (2, 4, 2, 70, 2 * width, 2 * width), (2, 2, 2, 9, 8 * width, 8 * width),
                              (4, 6, 2, 33, 32, 16)):
        k_cache, v_cache = torch.randn(B + 2, S + 7, G, D, dtype=cache_dtype), torch.randn(B + 2, S + 7, G, Dv, dtype=cache_dtype)
        k, v, q = k_cache[1:B + 1, :S], v_cache[1:B + 1, :S], torch.randn(B, 1, H, D) * 3
        pos = torch.randint(0, S, (B, 1))
        pos[0] = S - 1
        mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]     # [B, 1, 1, S]
        out = kernels.decode_attention(q, k, v, mask, 0.3)
        kv_head = torch.arange(H) // (H // G)
        scores = torch.einsum("bhd,bshd->bhs", q[:, 0].double(), k[:, :, kv_head].double()) * 0.3
        p = scores.masked_fill(~mask[:, 0], float("-inf")).softmax(-1)
        ref = torch.einsum("bhs,bshd->bhd", p, v[:, :, kv_head].double())[:, None]
        assert out.shape == (B, 1, H, Dv)
        assert torch.allclose(out.double(), ref, atol=1e-5 * ref.abs().max().item()), (B, H, G, S, D, Dv)


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
def test_training_attention_and_its_gradients_are_the_formula():
    """The fused training attention against softmax(q k^T scale + mask) v and its autograd gradients
    in float64: causal (keys j <= i + S - T), document masks (each row's span dense), masks with holes
    inside a row's span, GQA, odd head sizes, Dv != D, 8 vectors per head; a row that may attend no
    key gives 0 and passes no gradient (SDPA: NaN)."""
    torch.manual_seed(0)
    width = kernels.vector_width()
    for B, H, G, T, S, D, Dv, kind in ((2, 4, 4, 37, 37, 24, 16, "causal"), (2, 4, 2, 40, 50, 16, 16, "doc"),
                                       (3, 8, 8, 128, 128, 24, 16, "doc"), (2, 6, 3, 20, 20, 7, 5, "holes"),
                                       (1, 2, 1, 33, 45, 8 * width, 8 * width, "causal"),
                                       (2, 2, 2, 30, 30, 24, 24, "empty")):
        q, k = torch.randn(B, H, T, D, dtype=torch.float64) * 2, torch.randn(B, G, S, D, dtype=torch.float64)
        v, go = torch.randn(B, G, S, Dv, dtype=torch.float64), torch.randn(B, H, T, Dv, dtype=torch.float64)
        causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        doc = torch.cumsum(torch.rand(B, S) < 1 / 12, 1)
        mask = {"causal": None, "doc": (doc[:, -T:, None] == doc[:, None, :]) & causal,
                "holes": causal & (torch.rand(B, T, S) < 0.6) | (torch.arange(S) == torch.arange(T)[:, None] + S - T),
                "empty": causal.expand(B, T, S).clone()}[kind]
        if kind == "empty":
            mask[0, 3] = False
        mask = None if mask is None else mask[:, None]
        allow = causal if mask is None else mask
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        qr, kr, vr = leaves[0], leaves[1].repeat_interleave(H // G, 1), leaves[2].repeat_interleave(H // G, 1)
        p = ((qr @ kr.transpose(-1, -2)) * 0.3).masked_fill(~allow, float("-inf")).softmax(-1).nan_to_num()
        ref = p @ vr
        refs = (ref, *torch.autograd.grad(ref, leaves, go))
        ours = [t.float().requires_grad_() for t in (q, k, v)]
        out = kernels.attention(*ours, mask, 0.3)
        got = (out, *torch.autograd.grad(out, ours, go.float()))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, refs):
            assert a.shape == b.shape and torch.allclose(a.double(), b, atol=1e-5 * b.abs().max().item()), (
                kind, name, (a.double() - b).abs().max().item())


@pytest.mark.skipif(not kernels.available(), reason="no C++ compiler")
def test_kernel_library_is_built_with_openmp():
    """at::parallel_for is a header template around `#pragma omp parallel`: built without -fopenmp
    the kernel silently ran on one thread (4x slower on 2 cores); with it, the library calls the
    OpenMP runtime."""
    lib = kernels._cache_dir() / "nanoseek_kernels.so"
    assert b"GOMP_parallel" in lib.read_bytes()


def test_without_a_compiler_the_engine_falls_back_and_says_so(tmp_path):
    """No C++ compiler (CXX names none, empty kernel cache): int8 still decodes, with PyTorch's
    kernels, and Engine.path says which."""
    code = ("import sys; sys.path.insert(0, 'tests'); from test_model import tiny_llama\n"
            "from nanoseek.infer import Engine, SamplingParams, kernels\n"
            "from nanoseek.infer.quantize import quantize\n"
            "m = quantize(tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2), 'int8')\n"
            "e = Engine(m, max_seq_len=32)\n"
            "out = e.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
            "print(kernels.available(), len(out[0].token_ids), e.path)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), NANOSEEK_KERNEL_CACHE=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["False", "4"]
    assert "Int8Linear" in r.stdout and "no C++ kernel" in r.stdout

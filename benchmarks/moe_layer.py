"""The MoE layer's cost against a dense SwiGLU of the same active size, and against transformers.

    .venv/bin/python benchmarks/moe_layer.py                 # tiny and small presets, ~5 minutes on 1 thread
    .venv/bin/python benchmarks/moe_layer.py --quick         # tiny only, fewer repeats

Layer (forward + backward of one block on --tokens rows, new random ones at every call, so a new
routing as in training):
  ours         nanoseek.model.moe.MoE as training runs it, with the C++ kernels installed as every training
               command installs them (train.run.use_cpu_kernels): the C++ gate and dispatch plan
               (infer/ffn.cpp), then the fused experts (infer/moe.cpp: gather, shared and routed
               experts, SwiGLU and combine inside its own GEMM tiles) in fp32, and in bf16 where the
               CPU has AVX512_BF16 (elsewhere bf16 takes grouped GEMMs with the C++ SwiGLU)
  ours_unfused the same without the fused experts (MoE.FUSED off: grouped GEMMs on the stacked experts)
  ours_pytorch the same module with PyTorch's ops in their place (the kernels not installed)
  ours_compiled  the same module with MoE.COMPILE = True (the SwiGLU between the grouped GEMMs through
               torch.compile; the first call's time, compiling included, is reported apart)
  ours_loop    the same module with the per-expert loop forced (MoE.GROUPED = False)
  dense        nanoseek's SwiGLU MLP with intermediate (top_k + shared) x moe_intermediate_size:
               the MoE's active FFN parameters (the gate's E x H aside), as training runs it (with the
               kernels: [gate; up] as one GEMM, the C++ SwiGLU); dense_pytorch: with PyTorch's ops
  hf_eager / hf_grouped_mm   transformers' DeepseekV3MoE on the same config and weights, with its
               per-expert loop and with its grouped_mm experts implementation
  gemms_alone  the MoE block's matrix products alone (gate, shared expert, grouped GEMMs, each with
               its two gradient products) at the shapes of one call: a floor for the block with
               these GEMM kernels, everything else (routing, gather, SwiGLU, combine) left out;
               dense_gemms_alone: the same for the dense block
in fp32, and in bf16 when the CPU has native bf16 (AVX512_BF16 or AMX, read from /proc/cpuinfo) and
torch runs AVX-512 code (not under ATEN_CPU_CAPABILITY=avx2).
The systems run in interleaved rounds in one process (the machine is shared and noisy, so each
round sees the same load); a figure is the best round's median. glibc's malloc keeps freed blocks,
as the training commands have it (train.run.keep_freed_memory). With 1 thread the clock is the
thread's CPU time (time.thread_time: all the work runs on the calling thread, and time spent
descheduled by other jobs on a shared machine is left out); with more threads, wall time.

Decode: one step of the tiny DeepSeek-V3 preset (MLA + MoE, no MTP) at batch 1 and 32 with a
latent cache of --context tokens, against the same model with dense FFNs of its active size, with
the MoE's dispatch as it runs (the kernels installed, as in GRPO's rollouts: fp32 from 2 tokens on,
the fused experts), without the fused experts (grouped GEMMs), with PyTorch's ops instead, and with
the per-expert loop forced.

Balance: the tiny preset's gate on a skewed input distribution, the auxiliary-loss-free bias
update (γ = 1e-3, DeepSeek-V3 §2.1.2) run for --balance-steps steps on the measured load; the
expert load max/mean before and after.

Prints the CPU capability, its native bf16 flags, its measured bounds (matmul GFLOP/s, copy GB/s), the
layer's expert load max/mean on the benchmark tokens, a table, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from nanoseek.config import preset  # noqa: E402
from nanoseek.cost import cpu_info, measure_cpu  # noqa: E402
from nanoseek.model.cache import KVCache  # noqa: E402
from nanoseek.model import cpu_kernels  # noqa: E402
from nanoseek.model import moe as moe_module  # noqa: E402
from nanoseek.model.moe import MLP, MoE  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.train.objective import load_stats, update_bias  # noqa: E402
from nanoseek.train.run import choose_cpu_gemm, keep_freed_memory, use_cpu_kernels  # noqa: E402


def cpu_bf16() -> tuple[str, list[str]]:
    """torch's CPU capability and the native bf16 flags of this CPU; none where torch runs below AVX-512
    (ATEN_CPU_CAPABILITY=avx2, as benchmarks/decode.py --isa avx2 sets it: an AVX2 machine's code)."""
    cap = torch.backends.cpu.get_cpu_capability()
    flags = cpu_info()[1] if cap.startswith("AVX512") else set()
    return cap, [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


@contextmanager
def forced_path(path: str | None):
    """None: the dispatch as it runs; "loop": the per-expert loop forced; "compiled": MoE.COMPILE on;
    "pytorch": PyTorch's ops in place of the C++ kernels and its own products (model.cpu_kernels.installed
    None, onednn off); "unfused": the
    C++ kernels without the fused experts (MoE.FUSED off: grouped GEMMs with the C++ SwiGLU, gate and plan)."""
    old = MoE.GROUPED, MoE.COMPILE, MoE.FUSED, cpu_kernels.installed, cpu_kernels.onednn
    MoE.GROUPED = {"loop": False}.get(path, old[0])
    MoE.COMPILE = path == "compiled" or old[1]
    MoE.FUSED = old[2] and path not in ("unfused", "loop", "compiled")
    if path == "pytorch":
        cpu_kernels.installed, cpu_kernels.onednn = None, False
    try:
        yield
    finally:
        MoE.GROUPED, MoE.COMPILE, MoE.FUSED, cpu_kernels.installed, cpu_kernels.onednn = old


def rounds(fns: dict, repeats: int, n_rounds: int) -> dict[str, float]:
    """Best over interleaved rounds of the median of `repeats` timed calls, seconds."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    best = {n: float("inf") for n in fns}
    for f in fns.values():
        f()  # warm up
    for _ in range(n_rounds):
        for n, f in fns.items():
            ts = []
            for _ in range(repeats):
                t0 = clock()
                f()
                ts.append(clock() - t0)
            best[n] = min(best[n], statistics.median(ts))
    return best


def hf_moe(cfg, ours: MoE, implementation: str):
    """transformers' DeepseekV3MoE with the same config and our weights."""
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_config())
    hf_cfg._experts_implementation = implementation
    m = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        m.gate.weight.copy_(ours.gate.weight)
        m.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        m.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)  # the same stacked layout
        m.experts.down_proj.copy_(ours.experts.down_proj)
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(m.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
    return m


def layer(name: str, dtype: torch.dtype, tokens: int, repeats: int, n_rounds: int) -> dict:
    cfg = preset(name)
    torch.manual_seed(0)
    ours = MoE(cfg)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():  # a trained-like, uneven but not degenerate routing
        ours.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    active_ffn = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = MLP(cfg.hidden_size, active_ffn)
    models = {"ours": ours, "dense": dense}
    for impl in ("eager", "grouped_mm"):
        try:
            models[f"hf_{impl}"] = hf_moe(cfg, ours, impl)
        except Exception as e:  # an implementation this transformers does not have
            print(f"  transformers {impl}: {e}", file=sys.stderr)
    models = {n: m.to(dtype) for n, m in models.items()}
    x = torch.randn(tokens, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(1)).requires_grad_()
    dy = torch.randn(tokens, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(2))

    seeds = iter(range(10, 10 ** 6, 1000))

    def step(m, path=None):
        # a new input, so a new routing, at every call, as in training: CPU bf16 GEMMs (oneDNN) set up
        # each new row count anew, and one input repeated would hide that from the MoE (each expert's
        # rows, so its GEMM shapes, would repeat). No two calls of any system see the same input.
        s0 = next(seeds)
        inputs = iter([torch.randn(tokens, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(s0 + i))
                       .requires_grad_() for i in range(repeats * n_rounds + 1)])

        def f():
            m.zero_grad(set_to_none=True)  # as a training step leaves them: the backward writes, not adds
            with forced_path(path):
                out = m(next(inputs))
            (out[0] if isinstance(out, tuple) else out).backward(dy)
        return f

    t0 = time.perf_counter()
    step(ours, "compiled")()  # the first call compiles (or finds inductor's on-disk cache)
    compile_s = time.perf_counter() - t0
    if moe_module._COMPILED.get("swiglu") is moe_module.swiglu:
        print("  torch.compile failed: ours_compiled ran eagerly", file=sys.stderr)
    fns = {"ours": step(ours), "ours_unfused": step(ours, "unfused"), "ours_pytorch": step(ours, "pytorch"),
           "ours_compiled": step(ours, "compiled"),
           "ours_loop": step(ours, "loop"), "dense": step(dense), "dense_pytorch": step(dense, "pytorch")}
    for n in ("hf_eager", "hf_grouped_mm"):
        if n in models:
            try:
                step(models[n])()
                fns[n] = step(models[n])
            except Exception as e:
                print(f"  transformers {n}: {str(e)[:100]}", file=sys.stderr)
    with torch.no_grad():  # the systems compute the same function
        ref = models["hf_eager"](x) if "hf_eager" in models else None
        got, routing = ours(x)
        with forced_path("compiled"):
            got_c, _ = ours(x)
    load = routing.load.double()
    err = None if ref is None else float((got - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    err_c = None if ref is None else float((got_c - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    t = rounds(fns, repeats, n_rounds)
    t["gemms_alone"], t["dense_gemms_alone"] = gemm_floor(cfg, dtype, tokens, load, repeats, n_rounds)
    res = {"preset": name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
           "ms": {n: round(v * 1e3, 2) for n, v in t.items()},
           "ratio_vs_dense": {n: round(v / t["dense"], 3) for n, v in t.items()},
           "max_rel_diff_vs_hf_eager": err, "max_rel_diff_compiled_vs_hf_eager": err_c,
           "first_compiled_call_s": round(compile_s, 2), "load_max_mean": round(float(load.max() / load.mean()), 3)}
    print(f"  {name} {res['dtype']}: {res['ms']}", file=sys.stderr, flush=True)
    return res


def gemm_floor(cfg, dtype: torch.dtype, tokens: int, load: torch.Tensor, repeats: int,
               n_rounds: int) -> tuple[float, float]:
    """Seconds for the MoE block's matrix products alone, forward and backward (each product and its
    two gradient products), on random operands of the shapes one call of the block has with this
    routing (`load`, padded as MoE.dispatch pads): the gate, the shared expert, the two grouped
    GEMMs. Everything else the block does (routing, gather, SwiGLU, combine) left out: a floor for
    the block with these GEMM kernels. Then the same for the dense block's products."""
    import torch.nn.functional as F
    mm = cpu_kernels.linear  # a @ b^T as the layers compute it (oneDNN where training picks it)
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    _, counts, rows = moe_module.padded_layout(load.long(), int(load.sum()),
                                               moe_module.PAD_ROWS if dtype.itemsize == 2 else 1)
    offs = counts.cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(5)
    r = lambda *shape, dt=dtype: torch.randn(*shape, dtype=dt, generator=g)  # noqa: E731
    x, xs, gu, h, ys = r(tokens, H), r(rows, H), r(rows, 2 * I), r(rows, I), r(rows, H)
    w1, w2 = r(E, 2 * I, H), r(E, H, I)
    Is = I * cfg.n_shared_experts
    wg, wd, hs, xf, wr, lg = r(Is, H), r(H, Is), r(tokens, Is), r(tokens, H, dt=torch.float32), \
        r(E, H, dt=torch.float32), r(tokens, E, dt=torch.float32)
    products = [
        lambda: F.grouped_mm(xs, w1.transpose(1, 2), offs=offs), lambda: F.grouped_mm(gu, w1, offs=offs),
        lambda: F.grouped_mm(gu.t(), xs, offs=offs),                      # gate_up: y, dx, dW
        lambda: F.grouped_mm(h, w2.transpose(1, 2), offs=offs), lambda: F.grouped_mm(ys, w2, offs=offs),
        lambda: F.grouped_mm(ys.t(), h, offs=offs),                       # down
        lambda: mm(x, wg), lambda: mm(x, wg), lambda: mm(hs, wg.t()), lambda: mm(hs, wg.t()),
        lambda: mm(hs.t(), x.t()), lambda: mm(hs.t(), x.t()),            # shared gate and up
        lambda: mm(hs, wd), lambda: mm(x, wd.t()), lambda: mm(x.t(), hs.t()),  # shared down
        lambda: mm(xf, wr), lambda: mm(lg, wr.t()), lambda: mm(lg.t(), xf.t())]  # the gate, in fp32
    Id = I * (cfg.num_experts_per_tok + cfg.n_shared_experts)                # the dense block's
    wdg, wdd, hd = r(Id, H), r(H, Id), r(tokens, Id)
    dense = [lambda: mm(x, wdg), lambda: mm(x, wdg), lambda: mm(hd, wdg.t()), lambda: mm(hd, wdg.t()),
             lambda: mm(hd.t(), x.t()), lambda: mm(hd.t(), x.t()), lambda: mm(hd, wdd), lambda: mm(x, wdd.t()),
             lambda: mm(x.t(), hd.t())]
    t = rounds({"moe": lambda: [f() for f in products], "dense": lambda: [f() for f in dense]}, repeats, n_rounds)
    return t["moe"], t["dense"]


def decode_models():
    cfg = preset("tiny").replace(num_nextn_predict_layers=0)
    dense_cfg = cfg.replace(first_k_dense_replace=cfg.num_hidden_layers,
                            intermediate_size=cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts))
    out = {}
    for n, c in (("moe", cfg), ("dense", dense_cfg)):
        torch.manual_seed(0)
        out[n] = Transformer(c).eval()
    return out


@torch.no_grad()  # as the engine decodes (before 2026-12-07 this ran with autograd on)
def decode(batch: int, context: int, repeats: int, n_rounds: int) -> dict:
    models = decode_models()
    vocab = models["moe"].config.vocab_size
    ids = torch.randint(0, vocab, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    caches = {}
    for n, m in models.items():
        cache = KVCache.for_model(m.config, batch, context + 1)
        pos = torch.arange(context).expand(batch, context)
        m(ids[:, :context], positions=pos, cache=cache)
        caches[n] = cache
    last = torch.full((batch, 1), context)

    def step(n, path=None):
        def f():  # writes the same slot every call: the cost of one step at this context
            with forced_path(path):
                models[n](ids[:, context:], positions=last, cache=caches[n])
        return f

    fns = {"moe": step("moe"), "moe_unfused": step("moe", "unfused"), "moe_pytorch": step("moe", "pytorch"),
           "moe_loop": step("moe", "loop"),
           "dense": step("dense")}
    t = rounds(fns, repeats, n_rounds)
    res = {"batch": batch, "context": context, "ms": {n: round(v * 1e3, 3) for n, v in t.items()},
           "ratio_vs_dense": {n: round(v / t["dense"], 3) for n, v in t.items()}}
    print(f"  decode batch {batch}: {res['ms']}", file=sys.stderr, flush=True)
    return res


@torch.no_grad()
def balance(steps: int, tokens: int = 2048) -> dict:
    """Expert load max/mean of the tiny preset's gate under skewed inputs, before and after the
    auxiliary-loss-free bias update."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    g = torch.Generator().manual_seed(3)
    skew = torch.randn(cfg.hidden_size, generator=g) * 2.0  # a shared direction: routing piles up
    history = []
    for _ in range(steps + 1):
        x = torch.randn(tokens, cfg.hidden_size, generator=g) + skew
        _, idx, _ = moe.gate(x)
        load = torch.bincount(idx.flatten(), minlength=moe.n_experts).double()[None]
        history.append(load_stats(load)[0])
        update_bias([moe], load, 1e-3)
    return {"steps": steps, "load_max_mean_first": round(history[0], 3),
            "load_max_mean_last_10pct": round(statistics.fmean(history[-max(1, steps // 10):]), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  .venv/bin/python benchmarks/moe_layer.py --quick")
    p.add_argument("--tokens", type=int, default=2048, help="rows per layer call (default 16 x 128)")
    p.add_argument("--presets", nargs="*", default=["tiny", "small"])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--balance-steps", type=int, default=1000)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.presets, a.rounds, a.balance_steps = ["tiny"], 2, 300
    if min(a.tokens, a.context, a.threads, a.rounds, a.balance_steps) < 1:
        p.error("--tokens, --context, --threads, --rounds and --balance-steps must be at least 1")
    for name in a.presets:
        if name not in ("tiny", "small"):
            p.error(f"--presets: {name!r} is not one of tiny, small")
    torch.set_num_threads(a.threads)
    freed = keep_freed_memory()  # as the training commands run (nanoseek/train/run.py)
    kernels = use_cpu_kernels()
    choose_cpu_gemm()
    cap, bf16_flags = cpu_bf16()
    bounds = measure_cpu()
    print(f"CPU capability {cap}; native bf16: {', '.join(bf16_flags) or 'no'}; {a.threads} thread(s) "
          f"({'thread CPU time' if a.threads == 1 else 'wall time'}); "
          f"matmul fp32 {bounds['fp32_flops'] / 1e9:.0f} GFLOP/s, bf16 {bounds['bf16_flops'] / 1e9:.0f} GFLOP/s; "
          f"copy {bounds['bandwidth_gbs']:.1f} GB/s; malloc keeps freed blocks: {freed}; "
          f"C++ feed-forward kernels: {'yes' if kernels else 'no (ours = ours_pytorch)'}; "
          f"fp32 products: {cpu_kernels.gemm}", file=sys.stderr)
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_flags else [])
    layers = [layer(n, dt, a.tokens, 5 if n == "tiny" else 2, a.rounds) for n in a.presets for dt in dtypes]
    decodes = [decode(b, a.context, 20, a.rounds) for b in (1, 32)]
    bal = balance(a.balance_steps)

    print(f"\nMoE layer, forward + backward on {a.tokens} tokens, ms (ratio to the dense SwiGLU of the same "
          f"active size); CPU {cap}, native bf16 {'/'.join(bf16_flags) or 'no'}, {a.threads} thread(s)\n")
    cols = ["ours", "ours_pytorch", "ours_compiled", "ours_loop", "dense", "dense_pytorch", "hf_eager",
            "hf_grouped_mm", "gemms_alone", "dense_gemms_alone"]
    print("| preset | dtype | " + " | ".join(cols) + " | expert load max/mean |")
    print("|---|---|" + "---:|" * (len(cols) + 1))
    for r in layers:
        cells = [f"{r['ms'][c]:.1f} ({r['ratio_vs_dense'][c]:.2f}x)" if c in r["ms"] else "-" for c in cols]
        print(f"| {r['preset']} | {r['dtype']} | " + " | ".join(cells) + f" | {r['load_max_mean']} |")
    print(f"\nDecode step, tiny V3 vs dense of equal active size, context {a.context}, fp32, ms (ratio to dense)\n")
    print("| batch | MoE (grouped GEMMs) | MoE, PyTorch's ops | MoE, loop forced | dense |")
    print("|---:|---:|---:|---:|---:|")
    for r in decodes:
        print(f"| {r['batch']} | " + " | ".join(f"{r['ms'][c]:.2f} ({r['ratio_vs_dense'][c]:.2f}x)"
                                               for c in ("moe", "moe_pytorch", "moe_loop", "dense")) + " |")
    print(f"\nExpert load max/mean, tiny gate, skewed inputs: {bal['load_max_mean_first']} at the start, "
          f"{bal['load_max_mean_last_10pct']} over the last 10% of {bal['steps']} bias updates\n")
    print(json.dumps({"benchmark": "moe_layer", "cpu_capability": cap, "native_bf16": bf16_flags,
                      "threads": a.threads, "cpu_kernels": kernels,
                      "clock": "thread_time" if a.threads == 1 else "perf_counter",
                      "matmul_gflops_fp32": round(bounds["fp32_flops"] / 1e9, 1),
                      "matmul_gflops_bf16": round(bounds["bf16_flops"] / 1e9, 1),
                      "copy_gbs": round(bounds["bandwidth_gbs"], 1),
                      "layer": layers, "decode": decodes, "balance": bal}))


if __name__ == "__main__":
    main()

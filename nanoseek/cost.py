"""What training and serving a model costs: FLOPs, GPU-hours, dollars, KV-cache bytes, tokens/s.

    nanoseek cost                                   # DeepSeek-V3: reproduce the paper's Table 1
    nanoseek cost --model small --tokens 2B --gpu h100 --mfu 0.35 --json
    nanoseek cost --model out/ --gpu cpu            # this machine, measured matmul FLOP/s
    nanoseek cost --plot cost.png                   # cost breakdown + KV cache vs context length

    from nanoseek.cost import flops_per_token, training_cost, serving_cost, reproduce_deepseek_v3

Conventions (the ones `tests/test_cost.py` checks against torch's FlopCounterMode):
* a matmul of [m, k] x [k, n] is 2·m·k·n FLOPs; forward = 2 × active matmul weights per token
  (attention projections, MoE gate + shared + top-k routed experts, dense FFNs, LM head;
  the embedding lookup, norms, softmax and RoPE are not counted) + attention scores/values;
* attention per token per layer = 2·heads·context·(qk_dim + v_dim), for MLA qk_dim =
  qk_nope + qk_rope and v_dim = v_head_dim. `causal=True` (the default) counts only the unmasked
  (query, key) pairs: mean context (T+1)/2 for a sequence of T tokens. FlopCounterMode does not
  discount causal masks (it counts T², see the "NB" in torch/utils/flop_counter.py): `causal=False`;
* training = 3 × forward (backward = 2 × forward: gradients of inputs and of weights);
* MTP modules (DeepSeek-V3 §2.2, depth 1) are counted when the config has them and `mtp=True`:
  eh_proj + one more block + the shared LM head again;
* MFU = model FLOPs per second / the GPU's dense peak (no 2:4 sparsity) at the chosen precision.
Serving numbers are roofline upper bounds: a decode step reads the weights it touches once plus
every sequence's KV cache, over the aggregate HBM bandwidth, or is compute-bound at the peak.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write
from .config import PRESETS, ModelConfig, load_config, preset
from .args import HelpFormatter
from .errors import NanoseekError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float          # dense tensor-core peak, no sparsity
    fp8_tflops: float | None    # None: no FP8 tensor cores
    memory_gb: float
    bandwidth_tbs: float        # HBM TB/s
    price: float = 2.0          # $/GPU-hour default (DeepSeek-V3's assumption for the H800)


# Datasheet peaks. NVIDIA quotes tensor-core TFLOPS "with sparsity"; dense is half of that.
# - H100 SXM: NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 / FP8 3,958 TFLOPS
#   with sparsity -> 989.4 / 1978.9 dense; 80 GB HBM3, 3.35 TB/s (table also in
#   glennklockwood.com/garden/processors/h100).
# - H800 SXM: the export variant of the same GH100 part: same tensor-core peaks, memory and HBM
#   bandwidth as H100 SXM; NVLink cut to 400 GB/s and FP64 cut (NVIDIA H800 brief; DeepSeek-V3 §3.1).
# - H200 SXM: NVIDIA H200 datasheet: same tensor cores as H100 SXM; 141 GB HBM3e, 4.8 TB/s.
# - A100 SXM 80GB: NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
#   BF16 312 TFLOPS dense (624 sparse), no FP8; 80 GB HBM2e, 2,039 GB/s.
# - B200 (HGX B200, 1,000 W): NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS and FP8 9 PFLOPS
#   with sparsity -> 2,250 / 4,500 dense; 180 GB HBM3e, 7.7 TB/s.
# - cpu: this machine, measured (a short fp32 and bf16 matmul timing and a copy); $0.10/hour is an
#   assumed small cloud VM, override with --price.
GPUS = {
    "h800": GPU("H800 SXM", 989.4, 1978.9, 80, 3.35),
    "h100": GPU("H100 SXM", 989.4, 1978.9, 80, 3.35),
    "h200": GPU("H200 SXM", 989.4, 1978.9, 141, 4.8),
    "a100": GPU("A100 SXM 80GB", 312.0, None, 80, 2.039),
    "b200": GPU("B200 (HGX)", 2250.0, 4500.0, 180, 7.7),
}
CPU_PRICE = 0.10
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}

# MFU assumption: Llama 3 405B reports 38-43% BF16 MFU on 8K-16K H100s (Llama 3 paper, Table 4);
# we take a round 40%, against the BF16 peak although DeepSeek-V3 ran its GEMMs in FP8 (measured
# against the FP8 peak the same run is ~20% MFU).
DEFAULT_MFU = 0.40
CPU_MFU = 0.3  # assumed share of the measured big-matmul rate a small model's training step reaches

# DeepSeek-V3 technical report (arXiv 2412.19437): Table 1 and §1 (H800 GPU-hours, $2/GPU-hour),
# §4.2 (14.8T tokens at sequence length 4K, MTP depth 1), §4.3 (two 1000-step context-extension
# phases: 32K x batch 1920, then 128K x batch 480).
V3_PAPER = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3, "total": 2788e3}
V3_TOKENS, V3_SEQ_LEN, V3_PRICE = 14.8e12, 4096, 2.0
V3_EXTENSION = [(1000, 1920, 32 * 1024), (1000, 480, 128 * 1024)]  # (steps, batch, sequence length)


# ------------------------------------------------------------------------------------- FLOPs
def active_matmul_weights(cfg: ModelConfig) -> dict[str, int]:
    """Matmul weights one token passes through in the main model, by kind (MTP excluded)."""
    out = {"attention": cfg.num_hidden_layers * cfg.attention_matmul_weights(), "dense_ffn": 0,
           "moe_gate": 0, "moe_shared": 0, "moe_routed": 0}
    for i in range(cfg.num_hidden_layers):
        for k, v in cfg.ffn_matmul_weights(i).items():
            out[k] += v
    out["lm_head"] = cfg.hidden_size * cfg.vocab_size
    return out


def attention_flops(cfg: ModelConfig, context: float, absorbed: bool = False) -> float:
    """Score + value FLOPs of one query token against `context` keys, one layer.

    absorbed=True is MLA decode over the latent cache: scores against c_kv (kv_lora_rank) and
    k_pe (qk_rope), values from c_kv; the absorbed kv_b_proj costs what kv_b_proj itself costs.
    """
    nh = cfg.num_attention_heads
    if cfg.is_mla and absorbed:
        return 2 * nh * context * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.head_dim, cfg.head_dim)
    return 2 * nh * context * (qk + v)


def mean_context(seq_len: int, causal: bool = True) -> float:
    return (seq_len + 1) / 2 if causal else float(seq_len)


def mtp_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True, depth: int = 0) -> float:
    """Forward FLOPs per token of MTP module `depth`: eh_proj, its block, the shared LM head."""
    layer = cfg.num_hidden_layers + depth  # MTP blocks sit after the main layers (MoE for V3)
    w = 2 * cfg.hidden_size ** 2 + cfg.attention_matmul_weights() + sum(cfg.ffn_matmul_weights(layer).values())
    w += cfg.hidden_size * cfg.vocab_size
    return 2 * w + attention_flops(cfg, mean_context(seq_len, causal))


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True, mtp: bool = False) -> dict:
    """Forward and training FLOPs per token for sequences of `seq_len` tokens, with a breakdown."""
    w = active_matmul_weights(cfg)
    parts = {k: 2.0 * v for k, v in w.items()}
    parts["attention_scores"] = cfg.num_hidden_layers * attention_flops(cfg, mean_context(seq_len, causal))
    parts["mtp"] = sum(mtp_flops_per_token(cfg, seq_len, causal, k) for k in range(cfg.num_nextn_predict_layers)
                       if mtp)
    forward = sum(parts.values())
    return {"active_matmul_weights": sum(w.values()), "forward": forward, "train": 3 * forward,
            "forward_breakdown": parts}


# -------------------------------------------------------------------------- GPUs and training
def gpu_spec(name: str) -> GPU:
    key = name.lower().replace("-", "").replace(" ", "").removesuffix("sxm")
    if key == "cpu":
        m = measure_cpu()
        return GPU(f"this CPU ({m['dtype']} matmul, measured)", m["flops"] / 1e12, None,
                   m["memory_gb"], m["bandwidth_gbs"] / 1e3, CPU_PRICE)
    if key not in GPUS:
        raise NanoseekError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)}, cpu")
    return GPUS[key]


def peak_flops(gpu: GPU, precision: str = "bf16") -> float:
    if precision not in ("bf16", "fp8"):
        raise NanoseekError(f"precision must be bf16 or fp8, not {precision!r}")
    tflops = gpu.fp8_tflops if precision == "fp8" else gpu.bf16_tflops
    if tflops is None:
        raise NanoseekError(f"{gpu.name} has no {precision.upper()} tensor cores")
    return tflops * 1e12


def _check(mfu: float, price: float):
    if not 0 < mfu <= 1:
        raise NanoseekError(f"--mfu must be in (0, 1], got {mfu}")
    if price < 0:
        raise NanoseekError(f"--price must be >= 0, got {price}")


def training_cost(cfg: ModelConfig, tokens: float, gpu: str | GPU = "h800", mfu: float = DEFAULT_MFU,
                  price: float | None = None, seq_len: int = 4096, precision: str = "bf16",
                  mtp: bool | None = None, gpus: int | None = None) -> dict:
    """FLOPs, GPU-hours and dollars of training `cfg` on `tokens` tokens of `seq_len`."""
    g = gpu if isinstance(gpu, GPU) else gpu_spec(gpu)
    price = g.price if price is None else price
    _check(mfu, price)
    if tokens <= 0 or seq_len < 1 or (gpus is not None and gpus < 1):
        raise NanoseekError("tokens, --seq-len and --gpus must be positive")
    mtp = cfg.num_nextn_predict_layers > 0 if mtp is None else mtp
    f = flops_per_token(cfg, seq_len, mtp=mtp)
    total = f["train"] * tokens
    hours = total / (peak_flops(g, precision) * mfu) / 3600
    out = {"gpu": g.name, "precision": precision, "mfu": mfu, "price_per_gpu_hour": price,
           "tokens": tokens, "seq_len": seq_len, "mtp": mtp, "train_flops_per_token": f["train"],
           "train_flops": total, "gpu_hours": hours, "dollars": hours * price}
    if gpus:
        out.update(gpus=gpus, days=hours / gpus / 24)
    return out


def reproduce_deepseek_v3(mfu: float = DEFAULT_MFU, gpu: str = "h800", price: float = V3_PRICE,
                          precision: str = "bf16") -> dict:
    """DeepSeek-V3's Table 1 from its config: pre-training and context extension are modelled
    (14.8T tokens at 4K; 1000 x 1920 x 32K + 1000 x 480 x 128K tokens, MTP on); post-training is
    the paper's figure, scaled by the peak ratio on another GPU (SFT/RL token counts are not published)."""
    cfg, g = preset("deepseek-v3"), gpu_spec(gpu)
    rate = peak_flops(g, precision)
    pre = training_cost(cfg, V3_TOKENS, g, mfu, price, V3_SEQ_LEN, precision)
    ext_flops = sum(s * b * t * flops_per_token(cfg, t, mtp=True)["train"] for s, b, t in V3_EXTENSION)
    rows = {"pre-training": pre["gpu_hours"], "context extension": ext_flops / (rate * mfu) / 3600,
            "post-training": V3_PAPER["post-training"] * peak_flops(GPUS["h800"], precision) / rate}
    rows["total"] = sum(rows.values())
    implied = pre["train_flops"] / (V3_PAPER["pre-training"] * 3600 * rate)
    return {
        "gpu": g.name, "precision": precision, "mfu": mfu, "price_per_gpu_hour": price,
        "train_flops_per_token": pre["train_flops_per_token"], "pretrain_flops": pre["train_flops"],
        "context_extension_flops": ext_flops,
        "gpu_hours": rows, "dollars": {k: v * price for k, v in rows.items()},
        "paper_gpu_hours": dict(V3_PAPER), "paper_dollars": {k: v * V3_PRICE for k, v in V3_PAPER.items()},
        "implied_mfu_pretraining": implied,
        "implied_mfu_pretraining_vs_fp8_peak": (implied * rate / peak_flops(g, "fp8")) if g.fp8_tflops else None,
        "implied_mfu_context_extension": ext_flops / (V3_PAPER["context extension"] * 3600 * rate),
        "total_vs_paper": rows["total"] / V3_PAPER["total"] - 1,
    }


# --------------------------------------------------------------------------------- serving
def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2, gqa_groups: int = 8) -> dict:
    """KV-cache bytes per token of one sequence (all layers): this model's own cache, the MHA
    equivalent with the same heads (K at qk_head_dim, V at v_head_dim per head), GQA with
    `gqa_groups` KV heads, and MLA's latent when the model has it."""
    L, nh = cfg.num_hidden_layers, cfg.num_attention_heads
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.head_dim, cfg.head_dim)
    out = {"native": cfg.kv_cache_values_per_token() * L * bytes_per_value,
           "mha": nh * (qk + v) * L * bytes_per_value}
    if gqa_groups < nh:
        out[f"gqa{gqa_groups}"] = gqa_groups * (qk + v) * L * bytes_per_value
    if cfg.is_mla:
        out["mla"] = out["native"]
    return out


def _weights_read_per_step(cfg: ModelConfig, batch: int) -> float:
    """Parameters a decode step of `batch` tokens reads: all but the embedding table and the
    routed experts no token picked (expected count under uniform routing)."""
    total, _ = cfg.num_params()
    if not cfg.tie_word_embeddings:
        total -= cfg.vocab_size * cfg.hidden_size  # lookups read `batch` rows, not the table
    if cfg.is_moe:
        E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        touched = E * (1 - (1 - k / E) ** batch)
        total -= layers * (E - touched) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total


def serving_cost(cfg: ModelConfig, gpu: str | GPU = "h800", context: int = 32768, gpus: int | None = None,
                 batch: int | None = None, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 price: float | None = None) -> dict:
    """Memory and bandwidth roofline for decoding sequences of `context` tokens on `gpus` GPUs
    (perfectly split, no communication: an upper bound). Compute peak: FP8 for fp8 weights."""
    g = gpu if isinstance(gpu, GPU) else gpu_spec(gpu)
    price = g.price if price is None else price
    for name, d in (("weight", weight_dtype), ("kv", kv_dtype)):
        if d not in BYTES:
            raise NanoseekError(f"unknown {name} dtype {d!r}; choose one of: {', '.join(BYTES)}")
    if context < 1 or (gpus is not None and gpus < 1):
        raise NanoseekError("--context and --serve-gpus must be positive")
    total, _ = cfg.num_params()
    wbytes, kvb = total * BYTES[weight_dtype], BYTES[kv_dtype]
    kv = kv_cache_bytes_per_token(cfg, kvb)
    if gpus is None:  # the smallest power of two that holds the weights in at most 60% of memory
        gpus = 1
        while wbytes > 0.6 * gpus * g.memory_gb * 1e9:
            gpus *= 2
    free = gpus * g.memory_gb * 1e9 - wbytes
    max_seqs = max(0, int(free // (kv["native"] * context)))
    if max_seqs == 0:
        raise NanoseekError(f"{gpus} x {g.name} cannot hold the weights and one {context}-token sequence")

    def decode(b: int) -> dict:
        read = _weights_read_per_step(cfg, b) * BYTES[weight_dtype] + b * context * kv["native"]
        t_mem = read / (gpus * g.bandwidth_tbs * 1e12)
        flops = 2 * sum(active_matmul_weights(cfg).values()) + cfg.num_hidden_layers * attention_flops(
            cfg, context, absorbed=True)
        peak = peak_flops(g, "fp8" if weight_dtype == "fp8" and g.fp8_tflops else "bf16")
        t_compute = b * flops / (gpus * peak)
        tps = b / max(t_mem, t_compute)
        return {"batch": b, "bytes_per_step": read, "bound": "memory" if t_mem >= t_compute else "compute",
                "tokens_per_s": tps, "dollars_per_million_tokens": gpus * price / 3600 / tps * 1e6}

    batch = max_seqs if batch is None else batch
    if batch < 1 or batch > max_seqs:
        raise NanoseekError(f"--batch must be in 1..{max_seqs} (what fits at context {context})")
    return {"gpu": g.name, "gpus": gpus, "context": context, "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
            "weight_bytes": wbytes, "kv_bytes_per_token": kv, "kv_bytes_per_sequence": kv["native"] * context,
            "max_concurrent_sequences": max_seqs, "price_per_gpu_hour": price,
            "decode_batch_1": decode(1), "decode_max_batch": decode(batch)}


# ------------------------------------------------------------------------------ this machine
_CPU: dict | None = None


def cpu_info() -> tuple[str, set[str]]:
    """This CPU's model name and flags from /proc/cpuinfo ("" and no flags where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v for k, v in (line.split(":", 1) for line in f if ":" in line)}
    except OSError:
        return "", set()
    return info.get("model name", "").strip(), set(info.get("flags", "").split())


def measure_cpu(seconds: float = 0.2) -> dict:
    """Achieved matmul FLOP/s on this CPU (fp32, the faster of MKL's and oneDNN's, and bf16) and copy
    bandwidth.

    The matrix size doubles from 128 until one product takes seconds/8 (at most 1024), so a dtype
    without fast kernels (bf16 on many CPUs) costs well under a second instead of minutes."""
    global _CPU
    if _CPU is not None:
        return _CPU
    import torch

    from .model.cpu_kernels import onednn_linear

    rates = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = 128
        while True:
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            t0 = time.perf_counter()
            a @ b
            if time.perf_counter() - t0 > seconds / 8 or n >= 1024:
                break
            n *= 2
        products = [lambda: a @ b]
        if dt == torch.float32 and torch.backends.mkldnn.is_available():
            # oneDNN's fp32 product: 2x MKL's on AMD CPUs, where MKL runs its AVX2 code; training picks
            # the faster (model.cpu_kernels.choose_gemm), so the peak is the faster too
            products.append(lambda: onednn_linear(a, b))
        for product in products:
            try:
                product()
            except (RuntimeError, AttributeError):
                continue
            reps, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds / len(products):
                product()
                reps += 1
            rates[name] = max(rates.get(name, 0.0), 2 * n ** 3 * reps / elapsed)
    x = torch.empty(32 * 2 ** 20)  # 128 MB
    y = x.clone()
    t0 = time.perf_counter()
    for _ in range(4):
        y.copy_(x)
    bw = 4 * 2 * x.numel() * 4 / (time.perf_counter() - t0)  # read + write
    best = max(rates, key=rates.get)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 if hasattr(os, "sysconf") else 8.0
    _CPU = {"dtype": best, "flops": rates[best], "fp32_flops": rates["fp32"], "bf16_flops": rates["bf16"],
            "bandwidth_gbs": bw / 1e9, "memory_gb": mem, "threads": torch.get_num_threads()}
    return _CPU


# ----------------------------------------------------------------------------------- the CLI
def parse_count(text: str) -> float:
    """'14.8T', '300B', '2M', '1e9' -> a number."""
    t = str(text).strip().upper().replace(",", "").replace("_", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise NanoseekError(f"not a token count: {text!r} (examples: 14.8T, 300B, 2M, 1e9)") from None
    if not value > 0 or math.isinf(value):
        raise NanoseekError(f"token count must be positive, got {text!r}")
    return value


def _fmt(x: float, units=("T", "B", "M", "K")) -> str:
    """3 significant digits with a suffix: counts 37.6B, bytes (units=_BYTES) 2.3 GB."""
    for div, suf in zip((1e12, 1e9, 1e6, 1e3), units):
        if abs(x) >= div:
            return f"{x / div:,.3g}{suf}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


_BYTES = (" TB", " GB", " MB", " KB")


def _save_plot(path: str, report: dict, cfg: ModelConfig):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if "deepseek_v3" in report:
        r = report["deepseek_v3"]
        names = ["pre-training", "context extension", "post-training"]
        x = range(len(names))
        left.bar([i - 0.2 for i in x], [r["gpu_hours"][n] / 1e3 for n in names], 0.4,
                 label=f"model, MFU {r['mfu']:.0%}")
        left.bar([i + 0.2 for i in x], [r["paper_gpu_hours"][n] / 1e3 for n in names], 0.4, label="paper, Table 1")
        left.set_xticks(list(x), names)
        left.set_ylabel(f"GPU-hours, thousands ({r['gpu']}; paper: H800)")
        left.set_title("DeepSeek-V3 training cost")
        left.legend()
    else:
        parts = {k: v for k, v in report["flops_per_token"]["forward_breakdown"].items() if v}
        left.barh(list(parts), [v / 1e9 for v in parts.values()])
        left.set_xlabel("forward GFLOPs per token")
        left.set_title(f"forward FLOPs per token at seq {report['training']['seq_len']}")
    ctx = [2 ** i for i in range(10, 18)]
    kv = report["serving"]["kv_bytes_per_token"]
    for name, per_token in kv.items():
        if name == "native" and cfg.is_mla:
            continue  # the same line as MLA
        label = f"this model (GQA, {cfg.num_key_value_heads} KV heads)" if name == "native" else name.upper()
        right.plot(ctx, [per_token * c / 2 ** 30 for c in ctx], marker="o",
                   label=f"{label}: {per_token:,} B/token")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("context length (tokens)")
    right.set_ylabel(f"KV cache per sequence (GiB, {report['serving']['kv_dtype']})")
    right.set_title("KV cache: MLA vs MHA vs GQA" if cfg.is_mla else "KV cache vs context length")
    right.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())


def model_config(model: str) -> ModelConfig:
    """load_config, or the shape of a .gguf file (read from its metadata, like every other command)."""
    if str(model).endswith(".gguf"):
        from .weights.gguf import read_gguf_config
        if not Path(model).is_file():
            raise NanoseekError(f"{model}: no such GGUF file")
        return read_gguf_config(model)
    return load_config(model)


def build_report(args, cfg: ModelConfig) -> dict:
    gpu = gpu_spec(args.gpu)
    cpu = gpu.name.startswith("this CPU")
    mfu = args.mfu if args.mfu is not None else (CPU_MFU if cpu else DEFAULT_MFU)
    total, active = cfg.num_params()
    if args.tokens is not None:
        tokens = parse_count(args.tokens)
    else:
        tokens = V3_TOKENS if args.model == "deepseek-v3" else 20 * active  # Chinchilla: ~20 tokens/param
    mtp = args.mtp if args.mtp is not None else cfg.num_nextn_predict_layers > 0
    report = {
        "model": args.model, "model_type": cfg.model_type, "total_params": total, "active_params": active,
        "flops_per_token": flops_per_token(cfg, args.seq_len, mtp=mtp),
        "training": training_cost(cfg, tokens, gpu, mfu, args.price, args.seq_len, args.precision, mtp,
                                  args.gpus),
        "serving": serving_cost(cfg, gpu, args.context, 1 if cpu else args.serve_gpus, args.batch,
                                args.weight_dtype, args.kv_dtype, args.price),
    }
    if cpu:
        report["cpu"] = measure_cpu()
    if args.model == "deepseek-v3" and not cpu:
        price = V3_PRICE if args.price is None else args.price
        report["deepseek_v3"] = reproduce_deepseek_v3(mfu, args.gpu, price, args.precision)
    return report


def print_report(r: dict):
    t, s = r["training"], r["serving"]
    print(f"model {r['model']} ({r['model_type']}): {_fmt(r['total_params'])} params, "
          f"{_fmt(r['active_params'])} active per token")
    if "cpu" in r:
        c = r["cpu"]
        print(f"this machine: matmul {c['fp32_flops'] / 1e9:.1f} GFLOP/s fp32, {c['bf16_flops'] / 1e9:.1f} bf16 "
              f"({c['threads']} threads), copy {c['bandwidth_gbs']:.1f} GB/s")
    f = r["flops_per_token"]
    peak = "measured" if "cpu" in r else t["precision"]
    print(f"\ntraining  {_fmt(t['tokens'])} tokens at seq {t['seq_len']}{' + MTP' if t['mtp'] else ''} on "
          f"{t['gpu']}, {peak} peak, MFU {t['mfu']:.0%}, ${t['price_per_gpu_hour']:.2f}/GPU-hour")
    print(f"  forward FLOPs/token   {_fmt(f['forward'])}  (" + ", ".join(
        f"{k} {_fmt(v)}" for k, v in f["forward_breakdown"].items() if v) + ")")
    print(f"  train FLOPs/token     {_fmt(t['train_flops_per_token'])}   total {t['train_flops']:.3e}")
    days = f"   ({t['days']:,.1f} days on {t['gpus']:,})" if "days" in t else ""
    hours = f"{t['gpu_hours']:,.0f}" if t["gpu_hours"] >= 100 else f"{t['gpu_hours']:.3g}"
    print(f"  GPU-hours             {hours}{days}")
    print(f"  cost                  ${t['dollars']:,.{0 if t['dollars'] >= 1000 else 2}f}")
    kv = s["kv_bytes_per_token"]
    print(f"\nserving  {s['gpus']} x {s['gpu']}, weights {s['weight_dtype']} "
          f"({_fmt(s['weight_bytes'], _BYTES)}), KV {s['kv_dtype']}, context {s['context']:,}")
    print("  KV cache bytes/token  " + ", ".join(f"{k} {v:,}" for k, v in kv.items()))
    print(f"  per sequence          {_fmt(s['kv_bytes_per_sequence'], _BYTES)}; "
          f"max concurrent sequences {s['max_concurrent_sequences']:,}")
    for d in (s["decode_batch_1"], s["decode_max_batch"]):
        print(f"  decode batch {d['batch']:<8,} <= {d['tokens_per_s']:,.0f} tokens/s ({d['bound']}-bound), "
              f"${d['dollars_per_million_tokens']:,.2f} per million output tokens")
    if "deepseek_v3" in r:
        v = r["deepseek_v3"]
        print(f"\nDeepSeek-V3 Table 1 reproduced ({v['gpu']}, MFU {v['mfu']:.0%} of {v['precision']} peak, "
              f"${v['price_per_gpu_hour']:.2f}/h; post-training is the paper's figure)")
        print(f"  {'':<18}{'model GPU-h':>14}{'paper GPU-h':>14}{'model $':>14}{'paper $':>14}")
        for k in v["gpu_hours"]:
            print(f"  {k:<18}{v['gpu_hours'][k]:>14,.0f}{v['paper_gpu_hours'][k]:>14,.0f}"
                  f"{v['dollars'][k]:>14,.0f}{v['paper_dollars'][k]:>14,.0f}")
        fp8 = v["implied_mfu_pretraining_vs_fp8_peak"]
        print(f"  total vs paper {v['total_vs_paper']:+.1%}; MFU that gives the paper's pre-training hours: "
              f"{v['implied_mfu_pretraining']:.1%} of {v['precision'].upper()} peak"
              + (f" ({fp8:.1%} of FP8 peak)" if fp8 and v["precision"] != "fp8" else "")
              + f"; context extension: {v['implied_mfu_context_extension']:.1%}")


def run(args) -> int:
    cfg = model_config(args.model)
    report = build_report(args, cfg)
    if args.plot:
        _save_plot(args.plot, report, cfg)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "cost", help="FLOPs, GPU-hours, dollars, KV cache and decode throughput of a model",
        formatter_class=HelpFormatter,
        description="Training and serving cost of a model: FLOPs per token, GPU-hours and dollars at an\n"
                    "MFU, KV-cache bytes, sequences that fit, decode tokens/s and $ per million tokens.\n"
                    "With --model deepseek-v3 (the default) it also rebuilds the V3 report's Table 1.\n\n"
                    "examples:\n"
                    "  nanoseek cost\n"
                    "  nanoseek cost --model small --tokens 2B --gpu h100 --mfu 0.35 --json\n"
                    "  nanoseek cost --model out/ --gpu cpu --tokens 50M --seq-len 512\n"
                    "  nanoseek cost --weight-dtype fp8 --context 131072 --plot cost.png")
    s.add_argument("--model", default="deepseek-v3",
                   help=f"preset ({', '.join(PRESETS)}), HF directory or config.json")
    s.add_argument("--tokens", default=None, help="training tokens, e.g. 14.8T, 300B (default: 14.8T for "
                   "deepseek-v3, else 20 x active params)")
    s.add_argument("--gpu", default="h800", help=f"{', '.join(GPUS)} or cpu (measured now)")
    s.add_argument("--gpus", type=int, default=None, help="training GPU count, for wall-clock days")
    s.add_argument("--serve-gpus", type=int, default=None, help="serving GPU count (default: the smallest power "
                   "of two whose memory holds the weights in 60%%)")
    s.add_argument("--mfu", type=float, default=None,
                   help=f"model FLOPs utilisation (default {DEFAULT_MFU}, cpu {CPU_MFU})")
    s.add_argument("--precision", default="bf16", help="peak the MFU is measured against: bf16 or fp8")
    s.add_argument("--price", type=float, default=None, help="$ per GPU-hour (default 2.0; cpu 0.10)")
    s.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    s.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="count multi-token-prediction modules (default: if the config has them)")
    s.add_argument("--context", type=int, default=32768, help="serving context length (default 32768)")
    s.add_argument("--batch", type=int, default=None, help="decode batch (default: as many as fit)")
    s.add_argument("--weight-dtype", default="bf16", help=f"serving weights: {', '.join(BYTES)}")
    s.add_argument("--kv-dtype", default="bf16", help=f"KV cache: {', '.join(BYTES)}")
    s.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    s.add_argument("--plot", default=None, metavar="FILE",
                   help="write a PNG: cost breakdown and KV cache vs context length")
    s.set_defaults(func=run)
    return s

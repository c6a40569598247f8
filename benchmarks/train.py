"""Training speed: nanoseek vs transformers' DeepseekV3ForCausalLM, same tiny config, same weights.

    .venv/bin/python benchmarks/train.py                       # preset tiny, batch 16 x 128
    .venv/bin/python benchmarks/train.py --batch 8 --seq-len 256 --steps 10

One training step = forward + cross-entropy + backward + AdamW step, fp32 on CPU (bf16 autocast on
CUDA); both models get the optimizer pretraining uses (nanoseek.train.optim.adamw: β 0.9/0.95,
decay on matrices only). Our weights go to transformers through `nanoseek.save` + `from_pretrained`, and the first
step's losses are checked to agree. transformers has no MTP modules, so the like-for-like number is
our main-loss step; `nanoseek_full_objective` adds what pretraining really runs (MTP module and
loss, sequence-wise balance loss, bias update). The two models alternate in rounds (the machine is
noisy) and the median step time of each is used. The process runs as the training commands do
(train.run: glibc keeps freed memory, for both sides; nanoseek's C++ layer kernels installed: fused
attention, RMSNorm, SwiGLU, MoE gate and dispatch; fp32 products through oneDNN where it measures faster
than PyTorch's default, MKL, as on AMD CPUs: model.cpu_kernels.choose_gemm). MFU = tokens/s x training FLOPs per token
(nanoseek.cost) / this CPU's measured matmul peak (or the GPU's datasheet peak).

Prints a table (tokens/s, ratio to transformers, MFU), then one JSON line with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanoseek  # noqa: E402
from nanoseek import cost  # noqa: E402
from nanoseek.config import preset  # noqa: E402
from nanoseek.train.objective import (balance_loss, expert_loads, moe_layers, mtp_loss,  # noqa: E402
                                      next_token_loss, update_bias)
from nanoseek.train.optim import adamw  # noqa: E402
from nanoseek.model import cpu_kernels  # noqa: E402
from nanoseek.train.run import choose_cpu_gemm, keep_freed_memory, use_cpu_kernels  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()
    kernels = use_cpu_kernels()
    choose_cpu_gemm()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its load report lists our MTP tensors, which it does not use
    hf_logging.disable_progress_bar()

    cfg = preset(a.preset)
    if a.vocab_size:
        cfg = cfg.replace(vocab_size=a.vocab_size)
    torch.manual_seed(0)
    ours = nanoseek.Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(ours, None, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    data = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len + 1), device=device)
    x, y = data[:, :-1], data[:, 1:]

    moes = moe_layers(ours)
    opt_main = adamw(ours, lr=1e-4)
    opt_theirs = adamw(theirs, lr=1e-4)

    def step_ours():
        with autocast:
            logits = ours(x)
        loss = next_token_loss(logits, data)
        loss.backward()
        opt_main.step()
        opt_main.zero_grad(set_to_none=True)
        return loss.item()

    def step_full():
        with autocast:
            logits, mtp, routing = ours(x, return_mtp=True, return_routing=True)
        loss = (next_token_loss(logits, data) + 0.3 * mtp_loss(mtp, data)
                + balance_loss(routing, cfg.num_experts_per_tok, 1e-4))
        loss.backward()
        opt_main.step()
        opt_main.zero_grad(set_to_none=True)
        update_bias(moes, expert_loads(routing), 1e-3)
        return loss.item()

    def step_theirs():
        with autocast:
            logits = theirs(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return loss.item()

    # same weights, same batch: the first losses must agree before anything is timed
    l_ours, l_theirs = step_ours(), step_theirs()
    if abs(l_ours - l_theirs) > 1e-3:
        raise SystemExit(f"losses differ: nanoseek {l_ours:.6f} vs transformers {l_theirs:.6f}")
    for f in (step_ours, step_theirs, step_full):
        f()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {"nanoseek": [], "transformers": [], "full": []}
    for _ in range(a.rounds):
        for name, f in (("nanoseek", step_ours), ("transformers", step_theirs), ("full", step_full)):
            for _ in range(a.steps):
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                times[name].append(time.perf_counter() - t0)
    tokens = a.batch * a.seq_len
    tok_s = {k: tokens / statistics.median(v) for k, v in times.items()}

    if device.type == "cuda":
        name = torch.cuda.get_device_name().lower()
        gpu = next((g for k, g in cost.GPUS.items() if k in name), None)
        peak, peak_src = (gpu.bf16_tflops * 1e12, f"{gpu.name} BF16 datasheet") if gpu else (None, name)
    else:
        m = cost.measure_cpu(0.5)
        peak, peak_src = m["fp32_flops"], "this CPU, measured fp32 matmul"
    f_main = cost.flops_per_token(cfg, a.seq_len, mtp=False)["train"]
    f_full = cost.flops_per_token(cfg, a.seq_len, mtp=True)["train"]
    mfu = lambda ts, f: f"{ts * f / peak:.1%}" if peak else "-"  # noqa: E731
    print(f"train step, preset {a.preset}, batch {a.batch} x {a.seq_len}, {'bf16 autocast' if amp else 'fp32'} "
          f"on {device} ({torch.get_num_threads()} threads), median of {a.rounds} x {a.steps} steps each; "
          f"MFU against {peak_src}; nanoseek's C++ layer kernels: {'yes' if kernels else 'no'}; "
          f"nanoseek's fp32 products: {cpu_kernels.gemm}")
    print(f"{'':44}{'tokens/s':>10}{'vs transformers':>17}{'MFU':>8}")
    for label, key, f in (("transformers DeepseekV3ForCausalLM", "transformers", f_main),
                          ("nanoseek (same objective)", "nanoseek", f_main),
                          ("nanoseek (+ MTP, balance loss, bias update)", "full", f_full)):
        print(f"{label:44}{tok_s[key]:>10,.0f}{tok_s[key] / tok_s['transformers']:>16.2f}x{mfu(tok_s[key], f):>8}")
    print(json.dumps({
        "benchmark": "train_step", "preset": a.preset, "batch": a.batch, "seq_len": a.seq_len,
        "device": str(device), "threads": torch.get_num_threads(), "dtype": "bf16 autocast" if amp else "fp32",
        "transformers_experts_implementation": getattr(theirs.config, "_experts_implementation", None),
        "transformers_attn_implementation": getattr(theirs.config, "_attn_implementation", None),
        "first_loss": {"nanoseek": round(l_ours, 6), "transformers": round(l_theirs, 6)},
        "tokens_per_s": {"nanoseek": round(tok_s["nanoseek"]), "transformers": round(tok_s["transformers"]),
                         "nanoseek_full_objective": round(tok_s["full"])},
        "ratio_nanoseek_vs_transformers": round(tok_s["nanoseek"] / tok_s["transformers"], 3),
        "ratio_full_objective_vs_transformers": round(tok_s["full"] / tok_s["transformers"], 3),
        "mfu": {"nanoseek": round(tok_s["nanoseek"] * f_main / peak, 4) if peak else None,
                "nanoseek_full_objective": round(tok_s["full"] * f_full / peak, 4) if peak else None,
                "transformers": round(tok_s["transformers"] * f_main / peak, 4) if peak else None},
        "peak_flops": peak, "peak_source": peak_src,
    }))


if __name__ == "__main__":
    main()

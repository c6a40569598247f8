"""Dense vs DeepSeekMoE on real text: held-out loss against tokens, training FLOPs and wall clock.

    .venv/bin/python benchmarks/dense_vs_moe.py                      # 3 seeds x 3 models, ~25 min on 1 thread
    .venv/bin/python benchmarks/dense_vs_moe.py --quick              # a 2-minute smoke run
    .venv/bin/python benchmarks/dense_vs_moe.py --corpus my.txt --steps 2000 --threads 2
    .venv/bin/python benchmarks/dense_vs_moe.py --sweep-experts 4,8,16,32,64   # ~45 min on 1 thread

--sweep-experts trains, instead of the three models below, the MoE at each routed-expert count with
the same active parameters (top-k experts of width 64 + 1 shared), and dense_active beside them:
the trend with expert count at a fixed budget (DeepSeekMoE §3: finer / more experts at the same
active size). Both modes resume: each finished run is kept in --cache and skipped when rerun with
the same settings (the wall-clock figures then mix the two sessions' machine speeds).

Corpus: the Python standard library's own source (`Path(os.__file__).parent`, every *.py file,
sorted, up to --max-chars), which every machine that runs this has; or --corpus files. Every 20th
file is held out: the BPE (nanoseek.data.tokens.train_tokenizer) is trained on the others only, the
models never train on it, and the held-out loss is the mean next-token cross-entropy over a fixed
set of its windows.

Three models, the same attention (MLA, DeepSeek-V3's), depth, width, vocabulary and embeddings;
only the FFN differs. Sized so the routed experts hold most of the parameters, not the embeddings:
  moe           16 routed experts of width 64, top-2, 1 shared, sigmoid gate + aux-loss-free bias
                (γ = 1e-3) + sequence-wise balance loss (α = 1e-4), every layer MoE, no MTP
  dense_active  SwiGLU of width 64·(2+1) = 192: the MoE's active parameters, so the same training
                FLOPs per token (the gate's 16·128 per layer aside); trained on the same tokens
  dense_total   SwiGLU of width 64·(16+1) = 1088: the MoE's total parameters, given the same
                training FLOPs as the MoE (so it sees fewer tokens)
Both train as nanoseek's training commands run them (train.run.setup_cpu_training: the C++ kernels,
the measured choice of fp32 products, freed memory kept), so the wall clock is nanoseek's;
--pytorch-ops trains with PyTorch's ops instead.
Same optimizer (AdamW 0.9/0.95, wd 0.1, clip 1.0), peak lr, warmup + cosine schedule over each run's
own steps, batch, sequence length, data order (per seed) and initialisation rule. Training FLOPs =
3 x forward FLOPs per token (nanoseek.cost.flops_per_token: matmuls + attention scores) x tokens.
Wall clock counts training steps only (not the held-out evaluations); the models run one after the
other in one process, in an order rotated per seed, on a shared machine: read it as a rough ratio.

Prints a markdown table (mean ± std over seeds) and one JSON line; writes a PNG with the three
panels (--plot, default docs/dense_vs_moe.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.atomic import atomic_write  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.cost import flops_per_token  # noqa: E402
from nanoseek.data.sampler import WindowSampler  # noqa: E402
from nanoseek.data.tokens import cached_tokenizer, documents_hash, read_documents, token_file  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.eval.stats import mean_ci, t95  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402
from nanoseek.train.objective import balance_loss, expert_loads, load_stats, moe_layers, next_token_loss, \
    update_bias  # noqa: E402
from nanoseek.train.optim import adamw, lr_at  # noqa: E402
from nanoseek.train.run import setup_cpu_training  # noqa: E402

HOLDOUT_EVERY = 20  # every 20th file of the corpus is held out


def stdlib_documents(max_chars: int) -> list[str]:
    root = Path(os.__file__).parent
    docs, total = [], 0
    for f in sorted(root.rglob("*.py")):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return docs


def model_configs(vocab: int, experts: int, top_k: int, width: int) -> dict[str, ModelConfig]:
    base = dict(model_type="deepseek_v3", vocab_size=vocab, hidden_size=128, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=2048, q_lora_rank=64, kv_lora_rank=32,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0,
                bos_token_id=0, eos_token_id=1)
    moe = ModelConfig(**base, intermediate_size=width * (top_k + 1), n_routed_experts=experts,
                      num_experts_per_tok=top_k, n_shared_experts=1, moe_intermediate_size=width, n_group=1,
                      topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
                      topk_method="noaux_tc", first_k_dense_replace=0)
    return {"moe": moe,
            "dense_active": ModelConfig(**base, intermediate_size=width * (top_k + 1)),
            "dense_total": ModelConfig(**base, intermediate_size=width * (experts + 1))}


@torch.no_grad()
def heldout_loss(model: Transformer, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total = sum(next_token_loss(model(w[:, :-1]), w).item() * len(w) for w in windows.split(batch))
    model.train()
    return total / len(windows)


def train_one(name: str, cfg: ModelConfig, train_tokens: np.ndarray, heldout: torch.Tensor, steps: int,
              seed: int, a) -> dict:
    torch.manual_seed(seed)
    model = Transformer(cfg).train()
    opt = adamw(model, a.lr, 0.1, (0.9, 0.95))
    sampler = WindowSampler(train_tokens, a.seq_len, seed=seed)  # same windows, same order per seed
    moes = moe_layers(model)
    per_token = flops_per_token(cfg, a.seq_len)["train"]
    evals = sorted({max(1, round(steps * i / a.evals)) for i in range(1, a.evals + 1)})
    curve, wall, loads = [], 0.0, []
    for step in range(steps):
        t0 = time.perf_counter()
        lr = lr_at(step, steps, a.lr, max(1, steps // 20), "cosine")
        for g in opt.param_groups:
            g["lr"] = lr
        window = sampler.next_batch(a.batch_size)
        if moes:
            logits, routing = model(window[:, :-1], return_routing=True)
            loss = next_token_loss(logits, window) + balance_loss(routing, cfg.num_experts_per_tok, 1e-4)
        else:
            loss = next_token_loss(model(window[:, :-1]), window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if moes:
            layer_loads = expert_loads(routing)
            update_bias(moes, layer_loads, 1e-3)
            loads.append(load_stats(layer_loads))
        wall += time.perf_counter() - t0
        if step + 1 in evals:
            tokens = (step + 1) * a.batch_size * a.seq_len
            curve.append({"step": step + 1, "tokens": tokens, "flops": tokens * per_token, "wall_s": wall,
                          "heldout_loss": heldout_loss(model, heldout, a.batch_size)})
            print(f"  {name} seed {seed} step {step + 1}/{steps}: held-out {curve[-1]['heldout_loss']:.4f} "
                  f"({wall:.0f} s)", file=sys.stderr, flush=True)
    total, active = cfg.num_params()
    res = {"model": name, "seed": seed, "total_params": total, "active_params": active,
           "train_flops_per_token": per_token, "curve": curve, **curve[-1]}
    if loads:  # max/mean expert load, per layer, over the last 10% of steps
        tail = np.array(loads[-max(1, steps // 10):])
        res["load_max_mean"] = [round(float(x), 3) for x in tail.mean(0)]
    return res


def interp(curve: list[dict], key: str, at: float) -> float:
    """The held-out loss at x = at, linear between evaluations; NaN outside the curve (up to 2% past
    its end counts as its end: dense_active's FLOPs are the MoE's less the gate's)."""
    xs, ys = [c[key] for c in curve], [c["heldout_loss"] for c in curve]
    return float(np.interp(at, xs, ys)) if xs[0] <= at <= xs[-1] * 1.02 else math.nan


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    colors = {"moe": "C3", "dense_active": "C0", "dense_total": "C2"}
    for ax, (key, label, scale) in zip(axes, [("tokens", "training tokens (M)", 1e6),
                                              ("flops", "training FLOPs (TFLOP)", 1e12),
                                              ("wall_s", "training wall clock (s, 1 thread)", 1.0)]):
        for name, color in colors.items():
            runs = [r["curve"] for r in results if r["model"] == name]
            if not runs:
                continue
            xs = np.mean([[c[key] for c in run] for run in runs], axis=0) / scale
            ys = np.array([[c["heldout_loss"] for c in run] for run in runs])
            ax.plot(xs, ys.mean(0), color=color, marker=".", label=name)
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=color, alpha=0.2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend()
    fig.suptitle(f"Dense vs MoE (MLA both), Python stdlib source, mean ± std over "
                 f"{len({r['seed'] for r in results})} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  .venv/bin/python benchmarks/dense_vs_moe.py --quick")
    p.add_argument("--corpus", nargs="*", default=None, help="text/JSONL files (default: the stdlib's *.py)")
    p.add_argument("--max-chars", type=int, default=12_000_000, help="stdlib corpus size cap (characters)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None, help="MoE / dense_active steps (default 640; --quick 40)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--evals", type=int, default=10, help="held-out evaluations per run")
    p.add_argument("--heldout-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/dense_vs_moe-cache", help="tokenizer and token-file cache")
    p.add_argument("--plot", default="docs/dense_vs_moe.png")
    p.add_argument("--json", default="docs/dense_vs_moe.json",
                   help="results (the speedrun report's MoE claim reads docs/dense_vs_moe.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 1 seed, 2M characters")
    p.add_argument("--pytorch-ops", action="store_true",
                   help="train with PyTorch's ops, not the C++ kernels the training commands install")
    p.add_argument("--sweep-experts", default=None, metavar="E,E,...",
                   help="the MoE at each routed-expert count against dense_active (e.g. 4,8,16,32,64)")
    p.add_argument("--sweep-out", default="docs/moe_experts", help="the sweep's .json and .png (without suffix)")
    a = p.parse_args()
    if a.quick:
        a.steps, a.seeds, a.max_chars, a.evals = 40 if a.steps is None else a.steps, 1, min(a.max_chars, 2_000_000), 4
    a.steps = 640 if a.steps is None else a.steps
    for name in ("steps", "batch_size", "seeds", "evals", "heldout_windows", "threads", "vocab", "experts", "top_k"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.seq_len < 2 or a.top_k > a.experts or a.lr <= 0:
        p.error("need --seq-len >= 2, --top-k <= --experts and --lr > 0")
    counts = []
    if a.sweep_experts:
        try:
            counts = sorted({int(x) for x in a.sweep_experts.split(",")})
        except ValueError:
            p.error(f"--sweep-experts takes comma-separated integers, got {a.sweep_experts!r}")
        if counts[0] < a.top_k:
            p.error(f"--sweep-experts: every count must be at least --top-k ({a.top_k})")
    torch.set_num_threads(a.threads)
    if not a.pytorch_ops:
        setup_cpu_training()

    try:
        docs = read_documents(a.corpus) if a.corpus else stdlib_documents(a.max_chars)
    except NanoseekError as e:
        print(f"dense_vs_moe: error: {e}", file=sys.stderr)
        sys.exit(2)
    held = docs[::HOLDOUT_EVERY]
    train = [d for i, d in enumerate(docs) if i % HOLDOUT_EVERY]
    if not held or not train:
        print("dense_vs_moe: error: the corpus needs at least 2 documents", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    tok = cached_tokenizer(train, a.vocab, a.cache)
    train_tokens = token_file(train, tok, a.cache)
    held_tokens = token_file(held, tok, a.cache)
    need = a.heldout_windows * a.seq_len + 1
    if len(held_tokens) < need:
        a.heldout_windows = (len(held_tokens) - 1) // a.seq_len
    heldout = torch.from_numpy(np.asarray(held_tokens[:a.heldout_windows * a.seq_len + 1], dtype=np.int64))
    heldout = heldout.unfold(0, a.seq_len + 1, a.seq_len)  # disjoint windows [n, T+1]
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} chars; train {len(train_tokens):,} tokens, "
          f"held out {len(held_tokens):,} tokens ({len(held)} documents), eval on {len(heldout)} windows; "
          f"BPE {tok.vocab_size} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    if counts:
        sweep_report(sweep(counts, a, tok.vocab_size, train_tokens, heldout), counts, a)
        return
    configs = model_configs(tok.vocab_size, a.experts, a.top_k, 64)
    fpt = {n: flops_per_token(c, a.seq_len)["train"] for n, c in configs.items()}
    steps = {"moe": a.steps, "dense_active": a.steps,
             "dense_total": max(1, round(a.steps * fpt["moe"] / fpt["dense_total"]))}  # equal FLOPs
    for n, c in configs.items():
        t, act = c.num_params()
        emb = 2 * c.vocab_size * c.hidden_size
        print(f"{n:13} total {t:>9,}  active {act:>9,}  embeddings {emb:,}  train FLOPs/token {fpt[n]:,.0f}  "
              f"steps {steps[n]}", file=sys.stderr)

    results = []
    names = list(configs)
    done, keep = finished_runs(a, "main", tok.vocab_size, len(train_tokens))
    for seed in range(a.seeds):
        for name in names[seed % 3:] + names[:seed % 3]:  # rotate the order: machine noise spreads
            results.append(done.get((name, seed))
                           or keep(train_one(name, configs[name], train_tokens, heldout, steps[name], seed, a)))
    summary = report(results, configs, steps, a, tok.vocab_size, len(train_tokens), len(heldout) * a.seq_len, docs)
    atomic_write(a.json, json.dumps(summary, indent=1) + "\n")
    plot(results, Path(a.plot))
    print(f"plot: {a.plot}; results: {a.json}", file=sys.stderr)


def report(results, configs, steps, a, vocab, n_train, n_held, docs) -> dict:
    by = {n: [r for r in results if r["model"] == n] for n in configs}
    moe_flops = statistics.fmean(r["flops"] for r in by["moe"])
    wall_common = min(r["wall_s"] for r in results)
    print(f"\nDense vs MoE, MLA attention on all three, {len(docs)} files of Python stdlib source "
          f"({sum(map(len, docs)) / 1e6:.1f}M chars; BPE {vocab}; {n_train / 1e6:.2f}M training tokens, "
          f"{n_held:,} held-out tokens never trained on), batch {a.batch_size} x {a.seq_len}, "
          f"{a.seeds} seeds, {a.threads} thread(s)\n")
    print("| model | FFN | total params | active params | tokens | train FLOPs | held-out loss | "
          f"at {moe_flops / 1e12:.2f} TFLOP | at {wall_common:.0f} s | train s | tokens/s | expert load max/mean |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ffn = {"moe": f"{a.experts} x 64, top-{a.top_k} + 1 shared", "dense_active": "SwiGLU 192",
           "dense_total": f"SwiGLU {64 * (a.experts + 1)}"}
    summary = {}
    for n, rs in by.items():
        r0 = rs[0]
        at_f = [interp(r["curve"], "flops", moe_flops) for r in rs]
        at_w = [interp(r["curve"], "wall_s", wall_common) for r in rs]
        wall = statistics.fmean(r["wall_s"] for r in rs)
        load = "-"
        if "load_max_mean" in r0:
            load = f"{statistics.fmean(x for r in rs for x in r['load_max_mean']):.2f}"
        print(f"| {n} | {ffn[n]} | {r0['total_params'] / 1e6:.2f}M | {r0['active_params'] / 1e6:.2f}M "
              f"| {r0['tokens'] / 1e6:.2f}M | {r0['flops'] / 1e12:.2f}T | {mean_std([r['heldout_loss'] for r in rs])} "
              f"| {mean_std(at_f)} | {mean_std(at_w)} | {wall:.0f} | {r0['tokens'] / wall:,.0f} | {load} |")
        summary[n] = {"total_params": r0["total_params"], "active_params": r0["active_params"],
                      "steps": steps[n], "tokens": r0["tokens"], "train_flops": r0["flops"],
                      "heldout_loss": [round(r["heldout_loss"], 4) for r in rs],
                      "heldout_loss_at_moe_flops": [round(x, 4) for x in at_f],
                      "heldout_loss_at_common_wall": [round(x, 4) for x in at_w],
                      "train_s": [round(r["wall_s"], 1) for r in rs],
                      "load_max_mean_per_layer": [r.get("load_max_mean") for r in rs] if "load_max_mean" in r0 else None,
                      "curves": [[{k: round(v, 4) if isinstance(v, float) else v for k, v in c.items()}
                                  for c in r["curve"]] for r in rs]}
    out = {"benchmark": "dense_vs_moe", "date": time.strftime("%Y-%m-%d"), "corpus_files": len(docs), "vocab": vocab,
           "seeds": a.seeds, "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr, "threads": a.threads,
           "cpu_kernels": not a.pytorch_ops, "experts": a.experts, "top_k": a.top_k, "common_wall_s": round(wall_common, 1), "runs": summary}
    print()
    print(json.dumps(out))
    return out


def finished_runs(a, kind: str, vocab: int, n_train: int):
    """Runs already trained with these settings, by (model, seed), and a function that keeps one more:
    each finished run is appended to a JSONL in --cache (fsynced), so a killed benchmark loses at
    most the run under way and a rerun with the same settings goes on from there."""
    settings = [vocab, n_train, a.steps, a.batch_size, a.seq_len, a.lr, a.top_k, a.evals, a.heldout_windows,
                a.max_chars, a.corpus, a.pytorch_ops] + ([a.experts] if kind == "main" else [])
    path = Path(a.cache) / f"{kind}-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a kill mid-write: that run trains again
                continue
            done[(r["model"], r["seed"])] = r

    def keep(r: dict) -> dict:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return r
    return done, keep


def sweep(counts: list[int], a, vocab: int, train_tokens, heldout) -> dict[str, list[dict]]:
    """dense_active and the MoE at each expert count, every seed, the order rotated per seed; resumable
    (finished_runs)."""
    done, keep = finished_runs(a, "sweep", vocab, len(train_tokens))
    names = ["dense_active"] + [f"moe_{e}" for e in counts]
    cfgs = {"dense_active": model_configs(vocab, counts[0], a.top_k, 64)["dense_active"],
            **{f"moe_{e}": model_configs(vocab, e, a.top_k, 64)["moe"] for e in counts}}
    results: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(a.seeds):
        for name in names[seed % len(names):] + names[:seed % len(names)]:
            r = done.get((name, seed)) or keep(train_one(name, cfgs[name], train_tokens, heldout, a.steps, seed, a))
            results[name].append(r)
    return results


def sweep_report(results: dict[str, list[dict]], counts: list[int], a) -> None:
    """Table (mean ± std over seeds, MoE - dense_active per seed with its 95% interval), JSON and plot."""
    dense = [r["heldout_loss"] for r in results["dense_active"]]
    n = len(dense)
    print(f"\nMoE by routed-expert count (top-{a.top_k} of width 64 + 1 shared: the same active params), "
          f"{results['dense_active'][0]['tokens'] / 1e6:.2f}M tokens, {n} seeds, {a.threads} thread(s)\n")
    print("| model | total params | active params | held-out loss | MoE - dense_active (95% CI) | tokens/s "
          "| expert load max/mean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    out = {"benchmark": "dense_vs_moe --sweep-experts", "date": time.strftime("%Y-%m-%d"), "seeds": n,
           "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "top_k": a.top_k,
           "threads": a.threads, "cpu_kernels": not a.pytorch_ops, "runs": {}}
    for name, rs in results.items():
        loss = [r["heldout_loss"] for r in rs]
        diff = "-"
        if name != "dense_active" and n > 1:
            m, lo, hi = mean_ci([x - d for x, d in zip(loss, dense)], t95(n))
            diff = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        load = [x for r in rs for x in (r.get("load_max_mean") or [])]
        tps = statistics.fmean(r["tokens"] / r["wall_s"] for r in rs)
        load_s = f"{statistics.fmean(load):.2f}" if load else "-"
        print(f"| {name} | {rs[0]['total_params'] / 1e6:.2f}M | {rs[0]['active_params'] / 1e6:.2f}M "
              f"| {mean_std(loss)} | {diff} | {tps:,.0f} | {load_s} |")
        out["runs"][name] = {"total_params": rs[0]["total_params"], "active_params": rs[0]["active_params"],
                             "tokens": rs[0]["tokens"], "heldout_loss": [round(x, 4) for x in loss],
                             "tokens_per_s": round(tps), "load_max_mean": round(statistics.fmean(load), 3) if load else None,
                             "curves": [[{"tokens": c["tokens"], "heldout_loss": round(c["heldout_loss"], 4)}
                                         for c in r["curve"]] for r in rs]}
    atomic_write(a.sweep_out + ".json", json.dumps(out, indent=1) + "\n")
    sweep_plot(results, counts, Path(a.sweep_out + ".png"))
    print(f"\nplot: {a.sweep_out}.png; results: {a.sweep_out}.json", file=sys.stderr)


def sweep_plot(results: dict[str, list[dict]], counts: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    final = np.array([[r["heldout_loss"] for r in results[f"moe_{e}"]] for e in counts])
    dense = np.array([r["heldout_loss"] for r in results["dense_active"]])
    left.errorbar(counts, final.mean(1), yerr=final.std(1), color="C3", marker="o", capsize=3, label="MoE")
    left.axhline(dense.mean(), color="C0", label="dense_active")
    left.axhspan(dense.mean() - dense.std(), dense.mean() + dense.std(), color="C0", alpha=0.15)
    left.set_xscale("log", base=2)
    left.set_xticks(counts, [str(e) for e in counts])
    left.set(xlabel="routed experts (same active parameters)", ylabel="final held-out loss (nats/token)")
    for i, name in enumerate(results):
        ys = np.array([[c["heldout_loss"] for c in r["curve"]] for r in results[name]]).mean(0)
        xs = np.array([c["tokens"] for c in results[name][0]["curve"]]) / 1e6
        right.plot(xs, ys, marker=".", color="C0" if name == "dense_active" else plt.cm.autumn(i / len(results)),
                   label=name)
    right.set(xlabel="training tokens (M)", ylabel="held-out loss, mean over seeds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"MoE by expert count vs dense, Python stdlib source, {len(dense)} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

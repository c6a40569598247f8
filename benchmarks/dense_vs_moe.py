"""Dense vs MoE at equal active parameters: loss after the same tokens, same data, same order.

    .venv/bin/python benchmarks/dense_vs_moe.py --threads 2              # 600 steps each, 16 x 128 tokens/step
    .venv/bin/python benchmarks/dense_vs_moe.py --quick                  # 40-step smoke run
    .venv/bin/python benchmarks/dense_vs_moe.py --no-total --out runs/dvm   # skip (c), keep the runs

Pretrains with `nanoseek.train.pretrain` (the same code `nanoseek pretrain` runs), one after the other:
  (a) the tiny DeepSeek-V3 preset: MLA + MoE (8 routed experts, top-2, 1 shared) + MTP;
  (b) a dense llama with the preset's width, depth and heads and the intermediate size whose
      ACTIVE parameter count (ModelConfig.num_params()[1]) is closest to the MoE's;
  (c) a dense llama whose count matches the MoE's TOTAL parameters (skip with --no-total).
Each config goes to a config.json passed as PretrainArgs(config=...). All runs share one cache
directory, so the BPE tokenizer (cached by corpus hash and vocabulary size, which all configs
share) and the token file are built once and reused; the window order depends only on --seed.
The script checks that every run saved the same tokenizer and saw the same tokens.

Final loss = mean of the `loss` key of OUT/<run>/metrics.jsonl over the last 10% of steps. `loss`
is the main next-token cross-entropy only in every run: the MoE's MTP loss (`mtp_loss`) and balance
loss (`balance_loss`) are logged apart and left out, so the numbers compare like for like. Time and
tokens/s are the training loop's (metrics' `elapsed_s` at the last step: tokenizing, the final
sample and saving excluded); the MoE's includes what it really trains (MTP module, balance loss,
bias update). Runs are sequential on a noisy machine: read tokens/s as a rough ratio.
num_params() excludes the MTP module (as DeepSeek-V3's 671B/37B do).

Prints a markdown table for the README, then one JSON line with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import ModelConfig, preset  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.config import dense_variant  # noqa: E402
from nanoseek.train.pretrain import PretrainArgs, pretrain  # noqa: E402


def dense_matching(moe: ModelConfig, target: int, which: int) -> ModelConfig:
    """The llama (preset width/depth/heads) whose num_params()[which] is closest to target.

    The count is linear in intermediate_size (3·hidden per unit per layer), so solve, round, and
    check the neighbours."""
    base = dense_variant(moe, "llama")
    c0 = base.replace(intermediate_size=1).num_params()[which]
    per_unit = base.replace(intermediate_size=2).num_params()[which] - c0
    guess = max(1, round(1 + (target - c0) / per_unit))
    best = min((i for i in (guess - 1, guess, guess + 1) if i >= 1),
               key=lambda i: abs(base.replace(intermediate_size=i).num_params()[which] - target))
    return base.replace(intermediate_size=best)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(name: str, cfg: ModelConfig, root: Path, cache: Path, a) -> dict:
    cfg_dir = root / "configs" / name
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    out = root / name
    big = a.steps + 1  # no intermediate samples or checkpoints (pretrain still samples and saves at the end)
    args = PretrainArgs(out=str(out), config=str(cfg_dir / "config.json"), cache_dir=str(cache),
                        synthetic_docs=a.docs, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                        seed=a.seed, threads=a.threads, final_eval=0, progress=False, sample_every=big,
                        sample_tokens=1, save_every=big, keep=1, log_every=max(1, a.steps // 5))
    print(f"--- {name}: {cfg.model_type}, intermediate_size {cfg.intermediate_size}", file=sys.stderr)
    t0 = time.perf_counter()
    summary = pretrain(args)
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    if len(rows) != a.steps or [r["step"] for r in rows] != list(range(1, a.steps + 1)):
        raise SystemExit(f"{out}/metrics.jsonl has {len(rows)} steps, expected 1..{a.steps}")
    tail = rows[-max(1, a.steps // 10):]
    last = rows[-1]
    trained = summary["config"]  # the config as trained (vocabulary from the tokenizer)
    total, active = trained.num_params()
    emb = trained.vocab_size * trained.hidden_size * (1 if trained.tie_word_embeddings else 2) + trained.hidden_size
    from nanoseek.data.tokens import tokenizer_hash
    from nanoseek.tokenizer import Tokenizer
    res = {
        "model": name, "model_type": trained.model_type, "intermediate_size": trained.intermediate_size,
        "total_params": total, "active_params": active,
        "active_params_non_embedding": active - emb, "total_params_non_embedding": total - emb,
        "final_loss": statistics.fmean(r["loss"] for r in tail), "loss_last_step": last["loss"],
        "tail_steps": len(tail), "tokens": last["tokens"], "train_s": last["elapsed_s"],
        "tokens_per_s": last["tokens"] / last["elapsed_s"], "wall_clock_s": wall,
        "tokenizer_hash": tokenizer_hash(Tokenizer.from_dir(out / "final")),
    }
    if last.get("load_max_mean") is not None:
        res["load_max_mean_final"] = statistics.fmean(r["load_max_mean_avg"] for r in tail)
        res["load_max_mean_per_layer_last_step"] = [round(x, 3) for x in last["load_max_mean"]]
        res["mtp_loss_final"] = statistics.fmean(r["mtp_loss"] for r in tail)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  .venv/bin/python benchmarks/dense_vs_moe.py --threads 2")
    p.add_argument("--preset", default="tiny", help="the MoE preset (default tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 600; --quick 40)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=None,
                   help=f"synthetic corpus documents (default pretrain's {PretrainArgs.synthetic_docs}; --quick 5000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--no-total", action="store_true", help="skip (c), the dense model at the MoE's total count")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 steps on a 5000-document corpus")
    a = p.parse_args()
    a.steps = a.steps or (40 if a.quick else 600)
    a.docs = a.docs or (5000 if a.quick else PretrainArgs.synthetic_docs)

    moe = preset(a.preset)
    if not moe.is_moe:
        raise SystemExit(f"preset {a.preset!r} is not an MoE model")
    m_total, m_active = moe.num_params()
    configs = {"moe": moe, "dense_active": dense_matching(moe, m_active, 1)}
    if not a.no_total:
        configs["dense_total"] = dense_matching(moe, m_total, 0)
    # with the preset's vocabulary; the trained counts (the table's) use the tokenizer's, and since
    # both sides have the same embeddings the matched intermediate size does not depend on it
    for name, c in configs.items():
        t, act = c.num_params()
        print(f"{name:13} {c.model_type:12} intermediate {c.intermediate_size:5}  total {t:>10,}  active {act:>10,}"
              f"  (active {act / m_active - 1:+.3%} vs MoE active, total {t / m_total - 1:+.3%} vs MoE total)",
              file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="dense_vs_moe-") as tmp:
        root = Path(a.out) if a.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cache = root / "cache"
        try:
            results = [run_one(name, c, root, cache, a) for name, c in configs.items()]
        except NanoseekError as e:
            print(f"dense_vs_moe: error: {e}", file=sys.stderr)
            sys.exit(2)

    if len({r["tokenizer_hash"] for r in results}) != 1 or len({r["tokens"] for r in results}) != 1:
        raise SystemExit("the runs did not share the tokenizer / token count: the comparison is void")
    moe_r = results[0]
    labels = {"moe": f"DeepSeek-V3 `{a.preset}` (MLA + MoE {moe.n_routed_experts} experts top-{moe.num_experts_per_tok}"
                     f" + {moe.n_shared_experts} shared, + MTP)",
              "dense_active": "dense llama, MoE's active params", "dense_total": "dense llama, MoE's total params"}
    print(f"\nDense vs MoE, synthetic corpus ({a.docs} docs), {a.steps} steps x {a.batch_size} x {a.seq_len} "
          f"= {moe_r['tokens']:,} tokens each, same tokenizer and data order (seed {a.seed}); "
          f"loss = next-token CE, mean of the last {moe_r['tail_steps']} steps\n")
    print("| model | FFN | total params | active params | active vs MoE | final loss | tokens | train s | tokens/s "
          "| expert load max/mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ffn = (f"{moe.moe_intermediate_size} x ({moe.num_experts_per_tok} + {moe.n_shared_experts} shared)"
               if r["model"] == "moe"
               else str(r["intermediate_size"]))
        load = f"{r['load_max_mean_final']:.2f}" if "load_max_mean_final" in r else "-"
        print(f"| {labels[r['model']]} | {ffn} | {r['total_params'] / 1e6:.3f}M | {r['active_params'] / 1e6:.3f}M "
              f"| {r['active_params'] / moe_r['active_params'] - 1:+.2%} | {r['final_loss']:.4f} | {r['tokens']:,} "
              f"| {r['train_s']:.0f} | {r['tokens_per_s']:,.0f} | {load} |")
    print()
    print(json.dumps({
        "benchmark": "dense_vs_moe", "preset": a.preset, "steps": a.steps, "batch_size": a.batch_size,
        "seq_len": a.seq_len, "seed": a.seed, "synthetic_docs": a.docs, "threads": a.threads,
        "runs": {r["model"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                              if k not in ("model", "tokenizer_hash")} for r in results},
        "loss_dense_active_minus_moe": round(results[1]["final_loss"] - moe_r["final_loss"], 4),
        "tokens_per_s_ratio_dense_active_vs_moe": round(results[1]["tokens_per_s"] / moe_r["tokens_per_s"], 3),
    }))


if __name__ == "__main__":
    main()

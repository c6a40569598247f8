"""GRPO from SmolLM2-135M-Instruct, the R1 way: a short cold start (SFT on worked solutions in the
R1 chat format), then RL on rule-checked rewards. Writes OUT/cold-start/ and OUT/grpo/ (metrics,
plots, report.md) and prints the held-out greedy accuracy before and after RL.

    .venv/bin/python benchmarks/smollm2_rl.py --out runs/smollm2-rl          # ~15 min on 2 cores
    .venv/bin/python benchmarks/smollm2_rl.py --out runs/smollm2-rl --level 2 --cold-start 256

Without the cold start the model never closes `<think>` or tags its answer, every sample scores 0
and GRPO has nothing to learn from (README, "Reasoning by RL").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import nanoseek  # noqa: E402
from nanoseek.train.run import setup_cpu_training  # noqa: E402
from nanoseek.train.grpo import GRPOArgs, grpo, resolve  # noqa: E402
from nanoseek.pipeline import cold_start_records  # noqa: E402
from nanoseek.train.sft import SFTArgs, train_sft  # noqa: E402

from nanoseek.cli import example_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/smollm2-rl")
    ap.add_argument("--level", type=int, default=1, help="arithmetic level for both stages")
    ap.add_argument("--cold-start", type=int, default=128, help="worked solutions for the SFT cold start")
    ap.add_argument("--steps", type=int, default=20, help="GRPO steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    setup_cpu_training()  # as the training commands do
    torch.set_num_threads(args.threads)
    cold = os.path.join(args.out, "cold-start")
    if not os.path.exists(os.path.join(cold, "final")):
        model, tok = nanoseek.load(example_model())
        recs = cold_start_records(args.cold_start, template="chat", tok=tok, level=args.level, langs=("en",))
        train_sft(model, tok, SFTArgs(out=cold, template="none", epochs=1, seq_len=256, batch_size=8, lr=3e-5,
                                      log_every=4), records=recs, base=example_model())
    a = resolve(GRPOArgs(preset="smollm2", model=os.path.join(cold, "final"), out=os.path.join(args.out, "grpo"),
                         level=args.level, prompts_per_step=4, group_size=4, max_tokens=96, lr=1e-5,
                         steps=args.steps, eval_every=10, eval_n=150, threads=args.threads),
                given={"level", "prompts_per_step", "group_size", "max_tokens", "lr", "steps", "eval_every",
                       "eval_n", "threads"})
    grpo(a)
    rows = [json.loads(line) for line in open(os.path.join(a.out, "metrics.jsonl"))]
    evals = [(r["step"], r["eval/accuracy"], r["eval/format"]) for r in rows if "eval/accuracy" in r]
    print(json.dumps({"held_out_greedy_accuracy": {s: round(acc, 3) for s, acc, _ in evals},
                      "format": {s: round(f, 3) for s, _, f in evals}}))


if __name__ == "__main__":
    main()

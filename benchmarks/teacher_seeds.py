"""How reliably the speedrun's teacher base learns the arithmetic: pretrain it with several seeds and
grade each final model's plain-form accuracy by operation and number of digits.

The speedrun's R1-Zero and distillation claims need a teacher base that works problems out in the
plain form (docs/experiments-seed-claims.md, section 6). This trains the `cpu` preset's teacher
(V3-tiny, batch 16 x 128, 60k synthetic docs) once per seed, in its own process, two at a time with one
thread each, then grades every model on the same 400 new problems (pretrain's `arithmetic_grades`:
greedy worked solutions, answer correct) with a Wilson interval.

    .venv/bin/python benchmarks/teacher_seeds.py --seeds 0 1 2            # ~12 min on 2 cores
    .venv/bin/python benchmarks/teacher_seeds.py --seeds 0 1 --steps 2500 --lr 1e-3 --out runs/ts
    .venv/bin/python benchmarks/teacher_seeds.py --grade runs/ts/seed-0/final other/final  # grade only
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nanoseek.eval.stats import wilson
from nanoseek.train.pretrain import arithmetic_grades
from nanoseek.weights import load

OPS = "+-×"


def train(out: Path, seed: int, steps: int, lr: float, cache: Path, model: str = "tiny", extra=()) -> Path:
    """One teacher base, in a child process with one thread (as a speedrun lane runs it)."""
    source = "--config" if Path(model).exists() else "--preset"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", source, model, "--steps", str(steps),
           "--batch-size", "16", "--seq-len", "128", "--synthetic-docs", "60000", "--lr", str(lr),
           "--seed", str(seed), "--threads", "1", "--final-eval", "0", "--no-progress", "--resume",
           "--cache-dir", str(cache), "--out", str(out), *extra]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "final"


def plain_form(model_dir: Path, n: int = 400) -> dict:
    """Greedy plain-form accuracy on n new problems, overall and by (operation, digits of the larger number)."""
    model, tok = load(model_dir)
    by = collections.defaultdict(list)
    right = 0
    for p, g in arithmetic_grades(model, tok, n):   # the same problems as pretrain's final eval
        ok = bool(g["answer_correct"])
        right += ok
        op = next(o for o in OPS if f" {o} " in p.prompt)
        by[f"{op}{len(max(re.findall(r'[0-9]+', p.prompt), key=len))}"].append(ok)
    lo, hi = wilson(right, n)
    return {"model": str(model_dir), "n": n, "answer_correct": right / n, "ci95": [lo, hi],
            "by_op_digits": {k: round(sum(v) / len(v), 3) for k, v in sorted(by.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--model", default="tiny", help="a preset or a config.json (e.g. more heads)")
    ap.add_argument("--pretrain-args", nargs="*", default=[], metavar="ARG",
                    help="more `nanoseek pretrain` arguments, e.g. --pretrain-args=--no-document-mask")
    ap.add_argument("--jobs", type=int, default=2, help="teachers trained at once, one thread each")
    ap.add_argument("--out", default="runs/teacher-seeds")
    ap.add_argument("--grade", nargs="+", metavar="MODEL_DIR", help="only grade these model directories")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.grade:
        finals = [Path(d) for d in a.grade]
    else:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(a.jobs) as pool:
            finals = list(pool.map(lambda s: train(out / f"seed-{s}", s, a.steps, a.lr, out / "cache", a.model,
                                                   a.pretrain_args), a.seeds))
    rows = [plain_form(d) for d in finals]
    for r in rows:
        lo, hi = r["ci95"]
        print(f"{r['model']}: plain form {100 * r['answer_correct']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
              f"(n {r['n']}); by op+digits {r['by_op_digits']}")
    if not a.grade:
        (Path(a.out) / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

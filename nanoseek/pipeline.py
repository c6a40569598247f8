"""`nanoseek pipeline r1`: DeepSeek-R1's four training stages, then distillation, each a resumable stage.

    nanoseek pipeline r1 --model runs/speedrun/pretrain/final --out runs/r1
    nanoseek pipeline r1 --model runs/speedrun/pretrain/final --student runs/speedrun/student/final --out runs/r1
    nanoseek pipeline r1 ... --resume                 # finished stages are skipped, the current one resumes

The stages (DeepSeek-R1 §2.3, at miniature scale on the arithmetic task):
  1. cold-start  SFT of the base model on a small set of long, readable chains of thought in the
                 question's language (here: the worked column-by-column solutions, in the R1 format)
  2. reasoning   GRPO with accuracy + format + language-consistency rewards
  3. rejection   the stage-2 model samples k answers per training question; only verified, well-formed,
                 language-consistent traces are kept (rejection sampling); the BASE model is fine-tuned
                 on them (R1 retrains DeepSeek-V3-Base on this data, not the RL checkpoint)
  4. final-rl    a second GRPO stage from the stage-3 model
  5. distill     the final model's verified traces -> a dense student (SFT)
  6. eval        every stage's model on the held-out split; report.md via `nanoseek report`
Each stage writes OUT/<stage>/ (its own checkpoints and metrics.jsonl) and a `.<stage>.done` marker.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .atomic import write_json
from .args import HelpFormatter
from .errors import NanoseekError

STAGES = ("cold-start", "reasoning", "rejection", "final-rl", "distill", "eval", "report")


def cold_start_records(n: int, template: str = "r1-zero-short", seed: int = 0, tok=None, level: int = 2,
                       langs: tuple[str, ...] | None = None) -> list[dict]:
    """n worked solutions of training questions (arithmetic, level 1-2), as prompt/completion pairs in
    the R1 format: readable reasoning in the question's language, then the answer. `tok` is needed
    by the "chat" template (the model's own chat format)."""
    from .data.synthetic import worked
    from .data.tasks import get_task, render
    task = get_task("arithmetic", level=level, langs=langs)
    recs = []
    for ex in task.examples("train", n, seed=seed + 7919):
        a, op, b = ex.meta["expression"].split()
        p = worked(int(a), op, int(b), ex.lang)
        recs.append({"prompt": render(template, ex.question, tok),
                     "completion": f" {p.solution.strip()} </think> <answer> {p.answer} </answer>"})
    return recs


def r1(model: str, out: str, student: str = "dense:tiny", resume: bool = False, seed: int = 0,
       cold_start: int = 1000, rl_steps: int = 40, final_rl_steps: int = 20, prompts: int = 400, k: int = 4,
       eval_n: int = 200, only: list[str] | None = None) -> dict:
    from pathlib import Path

    from .speedrun import Stages
    from .train.grpo import GRPOArgs, grpo, resolve
    if not Path(model).exists():
        raise NanoseekError(f"{model}: no such model")
    run = Stages(out, resume, "pipeline r1", only)
    root = run.root

    def final(stage: str) -> str:
        return str(root / stage / "final")

    def rl(stage: str, start: str, steps: int):
        a = resolve(GRPOArgs(model=start, out=str(root / stage), preset="r1-zero-tiny", seed=seed,
                             resume=run.resuming(stage)), set())
        r = grpo(dataclasses.replace(a, steps=steps, language_weight=0.5))
        h = r["history"]
        return {"heldout_greedy_start": h[0].get("eval/accuracy") if h else None,
                "heldout_greedy_end": h[-1].get("eval/accuracy") if h else None}

    def cold():
        from .weights import load
        from .train.sft import SFTArgs, train_sft
        m, tok = load(model)
        r = train_sft(m, tok, SFTArgs(out=str(root / "cold-start"), template="none", epochs=1, seq_len=256,
                                      batch_size=16, lr=5e-4, seed=seed, resume=run.resuming("cold-start")),
                      records=cold_start_records(cold_start, seed=seed), base=model)
        return {"examples": cold_start, "final_loss": r["losses"][-1] if r["losses"] else None}

    def reject():
        from .train.distill import DistillArgs, distill
        r = distill(DistillArgs(teacher=final("reasoning"), student=model, task="arithmetic", level=2,
                                prompts=prompts, k=k, out=str(root / "rejection"), max_tokens=112, seq_len=256,
                                lr=5e-4, epochs=2, seed=seed, resume=(root / "rejection").exists()))
        return {k_: r["dataset"].get(k_) for k_ in ("generated", "kept", "keep_rate")}

    def dist():
        from .train.distill import DistillArgs, distill
        r = distill(DistillArgs(teacher=final("final-rl"), student=student, task="arithmetic", level=2,
                                prompts=prompts, k=k, out=str(root / "distill"), max_tokens=112, seq_len=256,
                                epochs=3, seed=seed + 1, resume=(root / "distill").exists()))
        return {k_: r["dataset"].get(k_) for k_ in ("generated", "kept", "keep_rate")}

    def evaluate_all():
        from .data.tasks import get_task
        from .eval import evaluate
        from .weights import load
        task = get_task("arithmetic", level=2)
        rows = []
        for name, path in [("base", model), ("1 cold-start SFT", final("cold-start")), ("2 reasoning RL", final("reasoning")),
                           ("3 rejection sampling + SFT", final("rejection")), ("4 final RL", final("final-rl")),
                           ("5 distilled student", final("distill"))]:
            if not Path(path).exists():
                continue
            m, tok = load(path)
            res = evaluate(m, tok, task, n=eval_n, k=4, template="r1-zero-short", max_tokens=112, seed=seed)
            rows.append({"model": name, **{k_: v for k_, v in res.items() if k_ != "samples"}})
            print(f"[pipeline r1] {name}: pass@1 {res['pass@1']:.1%}, greedy {res['greedy']:.1%}, "
                  f"format {res['format_rate']:.1%}, language {res['language_rate']:.1%}", file=sys.stderr)
        write_json(root / "eval.json", {"rows": rows})
        return {r["model"]: round(r["pass@1"], 3) for r in rows}

    def report():
        from .eval.report import write_report
        print(f"[pipeline r1] report card: {write_report(root, title='nanoseek pipeline r1')}", file=sys.stderr)

    run.run("cold-start", cold)
    run.run("reasoning", lambda: rl("reasoning", final("cold-start"), rl_steps))
    run.run("rejection", reject)
    run.run("final-rl", lambda: rl("final-rl", final("rejection"), final_rl_steps))
    run.run("distill", dist)
    run.run("eval", evaluate_all)
    run.run("report", report)
    return run.summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "pipeline", help="DeepSeek-R1's multi-stage recipe: cold start, RL, rejection sampling, RL, distill",
        formatter_class=HelpFormatter,
        description=__doc__.split("\n\n", 1)[1])
    s.add_argument("recipe", choices=["r1"], help="the recipe (r1)")
    s.add_argument("--model", required=True, help="the base model (e.g. runs/speedrun/pretrain/final)")
    s.add_argument("--out", default="runs/r1")
    s.add_argument("--student", default="dense:tiny", help="distillation student: a model path or dense:PRESET")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cold-start", type=int, default=1000, help="cold-start examples")
    s.add_argument("--rl-steps", type=int, default=40)
    s.add_argument("--final-rl-steps", type=int, default=20)
    s.add_argument("--prompts", type=int, default=400, help="questions for rejection sampling and distillation")
    s.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run just these stages")
    s.set_defaults(func=lambda a: r1(a.model, a.out, a.student, a.resume, a.seed, a.cold_start, a.rl_steps,
                                     a.final_rl_steps, a.prompts, only=a.only) and 0)
    return s

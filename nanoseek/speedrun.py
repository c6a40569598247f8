"""`nanoseek speedrun` (= `make speedrun`): the whole DeepSeek-V3 / R1 recipe in one command, on a laptop CPU.

    nanoseek speedrun                          # runs/speedrun, ~20-30 minutes on 2 CPU cores
    nanoseek speedrun --resume                 # continue an interrupted run where it stopped
    nanoseek speedrun --preset gpu-small       # the same pipeline, scaled up for a GPU
    nanoseek report runs/speedrun              # rebuild the report card from the logs

Stages (each writes its own directory under OUT and a `.done` marker; `--resume` skips finished
stages and resumes the unfinished one from its last checkpoint):
  1. pretrain   BPE tokenizer + the tiny DeepSeek-V3 (MLA + MoE + MTP, aux-loss-free balancing) on the
                synthetic worked-arithmetic corpus (held-out questions excluded)      -> pretrain/final
  2. student    a dense llama-architecture student pretrained on the same corpus with a smaller budget
                (the "small base model" DeepSeek distils into)                         -> student/final
  3. grpo       R1-Zero: GRPO from the base model on rule-checked rewards              -> grpo/final
  4. distill    the RL model writes verified traces (rejection sampling); the student learns them by SFT
  5. student-rl the same student trained by GRPO directly with comparable compute (R1 §4.1's comparison)
  6. eval       base, RL, distilled and student-RL models on the held-out split: pass@1, maj@k, greedy
  7. export     the RL model as open weights (HF safetensors + GGUF of the dense student)
  8. report     report.md with plots, the eval table, the cost of DeepSeek-V3 and a sample chat
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from .atomic import atomic_write, write_json
from .args import HelpFormatter
from .errors import NanoseekError

# Budgets for 2 CPU cores. gpu-small scales the same pipeline (bigger model, more steps).
PRESETS = {
    "cpu": dict(model="tiny", pretrain_steps=1500, student_steps=500, grpo_steps=60, grpo_prompts=16, group_size=8,
                distill_prompts=600, distill_k=4, student_rl_steps=30, eval_n=200, eval_k=4, batch_size=16,
                seq_len=128, docs=60000, max_tokens=112),
    "gpu-small": dict(model="small", pretrain_steps=20000, student_steps=6000, grpo_steps=400, grpo_prompts=64,
                      group_size=16, distill_prompts=8000, distill_k=8, student_rl_steps=200, eval_n=1000, eval_k=16,
                      batch_size=64, seq_len=256, docs=1_000_000, max_tokens=200),
    # wiring check for tests: every stage, a few steps each
    "smoke": dict(model="tiny", pretrain_steps=6, student_steps=4, grpo_steps=2, grpo_prompts=2, group_size=4,
                  distill_prompts=6, distill_k=2, student_rl_steps=1, eval_n=4, eval_k=2, batch_size=4, seq_len=64,
                  docs=400, max_tokens=24),
}
STAGES = ("pretrain", "student", "grpo", "distill", "student-rl", "eval", "export", "report")


class Stages:
    """A run directory of named stages: each finished stage leaves a `.NAME.done` marker (atomic) and
    its timing in summary.json, so a resumed run skips it. Shared by `speedrun` and `pipeline`."""

    def __init__(self, out: str | Path, resume: bool, label: str, only: list[str] | None = None):
        self.root, self.label, self.only = Path(out), label, only
        if self.root.exists() and not self.root.is_dir():
            raise NanoseekError(f"{self.root} is a file, not a run directory")
        if self.root.is_dir() and any(self.root.iterdir()) and not resume:
            raise NanoseekError(f"{self.root} is not empty; pass --resume to continue that run or choose another --out")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NanoseekError(f"{self.root}: cannot create the output directory ({e.strerror or e})") from None
        p = self.root / "summary.json"
        self.summary = json.loads(p.read_text()) if p.is_file() else {}
        self.summary.setdefault("machine", {"platform": platform.platform(), "python": platform.python_version(),
                                            "processor": platform.processor() or platform.machine()})
        self.summary.setdefault("stage_s", {})

    def save_summary(self) -> None:
        write_json(self.root / "summary.json", self.summary)

    def done(self, name: str) -> bool:
        return (self.root / f".{name}.done").is_file()

    def run(self, name: str, fn) -> None:
        if self.only and name not in self.only:
            return
        if self.done(name):
            print(f"[{self.label}] {name}: done already, skipped", file=sys.stderr)
            return
        print(f"\n[{self.label}] ===== {name} =====", file=sys.stderr)
        t0 = time.perf_counter()
        info = fn() or {}
        dt = round(time.perf_counter() - t0, 1)
        self.summary["stage_s"][name] = dt
        self.summary.update({f"{name}.{k}": v for k, v in info.items()})
        self.save_summary()
        atomic_write(self.root / f".{name}.done", json.dumps({"seconds": dt, **info}, indent=2) + "\n")

    def resuming(self, sub: str) -> bool:
        """Whether stage directory `sub` has checkpoints to resume from."""
        return (self.root / sub / "checkpoints").is_dir()


def speedrun(out: str = "runs/speedrun", preset: str = "cpu", resume: bool = False, seed: int = 0,
             threads: int | None = None, only: list[str] | None = None) -> dict:
    if preset not in PRESETS:
        raise NanoseekError(f"unknown speedrun preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    run = Stages(out, resume, "speedrun", only)
    if threads:
        import torch
        torch.set_num_threads(threads)
    run.summary.setdefault("preset", preset)
    for name, fn in STAGE_FUNCTIONS.items():
        if name == "report":
            run.summary["total_s"] = round(sum(run.summary["stage_s"].values()), 1)
            run.save_summary()
        run.run(name, lambda: fn(run, p, seed))
    return run.summary


# ------------------------------------------------------------------------------ the stages
def _pretrain_stage(run: Stages, p: dict, seed: int) -> dict:
    """1. Pretrain the DeepSeek-V3-architecture base model."""
    from .train.pretrain import PretrainArgs, pretrain
    root = run.root
    d = root / "pretrain"
    r = pretrain(PretrainArgs(out=str(d), preset=p["model"], steps=p["pretrain_steps"], batch_size=p["batch_size"],
                              seq_len=p["seq_len"], synthetic_docs=p["docs"], seed=seed, resume=run.resuming(d.name),
                              save_every=250, sample_every=500, final_eval=p["eval_n"]))
    return {"final_loss": r["last"].get("loss"), "steps": r["step"]}


def _student_stage(run: Stages, p: dict, seed: int) -> dict:
    """2. A dense student base model (llama architecture, same tokenizer and corpus, a third of the budget)."""
    from .train.pretrain import PretrainArgs, pretrain
    root = run.root
    d = root / "student"
    r = pretrain(PretrainArgs(out=str(d), preset=p["model"], arch="llama", steps=p["student_steps"],
                              batch_size=p["batch_size"], seq_len=p["seq_len"], synthetic_docs=p["docs"], seed=seed,
                              tokenizer=str(root / "pretrain" / "final"), cache_dir=str(root / "pretrain" / "cache"),
                              resume=run.resuming(d.name), save_every=250, sample_every=10**9, final_eval=0))
    return {"final_loss": r["last"].get("loss"), "steps": r["step"]}


def _grpo_stage(run: Stages, p: dict, seed: int) -> dict:
    """3. R1-Zero GRPO on the base model."""
    from .train.grpo import GRPOArgs, grpo, resolve
    root = run.root
    d = root / "grpo"
    a = resolve(GRPOArgs(model=str(root / "pretrain" / "final"), out=str(d), preset="r1-zero-tiny",
                         resume=run.resuming(d.name), seed=seed), set())
    a = dataclasses.replace(a, steps=p["grpo_steps"], prompts_per_step=p["grpo_prompts"], group_size=p["group_size"],
                            max_tokens=p["max_tokens"], eval_n=p["eval_n"])
    r = grpo(a)
    first, last = r["history"][0] if r["history"] else {}, r["history"][-1] if r["history"] else {}
    return {"steps": r["step"], "heldout_greedy_start": first.get("eval/accuracy"),
            "heldout_greedy_end": last.get("eval/accuracy")}


def _distill_stage(run: Stages, p: dict, seed: int) -> dict:
    """4. Distil the RL model's verified reasoning into the dense student."""
    from .train.distill import DistillArgs, distill
    root = run.root
    d = root / "distill"
    try:
        r = distill(DistillArgs(teacher=str(root / "grpo" / "final"), student=str(root / "student" / "final"),
                                task="arithmetic", level=2, prompts=p["distill_prompts"], k=p["distill_k"],
                                out=str(d), max_tokens=p["max_tokens"], seq_len=p["seq_len"] * 2, lr=1e-3, epochs=2,
                                seed=seed, resume=d.exists()))
    except NanoseekError as e:  # an RL model with no verified trace: nothing to distil, say so and go on
        if "no verified trace" not in str(e):
            raise
        print(f"[speedrun] distill skipped: {e}", file=sys.stderr)
        return {"kept": 0, "skipped": str(e)}
    return {k: r["dataset"].get(k) for k in ("generated", "kept", "keep_rate")}


def _student_rl_stage(run: Stages, p: dict, seed: int) -> dict:
    """5. The same student trained by GRPO directly, for comparable compute."""
    from .train.grpo import GRPOArgs, grpo, resolve
    root = run.root
    d = root / "student-rl"
    a = resolve(GRPOArgs(model=str(root / "student" / "final"), out=str(d), preset="r1-zero-tiny",
                         resume=run.resuming(d.name), seed=seed), set())
    r = grpo(dataclasses.replace(a, steps=p["student_rl_steps"], prompts_per_step=p["grpo_prompts"],
                                 group_size=p["group_size"], max_tokens=p["max_tokens"], eval_n=p["eval_n"]))
    return {"steps": r["step"]}


def _eval_stage(run: Stages, p: dict, seed: int) -> dict:
    """6. Evaluate every model on the held-out split."""
    from .data.tasks import get_task
    from .eval import evaluate
    from .weights import load
    root = run.root
    task = get_task("arithmetic", level=2)
    models = {"base (pretrained V3-tiny)": root / "pretrain" / "final", "RL (R1-Zero GRPO)": root / "grpo" / "final",
              "student base (dense)": root / "student" / "final",
              "student distilled from RL": root / "distill" / "final",
              "student + GRPO directly": root / "student-rl" / "final"}
    rows = []
    for name, path in models.items():
        if not (path / "config.json").is_file():
            continue
        model, tok = load(path)
        res = evaluate(model, tok, task, n=p["eval_n"], k=p["eval_k"], template="r1-zero-short",
                       max_tokens=p["max_tokens"], seed=seed)
        row = {"model": name, **{k: v for k, v in res.items() if k != "samples"}}
        rows.append(row)
        print(f"[speedrun] eval {name}: pass@1 {row['pass@1']:.1%}, maj@{p['eval_k']} {row['maj@k']:.1%}, "
              f"greedy {row['greedy']:.1%}, format {row['format_rate']:.1%}", file=sys.stderr)
    write_json(root / "eval.json", {"rows": rows})
    return {r["model"]: round(r["pass@1"], 3) for r in rows}


def _export_stage(run: Stages, p: dict, seed: int) -> dict:
    """7. Export open weights; a sample chat; the cost of the real thing."""
    import contextlib
    import io

    from . import cost, export
    from .args import Parser
    from .config import load_config
    from .data.tasks import render
    from .infer import Engine, SamplingParams
    from .infer.reasoning import split_reasoning
    from .weights import load
    root = run.root
    cli = Parser(prog="nanoseek")   # the same code paths as `nanoseek export` and `nanoseek cost`
    sub = cli.add_subparsers(dest="command")
    export.add_parser(sub)
    cost.add_parser(sub)
    with contextlib.redirect_stdout(io.StringIO()):
        for src, fmt, dst in (("grpo", "hf", "rl-hf"), ("grpo", "gguf", "rl-gguf"),
                              ("distill", "hf", "student-hf"), ("distill", "gguf", "student-gguf")):
            if not (root / src / "final").is_dir():
                continue
            args = cli.parse_args(["export", str(root / src / "final"), "--format", fmt,
                                   "--out", str(root / "export" / dst), "--force"])
            args.func(args)
    model, tok = load(root / "grpo" / "final")
    question = "Question: 487 + 356 = ?"
    text = Engine(model, tok, max_batch_size=1).generate(
        [render("r1-zero-short", question)], SamplingParams(max_tokens=p["max_tokens"], temperature=0))[0].text
    reasoning, answer = split_reasoning(text, started_in_reasoning=True)
    (root / "chat.json").write_text(json.dumps({"prompt": question, "reasoning": reasoning, "answer": answer},
                                               ensure_ascii=False, indent=2) + "\n")
    args = cli.parse_args(["cost", "--json"])   # DeepSeek-V3's bill, the default
    (root / "cost.json").write_text(json.dumps(cost.build_report(args, load_config(args.model)), indent=2) + "\n")
    # which runtime loads which: *-hf in transformers, vLLM, SGLang and nanoseek; *-gguf in llama.cpp
    # (rl-gguf as its deepseek2 architecture, without the MTP module) and nanoseek
    return {"exported": ["export/rl-hf", "export/rl-gguf", "export/student-hf", "export/student-gguf"]}


def _report_stage(run: Stages, p: dict, seed: int) -> dict:
    """8. The report card: report.md with the plots, the eval table, the cost and a sample chat."""
    from .eval.report import write_report
    root = run.root
    path = write_report(root, title="nanoseek speedrun")
    print(f"[speedrun] report card: {path}", file=sys.stderr)
    return {}


STAGE_FUNCTIONS = {"pretrain": _pretrain_stage, "student": _student_stage, "grpo": _grpo_stage,
                   "distill": _distill_stage, "student-rl": _student_rl_stage, "eval": _eval_stage,
                   "export": _export_stage, "report": _report_stage}  # in STAGES order


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "speedrun", help="the whole recipe end to end: pretrain -> R1-Zero GRPO -> distill -> eval -> report",
        formatter_class=HelpFormatter,
        description=__doc__.split("\n\n", 1)[1].split("\n\n", 1)[1] + "\nexamples:\n"
                    "  nanoseek speedrun --out runs/speedrun\n  nanoseek speedrun --out runs/speedrun --resume")
    s.add_argument("--out", default="runs/speedrun")
    s.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    s.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run just these stages")
    s.set_defaults(func=lambda args: speedrun(args.out, args.preset, args.resume, args.seed, args.threads,
                                              args.only) and 0)
    return s

"""`nanoseek speedrun` (= `make speedrun`): the whole DeepSeek-V3 / R1 recipe in one command, on a laptop CPU.

    nanoseek speedrun                          # runs/speedrun, two stages at a time on a 2-core CPU
    nanoseek speedrun --resume                 # continue an interrupted run where it stopped
    nanoseek speedrun --jobs 1                 # one stage at a time, all cores each
    nanoseek speedrun --preset gpu-small       # the same pipeline, scaled up for a GPU
    nanoseek report runs/speedrun              # rebuild the report card from the logs

Stages (each writes its own directory under OUT and a `.done` marker; `--resume` skips finished
stages and resumes the unfinished ones from their last checkpoints). With --jobs 2 (the default on a
CPU) the base model trains alone on every core, then two lanes run side by side, each stage as soon
as the stages it needs are done: the R1 chain in one, the student, its direct RL and R1-Zero in the
other; each stage's log is OUT/logs/STAGE.log.
Every stage that makes a model evaluates it on the held-out problems as it ends.
  data         the synthetic worked-arithmetic corpus (held-out questions excluded), its BPE tokenizer
  pretrain     the tiny DeepSeek-V3 (MLA + MoE + MTP, aux-loss-free balancing) on that corpus
                                                                                       -> pretrain/final
  student      a dense llama-architecture student on the same corpus: the small base model that
               distillation and direct RL start from                                   -> student/final
  grpo         R1-Zero: pure GRPO from the base on rule-checked rewards (no language reward)
  cold-start   R1: SFT of the base on a few readable worked solutions
  reasoning    R1: GRPO from the cold start with accuracy + format + language-consistency rewards
  rejection    R1: the reasoning model's verified traces (rejection sampling) re-train the base
  final-rl     R1: a last GRPO stage with the language reward                          -> r1/final
  distill      R1's verified traces (deduplicated, language-consistent; sampled until 2400 are kept)
               -> SFT of the student
  student-rl   the same student trained by GRPO directly, with more compute than distillation used
  eval         every model on the same held-out problems (pass@1, maj@k, greedy, format, language,
               length, with 95% intervals and per-problem scores) in one table
  export       R1 as open weights (HF + deepseek2 GGUF), the distilled student (HF + GGUF); a sample
               chat through the model's own chat template; DeepSeek-V3's bill
  report       report.md: the seed-claims table first, then plots and tables of every stage
A preset may leave out rejection / final-rl (R1 is then the reasoning model); the report says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from .args import HelpFormatter
from .atomic import atomic_write, write_json
from .errors import NanoseekError
from .pipeline import Stages, cold_start, evaluate_models, first_model, rl, run_parallel, sample_and_train

# Budgets for 2 CPU cores (docs/experiments-seed-claims.md has the runs behind them: a 1000-step teacher
# base or student breaks a claim; at 1500 steps the teacher base read 50-86% of plain-form answers by
# draw, at 2000 steps 88-91% (seeds 1-3, the same seeds 66-86% at 1500), so the teacher gets 2000;
# R1-Zero's jump comes between steps 30 and 40, so it gets 60, which fit beside the R1 chain in the
# second lane; R1 keeps 30-77% of its samples (by run: a fixed 6000 questions
# kept 1,834 to 4,634 traces), so distillation samples until 2400 traces are kept (at most 10000
# questions) and the student learns exactly those: its direct RL always gets more compute than its
# distillation, 50 GRPO steps of 128 rollouts against 2 epochs of 2400 traces, ~100 SFT steps).
# gpu-small scales the same pipeline (bigger model, more steps).
# rejection_prompts 0 leaves out R1's rejection-sampling and final-RL stages.
PRESETS = {
    "cpu": dict(model="tiny", pretrain_steps=2000, student_steps=1500, student_layers=2, grpo_steps=60,
                grpo_prompts=16, group_size=8, cold_start=1000, r1_rl_steps=20, rejection_prompts=2400,
                final_rl_steps=10, distill_prompts=10000, distill_kept=2400, distill_k=1, student_rl_steps=50,
                eval_n=400, eval_k=4, batch_size=16, seq_len=128, docs=60000, max_tokens=112),
    "gpu-small": dict(model="small", pretrain_steps=20000, student_steps=6000, student_layers=4, grpo_steps=400,
                      grpo_prompts=64, group_size=16, cold_start=4000, r1_rl_steps=300, rejection_prompts=8000,
                      final_rl_steps=200, distill_prompts=16000, distill_kept=8000, distill_k=1,
                      student_rl_steps=300, eval_n=1000, eval_k=16, batch_size=64, seq_len=256, docs=1_000_000,
                      max_tokens=200),
    # wiring check for tests: every stage, a few steps each
    "smoke": dict(model="tiny", pretrain_steps=6, student_steps=4, student_layers=2, grpo_steps=2, grpo_prompts=2,
                  group_size=4, cold_start=8, r1_rl_steps=1, rejection_prompts=4, final_rl_steps=1,
                  distill_prompts=6, distill_kept=4, distill_k=2, student_rl_steps=1, eval_n=4, eval_k=2,
                  batch_size=4, seq_len=64, docs=400, max_tokens=24),
}
STAGES = ("data", "pretrain", "student", "grpo", "cold-start", "reasoning", "rejection", "final-rl", "distill", "student-rl",
          "eval", "export", "report")
# what each stage needs, in the order a parallel run prefers them when both lanes are free (the R1 chain is
# the critical path: the student, R1-Zero and the student's direct RL fit beside it in the other lane;
# R1-Zero, the longest, before the short student RL, so no lane idles at the end)
NEEDS = {"data": (), "pretrain": ("data",), "cold-start": ("pretrain",), "reasoning": ("cold-start",),
         "rejection": ("reasoning",), "final-rl": ("rejection",), "distill": ("final-rl", "student"),
         "student": ("data",), "grpo": ("pretrain",), "student-rl": ("student",),
         "eval": ("pretrain", "grpo", "final-rl", "student", "distill", "student-rl"), "export": ("distill",)}

# the base model runs alone on every core: everything after it waits for it, and it scales to 2 threads
# (tiny preset, 2 cores: 9.1K tokens/s on one thread, 13-15K on two), so the lanes start sooner than
# they would with the student beside it (the student then fits in the other lane beside the R1 chain)
SOLO = ("pretrain",)


def speedrun(out: str = "runs/speedrun", preset: str = "cpu", resume: bool = False, seed: int = 0,
             threads: int | None = None, only: list[str] | None = None, jobs: int = 1, child: bool = False) -> dict:
    """The stages in order, or with jobs > 1 as that many processes side by side (each stage as soon as
    the stages it needs are done; `only` and `child` run stages in this process)."""
    if preset not in PRESETS:
        raise NanoseekError(f"unknown speedrun preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if jobs < 1:
        raise NanoseekError(f"--jobs must be at least 1, got {jobs}")
    p = PRESETS[preset]
    run = Stages(out, resume, "speedrun", only, child=child)
    if threads:
        import torch
        torch.set_num_threads(threads)
    run.summary.setdefault("preset", preset)
    if jobs > 1 and not only and not child:
        return _parallel(run, preset, seed, jobs, threads)
    for name, fn in STAGE_FUNCTIONS.items():
        if name == "report" and not child:
            run.summary["total_s"] = round(sum(run.summary["stage_s"].values()), 1)
            run.save_summary()
        run.run(name, lambda: _and_evaluate(run, p, seed, name, fn))
    return run.summary


# the model each stage makes, evaluated as the stage ends (so parallel lanes share the eval work)
EVALUATES = {"pretrain": "base", "student": "student-base", "grpo": "r1-zero", "final-rl": "r1",
             "distill": "student-distilled", "student-rl": "student-rl"}


def _and_evaluate(run: Stages, p: dict, seed: int, name: str, fn) -> dict:
    info = fn(run, p, seed)
    if name in EVALUATES:
        evaluate_models(run, [m for m in _models(run, p) if m[0] == EVALUATES[name]], p["eval_n"], p["eval_k"],
                        p["max_tokens"], seed, table=False)
    return info


def default_jobs() -> int:
    """2 lanes on a CPU with 2+ cores; 1 where a GPU runs the stages (they would share it)."""
    import torch
    return 1 if torch.cuda.is_available() or (os.cpu_count() or 1) < 2 else 2


def _parallel(run: Stages, preset: str, seed: int, jobs: int, threads: int | None) -> dict:
    """`jobs` lanes, each a process with cores // jobs threads: small models scale poorly over threads, so
    two one-thread stages side by side finish sooner than the same two one after the other on two."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    run.summary["jobs"], run.summary["threads_per_job"] = jobs, threads
    wall0, t0 = run.summary.get("total_s", 0.0), time.perf_counter()

    def command(name: str) -> list[str]:
        n = threads * jobs if name in SOLO else threads
        return [sys.executable, "-m", "nanoseek", "speedrun", "--out", str(run.root), "--preset", preset, "--seed",
                str(seed), "--threads", str(n), "--resume", "--only", name, "--child"]

    def wall(_name=None) -> None:   # wall-clock time of the run, across resumes
        run.summary["total_s"] = round(wall0 + time.perf_counter() - t0, 1)
        run.save_summary()

    run_parallel(run, NEEDS, command, jobs, on_done=wall, solo=SOLO)
    wall()
    run.run("report", lambda: _report_stage(run, PRESETS[preset], seed))
    return run.summary


# ------------------------------------------------------------------------------ the stages
def _data_stage(run: Stages, p: dict, seed: int) -> dict:
    """The synthetic corpus, its BPE tokenizer and token file (OUT/data), shared by the base and the student."""
    from .train.dist import DistInfo
    from .train.pretrain import prepare_data
    tok, tokens, _, _ = prepare_data(_pretrain_args(run, p, seed, "pretrain", p["pretrain_steps"]), DistInfo(), None)
    return {"tokens": int(len(tokens)), "vocab": tok.vocab_size}


def _pretrain_args(run: Stages, p: dict, seed: int, stage: str, steps: int, **kw):
    """What the base and the student share: corpus, its cache (OUT/data), batch, checkpoints, final eval."""
    from .train.pretrain import PretrainArgs
    d = run.root / stage
    return PretrainArgs(out=str(d), preset=p["model"], steps=steps, batch_size=p["batch_size"],
                        seq_len=p["seq_len"], synthetic_docs=p["docs"], seed=seed, cache_dir=str(run.root / "data"),
                        resume=run.resuming(d.name), save_every=250, final_eval=p["eval_n"], **kw)


def _pretrain_stage(run: Stages, p: dict, seed: int) -> dict:
    """Pretrain the DeepSeek-V3-architecture base model."""
    from .train.pretrain import pretrain
    r = pretrain(_pretrain_args(run, p, seed, "pretrain", p["pretrain_steps"], sample_every=500))
    return {"final_loss": r["last"].get("loss"), "steps": r["step"]}


def _student_stage(run: Stages, p: dict, seed: int) -> dict:
    """A dense student base model: llama architecture, the teacher's width and heads but `student_layers`
    layers (smaller than the teacher, as R1 §4's students are), same tokenizer, corpus and steps."""
    from .config import dense_variant, preset
    from .train.pretrain import pretrain
    cfg = dense_variant(preset(p["model"]), "llama").replace(num_hidden_layers=p["student_layers"])
    path = run.root / "student-config.json"
    atomic_write(path, json.dumps(cfg.to_hf_config(), indent=1))
    r = pretrain(_pretrain_args(run, p, seed, "student", p["student_steps"], config=str(path), sample_every=10**9))
    return {"final_loss": r["last"].get("loss"), "steps": r["step"]}


def _rl(run: Stages, p: dict, stage: str, start: Path, steps: int, seed: int, language_weight: float = 0.0) -> dict:
    """A GRPO stage with the preset's rollout sizes (every RL stage of the speedrun shares them)."""
    return rl(run, stage, str(start), steps, seed, language_weight=language_weight,
              prompts_per_step=p["grpo_prompts"], group_size=p["group_size"], max_tokens=p["max_tokens"],
              eval_n=min(p["eval_n"], 200))


def _grpo_stage(run: Stages, p: dict, seed: int) -> dict:
    """R1-Zero: pure RL from the base model (accuracy + format rewards only)."""
    return _rl(run, p, "grpo", run.root / "pretrain" / "final", p["grpo_steps"], seed)


def r1_final(run: Stages, p: dict) -> Path:
    """R1's last stage: final-rl, or reasoning when the preset leaves out rejection sampling."""
    return run.root / "r1" / ("final-rl" if p["rejection_prompts"] else "reasoning") / "final"


def _cold_start_stage(run: Stages, p: dict, seed: int) -> dict:
    return cold_start(run, "r1/cold-start", str(run.root / "pretrain" / "final"), p["cold_start"], seed)


def _reasoning_stage(run: Stages, p: dict, seed: int) -> dict:
    return _rl(run, p, "r1/reasoning", run.root / "r1" / "cold-start" / "final", p["r1_rl_steps"], seed, 0.5)


def _rejection_stage(run: Stages, p: dict, seed: int) -> dict:
    if not p["rejection_prompts"]:
        return {"skipped": "left out by the preset: R1 is the reasoning model"}
    return sample_and_train(run, "r1/rejection", str(run.root / "r1" / "reasoning" / "final"),
                            str(run.root / "pretrain" / "final"), p["rejection_prompts"], 1, seed)


def _final_rl_stage(run: Stages, p: dict, seed: int) -> dict:
    if not p["rejection_prompts"]:
        return {"skipped": "left out by the preset: R1 is the reasoning model"}
    start = first_model(run.root / "r1" / "rejection" / "final", run.root / "r1" / "reasoning" / "final")
    return _rl(run, p, "r1/final-rl", start, p["final_rl_steps"], seed, 0.5)


def _distill_stage(run: Stages, p: dict, seed: int) -> dict:
    """R1's verified reasoning, distilled into the dense student (k samples of each training question)."""
    return sample_and_train(run, "distill", str(r1_final(run, p)), str(run.root / "student" / "final"),
                            p["distill_prompts"], p["distill_k"], seed + 1, max_tokens=p["max_tokens"],
                            seq_len=p["seq_len"] * 2, kept=p["distill_kept"])


def _student_rl_stage(run: Stages, p: dict, seed: int) -> dict:
    """The same student trained by GRPO directly (R1 §4.1's comparison)."""
    return _rl(run, p, "student-rl", run.root / "student" / "final", p["student_rl_steps"], seed)


def _models(run: Stages, p: dict) -> list[tuple[str, str, str]]:
    """(role, name, path) of every model the report compares (roles feed the claims table)."""
    root = run.root
    models = [("base", "base (pretrained V3-tiny)", root / "pretrain" / "final"),
              ("r1-zero", "R1-Zero (pure RL)", root / "grpo" / "final"),
              ("r1", "R1 (cold start + RL with the language reward"
                     + (" + rejection SFT + RL)" if p["rejection_prompts"] else ")"), r1_final(run, p)),
              ("student-base", "student base (dense)", root / "student" / "final"),
              ("student-distilled", "student distilled from R1", root / "distill" / "final"),
              ("student-rl", "student + GRPO directly", root / "student-rl" / "final")]
    return [(r, n, str(path)) for r, n, path in models]


def _eval_stage(run: Stages, p: dict, seed: int) -> dict:
    """Every model on the same held-out problems (the ones the stages evaluated already are read back)."""
    return evaluate_models(run, _models(run, p), p["eval_n"], p["eval_k"], p["max_tokens"], seed)


def _export_stage(run: Stages, p: dict, seed: int) -> dict:
    """Export open weights; a sample chat; the cost of the real thing."""
    import contextlib
    import io

    from . import cost, export
    from .args import Parser
    from .config import load_config
    from .infer import Engine, SamplingParams
    from .data.rewards import parse_response
    from .data.tasks.math_answer import answers_equal
    from .infer.reasoning import opens_reasoning, split_reasoning
    from .tokenizer import THINK
    from .weights import load
    root = run.root
    cli = Parser(prog="nanoseek")   # the same code paths as `nanoseek export` and `nanoseek cost`
    sub = cli.add_subparsers(dest="command")
    export.add_parser(sub)
    cost.add_parser(sub)
    with contextlib.redirect_stdout(io.StringIO()):
        for src, fmt, dst in ((r1_final(run, p), "hf", "rl-hf"), (r1_final(run, p), "gguf", "rl-gguf"),
                              (root / "distill" / "final", "hf", "student-hf"),
                              (root / "distill" / "final", "gguf", "student-gguf")):
            if not src.is_dir():
                continue
            args = cli.parse_args(["export", str(src), "--format", fmt, "--out", str(root / "export" / dst),
                                   "--force"])
            args.func(args)
    # R1 in conversation, prompted through its own chat template as `nanoseek chat` and the server do
    model, tok = load(r1_final(run, p))
    question, expected = "Question: 487 + 356 = ?", str(487 + 356)
    prompt, ids = tok.encode_chat([{"role": "user", "content": question}])
    text = Engine(model, tok, max_batch_size=1).generate(
        [ids], SamplingParams(max_tokens=p["max_tokens"], temperature=0))[0].text
    reasoning, answer = split_reasoning(text, started_in_reasoning=opens_reasoning(prompt))
    # checked as the rewards and the eval check (the answer inside <answer></answer>), so the card
    # says whether the sample is right rather than leaving the reader to add it up
    completion = text if opens_reasoning(prompt) else text.split(THINK, 1)[-1]
    correct = answers_equal(parse_response(completion).answer, expected)
    write_json(root / "chat.json", {"model": "R1", "prompt": question, "reasoning": reasoning, "answer": answer,
                                    "expected": expected, "correct": correct})
    args = cli.parse_args(["cost", "--json"])   # DeepSeek-V3's bill, the default
    (root / "cost.json").write_text(json.dumps(cost.build_report(args, load_config(args.model)), indent=2) + "\n")
    # which runtime loads which: *-hf in transformers, vLLM, SGLang and nanoseek; *-gguf in llama.cpp
    # (rl-gguf as its deepseek2 architecture, without the MTP module) and nanoseek
    return {"exported": ["export/rl-hf", "export/rl-gguf", "export/student-hf", "export/student-gguf"]}


def _report_stage(run: Stages, p: dict, seed: int) -> dict:
    """The report card: report.md with the plots, the eval table, the cost and a sample chat."""
    from .eval.report import write_report
    root = run.root
    path = write_report(root, title="nanoseek speedrun")
    print(f"[speedrun] report card: {path}", file=sys.stderr)
    return {}


STAGE_FUNCTIONS = {"data": _data_stage, "pretrain": _pretrain_stage, "student": _student_stage, "grpo": _grpo_stage,
                   "cold-start": _cold_start_stage, "reasoning": _reasoning_stage, "rejection": _rejection_stage,
                   "final-rl": _final_rl_stage, "distill": _distill_stage, "student-rl": _student_rl_stage,
                   "eval": _eval_stage, "export": _export_stage, "report": _report_stage}  # in STAGES order


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
    s.add_argument("--jobs", type=int, default=None,
                   help="stages run side by side, each a process with cores/jobs threads (default: 2 on a CPU "
                        "with 2+ cores, 1 on a GPU)")
    s.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one stage of a parallel run
    s.set_defaults(func=lambda args: speedrun(args.out, args.preset, args.resume, args.seed, args.threads,
                                              args.only, default_jobs() if args.jobs is None else args.jobs,
                                              args.child) and 0)
    return s

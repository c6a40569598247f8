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
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from .atomic import atomic_write, write_json
from .args import HelpFormatter
from .errors import NanoseekError

STAGES = ("cold-start", "reasoning", "rejection", "final-rl", "distill", "eval", "report")


def cpu_description() -> str:
    """The CPU a run's figures came from, e.g. 'Intel(R) Xeon(R) Processor, 2 cores, torch AVX512,
    avx512_bf16 amx_bf16': float rounding, and so a trained model, can differ between hosts."""
    import torch
    from .cost import cpu_info
    name, all_flags = cpu_info()
    flags = [x for x in ("avx512_bf16", "amx_bf16") if x in all_flags]
    return ", ".join([name or platform.machine(), f"{os.cpu_count()} cores",
                      f"torch {torch.backends.cpu.get_cpu_capability()}"]
                     + ([" ".join(flags)] if flags else []))


class Stages:
    """A run directory of named stages: each finished stage leaves a `.NAME.done` marker (atomic) and
    its timing in summary.json, so a resumed run skips it. Shared by `speedrun` and `pipeline`."""

    def __init__(self, out: str | Path, resume: bool, label: str, only: list[str] | None = None,
                 child: bool = False):
        # child: one stage of a parallel run; its marker carries the results, the parent writes summary.json
        self.root, self.label, self.only, self.child = Path(out), label, only, child
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
                                            "processor": platform.processor() or platform.machine(),
                                            "cpu": cpu_description()})
        self.summary.setdefault("stage_s", {})
        for marker in sorted(self.root.glob(".*.done")):   # finished, but stopped before summary.json took note
            if marker.name[1:-len(".done")] not in self.summary["stage_s"]:
                self.merge(marker.name[1:-len(".done")])

    def save_summary(self) -> None:
        if not self.child:
            write_json(self.root / "summary.json", self.summary)

    def merge(self, name: str) -> None:
        """Fold a finished stage's marker (written by this or another process) into summary.json."""
        info = json.loads((self.root / f".{name}.done").read_text())
        self.summary["stage_s"][name] = info.pop("seconds", None)
        info.pop("started_at", None)
        self.summary.update({f"{name}.{k}": v for k, v in info.items()})
        self.save_summary()

    def done(self, name: str) -> bool:
        return (self.root / f".{name}.done").is_file()

    def run(self, name: str, fn) -> None:
        if self.only and name not in self.only:
            return
        if self.done(name):
            print(f"[{self.label}] {name}: done already, skipped", file=sys.stderr)
            return
        print(f"\n[{self.label}] ===== {name} =====", file=sys.stderr)
        t0, started = time.perf_counter(), time.time()
        info = fn() or {}
        dt = round(time.perf_counter() - t0, 1)
        atomic_write(self.root / f".{name}.done", json.dumps({"seconds": dt, **info, "started_at": started},
                                                             indent=2) + "\n")
        self.merge(name)

    def resuming(self, sub: str) -> bool:
        """Whether stage directory `sub` has checkpoints to resume from."""
        return (self.root / sub / "checkpoints").is_dir()


def _die_with_parent() -> None:
    """In a child process: be sent SIGTERM when the parent dies (Linux), so a killed run leaves no stage behind."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(path: Path, width: int = 110) -> str:
    """The last progress line a stage's log shows (tqdm redraws with \r)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        lines = [x.strip() for x in re.split(r"[\r\n]+", f.read().decode("utf-8", "replace")) if x.strip()]
    return lines[-1][:width] if lines else ""


def run_parallel(run: Stages, needs: dict[str, tuple[str, ...]], command, jobs: int, status_every: float = 30.0,
                 on_done=None, solo: tuple[str, ...] = ()) -> None:
    """Run the stages of `needs` as child processes, at most `jobs` at once, each as soon as the stages it
    needs are done (ties go to the earlier stage in `needs`: list the critical path first). A stage in
    `solo` runs alone (command(name) should give it every core): when it is the first ready stage, the
    lanes drain and nothing starts beside it. command(name) is the argv of a process that runs that one
    stage and leaves its marker; its output goes to OUT/logs/NAME.log. A failing stage stops the others;
    --resume continues all of them."""
    logs = run.root / "logs"
    logs.mkdir(exist_ok=True)
    todo = [s for s in needs if not run.done(s) and (not run.only or s in run.only)]
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "1"}
    last_status = time.monotonic()
    try:
        while todo or running:
            for name, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0 or not run.done(name):
                    raise NanoseekError(f"stage {name} failed (exit code {proc.returncode}): "
                                        f"{_last_line(logs / f'{name}.log', 300)} (whole log: {logs / name}.log)")
                run.merge(name)
                print(f"[{run.label}] {name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr)
                if on_done:
                    on_done(name)
            ready = [s for s in todo if all(run.done(d) for d in needs[s])]
            if not running and todo and not ready:
                raise NanoseekError(f"stages {', '.join(todo)} need stages that are neither done nor to be run")
            for name in _startable(ready, list(running), jobs, solo):
                todo.remove(name)
                log = open(logs / f"{name}.log", "ab")
                running[name] = (subprocess.Popen(command(name), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                  preexec_fn=_die_with_parent if os.name == "posix" else None),
                                 log, time.monotonic())
                print(f"[{run.label}] ===== {name} ===== (log: {logs / name}.log)", file=sys.stderr)
            if running and time.monotonic() - last_status >= status_every:
                last_status = time.monotonic()
                print(f"[{run.label}] " + " | ".join(f"{n}: {_last_line(logs / f'{n}.log')}" for n in running),
                      file=sys.stderr)
            time.sleep(0.5)
    finally:
        for proc, log, _ in running.values():   # stopped with the run; their checkpoints resume them
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _startable(ready: list[str], running: list[str], jobs: int, solo: tuple[str, ...]) -> list[str]:
    """The ready stages to start now, in order of preference: none beside a solo stage, and a solo stage
    first in line waits (blocking the ones behind it) until nothing runs."""
    if any(r in solo for r in running):
        return []
    start = []
    for name in ready:
        if len(running) + len(start) >= jobs:
            break
        if name in solo:
            return start if (running or start) else [name]
        start.append(name)
    return start


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


# ------------------------------------------------------------------------------ R1's stages, reusable
def cold_start(run: Stages, stage: str, model: str, n: int, seed: int = 0) -> dict:
    """Stage 1: SFT of `model` on n readable worked solutions (-> run.root/stage/final)."""
    from .train.sft import SFTArgs, train_sft
    from .weights import load
    m, tok = load(model)
    r = train_sft(m, tok, SFTArgs(out=str(run.root / stage), template="none", epochs=1, seq_len=256,
                                  batch_size=16, lr=5e-4, seed=seed, resume=run.resuming(stage)),
                  records=cold_start_records(n, seed=seed), base=model)
    return {"examples": n, "final_loss": r["losses"][-1] if r["losses"] else None}


def rl(run: Stages, stage: str, start: str, steps: int, seed: int = 0, language_weight: float = 0.0,
       **overrides) -> dict:
    """GRPO (the r1-zero-tiny preset) from `start`; language_weight > 0 adds R1's language reward."""
    from .train.grpo import GRPOArgs, grpo, resolve
    a = resolve(GRPOArgs(model=start, out=str(run.root / stage), preset="r1-zero-tiny", seed=seed,
                         resume=run.resuming(stage)), set())
    r = grpo(dataclasses.replace(a, steps=steps, language_weight=language_weight, **overrides))
    h = r["history"]
    return {"steps": r["step"], "heldout_greedy_start": h[0].get("eval/accuracy") if h else None,
            "heldout_greedy_end": h[-1].get("eval/accuracy") if h else None}


# sequences decoded at once when sampling traces and evaluating: the tiny models' decode step is mostly
# fixed cost, so wider batches pay (R1 teacher, 1 thread, 512 prompts of 112 tokens: 2.9K tokens/s at 32,
# 5.9K at 128, 7.8K at 256); every sample has its own seed, so the batch does not change what is drawn
GEN_BATCH = 256


def sample_and_train(run: Stages, stage: str, teacher: str, student: str, prompts: int, k: int, seed: int = 0,
                     **overrides) -> dict:
    """Rejection sampling + SFT: `teacher` answers `prompts` training questions k times; the verified,
    well-formed, language-consistent, distinct traces train `student` (R1 §2.3.3 and §4)."""
    from .train.distill import DistillArgs, distill
    d = run.root / stage
    try:
        r = distill(DistillArgs(teacher=teacher, student=student, task="arithmetic", level=2, prompts=prompts, k=k,
                                out=str(d), seed=seed, resume=d.exists(),
                                **{"max_tokens": 112, "seq_len": 256, "lr": 5e-4, "epochs": 2, "gen_batch": GEN_BATCH,
                                   "engine_batch": GEN_BATCH, **overrides}))
    except NanoseekError as e:   # a teacher with no verified trace: nothing to learn from, say so and go on
        if "no verified trace" not in str(e):
            raise
        print(f"[{run.label}] {stage} skipped: {e}", file=sys.stderr)
        return {"kept": 0, "skipped": str(e)}
    return {k_: r["dataset"].get(k_) for k_ in ("generated", "kept", "keep_rate", "used")}


def first_model(*paths: str | Path) -> str:
    """The first of `paths` that holds a model: the final RL continues from the reasoning model when
    rejection sampling kept no trace (its stage is skipped and leaves no model)."""
    for p in paths:
        if Path(p).is_dir():
            return str(p)
    raise NanoseekError(f"none of {', '.join(map(str, paths))} holds a model")


def evaluate_models(run: Stages, models: list[tuple[str, str, str]], n: int, k: int, max_tokens: int = 112,
                    seed: int = 0, table: bool = True) -> dict:
    """(role, name, path) models on the held-out split -> run.root/eval/ROLE.json each (a model already
    evaluated with the same settings is read back, so stages can evaluate their own model as they end)
    and, with `table`, run.root/eval.json (rows tagged by role, with per-problem scores for the claims
    table's paired intervals)."""
    from .data.tasks import get_task
    from .eval import evaluate
    from .weights import load
    task = get_task("arithmetic", level=2)
    rows = []
    for role, name, path in models:
        if not (Path(path) / "config.json").is_file():
            continue
        key = {"path": str(path), "n": n, "k": k, "max_tokens": max_tokens, "seed": seed}
        cached = run.root / "eval" / f"{role}.json"
        row = json.loads(cached.read_text()) if cached.is_file() else {}
        if row.pop("settings", None) != key:
            m, tok = load(path)
            res = evaluate(m, tok, task, n=n, k=k, template="r1-zero-short", max_tokens=max_tokens, seed=seed,
                           batch_size=GEN_BATCH)
            row = {"role": role, "model": name, **{k_: v for k_, v in res.items() if k_ != "samples"}}
            write_json(cached, {**row, "settings": key})
            print(f"[{run.label}] eval {name}: pass@1 {row['pass@1']:.1%}, maj@{k} {row['maj@k']:.1%}, greedy "
                  f"{row['greedy']:.1%}, format {row['format_rate']:.1%}, language {row['language_rate']:.1%}",
                  file=sys.stderr)
        rows.append({**row, "model": name})
    if table:
        write_json(run.root / "eval.json", {"rows": rows})
    return {r["model"]: round(r["pass@1"], 3) for r in rows}


def r1(model: str, out: str, student: str = "dense:tiny", resume: bool = False, seed: int = 0,
       cold_start_n: int = 1000, rl_steps: int = 40, final_rl_steps: int = 20, prompts: int = 2400, k: int = 1,
       eval_n: int = 200, only: list[str] | None = None, kept: int | None = None) -> dict:
    """`nanoseek pipeline r1`: the four R1 stages from `model`, then distillation into `student` (on
    exactly `kept` traces when given: sampled until that many are kept, from at most `prompts` questions)."""
    if kept is not None and kept < 1:
        raise NanoseekError("--kept must be at least 1")
    if not Path(model).exists():
        raise NanoseekError(f"{model}: no such model")
    run = Stages(out, resume, "pipeline r1", only)
    final = lambda stage: str(run.root / stage / "final")  # noqa: E731
    run.run("cold-start", lambda: cold_start(run, "cold-start", model, cold_start_n, seed))
    run.run("reasoning", lambda: rl(run, "reasoning", final("cold-start"), rl_steps, seed, language_weight=0.5))
    run.run("rejection", lambda: sample_and_train(run, "rejection", final("reasoning"), model, prompts, k, seed))
    run.run("final-rl", lambda: rl(run, "final-rl", first_model(final("rejection"), final("reasoning")), final_rl_steps,
                                   seed, language_weight=0.5))
    run.run("distill", lambda: sample_and_train(run, "distill", final("final-rl"), student, prompts, k, seed + 1,
                                                lr=None, epochs=3, kept=kept))
    models = [("base", "base", model), ("cold-start", "1 cold-start SFT", final("cold-start")),
              ("reasoning", "2 reasoning RL", final("reasoning")),
              ("rejection", "3 rejection sampling + SFT", final("rejection")),
              ("r1", "4 final RL", final("final-rl")), ("student-distilled", "5 distilled student", final("distill"))]
    run.run("eval", lambda: evaluate_models(run, models, eval_n, 4, seed=seed))
    run.run("report", lambda: print(f"[pipeline r1] report card: {_report(run, 'nanoseek pipeline r1')}",
                                    file=sys.stderr))
    return run.summary


def _report(run: Stages, title: str):
    from .eval.report import write_report
    return write_report(run.root, title=title)


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
    s.add_argument("--prompts", type=int, default=2400, help="questions for rejection sampling and distillation")
    s.add_argument("--kept", type=int, default=None, metavar="N",
                   help="distillation samples until N traces are kept (at most --prompts questions) and the "
                        "student learns exactly those N (default: every trace kept from --prompts questions)")
    s.add_argument("--k", type=int, default=1, help="samples per question (the tiny teachers are near-deterministic "
                                                    "at T = 0.6: more questions beat more samples)")
    s.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run just these stages")
    s.set_defaults(func=lambda a: r1(a.model, a.out, a.student, a.resume, a.seed, a.cold_start, a.rl_steps,
                                     a.final_rl_steps, a.prompts, a.k, only=a.only, kept=a.kept) and 0)
    return s

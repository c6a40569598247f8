"""`nanoseek distill`: a reasoning teacher writes verified chains of thought; a student learns them by SFT.

    nanoseek distill --teacher runs/grpo/final --student dense:tiny --task arithmetic --level 2 \\
        --prompts 500 --k 4 --out runs/distill
    nanoseek distill --teacher runs/grpo/final --student SmolLM2-135M-Instruct.Q4_1.gguf --out runs/d2
    nanoseek distill ... --prompts 10000 --kept 2400   # sample until 2,400 traces are kept (at most 10,000)
    nanoseek distill ... --resume            # a killed run continues: no trace generated twice
    python -m nanoseek.train.distill --teacher T --out runs/distill

    from nanoseek.train.distill import DistillArgs, distill, distill_from, reject_reasons
    summary = distill(DistillArgs(teacher="runs/grpo/final", prompts=100, out="runs/d"))
    summary = distill_from(teacher_model, tok, DistillArgs(student="dense:tiny", out="runs/d"))  # in-process

DeepSeek-R1 §2.3.3 / §2.4: rejection sampling on the RL checkpoint, then SFT of smaller models.
1. The teacher samples k completions per training prompt (the task's train split, rendered with
   --template; temperature 0.6, top-p 0.95, one seed per (prompt, sample), batched on the
   nanoseek.infer Engine, generation stops at "</answer>").
2. Rejection sampling (`reject_reasons`, a pure function): a trace is kept only if it is well formed
   (rewards format == 1), its answer is verified (accuracy == 1) and its chain of thought is in
   the question's language (language consistency >= --min-language, default 0.9; R1 filters mixed
   languages out of its SFT data). Kept traces are deduplicated by (prompt, completion).
   With --kept N the teacher stops after the generation round that reaches N kept traces and the
   student learns the first N: the student's SFT compute no longer depends on the teacher's keep
   rate, and --prompts only caps the questions drawn.
3. The student trains on the kept traces with sft.py, --template none: the prompt already holds
   the reasoning template, the completion is `reasoning </think> <answer> X </answer>` + eos.
   Traces are text, so a student with another tokenizer learns them too (R1 distilled into Qwen and
   Llama): each kept trace's question is rendered again in the student's prompt format
   (--student-template; default: the teacher's --template when the student has the teacher's
   vocabulary, else "chat", the student's own chat template, as `nanoseek eval --template chat` and
   the GRPO preset `smollm2` prompt it) and prompt and completion are encoded by the student's
   tokenizer (`student_records`).

Files in OUT:
  data.jsonl          {"prompt", "completion", "question", "answer"} per kept trace, appended one
                      generation batch at a time (flush + fsync)
  distill_state.json  the prompt indices already done and the counters (written atomically after
                      each batch's lines): on --resume, lines of prompts not marked done (a kill
                      between the two writes) are dropped and those prompts generated again with
                      the same seeds, so nothing is duplicated or lost
  dataset_stats.json  {"generated", "kept", "keep_rate", ...}
  metrics.jsonl, checkpoints/, final/   the student's SFT (sft.py)

Students: a model path (HF dir / .gguf, with its own tokenizer), or `dense:PRESET` (e.g. dense:tiny):
a from-scratch llama-architecture model with the preset's width and depth (config.dense_variant)
and the teacher's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write
from ..args import HelpFormatter, add_fields, from_args, module_main
from ..data.sampler import sub_seed
from ..errors import NanoseekError
from ..jsonl import append_jsonl, read_jsonl, write_jsonl

STATE_FILE, DATA_FILE, STATS_FILE = "distill_state.json", "data.jsonl", "dataset_stats.json"
KEEP = "kept"
REASONS = ("malformed", "wrong", "language")


@dataclass
class DistillArgs:
    teacher: str | None = None
    student: str = "dense:tiny"
    task: str = "arithmetic"
    level: int | None = None
    langs: str | None = None           # comma-separated question languages, e.g. "en,zh"
    prompts: int = 500
    kept: int | None = None            # stop sampling at this many kept traces; the student learns exactly these
    k: int = 4
    out: str = "runs/distill"
    template: str = "r1-zero-short"
    student_template: str | None = None  # None: --template if the student has the teacher's vocabulary, else chat
    max_tokens: int = 160
    temperature: float = 0.6
    top_p: float = 0.95
    min_language: float = 0.9
    gen_batch: int = 32                # prompts per generation round (one append + state write)
    engine_batch: int = 64             # concurrent sequences in the engine
    seed: int = 0
    # the student's SFT
    steps: int | None = None
    epochs: float | None = None        # default 3 when --steps is not given
    seq_len: int = 256
    batch_size: int = 16
    lr: float | None = None            # default 1e-3 for a dense:PRESET student, 5e-5 for a loaded one
    warmup: int | None = None
    save_every: int = 100
    keep: int = 3
    resume: bool = False
    device: str | None = None
    progress: bool = True


# ------------------------------------------------------------------------------ rejection sampling
def reject_reasons(completions: list[str], examples: list, task, min_language: float = 0.9) -> list[str]:
    """For each completion: "kept", or why it is rejected ("malformed", "wrong", "language").

    Uses the GRPO rewards (rewards.py): format == 1, accuracy == 1, language >= min_language.
    A question language without a script predicate (rewards.LANGUAGES) is not checked."""
    from ..data.rewards import LANGUAGES, Rewards
    scores = Rewards(task)(completions, examples, [0] * len(completions))
    out = []
    for i, ex in enumerate(examples):
        if scores["format"][i] != 1:
            out.append("malformed")
        elif scores["accuracy"][i] != 1:
            out.append("wrong")
        elif ex.lang in LANGUAGES and scores["language"][i] < min_language:
            out.append("language")
        else:
            out.append(KEEP)
    return out


# ------------------------------------------------------------------------------ the dataset on disk
class TraceStore:
    """OUT/data.jsonl + OUT/distill_state.json: kept traces and the prompts already done."""

    def __init__(self, out: Path, prompts: list[str], bound: dict, resume: bool):
        self.out, self.prompts, self.bound = Path(out), prompts, bound
        self.data, self.state_path = self.out / DATA_FILE, self.out / STATE_FILE
        self.done: set[int] = set()
        self.counts = {"generated": 0, "kept": 0, "duplicates": 0, **{r: 0 for r in REASONS}}
        self.records: list[dict] = []
        self.seen: set[tuple[str, str]] = set()
        exists = self.state_path.exists() or self.data.exists()
        if exists and not resume:
            raise NanoseekError(f"{self.out} already holds a distillation dataset; pass --resume to continue "
                                f"or choose another --out")
        if exists:
            self._load()
        self.out.mkdir(parents=True, exist_ok=True)

    def _load(self) -> None:
        state = {"done": [], "counts": {}, "bound": self.bound}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise NanoseekError(f"{self.state_path}: unreadable ({e})") from None
        changed = [k for k in self.bound if state.get("bound", {}).get(k) != self.bound[k]]
        if changed:
            raise NanoseekError(f"{self.out} was generated with different {', '.join(changed)}; "
                                f"resume with the same options or choose another --out")
        self.done = set(state["done"])
        self.counts.update(state["counts"])
        done_prompts = {self.prompts[i] for i in self.done}
        # a last line torn by a kill mid-write is dropped; any other bad line is an error
        for rec in read_jsonl(self.data, errors="torn_tail") if self.data.exists() else []:
            key = (rec.get("prompt"), rec.get("completion"))
            if rec.get("prompt") not in done_prompts or key in self.seen:
                continue  # written before the kill, but its prompt was not marked done
            self.seen.add(key)
            self.records.append(rec)
        self.counts["kept"] = len(self.records)
        write_jsonl(self.data, self.records)  # exactly the kept records, before appending more

    def add(self, indices: list[int], records: list[dict], reasons: list[str]) -> int:
        """Append one batch's kept traces (deduplicated), then mark its prompts done. Returns kept."""
        new = []
        for rec in records:
            key = (rec["prompt"], rec["completion"])
            if key in self.seen:
                self.counts["duplicates"] += 1
                continue
            self.seen.add(key)
            new.append(rec)
        if new:
            append_jsonl(self.data, new, fsync=True)
        self.records += new
        self.counts["generated"] += len(reasons)
        self.counts["kept"] += len(new)
        for r in reasons:
            if r != KEEP:
                self.counts[r] += 1
        self.done.update(indices)
        atomic_write(self.state_path, json.dumps({"bound": self.bound, "done": sorted(self.done),
                                                  "counts": self.counts}) + "\n")
        return len(new)

    def stats(self) -> dict:
        g = self.counts["generated"]
        return {"generated": g, "kept": self.counts["kept"], "keep_rate": self.counts["kept"] / g if g else 0.0,
                "prompts_done": len(self.done), "prompts": len(self.prompts),
                "duplicates": self.counts["duplicates"],
                "rejected": {r: self.counts[r] for r in REASONS}}


# sample_fn(indices) -> for each prompt index, its k completion texts
SampleFn = Callable[[list[int]], list[list[str]]]


def build_dataset(store: TraceStore, examples: list, task, sample_fn: SampleFn, gen_batch: int = 32,
                  min_language: float = 0.9, progress: bool = False, target: int | None = None) -> dict:
    """Generate, filter and store traces for every prompt not done yet, in order, or until `target`
    traces are kept (checked after each round of gen_batch prompts); returns store.stats()."""
    todo = [i for i in range(len(store.prompts)) if i not in store.done]
    bar = None
    if progress and todo and not reached(store, target):
        from tqdm import tqdm
        # toward the target in kept traces when there is one, else through the prompts
        total, initial = (target, store.counts["kept"]) if target else (len(store.prompts), len(store.done))
        bar = tqdm(total=total, initial=initial, desc="distill data", unit="trace" if target else "prompt",
                   dynamic_ncols=True)
    try:
        for b in range(0, len(todo), gen_batch):
            if reached(store, target):
                break
            idx = todo[b:b + gen_batch]
            samples = sample_fn(idx)
            texts = [t for group in samples for t in group]
            exs = [examples[i] for i, group in zip(idx, samples) for _ in group]
            reasons = reject_reasons(texts, exs, task, min_language)
            records = [{"prompt": store.prompts[i], "completion": t, "question": examples[i].question,
                        "answer": examples[i].answer} for i, group in zip(idx, samples) for t in group]
            kept = [r for r, why in zip(records, reasons) if why == KEEP]
            store.add(idx, kept, reasons)
            if bar is not None:
                s = store.stats()
                bar.update(min(s["kept"], target) - bar.n if target else len(idx))
                bar.set_postfix(prompts=s["prompts_done"], kept=s["kept"], keep_rate=f"{s['keep_rate']:.0%}")
    finally:
        if bar is not None:
            bar.close()
    return store.stats()


def reached(store: TraceStore, target: int | None) -> bool:
    """True when a --kept target is set and the store already holds that many traces."""
    return target is not None and store.counts["kept"] >= target


def teacher_sampler(model, tok, prompts: list[str], a: DistillArgs) -> SampleFn:
    """k seeded samples per prompt from the batched Engine (T=0.6, top-p 0.95, stop at </answer>)."""
    from ..eval.evaluate import STOP, completion_text
    from ..infer import Engine, SamplingParams

    ids = tok.encode_batch(prompts)
    longest = max(map(len, ids))
    context = model.config.max_position_embeddings
    if longest + 1 >= context:
        raise NanoseekError(f"a prompt of {longest} tokens does not fit the teacher's context of {context}; "
                            f"try --template r1-zero-short")
    engine = Engine(model, tok, max_batch_size=a.engine_batch,
                    max_seq_len=min(context, longest + a.max_tokens + 1))

    def sample(indices: list[int]) -> list[list[str]]:
        reqs, params = [], []
        for i in indices:
            for j in range(a.k):
                reqs.append(ids[i])
                # one seed per (prompt, sample): the same traces whatever the batching or a resume
                params.append(SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                             seed=sub_seed(a.seed, i * a.k + j) % 2**31, stop=STOP))
        outs = engine.generate(reqs, params)
        texts = [completion_text(o, tok) for o in outs]
        return [texts[n * a.k:(n + 1) * a.k] for n in range(len(indices))]
    return sample


# ------------------------------------------------------------------------------ student
def student_model(spec: str, teacher_tok, seed: int = 0):
    """(model, tokenizer, from_scratch) for a student path or `dense:PRESET`."""
    if spec.startswith("dense:"):
        from ..config import preset
        from ..model.transformer import Transformer
        from ..config import dense_variant
        cfg = dense_variant(preset(spec[len("dense:"):]), "llama").replace(
            vocab_size=teacher_tok.vocab_size, bos_token_id=teacher_tok.bos_token_id,
            eos_token_id=teacher_tok.eos_token_id, torch_dtype="float32")
        torch.manual_seed(seed)
        return Transformer(cfg), teacher_tok, True
    from ..weights import load
    model, tok = load(spec, dtype=torch.float32)
    if tok is None:
        raise NanoseekError(f"{spec}: the student has no tokenizer (tokenizer.json or GGUF vocabulary)")
    return model, tok, False


def same_vocabulary(a, b) -> bool:
    """True when two tokenizers map the same strings to the same ids (the student can read the teacher's ids)."""
    return a is b or (a.vocab_size == b.vocab_size and a.tk.get_vocab(with_added_tokens=True)
                      == b.tk.get_vocab(with_added_tokens=True))


def student_template(a: DistillArgs, teacher_tok, student_tok) -> str:
    """The prompt format the student learns in: --student-template, else the teacher's --template for a
    student with the teacher's vocabulary, else "chat" (the student's own chat template)."""
    if a.student_template:
        return a.student_template
    return a.template if same_vocabulary(teacher_tok, student_tok) else "chat"


def student_records(records: list[dict], template: str, student_tok) -> list[dict]:
    """The teacher's kept traces as the student's SFT records: the question rendered in the student's
    prompt format (data/tasks `render`, with the student's tokenizer for "chat"), the teacher's
    completion text unchanged; sft.py --template none then encodes both with the student's tokenizer."""
    from ..data.tasks import render
    return [{"prompt": render(template, r["question"], student_tok), "completion": r["completion"]}
            for r in records]


# ------------------------------------------------------------------------------ the run
def _check_args(a: DistillArgs, need_teacher: bool = True) -> None:
    from ..data.tasks import TEMPLATES
    if need_teacher and not a.teacher:
        raise NanoseekError("--teacher is required")
    for name in ("template", "student_template"):
        value = getattr(a, name)
        if value is not None and value not in TEMPLATES:
            raise NanoseekError(f"--{name.replace('_', '-')} must be one of {', '.join(TEMPLATES)}")
    for name in ("prompts", "k", "max_tokens", "gen_batch", "engine_batch", "seq_len", "batch_size"):
        if getattr(a, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be at least 1")
    if a.kept is not None and a.kept < 1:
        raise NanoseekError("--kept must be at least 1")
    if not 0 <= a.min_language <= 1:
        raise NanoseekError("--min-language must be in [0, 1]")
    if a.steps is not None and a.epochs is not None:
        raise NanoseekError("give --steps or --epochs, not both")
    if a.student.startswith("dense:"):
        from ..config import PRESETS
        if a.student[len("dense:"):] not in PRESETS:
            raise NanoseekError(f"unknown student preset {a.student!r}; use dense:{' | dense:'.join(PRESETS)}")
    else:
        check_student_path(a.student)


def check_student_path(path: str) -> None:
    """A student path must be a .gguf file or an HF directory with config.json and tokenizer.json; checked
    before the teacher samples anything (the student is loaded only after the dataset is built)."""
    from ..weights import GGUF_MAGIC
    p = Path(path)
    if not p.exists():
        raise NanoseekError(f"{path}: no such student model (a path, or dense:tiny)")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise NanoseekError(f"{path}: the student is not a GGUF file and not a model directory")
    elif not (p / "config.json").is_file():
        raise NanoseekError(f"{path}: the student directory has no config.json (an HF model directory or a .gguf)")
    elif not (p / "tokenizer.json").is_file():
        raise NanoseekError(f"{path}: the student has no tokenizer.json (it learns the traces as text, "
                            f"with its own tokenizer)")


def make_task(a: DistillArgs):
    from ..data.tasks import get_task
    return get_task(a.task, level=a.level, langs=a.langs)


def distill(a: DistillArgs) -> dict:
    """Load --teacher, build (or resume) the distillation dataset, then fine-tune the student on it."""
    from ..weights import load

    _check_args(a)
    make_task(a)  # a bad --task fails before the (slow) teacher load
    teacher, tok = load(a.teacher, device=a.device)
    if tok is None:
        raise NanoseekError(f"{a.teacher}: the teacher has no tokenizer (tokenizer.json or GGUF vocabulary)")
    return distill_from(teacher, tok, a)


def distill_from(teacher, tok, a: DistillArgs) -> dict:
    """`distill` with an already-built teacher (model, tokenizer), for in-process pipelines; a.teacher
    only names it (in the resume check). Returns train_sft's summary plus {"dataset": stats}."""
    from ..data.tasks import render
    from .sft import SFTArgs, train_sft

    _check_args(a, need_teacher=False)
    task = make_task(a)
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoseekError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    examples = task.examples("train", a.prompts, seed=a.seed)
    prompts = [render(a.template, ex.question, tok) for ex in examples]
    bound = {"teacher": str(a.teacher or "in-process"), "task": task.name, "langs": a.langs, "template": a.template,
             "prompts": a.prompts, "k": a.k, "max_tokens": a.max_tokens, "temperature": a.temperature,
             "top_p": a.top_p, "min_language": a.min_language, "seed": a.seed}
    store = TraceStore(out, prompts, bound, a.resume)
    if len(store.done) < len(prompts) and not reached(store, a.kept):
        goal = f"until {a.kept:,} traces are kept, at most " if a.kept else ""
        print(f"nanoseek distill: sampling {goal}{len(prompts) - len(store.done):,} of {len(prompts):,} prompts "
              f"(k={a.k}, T={a.temperature}, top-p {a.top_p}) from {a.teacher}", file=sys.stderr)
        build_dataset(store, examples, task, teacher_sampler(teacher, tok, prompts, a), a.gen_batch,
                      a.min_language, a.progress, a.kept)
    del teacher  # the engine and its KV cache are gone with the sampler; drop our reference too
    kept = store.records[:a.kept] if a.kept else store.records
    stats = {**store.stats(), "used": len(kept)}
    atomic_write(out / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    print(f"nanoseek distill: kept {stats['kept']} of {stats['generated']} traces "
          f"(keep rate {stats['keep_rate']:.1%}; rejected {stats['rejected']}, {stats['duplicates']} duplicates)"
          + (f"; the student learns the first {len(kept):,}" if len(kept) < stats["kept"] else ""),
          file=sys.stderr)
    if a.kept and len(kept) < a.kept:
        print(f"nanoseek distill: warning: {len(kept):,} traces kept from all {len(prompts):,} prompts, short "
              f"of --kept {a.kept:,} (raise --prompts or --k)", file=sys.stderr)
    if not kept:
        raise NanoseekError(f"the teacher produced no verified trace ({stats['generated']} generated); "
                            f"nothing to distill (try a stronger teacher, more --prompts or --k)")

    student, stok, scratch = student_model(a.student, tok, a.seed)
    template = student_template(a, tok, stok)
    records = student_records(kept, template, stok)
    print(f"nanoseek distill: the student learns the traces in the {template!r} prompt format with its own "
          f"tokenizer ({stok.vocab_size:,} tokens; the teacher's has {tok.vocab_size:,})", file=sys.stderr)
    sft_args = SFTArgs(out=str(out), template="none", steps=a.steps,
                       epochs=a.epochs if a.steps is None else None, seq_len=a.seq_len,
                       batch_size=a.batch_size, lr=a.lr or (1e-3 if scratch else 5e-5), warmup=a.warmup,
                       seed=a.seed, save_every=a.save_every, keep=a.keep, resume=a.resume,
                       device=a.device, progress=a.progress)
    if sft_args.steps is None and sft_args.epochs is None:
        sft_args.epochs = 3.0
    summary = train_sft(student, stok, sft_args, records=records, base=a.student)
    return {**summary, "dataset": stats, "student_template": template}


# ------------------------------------------------------------------------------ CLI
DESCRIPTION = """Distillation (DeepSeek-R1 §2.4): the teacher samples k reasoning traces per training
prompt (T=0.6, top-p 0.95); rejection sampling keeps the verified, well-formed, language-consistent
ones (deduplicated) in OUT/data.jsonl; then the student is fine-tuned on them (nanoseek sft).

examples:
  nanoseek distill --teacher runs/grpo/final --student dense:tiny --task arithmetic --level 2 \\
      --prompts 500 --k 4 --out runs/distill
  nanoseek distill --teacher runs/grpo/final --student SmolLM2-135M-Instruct.Q4_1.gguf --out runs/distill-smol
      (the traces as text, in SmolLM2's own chat template and tokenizer; --student-template to choose)
  nanoseek distill --teacher runs/grpo/final --out runs/distill --resume"""

HELP = {
    "teacher": "the reasoning model that writes the traces (HF dir or .gguf)",
    "student": "HF dir / .gguf to fine-tune (its own tokenizer), or dense:tiny (from scratch, the teacher's tokenizer)",
    "student_template": "the student's prompt format for the traces (default: --template if the student has the "
                        "teacher's vocabulary, else chat: its own chat template)",
    "task": "arithmetic | countdown | jsonl:PATH",
    "level": "task difficulty (default: the task's own)",
    "langs": "comma-separated question languages, e.g. en,zh",
    "prompts": "training prompts to sample (with --kept: the most to sample)", "k": "samples per prompt",
    "kept": "stop sampling once this many traces are kept; the student learns exactly these (default: all)",
    "out": "output directory: data.jsonl, dataset_stats.json, metrics.jsonl, checkpoints/, final/",
    "min_language": "minimum language consistency of a kept chain of thought",
    "gen_batch": "prompts per generation round (the unit of resume)",
    "engine_batch": "concurrent sequences in the inference engine",
    "steps": "student SFT optimizer steps (instead of --epochs)",
    "epochs": "student SFT passes over the traces (default 3)",
    "lr": "student learning rate (default 1e-3 for dense:PRESET, 5e-5 for a loaded model)",
    "warmup": "student warmup steps (default: steps // 20)",
    "resume": "continue a killed run: the dataset, then the student's SFT checkpoints",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..data.tasks import TEMPLATES
    s = subparsers.add_parser("distill", help="distill a reasoning teacher into a student (rejection sampling + SFT)",
                              formatter_class=HelpFormatter, description=DESCRIPTION)
    add_fields(s, DistillArgs, HELP, {"template": sorted(TEMPLATES), "student_template": sorted(TEMPLATES)},
               required={"teacher"})
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    distill(from_args(DistillArgs, args))
    return 0


def main(argv=None) -> int:
    return module_main(add_parser, "distill", argv)


if __name__ == "__main__":
    sys.exit(main())

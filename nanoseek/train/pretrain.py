"""`nanoseek pretrain`: train a DeepSeek-V3-architecture model (or a dense llama / qwen2) from scratch.

    nanoseek pretrain --out runs/tiny                                   # synthetic arithmetic corpus, CPU demo
    nanoseek pretrain --corpus books.txt web.jsonl --out runs/mine --steps 5000
    nanoseek pretrain --out runs/tiny --steps 2000 --resume             # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m nanoseek pretrain --out runs/ddp     # DDP (gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node 2 -m nanoseek pretrain --out runs/ep --expert-parallel   # experts split
    python -m nanoseek.train.pretrain --out runs/tiny                   # the same without the CLI

    from nanoseek.train.pretrain import PretrainArgs, pretrain
    summary = pretrain(PretrainArgs(out="runs/t", steps=20))           # {"losses": [...], ...}

One optimizer step (DeepSeek-V3 §2.1.2, §2.2, §4.2; see objective.py for the formulas):
  documents are packed into fixed windows; each token attends only within its own document
  (--no-document-mask: across them, as V3 does); with the mask, a tiny model learns to copy the
  numbers of its question far more reliably (docs/experiments-seed-claims.md section 7)
  for each micro-batch: L = CE(next token) + λ·L_MTP + L_Bal (sequence-wise, α), backward
  clip the gradient norm to 1.0, AdamW (β 0.9/0.95, wd 0.1 on matrices), lr warmup + cosine | wsd
  auxiliary-loss-free balancing: b_i += γ·sign(mean load − load_i) from the step's expert load
Every `--save-every` steps a checkpoint (checkpoint.py) that `--resume` continues exactly; every
step a JSONL line in OUT/metrics.jsonl; every `--sample-every` steps greedy samples. The final
model goes to OUT/final (an HF directory with training.json for `nanoseek export`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import cost
from ..args import HelpFormatter, add_fields, from_args, module_main
from ..config import PRESETS, ModelConfig, dense_variant, load_config, preset
from ..errors import NanoseekError
from ..model import cpu_kernels
from ..model.attention import training_attention
from ..model.transformer import Transformer
from . import checkpoint, dist, expert_parallel
from .objective import (balance_loss, document_attention_mask, expert_loads, load_stats, moe_layers, mtp_loss,
                        mtp_weight, next_token_loss, update_bias)
from .optim import SCHEDULES, adamw, lr_at
from .run import MetricsLog, Progress, check_same, resume_point, run_dir, save_final, set_lr, use_amp


@dataclass
class PretrainArgs:
    out: str = "runs/pretrain"
    preset: str = "tiny"
    config: str | None = None          # HF config.json / model dir instead of the preset
    arch: str | None = None            # "llama" | "qwen2": a dense model of the preset's size
    corpus: list[str] = field(default_factory=list)  # empty: the synthetic arithmetic corpus
    synthetic_docs: int = 60000
    chat_share: float = 0.5            # synthetic corpus: share of R1-Zero-format dialogues ...
    unclosed_share: float = 0.3        # ... of which this share never close </think> / give <answer>
    mix_share: float = 0.1             # synthetic corpus: share of code-switched (en/zh) solutions
    guess_share: float = 0.8           # synthetic corpus: share of closed dialogues answered with no working
    tokenizer: str | None = None       # a directory with tokenizer.json; default: BPE on the corpus
    vocab_size: int | None = None      # BPE vocabulary; default the preset's
    cache_dir: str | None = None       # token files and tokenizers; default OUT/cache
    steps: int = 1500
    seq_len: int = 128
    batch_size: int = 16               # sequences per optimizer step, all processes together
    micro_batch: int | None = None     # sequences per forward per process; default batch_size / world
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    mtp_weight_final: float = 0.1
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    no_balance: bool = False
    dtype: str = "auto"                # auto: bf16 autocast on CUDA with bf16, else fp32
    seed: int = 0
    document_mask: bool = True         # attend only within each document of a packed window
    save_every: int = 250
    keep: int = 3
    log_every: int = 25
    sample_every: int = 250
    sample_tokens: int = 80
    final_eval: int = 100              # synthetic corpus: greedy-grade this many new problems at the end (0: skip)
    time_limit: float | None = None    # seconds; then checkpoint and stop
    resume: bool = False
    fsdp: bool = False
    expert_parallel: bool = False      # split the routed experts across the processes (with DDP)
    device: str | None = None
    threads: int | None = None         # CPU threads per process (torch.set_num_threads)
    progress: bool = True


# ------------------------------------------------------------------------------ setup
def _check_args(a: PretrainArgs) -> None:
    if a.config is None and a.preset not in PRESETS:
        raise NanoseekError(f"unknown preset {a.preset!r}; choose one of: {', '.join(PRESETS)}")
    if a.arch not in (None, "llama", "qwen2"):
        raise NanoseekError(f"--arch must be llama or qwen2, not {a.arch!r}")
    if a.schedule not in SCHEDULES:
        raise NanoseekError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    for name in ("steps", "seq_len", "batch_size", "save_every", "log_every", "sample_every"):
        if getattr(a, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be at least 1")
    if a.dtype not in ("auto", "fp32", "bf16"):
        raise NanoseekError("--dtype must be auto, fp32 or bf16")
    if a.expert_parallel and a.fsdp:
        raise NanoseekError("--expert-parallel works with DDP, not with --fsdp")


def model_config(a: PretrainArgs, tok) -> ModelConfig:
    cfg = load_config(a.config) if a.config else preset(a.preset)
    if a.arch:
        cfg = dense_variant(cfg, a.arch)
    return cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, torch_dtype="float32")


def prepare_data(a: PretrainArgs, info: dist.DistInfo, ckpt_dir: Path | None):
    """(tokenizer, token array, data key, sample prompts); rank 0 tokenizes, the others read its cache."""
    from ..data import arithmetic_corpus, cached_tokenizer, demo_prompts, documents_hash, read_documents, token_file
    from ..tokenizer import DIALOGUE_TEMPLATE, Tokenizer

    if a.corpus:
        docs = read_documents(a.corpus)
    else:  # the held-out questions of the arithmetic task never appear in pretraining
        from ..data.tasks import get_task
        docs = arithmetic_corpus(a.synthetic_docs, seed=a.seed, chat_share=a.chat_share, mix_share=a.mix_share,
                                 unclosed_share=a.unclosed_share, guess_share=a.guess_share,
                                 exclude=get_task("arithmetic", level=2).is_test)
    key = documents_hash(docs)
    cache = Path(a.cache_dir or Path(a.out) / "cache")
    vocab = a.vocab_size or (preset(a.preset).vocab_size if a.config is None else load_config(a.config).vocab_size)

    def build():
        if ckpt_dir is not None:
            tok = Tokenizer.from_dir(ckpt_dir)
        elif a.tokenizer:
            tok = Tokenizer.from_dir(a.tokenizer)
        else:
            tok = cached_tokenizer(docs, vocab, cache, docs_key=key)
        return tok, token_file(docs, tok, cache, docs_key=key)

    # rank 0 fills the caches first (and reports its error to all), then the others read them
    result, err = None, None
    if info.main:
        try:
            result = build()
        except NanoseekError as e:
            err = str(e)
    err = dist.broadcast_object(err, info)
    if err is not None:
        raise NanoseekError(err)
    if not info.main:
        result = build()
    tok, tokens = result
    if not a.corpus and not a.tokenizer:   # the model learns the corpus's dialogue format: chat in that format
        tok.chat_template = DIALOGUE_TEMPLATE
    prompts = demo_prompts() if not a.corpus else [tok.decode(tokens[:16].tolist(), skip_special_tokens=True)]
    return tok, tokens, key, prompts


def device_peak_flops(info: dist.DistInfo, amp: bool) -> tuple[float | None, str]:
    """Per-device peak for MFU: the GPU's datasheet (dense BF16) or this CPU's measured matmul rate."""
    if info.device.type == "cuda":
        name = torch.cuda.get_device_name(info.device).lower()
        for key, gpu in cost.GPUS.items():
            if key in name:
                return gpu.bf16_tflops * 1e12, f"{gpu.name} BF16 datasheet"
        return None, f"unknown GPU {name!r}"
    m = cost.measure_cpu()
    which = "bf16" if amp else "fp32"
    return m[f"{which}_flops"], f"this CPU, measured {which} matmul"


def samples(model: Transformer, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    from ..infer.simple import generate
    was = model.training
    model.eval()
    try:
        out = generate(model, [tok.encode(p) for p in prompts], max_new_tokens, eos_token_id=tok.eos_token_id)
    finally:
        model.train(was)
    return [p + tok.decode(ids, skip_special_tokens=True) for p, ids in zip(prompts, out)]


def arithmetic_grades(model: Transformer, tok, n: int = 100, seed: int = 10**6,
                      max_new_tokens: int = 160) -> list[tuple]:
    """(problem, grade) for greedy completions of n new synthetic problems, graded step by step
    (data/synthetic.grade); the same problems for the same seed."""
    import random

    from ..data.synthetic import grade, problem
    rng = random.Random(seed)
    problems = [problem(rng) for _ in range(n)]
    texts = samples(model, tok, [p.prompt for p in problems], max_new_tokens)
    return [(p, grade(p, t[len(p.prompt):])) for p, t in zip(problems, texts)]


def arithmetic_eval(model: Transformer, tok, n: int = 100, seed: int = 10**6, max_new_tokens: int = 160) -> dict:
    """The shares of arithmetic_grades: well-formed, steps correct, answer correct."""
    grades = [g for _, g in arithmetic_grades(model, tok, n, seed, max_new_tokens)]
    return {k: sum(float(g[k]) for g in grades) / n for k in ("well_formed", "steps_correct", "answer_correct")}


# ------------------------------------------------------------------------------ training
def pretrain(a: PretrainArgs) -> dict:
    """Train; returns a summary with the per-step losses (for tests and scripts)."""
    _check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = dist.init(a.device)
    try:
        return _pretrain(a, info)
    finally:
        dist.shutdown(info)


@dataclass
class _Run:
    """What the loop of one pretraining run works on, built by `_setup`."""
    out: Path
    tok: object
    tokens: object
    prompts: list[str]
    cfg: ModelConfig
    sampler: object
    bound: dict
    micro: int
    accum: int
    amp: bool
    model: Transformer
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    start: int
    moes: list
    balance: bool


def _setup(a: PretrainArgs, info: dist.DistInfo) -> _Run:
    """Run directory, resume checks, data, model, optimizer (and their state when resuming)."""
    from ..data import WindowSampler
    out = run_dir(a.out)
    last = resume_point(out, a.resume, "pretrain", info.main)
    ckpt = checkpoint.read(last) if last is not None else None
    tok, tokens, data_key, prompts = prepare_data(a, info, last)
    cfg = model_config(a, tok)
    sampler = WindowSampler(tokens, a.seq_len, seed=a.seed)
    bound = {"seq_len": a.seq_len, "batch_size": a.batch_size, "seed": a.seed, "data": data_key}
    if ckpt is not None:
        diff = checkpoint.config_differences(ckpt.config, cfg)
        if diff:
            raise NanoseekError(f"{last} was trained with a different model config ({', '.join(diff[:5])} "
                                f"differ); resume with the same --preset/--config/--arch")
        check_same(last, ckpt.trainer_state.get("bound", {}), bound,
                   "an exact resume needs the same corpus, --seq-len, --batch-size and --seed")
        sampler.load_state_dict(ckpt.trainer_state["sampler"])

    micro = a.micro_batch or a.batch_size // info.world
    if micro < 1 or a.batch_size % (micro * info.world):
        raise NanoseekError(f"--batch-size {a.batch_size} must be a multiple of --micro-batch {micro} x "
                            f"{info.world} processes")
    torch.manual_seed(a.seed)
    model = Transformer(cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt.model_state, strict=True)
    model.to(info.device).train()
    if a.expert_parallel:  # keep this rank's routed experts (a no-op on one process)
        expert_parallel.shard_experts(model, info)
    wrapped = dist.wrap(model, info, a.fsdp)
    optimizer = adamw(model, a.lr, a.weight_decay, (a.beta1, a.beta2))
    start = 0
    if ckpt is not None:
        dist.load_optimizer_state(wrapped, optimizer, ckpt.optimizer, info)
        checkpoint.set_rng_state(ckpt.rng)
        start = ckpt.trainer_state["step"]
    return _Run(out, tok, tokens, prompts, cfg, sampler, bound, micro, a.batch_size // (micro * info.world),
                use_amp(a.dtype, info.device), model, wrapped, optimizer, start, moe_layers(model),
                cfg.is_moe and not a.no_balance)


def document_mask(x: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, 1, T, T]: causal, and each token attends only within its own document (documents end at EOS)."""
    return document_attention_mask(torch.cumsum(x == eos, dim=1) - (x == eos).long())  # EOS ends its document


def _step(r: _Run, a: PretrainArgs, info: dist.DistInfo, step: int) -> dict:
    """One optimizer step over the global batch (micro-batches accumulated); its metrics, all ranks averaged."""
    t0 = time.perf_counter()
    lr = set_lr(r.optimizer, lr_at(step, a.steps, a.lr, a.warmup, a.schedule, a.min_lr_ratio))
    lam = mtp_weight(step, a.steps, a.mtp_weight, a.mtp_weight_final)
    batch = r.sampler.next_batch(a.batch_size, info.rank, info.world).to(info.device)
    sums = torch.zeros(3, dtype=torch.float64)  # main, mtp, balance (means over micro-batches)
    loads = torch.zeros(len(r.moes), r.cfg.n_routed_experts or 0, dtype=torch.float64)
    for i, window in enumerate(batch.split(r.micro)):
        with dist.grad_sync(r.wrapped, info, sync=i == r.accum - 1):
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=r.amp):
                x = window[:, :-1]
                mask = document_mask(x, r.cfg.eos_token_id) if a.document_mask else None
                logits, mtp_logits, routing = r.wrapped(x, return_mtp=True, return_routing=True, mask=mask)
            main = next_token_loss(logits, window)
            l_mtp = mtp_loss(mtp_logits, window)
            l_bal = (balance_loss(routing, r.cfg.num_experts_per_tok, a.balance_alpha)
                     if r.balance and a.balance_alpha > 0 else None)
            loss = main + lam * l_mtp + (l_bal if l_bal is not None else 0.0)
            (loss / r.accum).backward()
        sums += torch.tensor([main.item(), l_mtp.item(), l_bal.item() if l_bal is not None else 0.0],
                             dtype=torch.float64) / r.accum
        if routing:
            loads += expert_loads(routing)
    grad_norm = dist.clip_grad_norm(r.model, a.grad_clip, info)  # the global norm (FSDP2, expert parallel)
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(sums, info, "mean")
    dist.all_reduce(loads, info, "sum")
    if r.balance and a.bias_gamma > 0:
        update_bias(r.moes, loads, a.bias_gamma)
    main_loss, mtp_l, bal_l = sums.tolist()
    dt = time.perf_counter() - t0
    tokens_per_step = a.batch_size * a.seq_len
    metrics = {"step": step + 1, "loss": main_loss, "mtp_loss": mtp_l if r.cfg.num_nextn_predict_layers else None,
               "balance_loss": bal_l if r.balance else None, "total_loss": main_loss + lam * mtp_l + bal_l,
               "lr": lr, "mtp_lambda": lam, "grad_norm": float(grad_norm), "tokens": (step + 1) * tokens_per_step,
               "tokens_per_s": tokens_per_step / dt, "step_s": dt}
    if r.moes:
        ratios = load_stats(loads)
        metrics.update(load_max_mean=ratios, load_max_mean_avg=sum(ratios) / len(ratios))
    return metrics


def _save(r: _Run, a: PretrainArgs, info: dist.DistInfo, step: int, metrics: dict) -> None:
    """A checkpoint: with FSDP or expert parallelism every rank takes part in gathering; rank 0 writes."""
    opt_state = dist.optimizer_state(r.wrapped, r.optimizer, info)
    target = r.model
    if info.fsdp or info.expert_parallel:
        state = dist.model_state(r.wrapped, info)  # full on rank 0 only
        if info.main:
            with torch.device("meta"):
                target = Transformer(r.cfg)
            target.load_state_dict(state, assign=True)
    if info.main:
        checkpoint.save(r.out / "checkpoints", step, target, r.tok, opt_state, checkpoint.rng_state(),
                        {"sampler": r.sampler.state_dict(), "bound": r.bound, "metrics": metrics,
                         "train_args": dataclasses.asdict(a)}, keep=a.keep)
    dist.barrier(info)


def _pretrain(a: PretrainArgs, info: dist.DistInfo) -> dict:
    r = _setup(a, info)
    flops_per_token = cost.flops_per_token(r.cfg, a.seq_len, mtp=r.cfg.num_nextn_predict_layers > 0)["train"]
    peak, peak_src = device_peak_flops(info, r.amp) if info.main else (None, "")
    log = MetricsLog(r.out / "metrics.jsonl", r.start if a.resume else None) if info.main else None
    if info.main:
        total, active = r.cfg.num_params()
        print(f"nanoseek pretrain: {r.cfg.architecture} {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), "
              f"vocab {r.cfg.vocab_size}, {len(r.tokens):,} tokens ({r.sampler.n_windows:,} windows of {a.seq_len}); "
              f"batch {a.batch_size} = {r.micro} x {r.accum} accum x {info.world} proc; steps {r.start}->{a.steps}; "
              f"{'bf16 autocast' if r.amp else 'fp32'} on {info.device}"
              + (f" ({info.backend}, {'FSDP2' if a.fsdp else 'DDP'}"
                 f"{' + expert parallel' if info.expert_parallel else ''})" if info.enabled else "")
              + f"; attention: {training_attention(info.device, torch.bfloat16 if r.amp else torch.float32)}"
              + (f"; fp32 products: {cpu_kernels.gemm}" if info.device.type == "cpu" and not r.amp else "")
              + (f"; MFU against {peak_src}: {peak / 1e9:,.0f} GFLOP/s per process" if peak else ""), file=sys.stderr)
        if r.start >= a.steps:
            print(f"nanoseek pretrain: {r.out / 'checkpoints'} is already at step {r.start} of --steps {a.steps}; "
                  f"nothing to do", file=sys.stderr)
    progress = Progress(a.steps, r.start, "pretrain", info.main and a.progress)
    say = progress.say if info.main else (lambda s: None)
    losses: list[float] = []
    metrics: dict = {}
    t_start = time.perf_counter()
    step = r.start
    while step < a.steps:
        metrics = _step(r, a, info, step)
        step += 1
        losses.append(metrics["loss"])
        metrics.update(elapsed_s=time.perf_counter() - t_start,
                       mfu=metrics["tokens_per_s"] / info.world * flops_per_token / peak if peak else None)
        if info.main:
            log.write(metrics)
            progress.update(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
            if step % a.log_every == 0 or step == a.steps:
                say(f"step {step:>6} | loss {metrics['loss']:.4f} | mtp {metrics['mtp_loss'] or 0.0:.4f} | "
                    f"bal {metrics['balance_loss'] or 0.0:.2e} | lr {metrics['lr']:.2e} | "
                    f"gnorm {metrics['grad_norm']:.2f} | {metrics['tokens_per_s']:,.0f} tok/s"
                    + (f" | MFU {metrics['mfu']:.1%}" if metrics["mfu"] else "")
                    + (f" | load max/mean {metrics['load_max_mean_avg']:.2f}" if r.moes else ""))
        out_of_time = a.time_limit is not None and time.perf_counter() - t_start > a.time_limit
        if a.time_limit is not None and info.enabled:  # rank 0's clock decides, or ranks could disagree and hang
            out_of_time = dist.broadcast_object(out_of_time, info)
        if step % a.sample_every == 0 or step == a.steps or out_of_time:
            if info.fsdp or info.expert_parallel or info.main:  # every rank takes part in their forwards
                metrics["samples"] = samples(r.model, r.tok, r.prompts, a.sample_tokens)
                for text in metrics["samples"]:
                    say(f"  sample @ {step}: {text!r}")
        if step % a.save_every == 0 or step == a.steps or out_of_time:
            _save(r, a, info, step, metrics)
        if out_of_time:
            say(f"time limit of {a.time_limit:.0f}s reached at step {step}")
            break
    progress.close()
    if log is not None:
        log.close()
    # a run killed after its last checkpoint but before final/ resumes with nothing to train: write final/ then
    if info.main and (step > r.start or not (r.out / "final").is_dir()):
        _finish(r, a, info, step, metrics, time.perf_counter() - t_start, say)
    # leave together: a rank that tears gloo down while rank 0 still writes final/ was seen to abort
    # ("terminate called without an active exception") on a loaded machine
    dist.barrier(info)
    return {"losses": losses, "start_step": r.start, "step": step, "last": metrics, "out": str(r.out),
            "config": r.cfg}


def _finish(r: _Run, a: PretrainArgs, info: dist.DistInfo, step: int, metrics: dict, seconds: float, say) -> None:
    """OUT/final (rank 0): the model, graded on new problems for the synthetic corpus, with training.json."""
    target = dist.unwrap(r.wrapped) if not (info.fsdp or info.expert_parallel) else None
    if target is None:  # sharded: the last checkpoint holds the full model
        from ..weights import load
        target, _ = load(checkpoint.latest(r.out / "checkpoints"))
    summary = {"stage": "pretrain", "corpus": a.corpus or f"synthetic arithmetic ({a.synthetic_docs} problems)",
               "tokens": step * a.batch_size * a.seq_len, "steps": step, "seq_len": a.seq_len,
               "batch_size": a.batch_size, "lr": a.lr, "schedule": a.schedule,
               "final_loss": metrics.get("loss"), "mtp_loss": metrics.get("mtp_loss"),
               "balance": "aux-loss-free bias + sequence-wise loss" if r.balance else "off",
               "wall_clock_s": round(seconds, 1)}
    if not a.corpus and a.final_eval > 0:
        scores = arithmetic_eval(target, r.tok, n=a.final_eval)
        summary["plain_form_eval"] = {"n": a.final_eval, **{k: round(v, 4) for k, v in scores.items()}}
        say(f"greedy on {a.final_eval} new problems: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.items()))
    save_final(r.out / "final", target, r.tok, summary)
    say(f"final model written to {r.out / 'final'}")


# ------------------------------------------------------------------------------ CLI
HELP = {
    "out": "output directory: checkpoints/, metrics.jsonl, final/",
    "preset": f"model preset ({', '.join(PRESETS)})",
    "config": "HF config.json or model directory to use instead of --preset",
    "arch": "train a dense llama or qwen2 of the preset's size instead of DeepSeek-V3",
    "corpus": "text (.txt: blank line between documents) or .jsonl ({\"text\": ...}) files; "
              "default: synthetic worked arithmetic",
    "tokenizer": "directory with tokenizer.json to reuse (default: train BPE on the corpus)",
    "vocab_size": "BPE vocabulary size (default: the preset's)",
    "cache_dir": "token files and tokenizers (default: OUT/cache)",
    "micro_batch": "sequences per forward per process (gradient accumulation when smaller)",
    "batch_size": "sequences per optimizer step over all processes",
    "document_mask": "attend only within each document of a packed training window (documents end at EOS); "
                     "--no-document-mask lets documents see the ones before them",
    "no_balance": "turn off both balancing mechanisms (bias update and sequence-wise loss), to compare",
    "chat_share": "synthetic corpus: share of documents in the R1-Zero dialogue format (<think>, <answer>)",
    "unclosed_share": "synthetic corpus: share of the dialogues whose reasoning is never closed (no </think>, "
                      "no <answer>): the format a base model knows but does not use reliably",
    "mix_share": "synthetic corpus: share of solutions that switch between English and Chinese",
    "guess_share": "synthetic corpus: share of the closed dialogues that state the answer with no working "
                   "(\"<think> I know this one. </think>\"), so RL has longer reasoning to discover",
    "time_limit": "stop (with a checkpoint) after this many seconds",
    "resume": "continue from the newest complete checkpoint in OUT/checkpoints",
    "fsdp": "shard with FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP under torchrun",
    "expert_parallel": "under torchrun, split the routed experts across the processes (all-to-all dispatch)",
    "dtype": "auto = bf16 autocast on CUDA, fp32 on CPU",
    "threads": "CPU threads per process (default: torch's choice)",
}
CHOICES = {"schedule": SCHEDULES, "dtype": ("auto", "fp32", "bf16"), "arch": ("llama", "qwen2")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "pretrain", help="pretrain a DeepSeek-V3-style model from scratch (MTP, aux-loss-free balance)",
        formatter_class=HelpFormatter,
        description="Pretrain from scratch: next-token + multi-token-prediction loss, auxiliary-loss-free\n"
                    "load balancing, resumable checkpoints, DDP/FSDP2 under torchrun.\n\nexamples:\n"
                    "  nanoseek pretrain --out runs/tiny                        # CPU demo, synthetic arithmetic\n"
                    "  nanoseek pretrain --corpus data.jsonl --out runs/mine --steps 5000\n"
                    "  nanoseek pretrain --out runs/tiny --steps 2000 --resume\n"
                    "  torchrun --nproc_per_node 2 -m nanoseek pretrain --out runs/ddp")
    add_fields(s, PretrainArgs, HELP, CHOICES, metavar={"corpus": "FILE"})
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    pretrain(from_args(PretrainArgs, args))
    return 0


def main(argv=None) -> int:
    return module_main(add_parser, "pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())

"""`nanoseek sft`: supervised fine-tuning on JSONL chat data, loss on the assistant's tokens only.

    nanoseek sft --model SmolLM2-135M-Instruct.Q4_1.gguf --data chats.jsonl --out runs/sft --epochs 2
    nanoseek sft --model runs/tiny/final --data traces.jsonl --out runs/sft --template none --steps 300
    nanoseek sft ... --resume                  # continue from the newest checkpoint in OUT/checkpoints
    python -m nanoseek.train.sft --model M --data train.jsonl --out runs/sft

    from nanoseek.train.sft import SFTArgs, sft, train_sft
    summary = sft(SFTArgs(model="runs/tiny/final", data="train.jsonl", out="runs/sft", steps=50))
    summary = train_sft(model, tok, SFTArgs(out="runs/sft", steps=50), records=[{"prompt": .., "completion": ..}])

Data: one JSON object per line, either {"messages": [{"role", "content"}, ...]} or
{"prompt": ..., "completion": ...}.
* --template chat (default): rendered with the model's own chat template (a prompt/completion line
  becomes one user turn and one assistant turn). Trained: each assistant message's content and the
  end-of-turn token that closes it (e.g. `<|im_end|>`, `<｜end▁of▁sentence｜>`); everything else
  (system prompt, user turns, the role headers the template adds) is context only.
* --template none: raw `prompt + completion + eos`, trained on completion + eos. The prompt is
  encoded on its own, exactly as the inference engine encodes a prompt, so the model learns to
  continue the token sequence it will actually see (used by `nanoseek distill`, whose prompts
  already contain the reasoning template).
Each text piece is tokenized separately and the pieces are concatenated, so the loss mask lines up
with the tokens by construction (template pieces meet at special tokens and newlines, where BPE
would split anyway).

Packing: whole examples are packed in order into rows of seq_len + 1 tokens (inputs row[:-1],
targets row[1:]); an example never straddles two rows; the rest of a row is padding with no loss.
Each example attends only to itself (a block-diagonal causal mask over the row, as pretraining's
document mask), so a packed example sees exactly what it would see alone, and the loss masks keep
every prompt out of the loss; packing buys rows with almost no padding. (Plain causal attention
across the examples of a row hurts a base pretrained with the document mask: the speedrun's cold
start began at loss 2.0 instead of 0.7 and its R1 fell to 3% pass@1.)

Optimisation: AdamW (optim.py, no decay on norms/embeddings) with warmup + cosine, grad-norm clip,
loss = mean cross-entropy over the supervised tokens of the step (exact under micro-batching).
A MoE model's routing bias is left as loaded and MTP modules are not trained (SFT trains the
main next-token head). Order of rows: examples are shuffled per epoch with the seed, so the batch
of step s depends only on s: `--resume` reloads model, AdamW state and step from
OUT/checkpoints/step-N (checkpoint.py) and reproduces the uninterrupted run's losses exactly on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..args import HelpFormatter, add_fields, from_args, module_main
from ..data.sampler import sub_seed
from ..errors import NanoseekError
from ..jsonl import iter_jsonl
from ..model import cpu_kernels
from . import checkpoint
from .objective import document_attention_mask
from .optim import SCHEDULES, adamw, lr_at
from .run import MetricsLog, Progress, check_same, resume_point, run_dir, save_final, set_lr, use_amp

TEMPLATES = ("chat", "none")


@dataclass
class SFTArgs:
    model: str | None = None           # HF dir or .gguf (not needed by train_sft)
    data: str | None = None            # JSONL file (or pass records= to train_sft)
    out: str = "runs/sft"
    steps: int | None = None           # optimizer steps; default: --epochs worth of rows
    epochs: float | None = None        # default 1 when --steps is not given
    template: str = "chat"
    seq_len: int = 512
    batch_size: int = 8                # rows per optimizer step
    micro_batch: int | None = None     # rows per forward (gradient accumulation when smaller)
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int | None = None          # default 5% of the steps
    schedule: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    log_every: int = 25
    resume: bool = False
    dtype: str = "auto"                # auto: bf16 autocast on CUDA with bf16, else fp32
    device: str | None = None
    progress: bool = True


# ------------------------------------------------------------------------------ data
def read_records(path) -> list[dict]:
    """The JSONL lines as dicts, checked; one NanoseekError naming the file (and line) otherwise."""
    if not Path(path).is_file():
        raise NanoseekError(f"{path}: no such data file")
    records = []
    for n, rec in iter_jsonl(path):
        problem = check_record(rec)
        if problem:
            raise NanoseekError(f"{path}:{n}: {problem}")
        records.append(rec)
    if not records:
        raise NanoseekError(f"{path}: no examples (the data file is empty)")
    return records


def check_record(rec) -> str | None:
    """Why a record is unusable, or None."""
    want = 'expected {"messages": [...]} or {"prompt": "...", "completion": "..."}'
    if not isinstance(rec, dict):
        return want
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list'
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return 'each message needs a string "role" and "content"'
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message to train on"
        return None
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
        return None
    return want


def encode_prompt_completion(prompt: str, completion: str, tok) -> tuple[list[int], list[bool]]:
    """prompt + completion + eos; the mask marks completion + eos. The prompt is encoded as the
    engine encodes prompts (BOS if the tokenizer adds one), the completion without specials."""
    if tok.eos_token_id is None:
        raise NanoseekError("the tokenizer has no eos token; --template none needs one")
    p = tok.encode(prompt)
    c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
    return p + c, [False] * len(p) + [True] * len(c)


def chat_segments(messages: list[dict], tok) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces.

    For the i-th message, if it is the assistant's, the text it adds is found by rendering the
    history with the generation prompt (what the model is given at inference) and the history
    plus this message; their common prefix is context, the rest up to the end-of-turn token is
    trained, and whatever the template puts after the end-of-turn token (a newline) is context.
    """
    render = tok.apply_chat_template
    full = render(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(upto):
            raise NanoseekError("the chat template does not render a conversation turn by turn "
                                "(an earlier prefix changes later); cannot mask the assistant turns")
        prompt = render(messages[:i], add_generation_prompt=True) if i else ""
        start = len(_common_prefix(prompt, upto))
        end = len(upto.rstrip())
        start = max(start, done)
        if end <= start:
            continue
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(t, trained) for t, trained in pieces if t]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def encode_chat(messages: list[dict], tok) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and the mask of the assistant tokens."""
    ids, mask = [], []
    for text, trained in chat_segments(messages, tok):
        piece = tok.encode(text, add_special_tokens=False)  # the template writes its own BOS
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


def encode_record(rec: dict, tok, template: str = "chat") -> tuple[list[int], list[bool]]:
    if template not in TEMPLATES:
        raise NanoseekError(f"--template must be one of {', '.join(TEMPLATES)}, not {template!r}")
    if "messages" in rec:
        if template == "none":
            raise NanoseekError('--template none needs {"prompt", "completion"} lines, not "messages"')
        return encode_chat(rec["messages"], tok)
    if template == "chat":
        return encode_chat([{"role": "user", "content": rec["prompt"]},
                            {"role": "assistant", "content": rec["completion"]}], tok)
    return encode_prompt_completion(rec["prompt"], rec["completion"], tok)


def pack(examples: list[tuple[list[int], list[bool]]], row_len: int, pad_id: int):
    """Pack whole examples, in order, into rows of row_len tokens.

    Returns (ids [R, row_len] long, mask [R, row_len] bool, spans, doc [R, row_len] long) where
    spans[j] = (row, start) of example j and doc numbers the examples of each row (padding: -1).
    Examples longer than a row must be cut before packing (see `fit`)."""
    rows, spans, used = [], [], row_len
    for ids, mask in examples:
        n = len(ids)
        if n > row_len:
            raise ValueError(f"example of {n} tokens does not fit a row of {row_len}")
        if used + n > row_len:
            rows.append(([], []))
            used = 0
        spans.append((len(rows) - 1, used))
        rows[-1][0].extend(ids)
        rows[-1][1].extend(mask)
        used += n
    out_ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    out_mask = torch.zeros(len(rows), row_len, dtype=torch.bool)
    doc = torch.full((len(rows), row_len), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        out_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        out_mask[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    for j, ((r, start), (ids, _)) in enumerate(zip(spans, examples)):
        doc[r, start:start + len(ids)] = j
    return out_ids, out_mask, spans, doc


def fit(examples, row_len: int):
    """Cut examples to a row (keeping the start); drop those left with nothing to train on."""
    kept, cut, dropped = [], 0, 0
    for ids, mask in examples:
        if len(ids) > row_len:
            ids, mask, cut = ids[:row_len], mask[:row_len], cut + 1
        # the first token is never a target, so it must not be the only trained one
        if any(mask[1:]):
            kept.append((ids, mask))
        else:
            dropped += 1
    return kept, cut, dropped


class PackedStream:
    """Rows of shuffled, packed examples, epoch after epoch; the rows of a step depend only on it."""

    def __init__(self, examples, row_len: int, pad_id: int, seed: int = 0):
        self.examples, self.row_len, self.pad_id, self.seed = examples, row_len, pad_id, seed
        self.epochs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def epoch(self, e: int):
        while len(self.epochs) <= e:
            g = torch.Generator().manual_seed(sub_seed(self.seed, len(self.epochs)))
            order = torch.randperm(len(self.examples), generator=g).tolist()
            ids, mask, _, doc = pack([self.examples[i] for i in order], self.row_len, self.pad_id)
            self.epochs.append((ids, mask, doc))
        return self.epochs[e]

    def rows_in(self, epochs: float) -> int:
        whole = int(epochs)
        n = sum(len(self.epoch(e)[0]) for e in range(whole))
        return n + round((epochs - whole) * len(self.epoch(whole)[0]))

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, loss mask, document numbers) of the step's rows."""
        lo, hi = step * batch_size, (step + 1) * batch_size
        parts, e, base = [], 0, 0
        while base < hi:
            ep = self.epoch(e)
            a, b = max(lo - base, 0), min(hi - base, len(ep[0]))
            if a < b:
                parts.append([t[a:b] for t in ep])
            base += len(ep[0])
            e += 1
        return tuple(torch.cat(t) for t in zip(*parts))


def records_hash(records: list[dict], template: str) -> str:
    h = hashlib.sha256(template.encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def masked_loss_sum(model, rows: torch.Tensor, mask: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over the positions whose target is trained; with `doc` (the
    rows' document numbers) each packed example attends only to itself."""
    attn = None if doc is None else document_attention_mask(doc[:, :-1])
    logits = model(rows[:, :-1], mask=attn)
    ce = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    return (ce * mask[:, 1:].flatten().to(ce.dtype)).sum()


# ------------------------------------------------------------------------------ training
def _check_args(a: SFTArgs) -> None:
    if a.template not in TEMPLATES:
        raise NanoseekError(f"--template must be one of {', '.join(TEMPLATES)}")
    if a.schedule not in SCHEDULES:
        raise NanoseekError(f"--schedule must be one of {', '.join(SCHEDULES)}")
    if a.steps is not None and a.epochs is not None:
        raise NanoseekError("give --steps or --epochs, not both")
    if a.steps is not None and a.steps < 1:
        raise NanoseekError("--steps must be at least 1")
    if a.epochs is not None and not a.epochs > 0:
        raise NanoseekError("--epochs must be positive")
    for name in ("seq_len", "batch_size", "save_every", "log_every"):
        if getattr(a, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be at least 1")
    if a.dtype not in ("auto", "fp32", "bf16"):
        raise NanoseekError("--dtype must be auto, fp32 or bf16")


def sft(a: SFTArgs) -> dict:
    """Load --model and --data, fine-tune, save OUT/final; returns the summary of train_sft."""
    _check_args(a)
    if not a.model:
        raise NanoseekError("--model is required")
    if not a.data:
        raise NanoseekError("--data is required")
    records = read_records(a.data)  # before the (slow) model load: bad data fails fast
    from ..weights import load
    model, tok = load(a.model, dtype=torch.float32)  # GGUF weights come dequantized to float
    if tok is None:
        raise NanoseekError(f"{a.model}: no tokenizer found (tokenizer.json or GGUF vocabulary)")
    return train_sft(model, tok, a, records=records, base=a.model)


def train_sft(model, tok, a: SFTArgs, records: list[dict] | None = None, base: str | None = None) -> dict:
    """Fine-tune an already-built (model, tokenizer) in place on `records` (or a.data).

    Returns {"losses": per-step losses of this call, "start_step", "step", "out", "final", ...}."""
    _check_args(a)
    if records is None:
        if not a.data:
            raise NanoseekError("no training data: pass records or --data")
        records = read_records(a.data)
    for i, r in enumerate(records):
        problem = check_record(r)
        if problem:
            raise NanoseekError(f"record {i}: {problem}")
    out = run_dir(a.out)
    last = resume_point(out, a.resume, "sft")

    row_len = a.seq_len + 1
    examples, cut, dropped = fit([encode_record(r, tok, a.template) for r in records], row_len)
    if not examples:
        raise NanoseekError(f"no example has a token to train on within --seq-len {a.seq_len}")
    pad_id = tok.token_to_id(tok.pad_token) or tok.eos_token_id or 0  # never a target: mask is False
    stream = PackedStream(examples, row_len, pad_id, a.seed)
    total = a.steps or max(1, math.ceil(stream.rows_in(a.epochs or 1.0) / a.batch_size))
    warmup = a.warmup if a.warmup is not None else max(1, total // 20)
    bound = {"seq_len": a.seq_len, "batch_size": a.batch_size, "seed": a.seed, "template": a.template,
             "data": records_hash(records, a.template)}

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device=device, dtype=torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = adamw(model, a.lr, a.weight_decay, (a.beta1, a.beta2))
    start = _resume(last, model, optimizer, bound, device) if last is not None else 0
    micro = a.micro_batch or a.batch_size
    amp = use_amp(a.dtype, device)

    log = MetricsLog(out / "metrics.jsonl", start if last is not None else None)
    n_sup = sum(sum(m[1:]) for _, m in examples)
    print(f"nanoseek sft: {len(examples)} examples ({n_sup:,} trained tokens; {cut} cut to {row_len} tokens, "
          f"{dropped} dropped with nothing to train), {len(stream.epoch(0)[0])} packed rows per epoch; "
          f"steps {start}->{total} of {a.batch_size} rows x {a.seq_len}; lr {a.lr:g} on {device}"
          f"{' (bf16 autocast)' if amp else ''}"
          f"{f'; fp32 products: {cpu_kernels.gemm}' if device.type == 'cpu' and not amp else ''}", file=sys.stderr)
    progress = Progress(total, start, "sft", a.progress)

    losses: list[float] = []
    metrics: dict = {}
    step, t_start = start, time.perf_counter()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    try:
        while step < total:
            t0 = time.perf_counter()
            lr = set_lr(optimizer, lr_at(step, total, a.lr, warmup, a.schedule, a.min_lr_ratio))
            rows, mask, doc = (t.to(device) for t in stream.batch(step, a.batch_size))
            trained = int(mask[:, 1:].sum())
            loss_sum = 0.0
            for r, m, d in zip(rows.split(micro), mask.split(micro), doc.split(micro)):
                with autocast:
                    part = masked_loss_sum(model, r, m, d) / trained
                part.backward()
                loss_sum += part.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            losses.append(loss_sum)
            metrics = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                       "trained_tokens": trained, "tokens_per_s": rows.numel() / dt,
                       "elapsed_s": time.perf_counter() - t_start}
            log.write(metrics)
            progress.update(loss=f"{loss_sum:.3f}")
            if step % a.log_every == 0 or step == total:
                progress.say(f"step {step:>6} | loss {loss_sum:.4f} | lr {lr:.2e} | gnorm {float(grad_norm):.2f} | "
                             f"{metrics['tokens_per_s']:,.0f} tok/s")
            if step % a.save_every == 0 or step == total:
                checkpoint.save(out / "checkpoints", step, model, tok, optimizer.state_dict(), checkpoint.rng_state(),
                                {"bound": bound, "metrics": metrics, "base_model": base,
                                 "train_args": dataclasses.asdict(a)}, keep=a.keep)
    finally:
        progress.close()
        log.close()
    model.eval()
    final = out / "final"
    if step > start or not final.is_dir():
        save_final(final, model, tok, {
            "stage": "sft", "base_model": base, "examples": len(examples), "template": a.template, "steps": step,
            "seq_len": a.seq_len, "batch_size": a.batch_size, "lr": a.lr, "final_loss": metrics.get("loss"),
            "wall_clock_s": round(time.perf_counter() - t_start, 1)})
        progress.say(f"final model written to {final}")
    return {"losses": losses, "start_step": start, "step": step, "total_steps": total, "out": str(out),
            "final": str(final), "examples": len(examples), "cut": cut, "dropped": dropped, "last": metrics}


def _resume(last: Path, model, optimizer, bound: dict, device) -> int:
    """Load checkpoint `last` into the model and optimizer (same config and data required); its step."""
    ckpt = checkpoint.read(last)
    diff = checkpoint.config_differences(ckpt.config, model.config)
    if diff:
        raise NanoseekError(f"{last} holds a model with a different config ({', '.join(diff[:5])} differ); "
                            f"resume with the same --model")
    check_same(last, ckpt.trainer_state.get("bound", {}), bound,
               "an exact resume needs the same data, --template, --seq-len, --batch-size and --seed")
    with torch.no_grad():
        model.load_state_dict({k: v.to(device) for k, v in ckpt.model_state.items()}, strict=True)
    optimizer.load_state_dict(ckpt.optimizer)
    checkpoint.set_rng_state(ckpt.rng)
    return ckpt.trainer_state["step"]


# ------------------------------------------------------------------------------ CLI
DESCRIPTION = """Supervised fine-tuning on JSONL chat data; the loss covers the assistant's tokens only.
Lines: {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...}.

examples:
  nanoseek sft --model SmolLM2-135M-Instruct.Q4_1.gguf --data chats.jsonl --out runs/sft --epochs 2
  nanoseek sft --model runs/tiny/final --data traces.jsonl --out runs/sft --template none --steps 300
  nanoseek sft --model runs/tiny/final --data traces.jsonl --out runs/sft --template none --steps 600 --resume"""


HELP = {
    "model": "HF-style directory or .gguf file to fine-tune",
    "data": "JSONL training data",
    "out": "output directory: checkpoints/, metrics.jsonl, final/",
    "steps": "optimizer steps",
    "epochs": "passes over the data (default 1)",
    "template": "chat: the model's chat template; none: raw prompt + completion + eos",
    "micro_batch": "rows per forward (gradient accumulation when smaller)",
    "warmup": "default: steps // 20",
    "dtype": "auto = bf16 autocast on CUDA, fp32 on CPU",
    "resume": "continue from the newest checkpoint in OUT/checkpoints",
}
CHOICES = {"template": TEMPLATES, "schedule": SCHEDULES, "dtype": ("auto", "fp32", "bf16")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sft", help="supervised fine-tuning on JSONL chats (assistant-only loss)",
                              formatter_class=HelpFormatter, description=DESCRIPTION)
    add_fields(s, SFTArgs, HELP, CHOICES, required={"model", "data", "out"}, exclusive={"steps", "epochs"},
               skip={"beta1", "beta2"})
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    sft(from_args(SFTArgs, args))
    return 0


def main(argv=None) -> int:
    return module_main(add_parser, "sft", argv)


if __name__ == "__main__":
    sys.exit(main())

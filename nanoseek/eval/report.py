"""The report card of a run: RUN_DIR/report.md with PNG plots in RUN_DIR/plots/, rebuilt from the logs.

    nanoseek report runs/speedrun                 # prints runs/speedrun/report.md
    nanoseek report runs/speedrun --title "CPU speedrun, 2 cores"

    from nanoseek.eval.report import write_report
    path = write_report("runs/speedrun")           # the speedrun calls this at its end

Reads whatever exists of the run-directory layout (every stage writes its own part):
  pretrain/metrics.jsonl   loss + MTP loss, per-layer expert load max/mean   -> plots, first/last table
  pretrain/samples.jsonl   optional greedy samples {"step", "prompt", "completion"}
  grpo/metrics.jsonl       reward and reward/* parts, accuracy, response length; KL and entropy
  grpo/samples.jsonl       optional rollouts {"step", "question", "answer", "completion", "reward"}
  distill/metrics.jsonl    SFT loss;  distill/dataset_stats.json {"generated", "kept", "keep_rate"}
  eval.json                {"rows": [{"model", "task", "pass@1", "maj@k", "greedy", ...}]}  -> table + bars
  cost.json                `nanoseek cost --json` output (one, a list, or {name: output})  -> tables + bars
  chat.json                {"prompt", "reasoning", "answer", "expected", "correct"}: reasoning folded in
                           <details>, the check of the answer under it
  summary.json             anything else (timings per stage, machine, versions) -> a key/value table
A missing part gives a section that says "not run"; a torn last JSONL line (a killed run) is skipped.
Noisy curves are drawn smoothed (bias-corrected EMA) over the faint raw curve. Every file is
written atomically (temp + rename), so a crash never leaves a half-written report or PNG.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import time
from pathlib import Path

from ..atomic import atomic_write
from .. import jsonl
from ..jsonl import read_json
from ..args import HelpFormatter
from ..errors import NanoseekError
from .stats import with_ci

KNOWN = ("pretrain/metrics.jsonl", "grpo/metrics.jsonl", "distill/metrics.jsonl", "distill/dataset_stats.json",
         "eval.json", "cost.json", "chat.json", "summary.json")
NOT_RUN = "_not run_"
GRPO_LABELS = {"reward": "total", "accuracy": "training samples (T = 1)", "eval/accuracy": "held-out, greedy",
               "response_length": "training samples", "eval/response_length": "held-out, greedy"}
RATES = ("pass@1", "maj@k", "greedy", "format_rate", "language_rate")


# ------------------------------------------------------------------------------ reading
def read_jsonl(path: Path) -> list[dict]:
    """JSON objects, one per line; unparseable lines (a torn last line of a killed run) are skipped.
    Rows with a numeric "step" are de-duplicated by step (a resumed run may repeat some), last wins."""
    if not path.is_file():
        return []
    try:
        rows = [row for row in jsonl.read_jsonl(path, errors="skip") if isinstance(row, dict)]
    except NanoseekError:  # unreadable: a report never fails on one bad part
        return []
    if rows and all(_num(r.get("step")) for r in rows):
        rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
    return rows


# keys that tell which stage wrote a metrics.jsonl, for a run directory that is a single stage's --out
STAGE_KEYS = {"pretrain": {"mtp_loss", "balance_loss"}, "grpo": {"reward", "zero_adv_frac"}}


def stage_dir(run: Path, stage: str) -> Path:
    """RUN/<stage>, or RUN itself when it is one stage's own output directory (e.g. `nanoseek grpo --out X`)."""
    if (run / stage).is_dir():
        return run / stage
    if stage == "distill":
        return run if (run / "dataset_stats.json").is_file() else run / stage
    rows = read_jsonl(run / "metrics.jsonl")[:3]
    return run if any(STAGE_KEYS[stage] & set(r) for r in rows) else run / stage


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where `key` is a finite number; step defaults to the row number."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if _num(v):
            xs.append(r["step"] if _num(r.get("step")) else i + 1)
            ys.append(float(v))
    return xs, ys


def centered_mean(values: list[float], half: int) -> list[float]:
    """Mean of the 2*half+1 values around each point (fewer at the ends): a smooth curve with no lag,
    so a fast early drop is drawn where it happens (an EMA trails it)."""
    import numpy as np
    v = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(len(v))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(v))
    return ((c[hi] - c[lo]) / (hi - lo)).tolist()


# ------------------------------------------------------------------------------ formatting
def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == int(x) and abs(x) < 1e15 and abs(x) >= 1000:
            return f"{int(x):,}"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v) for v in x)
    return str(x)


def count(x) -> str:
    """Token counts as the cost tables write them: 14.8T, 300B, 2.5M."""
    if not _num(x):
        return "–"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}"
    return f"{x:.3g}"


def pct(x) -> str:
    return f"{100 * x:.1f}%" if _num(x) else "–"


def money(x) -> str:
    if not _num(x):
        return "–"
    return f"${x:,.0f}" if abs(x) >= 1000 else f"${x:,.2f}" if abs(x) >= 1 else f"${x:.3g}"


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def _cell(x) -> str:
    s = x if isinstance(x, str) else fmt(x)
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fenced(text: str, lang: str = "text") -> str:
    """A code block whose fence is longer than any backtick run inside: model output stays inert text."""
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def metrics_table(rows: list[dict]) -> str:
    """first / last / min / max of every numeric per-step metric, in the order the log first names them."""
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k != "step" and _num(v) and k not in keys]
    body = []
    for k in keys:
        _, ys = series(rows, k)
        body.append([k, ys[0], ys[-1], min(ys), max(ys)])
    steps, _ = series(rows, "step")
    head = f"{len(rows)} logged steps" + (f", last step {fmt(steps[-1])}" if steps else "")
    return head + "\n\n" + table(["metric", "first", "last", "min", "max"], body)


# ------------------------------------------------------------------------------ plots
class Plots:
    """Figures drawn with the Agg canvas directly (no pyplot global state, no display needed)."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "plots"

    def figure(self, panels: int = 1, width: float = 5.0, height: float = 3.2):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(width * panels, height), dpi=100)
        FigureCanvasAgg(fig)
        axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_xlabel("step")
        return fig, axes

    def save(self, fig, name: str) -> str:
        """Write plots/NAME.png; returns the markdown image link, relative to report.md."""
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write(self.dir / f"{name}.png", buf.getvalue())
        return f"![{name.replace('_', ' ')}](plots/{name}.png)"


def curve(ax, rows: list[dict], key: str, label: str | None = None, color=None) -> bool:
    """Per-step values faint, a centered moving average on top (curves of 20 points or fewer are drawn
    as they are, with markers); False if the log has no such metric."""
    xs, ys = series(rows, key)
    if not xs:
        return False
    if len(ys) > 20:
        (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8, color=color)
        ax.plot(xs, centered_mean(ys, max(1, len(ys) // 60)), color=raw.get_color(), label=label or key)
    else:
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label or key)
    return True


def _smoothing_note(ax) -> None:
    ax.text(0.99, 0.01, "faint: each step; solid: moving average", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7, color="#666")


def _legend(ax, below: bool = False):
    """A legend that never covers a curve: the best free corner, or under the axes when `below`."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    if below:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=min(3, len(handles)),
                  frameon=False)
    else:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


# ------------------------------------------------------------------------------ sections
def pretrain_section(run: Path, plots: Plots) -> list[str]:
    rows = read_jsonl(stage_dir(run, "pretrain") / "metrics.jsonl")
    out = ["## Pretraining"]
    if not rows:
        return out + [NOT_RUN]
    fig, (ax,) = plots.figure()
    curve(ax, rows, "loss", "next-token loss")
    curve(ax, rows, "mtp_loss", "MTP loss (next-but-one token)")
    ax.set_yscale("log")                     # the tail, where the runs differ, is visible
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator
    ax.yaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10]))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("cross-entropy (nats, log scale)")
    ax.set_title("pretraining loss")
    _smoothing_note(ax)
    _legend(ax)
    out.append(plots.save(fig, "pretrain_loss"))
    # per-layer expert load: the interface's name, or the one nanoseek pretrain writes
    key = next((k for k in ("expert_load_max_over_mean", "load_max_mean")
                if any(isinstance(r.get(k), list) for r in rows)), None)
    if key:
        layers = max(len(r[key]) for r in rows if isinstance(r.get(key), list))
        per_layer = [[{"step": r.get("step", i + 1), "v": r[key][j]} for i, r in enumerate(rows)
                      if isinstance(r.get(key), list) and j < len(r[key])] for j in range(layers)]
        fig, (ax,) = plots.figure()
        for j, pts in enumerate(per_layer):
            curve(ax, pts, "v", f"MoE layer {j}")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        ax.set_ylabel("max / mean expert load (1 = balanced)")
        ax.set_title("expert load balance")
        _legend(ax)
        out.append(plots.save(fig, "pretrain_expert_load"))
    out.append(metrics_table(rows))
    samples = [r for r in read_jsonl(stage_dir(run, "pretrain") / "samples.jsonl") if "completion" in r]
    if samples:
        last = [r for r in samples if r.get("step") == samples[-1].get("step")]
        text = "\n\n".join(f"{r.get('prompt', '')}{r['completion']}" for r in last[:3])
        out.append(f"Samples at step {fmt(samples[-1].get('step'))}:\n\n" + fenced(text))
    else:
        with_samples = [r for r in rows if isinstance(r.get("samples"), list) and r["samples"]]
        if with_samples:
            r = with_samples[-1]
            out.append(f"Samples at step {fmt(r.get('step'))}:\n\n" + fenced("\n\n".join(map(str, r["samples"][:3]))))
    return out


def grpo_section(run: Path, plots: Plots) -> list[str]:
    rows = read_jsonl(stage_dir(run, "grpo") / "metrics.jsonl")
    out = ["## Reinforcement learning (GRPO)"]
    if not rows:
        return out + [NOT_RUN]
    reward_keys = ["reward"] + sorted({k for r in rows for k in r if k.startswith("reward/")})
    panels = [("reward (training samples)", reward_keys, "mean reward"),
              ("accuracy", ["accuracy", "eval/accuracy"], "share correct"),
              ("response length", ["response_length", "eval/response_length"], "tokens")]
    panels = [p for p in panels if any(series(rows, k)[0] for k in p[1])]
    if panels:
        fig, axes = plots.figure(len(panels), width=4.2, height=3.6)
        for ax, (title, keys, ylabel) in zip(axes, panels):
            for k in keys:
                curve(ax, rows, k, GRPO_LABELS.get(k, k.removeprefix("reward/")))
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            _legend(ax, below=True)
        out.append(plots.save(fig, "grpo_reward"))
    # KL only when a reference was used (beta > 0): with beta = 0 it is identically zero
    extra = [k for k in ("kl", "entropy") if any(y != 0 for y in series(rows, k)[1])]
    if extra:
        fig, axes = plots.figure(len(extra), width=4.2)
        for ax, k in zip(axes, extra):
            curve(ax, rows, k)
            ax.set_title({"kl": "KL to the reference (k3)", "entropy": "policy entropy"}[k])
            ax.set_ylabel("nats per token")
        out.append(plots.save(fig, "grpo_kl_entropy"))
    out.append(metrics_table(rows))
    samples = [r for r in read_jsonl(stage_dir(run, "grpo") / "samples.jsonl") if "completion" in r]
    if samples:
        step = samples[-1].get("step")
        last = [r for r in samples if r.get("step") == step][:2]
        text = "\n\n".join(f"Q: {r.get('question', r.get('prompt', ''))}  (answer {r.get('answer', '?')}, "
                            f"reward {fmt(r.get('reward'))})\n{r['completion']}" for r in last)
        out.append(f"<details>\n<summary>Rollouts at step {fmt(step)}</summary>\n\n{fenced(text)}\n\n</details>")
    return out


def distill_section(run: Path, plots: Plots) -> list[str]:
    rows = read_jsonl(stage_dir(run, "distill") / "metrics.jsonl")
    stats = read_json(stage_dir(run, "distill") / "dataset_stats.json")
    out = ["## Distillation"]
    if not rows and not isinstance(stats, dict):
        return out + [NOT_RUN]
    if isinstance(stats, dict):
        body = [[k, pct(v) if k.endswith("rate") else v] for k, v in _flatten(stats)]
        out.append("Distillation data (teacher samples kept after verification):\n\n" + table(["", "value"], body))
    if rows:
        fig, (ax,) = plots.figure()
        if curve(ax, rows, "loss", "SFT loss"):
            ax.set_title("distillation (SFT) loss")
            ax.set_ylabel("cross-entropy (nats)")
            out.append(plots.save(fig, "distill_loss"))
        out.append(metrics_table(rows))
    return out


def eval_section(run: Path, plots: Plots) -> list[str]:
    data = read_json(run / "eval.json")
    rows = data.get("rows") if isinstance(data, dict) else data
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    out = ["## Evaluation"]
    if not rows:
        return out + [NOT_RUN]
    ks = {r.get("k") for r in rows if r.get("k") is not None}
    maj = f"maj@{ks.pop()}" if len(ks) == 1 else "maj@k"
    headers = ["model", "task", "pass@1", maj, "greedy", "mean length", "format rate", "language rate"]
    body = [[r.get("model", "?"), r.get("task", "?"), with_ci(r, "pass@1"), with_ci(r, "maj@k"), with_ci(r, "greedy"),
             r.get("mean_length"), pct(r.get("format_rate")), pct(r.get("language_rate"))] for r in rows]
    if any("n" in r for r in rows):
        headers.append("n")
        for b, r in zip(body, rows):
            b.append(r.get("n"))
    out.append(table(headers, body))
    scored = [r for r in rows if _num(r.get("pass@1"))]
    if scored:
        out.append(plots.save(pass1_bars(plots, scored), "eval_pass1"))
    return out


def pass1_bars(plots: "Plots", rows: list[dict]):
    """Horizontal bars (labels stay readable however many models), value labels, 95% intervals."""
    names = [f"{r.get('model', '?')}" + (f" ({r['task']})" if len({x.get('task') for x in rows}) > 1 else "")
             for r in rows]
    ys = [100 * r["pass@1"] for r in rows]
    ci = [r.get("pass@1_ci") for r in rows]
    err = [[100 * r["pass@1"] - 100 * c[0] if c else 0 for r, c in zip(rows, ci)],
           [100 * c[1] - 100 * r["pass@1"] if c else 0 for r, c in zip(rows, ci)]]
    fig, (ax,) = plots.figure(width=7.0, height=0.45 * len(rows) + 1.2)
    pos = list(range(len(rows)))[::-1]                      # first row on top
    bars = ax.barh(pos, ys, xerr=err if any(ci) else None, capsize=3, color="#4c72b0",
                   error_kw={"elinewidth": 1, "ecolor": "#333"})
    ax.bar_label(bars, labels=[f"{y:.1f}%" for y in ys], padding=4, fontsize=8)
    ax.set_yticks(pos, names, fontsize=8)
    ax.set_xlim(0, 110)
    ax.set_xlabel("held-out pass@1 (%)" + (", bars: 95% CI" if any(ci) else ""))
    ax.set_title("pass@1 per model")
    ax.grid(axis="y", alpha=0)
    return fig


def _cost_entries(data) -> list[tuple[str, dict]]:
    """`nanoseek cost --json` output: one object, a list of them, or {name: object}."""
    is_cost = lambda d: isinstance(d, dict) and isinstance(d.get("training"), dict)  # noqa: E731
    if is_cost(data):
        return [(str(data.get("model", "model")), data)]
    if isinstance(data, list):
        return [(str(d.get("model", f"#{i}")), d) for i, d in enumerate(data) if is_cost(d)]
    if isinstance(data, dict):
        return [(str(k), d) for k, d in data.items() if is_cost(d)]
    return []


def cost_section(run: Path, plots: Plots) -> list[str]:
    entries = _cost_entries(read_json(run / "cost.json"))
    out = ["## Cost"]
    if not entries:
        return out + ["_not recorded_"]
    train = [[name, t.get("gpu"), count(t.get("tokens")), pct(t.get("mfu")), t.get("gpu_hours"), money(t.get("dollars"))]
             for name, c in entries for t in [c["training"]]]
    out.append("Training (FLOPs / (peak × MFU); `nanoseek cost`):\n\n"
               + table(["model", "GPU", "tokens", "MFU", "GPU-hours", "cost"], train))
    serve = [[name, s.get("gpu"), d.get("batch"), d.get("tokens_per_s"), money(d.get("dollars_per_million_tokens"))]
             for name, c in entries if isinstance(c.get("serving"), dict) for s in [c["serving"]]
             for d in (s.get("decode_batch_1"), s.get("decode_max_batch")) if isinstance(d, dict)]
    if serve:
        out.append("Serving (roofline upper bound on decode speed):\n\n"
                   + table(["model", "GPU", "decode batch", "tokens/s", "$ per M output tokens"], serve))
    v3 = next((c["deepseek_v3"] for _, c in entries if isinstance(c.get("deepseek_v3"), dict)), None)
    stages = [k for k in (v3 or {}).get("gpu_hours", {}) if k in v3.get("paper_gpu_hours", {})]
    if stages:
        body = [[k, v3["gpu_hours"][k], v3["paper_gpu_hours"][k], money(v3["dollars"][k]),
                 money(v3["paper_dollars"][k])] for k in stages]
        out.append("DeepSeek-V3 Table 1, rebuilt by the cost model vs the paper:\n\n"
                   + table(["stage", "model GPU-hours", "paper GPU-hours", "model cost", "paper cost"], body))
    # plot: V3 stages (model vs paper), else GPU-hours per entry and serving $/M tokens
    if stages:
        parts = [k for k in stages if k != "total"]
        fig, (ax,) = plots.figure(width=6.0)
        x = range(len(parts))
        for shift, key, label in ((-0.2, "gpu_hours", "cost model"), (0.2, "paper_gpu_hours", "paper")):
            bars = ax.bar([i + shift for i in x], [v3[key][k] / 1e3 for k in parts], 0.4, label=label)
            ax.bar_label(bars, fmt="%.0fK", fontsize=7, padding=2)
        ax.set_yscale("log")                 # post-training (5K) is visible beside pre-training (2,664K)
        ax.set_xticks(list(x), parts)
        ax.set_xlabel("")
        ax.set_ylabel("H800 GPU-hours (thousands, log)")
        ax.set_title("DeepSeek-V3 training cost")
        _legend(ax)
        out.append(plots.save(fig, "cost"))
    else:
        named = [(n, c["training"]) for n, c in entries if _num(c["training"].get("gpu_hours"))]
        if named:
            fig, axes = plots.figure(2 if serve else 1, width=4.2)
            ax = axes[0]
            bars = ax.bar([n for n, _ in named], [t["gpu_hours"] for _, t in named])
            ax.bar_label(bars, labels=[money(t.get("dollars")) for _, t in named], fontsize=7)
            ax.set_xlabel("")
            ax.set_ylabel("GPU-hours")
            ax.set_title("training cost")
            if serve:
                labels = [f"{r[0]}\nbatch {fmt(r[2])}" for r in serve]
                vals = [d for _, c in entries if isinstance(c.get("serving"), dict)
                        for d in (c["serving"].get("decode_batch_1"), c["serving"].get("decode_max_batch"))
                        if isinstance(d, dict)]
                axes[1].bar(labels, [d.get("dollars_per_million_tokens") or 0.0 for d in vals])
                axes[1].set_xlabel("")
                axes[1].set_ylabel("$ per million output tokens")
                axes[1].set_title("serving cost")
            out.append(plots.save(fig, "cost"))
    return out


RUNTIMES = {"hf": "transformers, nanoseek; vLLM and SGLang (checked up to config.json, no GPU here)",
            "gguf": "llama.cpp (llama-server, Ollama, LM Studio), nanoseek"}


def exports_section(run: Path) -> list[str]:
    """What the run exported and which runtime loads each (speedrun's export/ directory)."""
    exports = sorted(d for d in (run / "export").iterdir() if d.is_dir()) if (run / "export").is_dir() else []
    if not exports:
        return []
    rows = []
    for d in exports:
        fmt = "gguf" if any(d.glob("*.gguf")) else "hf"
        note = " (MoE as llama.cpp's deepseek2; the MTP module is left out)" if fmt == "gguf" and \
            d.name.startswith("rl") else ""
        rows.append([f"`export/{d.name}`", fmt.upper(), RUNTIMES[fmt] + note])
    return ["## Open weights", table(["export", "format", "loads in"], rows)]


def chat_section(run: Path) -> list[str]:
    chat = read_json(run / "chat.json")
    out = ["## Sample chat"]
    if not isinstance(chat, dict) or not any(chat.get(k) for k in ("prompt", "reasoning", "answer")):
        return out + ["_not recorded_"]
    out.append("**User**\n\n" + fenced(str(chat.get("prompt", ""))))
    reasoning = str(chat.get("reasoning") or "")
    if reasoning:
        out.append(f"<details>\n<summary>Reasoning ({len(reasoning):,} characters, click to show)</summary>\n\n"
                   + fenced(reasoning) + "\n\n</details>")
    out.append("**Assistant**\n\n" + fenced(str(chat.get("answer", ""))))
    if isinstance(chat.get("correct"), bool):
        out.append(f"Checked as the eval checks (the answer inside `<answer>`): **{'right' if chat['correct'] else 'wrong'}**"
                   + (f"; the answer is {chat['expected']}" if chat.get("expected") is not None else "") + ".")
    return out


def claims_section(run: Path) -> list[str]:
    """The seed-claims table (eval.claims) when the run evaluated models by role (a speedrun)."""
    from .claims import claims_markdown, seed_claims
    data = read_json(run / "eval.json")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not (isinstance(rows, list) and any(isinstance(r, dict) and "role" in r for r in rows)):
        return []
    return ["## Seed claims", "Each claim of the DeepSeek papers, the paper's figure, and this run's (95% intervals "
            "over the same held-out problems; differences are paired). Reproduced: **yes** when the interval "
            "excludes no effect, **partly** when only the direction or half of the claim holds.",
            claims_markdown(seed_claims(run))]


def label(key: str) -> str:
    """A summary.json key as a reader says it: stage_s.pretrain -> "pretrain: time (s)",
    grpo.heldout_greedy_end -> "grpo: heldout greedy end"."""
    if key.startswith("stage_s."):
        return f"{key.removeprefix('stage_s.')}: time (s)"
    if key == "total_s":
        return "total time (s)"
    head, _, tail = key.partition(".")
    return (f"{head}: {tail}" if tail else head).replace("_", " ")


def summary_section(summary: dict) -> list[str]:
    items = [(k, v) for k, v in _flatten(summary) if k != "title"]
    if not items:
        return []
    body = [[label(k), f"{fmt(v)} ({duration(v)})" if _num(v) and (k.endswith(("_s", "seconds")) or k.startswith("stage_s."))
             and v >= 60 else v]
            for k, v in items]
    return ["## Run", table(["", "value"], body)]


# ------------------------------------------------------------------------------ report
def write_report(run_dir: str | os.PathLike, title: str | None = None) -> Path:
    """Rebuild RUN_DIR/report.md and RUN_DIR/plots/*.png from whatever logs the run left; returns the
    report's path. Raises NanoseekError if RUN_DIR is not a directory or holds none of the known files."""
    run = Path(run_dir)
    if not run.is_dir():
        raise NanoseekError(f"{run}: no such run directory")
    if not any((run / k).is_file() for k in KNOWN + ("metrics.jsonl", "dataset_stats.json")):
        raise NanoseekError(f"{run}: no run logs found (expected any of {', '.join(KNOWN)})")
    summary = read_json(run / "summary.json")
    summary = summary if isinstance(summary, dict) else {}
    title = title or summary.get("title") or f"nanoseek report card: {run.resolve().name}"
    plots = Plots(run)
    parts = [f"# {title}", f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
             f"`nanoseek report {run.name}` from the logs in this directory."]
    parts += claims_section(run)
    parts += summary_section(summary)
    for section in (pretrain_section, grpo_section, distill_section, eval_section):
        parts += section(run, plots)
    parts += exports_section(run)
    parts += chat_section(run)
    parts += cost_section(run, plots)
    path = run / "report.md"
    atomic_write(path, "\n\n".join(parts) + "\n")
    return path


def run(args) -> int:
    print(write_report(args.run_dir, args.title))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "report", help="report card of a run: markdown + PNG plots from its logs",
        formatter_class=HelpFormatter,
        description="Rebuild RUN_DIR/report.md and RUN_DIR/plots/*.png from the logs a run left\n"
                    "(pretrain/, grpo/, distill/ metrics, eval.json, cost.json, chat.json, summary.json);\n"
                    "missing parts are marked \"not run\". Prints the report's path.\n\n"
                    "examples:\n"
                    "  nanoseek report runs/speedrun\n"
                    "  nanoseek report runs/speedrun --title 'CPU speedrun'")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (e.g. runs/speedrun)")
    s.add_argument("--title", default=None, help="report title (default: summary.json's title or the directory name)")
    s.set_defaults(func=run)
    return s

"""The report card: `nanoseek report RUN_DIR` builds report.md + plots/*.png from a run's logs.

    .venv/bin/python -m pytest -q tests/test_report.py
"""

import json
import re
import struct
from pathlib import Path

import pytest

from nanoseek import cost
from nanoseek.config import load_config
from nanoseek.cli import build_parser, main
from nanoseek.errors import NanoseekError
from nanoseek.eval.report import centered_mean, read_jsonl, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cost_json(*argv):
    """The real `nanoseek cost --json` object (same code path as the CLI, without printing)."""
    args = build_parser().parse_args(["cost", "--json", *argv])
    return json.loads(json.dumps(cost.build_report(args, load_config(args.model))))


def write_jsonl(path: Path, rows, torn: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + (torn or ""))


def pretrain_rows(n=6):
    return [{"step": s, "loss": 5.0 - 0.5 * s, "mtp_loss": 5.2 - 0.5 * s, "balance_loss": 1e-4, "lr": 1e-3,
             "grad_norm": 1.0, "tokens_per_s": 1000.0, "mfu": None,
             "expert_load_max_over_mean": [1.0 + 1 / s, 1.5]} for s in range(1, n + 1)]


EVAL_ROWS = [
    {"model": "base", "task": "arithmetic", "pass@1": 0.125, "maj@k": 0.25, "greedy": 0.2, "mean_length": 87.5,
     "format_rate": 0.5, "language_rate": 0.75, "k": 4},
    {"model": "rl", "task": "arithmetic", "pass@1": 0.625, "maj@k": 0.75, "greedy": 0.7, "mean_length": 41.0,
     "format_rate": 1.0, "language_rate": 0.875, "k": 4},
]


@pytest.fixture
def full_run(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "pretrain" / "metrics.jsonl", pretrain_rows())
    write_jsonl(run / "grpo" / "metrics.jsonl", [
        {"step": s, "reward": 0.1 * s, "reward/accuracy": 0.08 * s, "reward/format": 1.0, "reward/language": 0.9,
         "reward/overlong": 0.0, "accuracy": 0.08 * s, "response_length": 30 + s, "kl": 0.001 * s,
         "entropy": 1.0 - 0.05 * s} for s in range(1, 5)])
    write_jsonl(run / "grpo" / "samples.jsonl", [
        {"step": s, "question": f"Question: {s} + 1 = ?", "answer": str(s + 1), "completion": f"rollout-{s} </think>",
         "reward": 1.0} for s in (3, 4)])
    write_jsonl(run / "pretrain" / "samples.jsonl", [
        {"step": s, "prompt": "Question: 2 + 2 = ?", "completion": f" pretrain-sample-{s}"} for s in (3, 6)])
    write_jsonl(run / "distill" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s, "lr": 1e-4} for s in range(1, 4)])
    (run / "distill" / "dataset_stats.json").write_text(json.dumps({"generated": 64, "kept": 24, "keep_rate": 0.375}))
    (run / "eval.json").write_text(json.dumps({"rows": EVAL_ROWS}))
    (run / "cost.json").write_text(json.dumps(cost_json("--model", "tiny", "--tokens", "2M", "--gpu", "h100")))
    (run / "chat.json").write_text(json.dumps({"prompt": "Question: 23 + 48 = ?",
                                               "reasoning": "3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7 <b>```",
                                               "answer": "<answer> 71 </answer>", "expected": "71",
                                               "correct": True}))
    (run / "summary.json").write_text(json.dumps({"machine": {"cpu_cores": 2}, "torch": "2.13.0",
                                                  "timings": {"pretrain_s": 125.0}}))
    return run


def sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## ", md, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p.split("\n", 1)[1] if "\n" in p else "" for p in parts[1:]}


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, path  # a drawn figure, not an empty image
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert 200 <= width <= 2000 and 150 <= height <= 1000, (path, width, height)


def image_links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_centered_mean_by_hand():
    # half 1: each point with its neighbours; the ends average the two values they have
    assert centered_mean([1.0, 2.0, 6.0, 3.0], 1) == pytest.approx([1.5, 3.0, 11 / 3, 4.5])
    assert centered_mean([0.0, 0.0, 9.0, 0.0, 0.0], 0) == [0.0, 0.0, 9.0, 0.0, 0.0]
    drop = [10.0] * 5 + [1.0] * 5                # a step: drawn at the step, not after it (no lag)
    assert centered_mean(drop, 2)[4] == pytest.approx((3 * 10 + 2 * 1) / 5)


def test_full_report(full_run):
    path = write_report(full_run, title="Test run")
    assert path == full_run / "report.md"
    md = path.read_text()
    assert md.startswith("# Test run\n")
    sec = sections(md)
    for name in ("Run", "Pretraining", "Reinforcement learning (GRPO)", "Distillation", "Evaluation",
                 "Sample chat", "Cost"):
        assert name in sec, name
        assert "not run" not in sec[name] and "not recorded" not in sec[name], name

    # every image link is relative and points at a valid PNG
    links = image_links(md)
    assert {Path(p).name for p in links} == {"pretrain_loss.png", "pretrain_expert_load.png", "grpo_reward.png",
                                             "grpo_kl_entropy.png", "distill_loss.png", "eval_pass1.png", "cost.png"}
    for link in links:
        assert not link.startswith("/") and link.startswith("plots/")
        assert_png(full_run / link)
    assert not [p for p in (full_run / "plots").iterdir() if p.name.startswith(".")]  # no temp files left

    # pretraining table: first/last/min/max of the logged losses (5 - 0.5 s for s = 1..6)
    rows = {r[0]: r[1:] for r in table_rows(sec["Pretraining"])}
    assert rows["loss"] == ["4.5", "2", "2", "4.5"]
    assert rows["mtp_loss"] == ["4.7", "2.2", "2.2", "4.7"]
    assert "mfu" not in rows  # all None: nothing to report
    assert "6 logged steps" in sec["Pretraining"]
    assert "pretrain-sample-6" in sec["Pretraining"] and "pretrain-sample-3" not in sec["Pretraining"]

    # GRPO: reward 0.1 s, kl 0.001 s for s = 1..4
    rows = {r[0]: r[1:] for r in table_rows(sec["Reinforcement learning (GRPO)"])}
    assert rows["reward"][:2] == ["0.1", "0.4"] and rows["kl"][:2] == ["0.001", "0.004"]
    assert rows["reward/format"] == ["1", "1", "1", "1"]
    rollouts = sec["Reinforcement learning (GRPO)"].split("<details>")[1]  # the last step's rollouts, folded
    assert "rollout-4 </think>" in rollouts and "rollout-3" not in rollouts and "</details>" in rollouts

    # distillation data stats and loss 2/s
    dist = sec["Distillation"]
    assert "| generated | 64 |" in dist and "| kept | 24 |" in dist and "| keep_rate | 37.5% |" in dist
    assert {r[0]: r[1:] for r in table_rows(dist)}["loss"][:2] == ["2", "0.6667"]

    # evaluation table: the given rates as percentages, k named in the header
    ev = table_rows(sec["Evaluation"])
    assert ev[0] == ["model", "task", "pass@1", "maj@4", "greedy", "mean length", "format rate", "language rate"]
    assert ev[1] == ["base", "arithmetic", "12.5%", "25.0%", "20.0%", "87.5", "50.0%", "75.0%"]
    assert ev[2] == ["rl", "arithmetic", "62.5%", "75.0%", "70.0%", "41", "100.0%", "87.5%"]

    # cost: the GPU-hours and dollars of the cost JSON
    c = json.loads((full_run / "cost.json").read_text())
    t = c["training"]
    train = table_rows(sec["Cost"].split("Serving")[0])
    assert train[1][:4] == ["tiny", "H100 SXM", "2M", "40.0%"]
    assert float(train[1][4]) == pytest.approx(t["gpu_hours"], rel=1e-3)
    assert float(train[1][5].lstrip("$")) == pytest.approx(t["dollars"], rel=1e-2)
    assert f"{c['serving']['decode_batch_1']['tokens_per_s']:,.0f}" in sec["Cost"]

    # chat: reasoning folded, model text fenced so its markup stays inert
    chat = sec["Sample chat"]
    details = chat[chat.index("<details>"):chat.index("</details>")]
    assert "3 + 8 = 11" in details and "<summary>" in details
    assert "````text\n3 + 8" in details  # fence longer than the ``` inside the reasoning
    assert "71" in chat.split("</details>")[1]
    assert "**right**; the answer is 71." in chat  # the export stage's check, shown under the answer

    # summary.json key/values
    run_rows = {r[0]: r[1] for r in table_rows(sec["Run"])}
    assert run_rows["machine: cpu cores"] == "2" and run_rows["torch"] == "2.13.0"   # keys read as words
    assert run_rows["timings: pretrain s"] == "125 (2m 05s)"


def test_pretrain_only_and_torn_last_line(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "pretrain" / "metrics.jsonl", pretrain_rows(4), torn='{"step": 5, "loss": 1.')
    assert [r["step"] for r in read_jsonl(run / "pretrain" / "metrics.jsonl")] == [1, 2, 3, 4]
    md = write_report(run).read_text()
    sec = sections(md)
    rows = {r[0]: r[1:] for r in table_rows(sec["Pretraining"])}
    assert rows["loss"][1] == "3"  # step 4's loss (5 - 2): the torn step 5 is dropped
    for name in ("Reinforcement learning (GRPO)", "Distillation", "Evaluation"):
        assert sec[name].strip() == "_not run_"
    assert "Run" not in sec  # no summary.json
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["pretrain_expert_load.png", "pretrain_loss.png"]
    for link in image_links(md):
        assert_png(run / link)


def test_resumed_log_repeated_steps_keep_the_last(tmp_path):
    p = tmp_path / "m.jsonl"
    write_jsonl(p, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}])
    assert [(r["step"], r["loss"]) for r in read_jsonl(p)] == [(1, 3.0), (2, 1.5), (3, 1.0)]


def test_deepseek_v3_cost_table_and_rerun(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    c = cost_json()  # default: DeepSeek-V3, with the paper's Table 1 alongside
    (run / "cost.json").write_text(json.dumps(c))
    write_report(run)
    md = write_report(run).read_text()  # a second run overwrites cleanly
    v3 = c["deepseek_v3"]
    rows = {r[0]: r[1:] for r in table_rows(sections(md)["Cost"])}
    assert rows["pre-training"][1] == "2,664,000"  # paper GPU-hours, DeepSeek-V3 Table 1
    assert rows["total"][3] == "$5,576,000"
    assert rows["pre-training"][0] == f"{v3['gpu_hours']['pre-training']:,.0f}"
    assert_png(run / "plots" / "cost.png")
    assert sorted(p.name for p in run.iterdir()) == ["cost.json", "plots", "report.md"]


def test_cli_prints_path(tmp_path, capsys):
    (tmp_path / "eval.json").write_text(json.dumps({"rows": EVAL_ROWS}))
    assert main(["report", str(tmp_path), "--title", "CLI run"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# CLI run\n") and "| rl | arithmetic | 62.5% |" in md


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_cli_bad_dir_exit_2(tmp_path, capsys, kind):
    target = tmp_path / "x"
    if kind == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("hi")
    elif kind == "file":
        target.write_text("not a dir")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err
    assert not (tmp_path / "x" / "report.md").exists() if kind == "empty" else True
    with pytest.raises(NanoseekError):
        write_report(target)


def test_no_flat_kl_panel_when_beta_is_zero(tmp_path):
    """With beta = 0 the KL is identically zero: only the entropy panel is drawn (a plot one panel wide)."""
    import struct
    run = tmp_path / "run"
    write_jsonl(run / "grpo" / "metrics.jsonl", [{"step": s, "reward": 0.1 * s, "kl": 0.0, "entropy": 1.0 - 0.05 * s}
                                                  for s in range(1, 30)])
    write_report(run)
    png = (run / "plots" / "grpo_kl_entropy.png").read_bytes()
    width = struct.unpack(">I", png[16:20])[0]          # IHDR: the image width in pixels
    assert width == 420                                 # one 4.2-inch panel at 100 dpi, not two

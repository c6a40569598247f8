"""Staged runs (speedrun, pipeline r1): finished stages are skipped on resume, an interrupted stage reruns
and resumes; the whole speedrun wiring on a smoke preset, killed in the middle and resumed, ends in a report."""

import json

import pytest
import torch

from nanoseek.errors import NanoseekError
from nanoseek.pipeline import Stages, _startable


def test_stages_skip_finished_and_rerun_interrupted(tmp_path):
    calls = []
    run = Stages(tmp_path / "r", resume=False, label="t")
    run.run("a", lambda: calls.append("a") or {"x": 1})
    with pytest.raises(RuntimeError):
        run.run("b", lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    assert run.done("a") and not run.done("b")
    with pytest.raises(NanoseekError):          # a used directory needs --resume
        Stages(tmp_path / "r", resume=False, label="t")
    again = Stages(tmp_path / "r", resume=True, label="t")
    again.run("a", lambda: calls.append("a2"))
    again.run("b", lambda: calls.append("b") or {"y": 2})
    assert calls == ["a", "b"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["a.x"] == 1 and summary["b.y"] == 2 and set(summary["stage_s"]) == {"a", "b"}
    # the host the figures came from: its torch CPU capability at least (model name where /proc has it)
    assert f"torch {torch.backends.cpu.get_cpu_capability()}" in summary["machine"]["cpu"]


def test_a_solo_stage_runs_alone_and_is_not_starved():
    solo = ("b",)
    assert _startable(["a", "c"], [], 2, solo) == ["a", "c"]
    assert _startable(["a", "c"], ["x"], 2, solo) == ["a"]          # one free lane
    assert _startable(["b", "c"], [], 2, solo) == ["b"]             # alone, though a lane is free
    assert _startable(["b", "c"], ["x"], 2, solo) == []             # waits for the lanes to drain; c waits too
    assert _startable(["a", "b"], [], 2, solo) == ["a"]             # what comes before it may start
    assert _startable(["c"], ["b"], 2, solo) == []                  # nothing beside it
    assert _startable(["a", "c"], [], 2, ()) == ["a", "c"]


def test_cold_start_examples_are_verified_readable_r1_format():
    from nanoseek.data.tasks import get_task
    from nanoseek.pipeline import cold_start_records
    from nanoseek.data.rewards import Rewards
    recs = cold_start_records(40)
    task = get_task("arithmetic", level=2)
    exs = task.examples("train", 40, seed=7919)
    r = Rewards(task, {"accuracy": 1.0, "format": 1.0, "language": 1.0})([x["completion"] for x in recs], exs,
                                                                          [10] * 40)
    assert r["accuracy"] == [1.0] * 40 and r["format"] == [1.0] * 40 and r["language"] == [1.0] * 40
    assert not any(task.is_test(e.question) for e in exs)


@pytest.mark.slow
def test_speedrun_smoke_killed_and_resumed_writes_the_report(tmp_path, monkeypatch):
    """Every stage on a tiny budget. Rewards are forced to 1 so that distillation keeps traces from an
    untrained teacher (this checks wiring, not learning); the run is killed in the GRPO stage and resumed."""
    from nanoseek import speedrun as sr
    from nanoseek.train import grpo as grpo_mod
    from nanoseek.data import rewards

    def ok(self, completions, examples, n_tokens):
        one = [1.0] * len(completions)
        return {"accuracy": one, "format": one, "language": one, "overlong": [0.0] * len(one), "total": one}
    monkeypatch.setattr(rewards.Rewards, "__call__", ok)
    out = tmp_path / "run"
    real = grpo_mod.grpo

    def killed(a):
        raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(grpo_mod, "grpo", killed)
    with pytest.raises(KeyboardInterrupt):
        sr.speedrun(str(out), preset="smoke")
    assert (out / ".pretrain.done").is_file() and (out / ".student.done").is_file()
    assert not (out / ".grpo.done").exists()
    with pytest.raises(NanoseekError):
        sr.speedrun(str(out), preset="smoke")            # not empty and no --resume
    monkeypatch.setattr(grpo_mod, "grpo", real)
    summary = sr.speedrun(str(out), preset="smoke", resume=True)
    for stage in sr.STAGES:
        assert (out / f".{stage}.done").is_file(), stage
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["base", "r1-zero", "r1", "student-base", "student-distilled", "student-rl"]
    assert all(len(r["per_problem"]["pass@1"]) == 4 for r in rows)
    report = (out / "report.md").read_text()
    assert report.split("\n## ")[1].startswith("Seed claims")          # the claims table opens the card
    assert "| Pure RL on rule-checked rewards teaches reasoning (R1-Zero) |" in report
    assert "pass@1" in report and (out / "plots").is_dir() and any((out / "plots").glob("*.png"))
    assert "| `export/rl-gguf` | GGUF | llama.cpp" in report and "| `export/rl-hf` | HF | transformers, nanoseek; vLLM" in report
    assert (out / "r1" / "final-rl" / "final" / "config.json").is_file()   # the smoke preset runs all R1 stages
    assert (out / "export" / "rl-hf" / "config.json").is_file()
    assert list((out / "export" / "student-gguf").glob("*.gguf"))
    assert list((out / "export" / "rl-gguf").glob("*.gguf"))  # the MoE model, as llama.cpp's deepseek2
    chat = json.loads((out / "chat.json").read_text())    # the sample chat, checked like the eval
    assert chat["expected"] == "843" and isinstance(chat["correct"], bool)
    assert f"**{'right' if chat['correct'] else 'wrong'}**; the answer is 843." in report
    assert summary["total_s"] > 0
    served_export_chats_in_its_training_format(out / "export" / "rl-hf")


def served_export_chats_in_its_training_format(path):
    """The exported model, served, is prompted through /v1/chat/completions exactly as it was trained
    (the corpus's dialogue format, opening <think>), so its reply is parsed into reasoning and answer."""
    import httpx

    import nanoseek
    from nanoseek.data.tasks import render
    from test_serve_common import engine_factory, live_server
    model, tok = nanoseek.load(path)
    q = "Question: 487 + 356 = ?"
    with live_server(engine_factory(model, tok)) as live:
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(tok.encode(render("r1-zero-short", q)))
    assert "reasoning_content" in body["choices"][0]["message"]      # the reply starts inside <think>


@pytest.mark.slow
def test_parallel_speedrun_killed_and_resumed(tmp_path):
    """`nanoseek speedrun --jobs 2`: stages run as two lanes of child processes. Killing the parent stops
    its children (nothing keeps writing), and --resume finishes the run with every marker, the eval table
    of the models that exist and a report; stages started only once their needs were done."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from nanoseek import speedrun as sr
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--preset", "smoke", "--out", str(out), "--jobs", "2"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    err = open(tmp_path / "stderr.txt", "w")  # a file, not a pipe nobody drains
    # SIGINT as a terminal delivers it: a test run started in the background (`make test &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the run would go on
    proc = subprocess.Popen(cmd, env=env, stderr=err, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 300
    while not (out / ".pretrain.done").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
    proc.send_signal(signal.SIGINT)                       # Ctrl-C: the parent stops its lanes
    proc.wait(timeout=60)
    err.close()
    time.sleep(1)
    logs = {p: p.stat().st_size for p in (out / "logs").glob("*.log")}
    markers = {p.name for p in out.glob(".*.done")}
    time.sleep(3)                                          # no orphaned stage goes on writing
    assert logs == {p: p.stat().st_size for p in (out / "logs").glob("*.log")}
    assert {p.name for p in out.glob(".*.done")} == markers and ".report.done" not in markers
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in sr.STAGES:
        assert (out / f".{stage}.done").is_file(), stage
    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs"] == 2 and set(summary["stage_s"]) == set(sr.STAGES)
    done_at = {s: (out / f".{s}.done").stat().st_mtime for s in sr.STAGES}
    started = {s: json.loads((out / f".{s}.done").read_text())["started_at"] for s in sr.NEEDS}
    for stage, needs in sr.NEEDS.items():              # a stage starts after its needs' markers are written
        assert all(done_at[d] <= started[stage] for d in needs), stage
    for stage in set(sr.NEEDS) - {"data", "pretrain"}:  # the base model trained alone (sr.SOLO)
        assert started[stage] >= done_at["pretrain"], stage
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {"base", "r1-zero", "r1", "student-base", "student-rl"} <= {r["role"] for r in rows}
    assert (out / "report.md").read_text().split("\n## ")[1].startswith("Seed claims")


def test_pipeline_r1_goes_on_when_rejection_sampling_keeps_no_trace(tmp_path, monkeypatch):
    """A weak reasoning model yields no verified trace: rejection sampling is skipped and leaves no
    model, so the final RL starts from the reasoning model (it used to fail on the missing directory)."""
    from nanoseek import pipeline as pl
    started = {}

    def fake_train(run, stage, *a, **kw):            # cold start and RL: write the stage's model
        started[stage] = a[0] if stage != "cold-start" else None
        (run.root / stage / "final").mkdir(parents=True)
        return {}

    monkeypatch.setattr(pl, "cold_start", fake_train)
    monkeypatch.setattr(pl, "rl", fake_train)
    monkeypatch.setattr(pl, "sample_and_train", lambda run, stage, *a, **kw: {"kept": 0, "skipped": "no trace"})
    monkeypatch.setattr(pl, "evaluate_models", lambda *a, **kw: {})
    monkeypatch.setattr(pl, "_report", lambda *a, **kw: "report.md")
    base = tmp_path / "base"
    base.mkdir()
    pl.r1(str(base), str(tmp_path / "r1"))
    assert started["final-rl"] == str(tmp_path / "r1" / "reasoning" / "final")
    assert started["reasoning"] == str(tmp_path / "r1" / "cold-start" / "final")
    with pytest.raises(NanoseekError, match="holds a model"):
        pl.first_model(tmp_path / "nothing", tmp_path / "neither")


def test_pipeline_r1_distils_exactly_kept_traces(tmp_path, monkeypatch):
    """--kept reaches the distillation stage (and only it: rejection sampling keeps every verified trace, as R1
    does); --kept 0 is a one-line error before any stage runs."""
    from nanoseek import pipeline as pl
    calls = {}

    def fake_train(run, stage, *a, **kw):
        (run.root / stage / "final").mkdir(parents=True)
        return {}

    def fake_sample(run, stage, *a, **kw):
        calls[stage] = kw.get("kept")
        (run.root / stage / "final").mkdir(parents=True)
        return {"kept": 3}

    for name, f in (("cold_start", fake_train), ("rl", fake_train), ("sample_and_train", fake_sample),
                    ("evaluate_models", lambda *a, **kw: {}), ("_report", lambda *a, **kw: "report.md")):
        monkeypatch.setattr(pl, name, f)
    base = tmp_path / "base"
    base.mkdir()
    pl.r1(str(base), str(tmp_path / "r1"), kept=3)
    assert calls == {"rejection": None, "distill": 3}
    with pytest.raises(NanoseekError, match="--kept must be at least 1"):
        pl.r1(str(base), str(tmp_path / "r1b"), kept=0)
    assert not (tmp_path / "r1b").exists()

"""Checkpoints and final models survive a power cut, not only a kill (issue 15, item 4): files and
directories are fsynced before the rename that publishes them, a torn newest checkpoint makes a resume
fall back to the previous one with a warning, training.json is inside the atomic unit of final/, and
the leftovers of an interrupted replace never block a later save."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek import atomic
from nanoseek.config import ModelConfig
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import checkpoint
from nanoseek.train.sft import SFTArgs, train_sft

RECORDS = [{"prompt": f"Question: {a} + {b} = ?", "completion": f" {a + b}"} for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe([r["prompt"] + r["completion"] for r in RECORDS] * 3, vocab_size=280)


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return nanoseek.Transformer(ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            max_position_embeddings=128, eos_token_id=tok.eos_token_id))


def sft_args(out, **kw):
    return SFTArgs(out=str(out), template="none", seq_len=32, batch_size=4, lr=3e-3, warmup=1, progress=False,
                   **{"save_every": 2, "keep": 5, **kw})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_atomic_dir_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                            real_replace(a, b))[1])
    target = tmp_path / "final"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "model.safetensors").write_bytes(b"x" * 100)
        (tmp / "sub" / "training.json").write_text("{}")
        tmp = str(tmp)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1] == tmp)
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {f"{tmp}/model.safetensors", f"{tmp}/sub/training.json", f"{tmp}/sub", tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[publish:]           # the rename itself made durable
    assert (target / "sub" / "training.json").read_text() == "{}"


def test_a_leftover_old_directory_does_not_block_a_later_save(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "a").write_text("old")
    stale = tmp_path / f".final.old-{os.getpid()}"     # a replace interrupted between its two renames
    stale.mkdir()
    (stale / "b").write_text("older")
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def _checkpoints(tmp_path, tok, steps=(2, 4), keep=5):
    root = tmp_path / "checkpoints"
    model = tiny_model(tok)
    for s in steps:
        checkpoint.save(root, s, model, tok, {"state": {}, "param_groups": []}, checkpoint.rng_state(),
                        {"bound": {}}, keep=keep)
    return root


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "tokenizer.json", "trainer_state.json"])
def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, tok, capsys, victim):
    root = _checkpoints(tmp_path, tok)
    newest = root / "step-00000004"
    assert checkpoint.latest(root) == newest and checkpoint.verify(newest) is None
    f = newest / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])      # the power went out mid-write
    assert checkpoint.verify(newest) is not None
    assert checkpoint.latest(root) == root / "step-00000002"
    err = capsys.readouterr().err
    assert "torn" in err and "step-00000004" in err


def test_rotation_keeps_the_good_checkpoints_below_a_torn_newer_one(tmp_path, tok, capsys):
    root = _checkpoints(tmp_path, tok, steps=(2, 4), keep=1)          # keep=1: only step-4 remains
    assert [s for s, _ in checkpoint.step_dirs(root)] == [4]
    root = _checkpoints(tmp_path / "b", tok, steps=(2,), keep=1)
    shutil.copytree(root / "step-00000002", root / "step-00000004")
    (root / "step-00000004" / "optimizer.pt").write_bytes(b"")    # torn: a resume goes back to step 2 ...
    checkpoint.save(root, 3, tiny_model(tok), tok, {}, checkpoint.rng_state(), {}, keep=1)
    # ... and its next save must not delete step-3 in favour of the torn step-4
    assert checkpoint.latest(root) == root / "step-00000003"
    assert "torn" in capsys.readouterr().err


def test_resume_skips_a_torn_checkpoint_and_reproduces_the_run(tmp_path, tok, capsys):
    full = train_sft(tiny_model(tok), tok, sft_args(tmp_path / "full", steps=6), records=RECORDS)["losses"]
    cut = tmp_path / "cut" / "checkpoints"
    cut.mkdir(parents=True)
    for s in ("step-00000002", "step-00000004"):
        shutil.copytree(tmp_path / "full" / "checkpoints" / s, cut / s)
    torn = cut / "step-00000004" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[:-1000])
    res = train_sft(tiny_model(tok, seed=1), tok, sft_args(tmp_path / "cut", steps=6, resume=True), records=RECORDS)
    assert res["start_step"] == 2 and res["losses"] == full[2:]
    assert "step-00000004 is torn" in capsys.readouterr().err
    assert checkpoint.verify(cut / "step-00000004") is None           # rewritten whole at step 4


def test_final_model_and_training_json_are_one_atomic_unit(tmp_path, tok, monkeypatch):
    real = Path.write_text

    def power_cut(self, data, *a, **kw):
        if self.name == "training.json":
            raise OSError("no space left on device")
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", power_cut)
    with pytest.raises(OSError):
        train_sft(tiny_model(tok), tok, sft_args(tmp_path / "run", steps=2), records=RECORDS)
    assert not (tmp_path / "run" / "final").exists()                  # no model without its record
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "metrics.jsonl"]  # no temps
    monkeypatch.undo()
    train_sft(tiny_model(tok), tok, sft_args(tmp_path / "run2", steps=2), records=RECORDS)
    assert (tmp_path / "run2" / "final" / "training.json").is_file()


def test_checkpoints_written_before_manifests_still_resume(tmp_path, tok):
    root = _checkpoints(tmp_path, tok, steps=(2,))
    legacy = root / "step-00000002"
    (legacy / checkpoint.MANIFEST).unlink()
    state = json.loads((legacy / checkpoint.STATE_FILE).read_text())
    del state["manifest"]
    (legacy / checkpoint.STATE_FILE).write_text(json.dumps(state))
    assert checkpoint.verify(legacy) is None and checkpoint.latest(root) == legacy
    (legacy / checkpoint.STATE_FILE).write_text(json.dumps({**state, "manifest": True}))  # but one that had a
    assert checkpoint.verify(legacy) == "manifest.json is missing"                       # manifest lost it

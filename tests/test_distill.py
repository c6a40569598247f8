"""Distillation: rejection sampling on crafted completions, the dataset surviving kills without
duplicates, seeds independent of batching on the real engine, and the command end to end."""

import json

import pytest
import torch

import nanoseek
from nanoseek.cli import main as cli_main
from nanoseek.config import ModelConfig
from nanoseek.data.tasks import Example, get_task, render
from nanoseek.infer import Engine, RequestOutput
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distill as D
from nanoseek.train.distill import DistillArgs, TraceStore, build_dataset, reject_reasons, teacher_sampler

TASK = get_task("arithmetic", level=1)
EN = Example("Question: 3 + 4 = ?", "7", "en")
ZH = Example("问题：3 + 4 = ？", "7", "zh")


# ------------------------------------------------------------------------------ rejection sampling
def test_reject_reasons_keeps_exactly_the_verified_traces():
    cases = [  # (completion, example, expected) — by hand from the rules in the brief
        ("three plus four is seven </think> <answer> 7 </answer>", EN, "kept"),
        ("three plus four </think> 7", EN, "kept"),                               # answer tags optional
        ("three plus four </think> <answer> 8 </answer>", EN, "wrong"),
        ("three plus four </think> <answer> 7 </answer>", Example("Question: 3 + 5 = ?", "8", "en"), "wrong"),
        ("three plus four is seven <answer> 7 </answer>", EN, "malformed"),       # never closes </think>
        ("a </think> b </think> <answer> 7 </answer>", EN, "malformed"),         # two </think>
        ("<think> again </think> <answer> 7 </answer>", EN, "malformed"),         # stray <think>
        (" </think> <answer> 7 </answer>", EN, "malformed"),                      # empty reasoning
        ("三加四等于七 </think> <answer> 7 </answer>", ZH, "kept"),
        ("three plus four is seven </think> <answer> 7 </answer>", ZH, "language"),
        ("三加四等于七 </think> <answer> 7 </answer>", EN, "language"),
        # 9 of 10 words English: 0.9 >= 0.9 kept; 8 of 10: 0.8 rejected
        ("one two three four five six seven eight nine 十 </think> 7", EN, "kept"),
        ("one two three four five six seven eight 九 十 </think> 7", EN, "language"),
        ("3 + 4 = 7 </think> 7", EN, "kept"),                                      # no words: consistent
    ]
    got = reject_reasons([c for c, _, _ in cases], [e for _, e, _ in cases], TASK, min_language=0.9)
    assert got == [want for _, _, want in cases]
    # the threshold is a parameter: at 0.8 the 8-of-10 trace passes
    assert reject_reasons([cases[12][0]], [EN], TASK, min_language=0.8) == ["kept"]


# ------------------------------------------------------------------------------ dataset resume
def fake_teacher(examples, k):
    """Deterministic per prompt index: a right trace (twice: a duplicate), a wrong one, a malformed one."""
    def sample(indices):
        out = []
        for i in indices:
            ex = examples[i]
            right = f"work {i} </think> <answer> {ex.answer} </answer>"
            out.append([right, right, f"work {i} </think> <answer> {int(ex.answer) + 1} </answer>",
                        f"work {i} <answer> {ex.answer} </answer>"][:k])
        return out
    return sample


def store_for(out, examples, resume=False):
    prompts = [render("r1-zero-short", ex.question) for ex in examples]
    return TraceStore(out, prompts, {"seed": 0}, resume)


class Killed(Exception):
    pass


def test_dataset_resume_after_kills_does_not_duplicate(tmp_path, monkeypatch):
    examples = get_task("arithmetic", level=2, langs=("en",)).examples("train", 10, seed=0)
    sample = fake_teacher(examples, 4)
    # uninterrupted reference
    ref = build_dataset(store_for(tmp_path / "ref", examples), examples, TASK, sample, gen_batch=3)
    ref_lines = (tmp_path / "ref" / "data.jsonl").read_text().splitlines()
    assert ref == {"generated": 40, "kept": 10, "keep_rate": 0.25, "prompts_done": 10, "prompts": 10,
                   "duplicates": 10, "rejected": {"malformed": 10, "wrong": 10, "language": 0}}
    assert len(ref_lines) == len(set(ref_lines)) == 10
    rec = json.loads(ref_lines[0])
    assert set(rec) == {"prompt", "completion", "question", "answer"} and rec["prompt"].endswith("<think>")

    out = tmp_path / "run"
    # kill 1: between batches (the third generation round never returns)
    calls = []

    def dies_on_third(idx):
        calls.append(idx)
        if len(calls) == 3:
            raise Killed
        return sample(idx)
    with pytest.raises(Killed):
        build_dataset(store_for(out, examples), examples, TASK, dies_on_third, gen_batch=3)
    assert len((out / "data.jsonl").read_text().splitlines()) == 6
    with pytest.raises(D.NanoseekError, match="--resume"):
        store_for(out, examples)

    # kill 2: after a batch's lines are on disk but before its prompts are marked done,
    # plus a line torn in half by the kill
    real_write = D.atomic_write
    writes = []

    def dies_on_second_state_write(path, text):
        writes.append(path)
        if len(writes) == 2:
            with open(out / "data.jsonl", "a") as f:
                f.write('{"prompt": "User: Que')
            raise Killed
        real_write(path, text)
    monkeypatch.setattr(D, "atomic_write", dies_on_second_state_write)
    with pytest.raises(Killed):
        build_dataset(store_for(out, examples, resume=True), examples, TASK, sample, gen_batch=3)
    assert len((out / "data.jsonl").read_text().splitlines()) == 11  # 10 whole lines + the torn one
    monkeypatch.setattr(D, "atomic_write", real_write)

    seen = []
    store = store_for(out, examples, resume=True)
    assert len(store.done) == 9 and len(store.records) == 9  # the unmarked batch's lines were dropped
    stats = build_dataset(store, examples, TASK, lambda idx: seen.append(idx) or sample(idx), gen_batch=3)
    assert seen == [[9]]  # only the prompt not done is generated again
    assert stats == ref
    assert (out / "data.jsonl").read_text().splitlines() == ref_lines


# ------------------------------------------------------------------------------ the real engine
CORPUS = [f"User: Question: {a} + {b} = ?\nAssistant: <think> {a} + {b} = {a + b} </think> <answer> {a + b} </answer>"
          for a in range(20) for b in range(20)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    d = tmp_path_factory.mktemp("teacher") / "t"
    nanoseek.save(nanoseek.Transformer(cfg), tok, d)
    return d


def test_teacher_samples_do_not_depend_on_the_batch(teacher_dir):
    model, tok = nanoseek.load(teacher_dir)
    examples = TASK.examples("train", 3, seed=0)
    prompts = [render("r1-zero-short", ex.question) for ex in examples]
    a = DistillArgs(teacher=str(teacher_dir), k=3, max_tokens=12, engine_batch=4)
    together = teacher_sampler(model, tok, prompts, a)([0, 1, 2])
    alone = teacher_sampler(model, tok, prompts, a)([2])
    assert alone[0] == together[2]
    assert len(together) == 3 and all(len(g) == 3 for g in together)
    assert len(set(together[0])) > 1  # sampled, not greedy


def test_distill_with_a_random_teacher_keeps_nothing_and_says_so(tmp_path, teacher_dir, capsys):
    out = tmp_path / "d"
    rc = cli_main(["distill", "--teacher", str(teacher_dir), "--task", "arithmetic", "--level", "1",
                   "--prompts", "3", "--k", "2", "--max-tokens", "8", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "no verified trace" in err[-1]
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert stats["generated"] == 6 and stats["kept"] == 0 and stats["keep_rate"] == 0


def test_distill_end_to_end_with_dense_tiny_student(tmp_path, teacher_dir, monkeypatch):
    """The teacher's generate is replaced by one that answers right half of the time; the rest
    (filtering, files, the student's SFT, resume) is the real pipeline."""
    tok = Tokenizer.from_dir(teacher_dir)
    task = get_task("arithmetic", level=1, langs=("en",))
    by_prompt = {tuple(tok.encode(render("r1-zero-short", ex.question))): ex
                 for ex in task.examples("train", 6, seed=0)}

    def generate(self, prompts, params=None, progress=False):
        outs = []
        for n, (p, sp) in enumerate(zip(prompts, params)):
            ex = by_prompt[tuple(p)]
            ans = ex.answer if sp.seed % 2 == 0 else "-1"
            text = f" {ex.meta['expression']} = {ans} </think> <answer> {ans} </answer>"
            outs.append(RequestOutput(f"r{n}", list(p), tok.encode(text, add_special_tokens=False), text, None, "stop"))
        return outs
    monkeypatch.setattr(Engine, "generate", generate)
    out = tmp_path / "d"
    argv = ["distill", "--teacher", str(teacher_dir), "--student", "dense:tiny", "--task", "arithmetic",
            "--level", "1", "--langs", "en", "--prompts", "6", "--k", "2", "--out", str(out), "--steps", "2",
            "--seq-len", "64", "--batch-size", "2", "--save-every", "1", "--no-progress"]
    assert cli_main(argv) == 0
    stats = json.loads((out / "dataset_stats.json").read_text())
    assert (stats["generated"], stats["kept"], stats["keep_rate"]) == (12, 6, 0.5)
    lines = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(r["completion"].endswith(f"<answer> {r['answer']} </answer>") for r in lines)
    model, stok = nanoseek.load(out / "final")
    assert model.config.model_type == "llama" and model.config.hidden_size == 128
    assert stok.vocab_size == tok.vocab_size
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # without --resume the run refuses to touch the existing dataset; with it, the student continues
    assert cli_main(argv) == 2
    more = [("3" if x == "2" and argv[n - 1] == "--steps" else x) for n, x in enumerate(argv)]
    assert cli_main([*more, "--resume"]) == 0
    assert len((out / "data.jsonl").read_text().splitlines()) == 6
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("extra,needle", [(["--student", "dense:huge"], "unknown student preset"),
                                          (["--student", "/nonexistent/model"], "no such student"),
                                          (["--task", "sudoku"], "unknown task"),
                                          (["--k", "0"], "--k")])
def test_bad_distill_input(tmp_path, teacher_dir, capsys, extra, needle):
    rc = cli_main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "d"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "d" / "data.jsonl").exists()

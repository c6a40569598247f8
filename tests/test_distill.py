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


def test_dataset_stops_at_the_kept_target_and_resumes_toward_a_larger_one(tmp_path):
    """fake_teacher keeps one distinct trace per prompt: with rounds of 3 prompts, a target of 4 stops
    after the second round (6 kept, prompts 6..9 never sampled); a resume with 8 samples one round more."""
    examples = get_task("arithmetic", level=2, langs=("en",)).examples("train", 10, seed=0)
    sample, seen = fake_teacher(examples, 4), []
    spy = lambda idx: seen.append(idx) or sample(idx)  # noqa: E731
    stats = build_dataset(store_for(tmp_path, examples), examples, TASK, spy, gen_batch=3, target=4)
    assert seen == [[0, 1, 2], [3, 4, 5]] and (stats["kept"], stats["prompts_done"], stats["generated"]) == (6, 6, 24)
    assert build_dataset(store_for(tmp_path, examples, resume=True), examples, TASK, spy, gen_batch=3,
                         target=6)["kept"] == 6 and len(seen) == 2  # reached: nothing sampled
    stats = build_dataset(store_for(tmp_path, examples, resume=True), examples, TASK, spy, gen_batch=3, target=8)
    assert seen[2:] == [[6, 7, 8]] and stats["kept"] == 9
    # a target above what every prompt yields samples them all
    stats = build_dataset(store_for(tmp_path, examples, resume=True), examples, TASK, spy, gen_batch=3, target=99)
    assert seen[3:] == [[9]] and stats["kept"] == 10 and stats["prompts_done"] == 10


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

    # --kept 3: rounds of 2 prompts until 3 traces are kept; the student learns exactly the first 3
    out2 = tmp_path / "d2"
    argv2 = [out2.as_posix() if x == out.as_posix() else x for x in argv]
    assert cli_main([*argv2, "--kept", "3", "--gen-batch", "2"]) == 0
    stats = json.loads((out2 / "dataset_stats.json").read_text())
    lines = (out2 / "data.jsonl").read_text().splitlines()
    assert stats["used"] == 3 and 3 <= stats["kept"] == len(lines) <= 6 and stats["prompts_done"] % 2 == 0
    assert stats["prompts_done"] < 6 or stats["kept"] < 6
    assert json.loads((out2 / "final" / "training.json").read_text())["examples"] == 3


@pytest.mark.parametrize("extra,needle", [(["--student", "dense:huge"], "unknown student preset"),
                                          (["--student", "/nonexistent/model"], "no such student"),
                                          (["--student", "NOT_A_GGUF"], "not a GGUF file"),
                                          (["--student", "EMPTY_DIR"], "no config.json"),
                                          (["--student", "NO_TOKENIZER"], "no tokenizer.json"),
                                          (["--task", "sudoku"], "unknown task"),
                                          (["--k", "0"], "--k"),
                                          (["--kept", "0"], "--kept")])
def test_bad_distill_input(tmp_path, teacher_dir, capsys, extra, needle):
    (tmp_path / "NOT_A_GGUF").write_text("not a model")  # a file that is not a GGUF
    (tmp_path / "EMPTY_DIR").mkdir()
    (tmp_path / "NO_TOKENIZER").mkdir()
    (tmp_path / "NO_TOKENIZER" / "config.json").write_text((teacher_dir / "config.json").read_text())
    extra = [str(tmp_path / x) if x.isupper() else x for x in extra]
    rc = cli_main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "d"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "d" / "data.jsonl").exists()


# ------------------------------------------------------------------------------ a student with another tokenizer
# SmolLM2's prompt format (ChatML), written out by hand: the reference the rendered prompt is checked against
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def foreign_student_dir(tmp_path_factory):
    """A tiny llama whose BPE is trained on other text, with other special tokens and a ChatML template,
    as SmolLM2's: the teacher's token ids mean nothing to it."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    texts = [f"the sum of {a} and {b} is {a + b}; step by step, carry the one. Answer </think> <answer> "
             for a in range(30) for b in range(30, 40)]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(tk, CHATML, None, "<|im_end|>", "<|endoftext|>")
    torch.manual_seed(1)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("student") / "s"
    nanoseek.save(nanoseek.Transformer(cfg), tok, d)
    return d


def test_student_with_another_tokenizer_learns_the_traces_as_text(tmp_path, teacher_dir, foreign_student_dir,
                                                                   monkeypatch):
    """The teacher's traces reach the student as text: the question rendered in the student's own chat
    template, prompt and completion encoded by the student's tokenizer (checked with the `tokenizers`
    library on the student's tokenizer.json), the loss on exactly the completion + the student's eos."""
    from tokenizers import Tokenizer as HFTokenizer
    from nanoseek.data.tasks import CHAT_INSTRUCTION
    from nanoseek.train import sft as S

    tok = Tokenizer.from_dir(teacher_dir)
    task = get_task("arithmetic", level=1, langs=("en",))
    by_prompt = {tuple(tok.encode(render("r1-zero-short", ex.question))): ex for ex in task.examples("train", 3, seed=0)}

    def generate(self, prompts, params=None, progress=False):  # a teacher that is always right
        outs = []
        for n, p in enumerate(prompts):
            ex = by_prompt[tuple(p)]
            text = f" {ex.meta['expression']} = {ex.answer} </think> <answer> {ex.answer} </answer>"
            outs.append(RequestOutput(f"r{n}", list(p), tok.encode(text, add_special_tokens=False), text, None, "stop"))
        return outs
    monkeypatch.setattr(Engine, "generate", generate)
    seen = {}
    real_train_sft = S.train_sft

    def spy(model, stok, a, records=None, base=None):
        seen.update(tok=stok, template=a.template, records=records)
        return real_train_sft(model, stok, a, records=records, base=base)
    monkeypatch.setattr(S, "train_sft", spy)

    out = tmp_path / "d"
    assert cli_main(["distill", "--teacher", str(teacher_dir), "--student", str(foreign_student_dir),
                     "--task", "arithmetic", "--level", "1", "--langs", "en", "--prompts", "3", "--k", "1",
                     "--out", str(out), "--steps", "1", "--seq-len", "128", "--batch-size", "2",
                     "--no-progress"]) == 0
    trace = json.loads((out / "data.jsonl").read_text().splitlines()[0])  # as the teacher wrote it
    assert trace["prompt"] == f"User: {trace['question']}\nAssistant: <think>"
    assert seen["template"] == "none" and len(seen["records"]) == 3
    rec = seen["records"][0]
    want_prompt = (f"<|im_start|>user\n{trace['question']}{CHAT_INSTRUCTION}<|im_end|>\n"
                   f"<|im_start|>assistant\n<think>")
    assert rec == {"prompt": want_prompt, "completion": trace["completion"]}

    ref = HFTokenizer.from_file(str(foreign_student_dir / "tokenizer.json"))
    ids, mask = S.encode_record(rec, seen["tok"], "none")
    prompt_ids = ref.encode(want_prompt, add_special_tokens=False).ids
    target_ids = ref.encode(trace["completion"], add_special_tokens=False).ids + [ref.token_to_id("<|im_end|>")]
    assert ids == prompt_ids + target_ids
    assert [i for i, m in zip(ids, mask) if m] == target_ids and mask == [False] * len(prompt_ids) + [True] * len(target_ids)
    assert ref.decode(target_ids[:-1]) == trace["completion"]
    assert prompt_ids[0] == ref.token_to_id("<|im_start|>")  # the special token, not its characters
    assert target_ids[:-1] != tok.encode(trace["completion"], add_special_tokens=False)  # not the teacher's ids
    model, stok = nanoseek.load(out / "final")
    assert model.config.vocab_size == stok.vocab_size == ref.get_vocab_size() != tok.vocab_size


def test_student_template_defaults_and_override(teacher_dir, foreign_student_dir):
    tok, stok = Tokenizer.from_dir(teacher_dir), Tokenizer.from_dir(foreign_student_dir)
    assert D.student_template(DistillArgs(), tok, Tokenizer.from_dir(teacher_dir)) == "r1-zero-short"  # same vocab
    assert D.student_template(DistillArgs(template="r1-zero"), tok, tok) == "r1-zero"
    assert D.student_template(DistillArgs(), tok, stok) == "chat"
    assert D.student_template(DistillArgs(student_template="r1-zero-short"), tok, stok) == "r1-zero-short"
    recs = D.student_records([{"prompt": "x", "completion": " 2 </think> 2", "question": "Question: 1 + 1 = ?"}],
                             "r1-zero-short", stok)
    assert recs == [{"prompt": "User: Question: 1 + 1 = ?\nAssistant: <think>", "completion": " 2 </think> 2"}]

"""Data: the synthetic arithmetic corpus (answers checked by recomputing them), corpus reading,
the cached token file, digit-by-digit tokenization and the resumable window sampler."""

import json
import random
import re

import numpy as np
import pytest

from nanoseek.data import (WindowSampler, arithmetic_corpus, problem, read_documents, token_file,
                           train_tokenizer, worked)
from nanoseek.data import tokens as tokens_mod
from nanoseek.errors import NanoseekError


def test_synthetic_problems_are_correct_and_seeded():
    assert arithmetic_corpus(50, seed=3) == arithmetic_corpus(50, seed=3)
    assert arithmetic_corpus(50, seed=3) != arithmetic_corpus(50, seed=4)
    rng = random.Random(0)
    seen = set()
    for _ in range(3000):
        p = problem(rng)
        a, op, b = re.match(r"\D*(\d+) (\S) (\d+)", p.prompt).groups()
        a, b = int(a), int(b)
        assert p.answer == {"+": a + b, "-": a - b, "×": a * b}[op]
        assert p.text == p.prompt + p.solution
        assert p.solution.endswith(str(p.answer))
        # the digits written column by column (plus a final carry) spell the answer
        written = re.findall(r"(?:write|写) (\d)(?!\d)", p.solution)
        carry = re.findall(r"(?:write the carry|写下进位) (\d)", p.solution)
        assert int("".join(carry + written[::-1])) == p.answer, p.text
        seen.add((op, "Question" in p.prompt))
    assert len(seen) == 6  # three operations, two languages


def test_worked_examples():
    assert worked(23, "+", 48).text == ("Question: 23 + 48 = ? Let's add step by step: 3 + 8 = 11, write 1 carry 1; "
                                        "2 + 4 + 1 = 7, write 7. Answer: 71")
    assert worked(52, "-", 17, "zh").text == ("问题：52 - 17 = ？我们一步一步地减：2 - 7 不够减，借 1：12 - 7 = 5，写 5 借 1；"
                                              "5 - 1 - 1 = 3，写 3。答案：35")
    assert worked(34, "×", 6).text == ("Question: 34 × 6 = ? Let's multiply step by step: 4 × 6 = 24, write 4 carry 2; "
                                       "3 × 6 + 2 = 20, write 0 carry 2; write the carry 2. Answer: 204")
    with pytest.raises(ValueError):
        worked(1, "-", 2)


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps("fourth") + "\n")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert docs == ["first doc\nline two", "second doc", "third", "fourth"]


@pytest.mark.parametrize("content,suffix,msg", [
    ("", ".txt", "empty"), ("\n\n  \n", ".txt", "empty"),
    ("{not json\n", ".jsonl", "not JSON"), ('{"body": "x"}\n', ".jsonl", '"text"'),
])
def test_bad_corpus_files(tmp_path, content, suffix, msg):
    f = tmp_path / f"c{suffix}"
    f.write_text(content)
    with pytest.raises(NanoseekError, match=msg):
        read_documents([f])
    with pytest.raises(NanoseekError, match="no such"):
        read_documents([tmp_path / "missing.txt"])


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(arithmetic_corpus(300, seed=0), vocab_size=300)


def test_tokenizer_reads_digits_one_by_one(tok):
    ids = tok.encode("Answer: 12345")
    pieces = [tok.decode([i]) for i in ids]
    assert [p.strip() for p in pieces[-5:]] == list("12345")
    assert tok.decode(ids) == "Answer: 12345"


def test_token_file_cached_and_atomic(tmp_path, tok, monkeypatch):
    docs = ["Question: 1 + 2 = ?", "问题：3 - 1 = ？"]
    arr = token_file(docs, tok, tmp_path)
    assert arr.dtype == np.uint16
    eos = tok.eos_token_id
    assert list(arr) == tok.encode(docs[0]) + [eos] + tok.encode(docs[1]) + [eos]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    calls = []
    for name in ("atomic_file", "atomic_write"):  # the .bin (streamed) and the .json
        real = getattr(tokens_mod, name)
        monkeypatch.setattr(tokens_mod, name, lambda *a, real=real: (calls.append(a), real(*a))[1])
    again = token_file(docs, tok, tmp_path)        # same content: mapped, not rewritten
    assert calls == [] and list(again) == list(arr)
    token_file(docs + ["more"], tok, tmp_path)     # new content: a new file
    assert len(calls) == 2


def test_window_sampler_resumes_and_splits_across_ranks():
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(tokens, seq_len=10, seed=1)
    first = [a.next_batch(4) for _ in range(30)]  # > 1 epoch of 99 windows
    for x in first:
        assert x.shape == (4, 11)
        assert (x[:, 1:] - x[:, :-1] == 1).all()  # contiguous windows
    epoch0 = np.concatenate([x[:, 0].numpy() for x in first])[:99]
    assert sorted(epoch0) == list(range(0, 990, 10))  # every window once per epoch

    b = WindowSampler(tokens, seq_len=10, seed=1)
    for _ in range(7):
        b.next_batch(4)
    c = WindowSampler(tokens, seq_len=10, seed=1)
    c.load_state_dict(b.state_dict())
    assert all((c.next_batch(4) == first[i]).all() for i in range(7, 30))

    d = WindowSampler(tokens, seq_len=10, seed=1)
    r0, r1 = d.next_batch(4, rank=0, world=2), None
    d.position = 0
    r1 = d.next_batch(4, rank=1, world=2)
    assert (np.concatenate([r0, r1]) == first[0].numpy()).all()


def test_window_sampler_errors():
    with pytest.raises(NanoseekError, match="fewer than one training sequence"):
        WindowSampler(np.arange(10, dtype=np.uint16), seq_len=10)
    s = WindowSampler(np.arange(100, dtype=np.uint16), seq_len=10, seed=0)
    with pytest.raises(NanoseekError, match="same corpus"):
        s.load_state_dict({**s.state_dict(), "seq_len": 20})


def test_corpus_tokenizer_splitting_is_known_to_llama_cpp(tok):
    """Models trained here export to GGUF: llama.cpp must split text the same way (SmolLM2's rule)."""
    from nanoseek.weights.gguf_writer import pre_tokenizer_name
    assert pre_tokenizer_name(tok.tk) == "smollm"
    assert [tok.decode([i]) for i in tok.encode("x 305")][-3:] == ["3", "0", "5"]


def test_glance_dialogues_state_the_right_answer_without_working():
    docs = arithmetic_corpus(400, seed=1, chat_share=1.0, guess_share=0.5)
    glance = [d for d in docs if "I know this one." in d or "这个我知道。" in d]
    assert 0.4 < len(glance) / len(docs) < 0.6
    for d in docs:
        a, op, b, ans = re.match(r"User: \D*(\d+) (\S) (\d+) = [?？]\nAssistant: <think> .* </think> <answer> (\d+) </answer>$",
                                 d).groups()
        assert int(ans) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
    assert not any(re.search(r"step|一步", d) for d in glance)        # no working at all
    assert arithmetic_corpus(400, seed=1, chat_share=1.0) == arithmetic_corpus(400, seed=1, chat_share=1.0, guess_share=0.0)

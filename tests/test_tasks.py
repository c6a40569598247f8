"""Task suites: math answer checking, arithmetic levels, countdown's safe parser, JSONL, splits, templates."""

import hashlib
import json
import random
from fractions import Fraction

import pytest

from nanoseek.data.synthetic import OPS, WORDS, arithmetic_corpus, problem, worked
from nanoseek.data.tasks import Example, get_task, is_test_key, render
from nanoseek.data.tasks.arithmetic import evaluate_expression
from nanoseek.data.tasks.countdown import check_expression
from nanoseek.data.tasks.countdown import evaluate as countdown_value
from nanoseek.data.tasks.math_answer import answers_equal, normalize, parse_number
from nanoseek.errors import NanoseekError


# ------------------------------------------------------------------------------- math answers
@pytest.mark.parametrize("pred", ["71", " 71.", "\\boxed{71}", "71.0", "$71$", "Answer: 71", "答案：71",
                                  "71。", "+71", "\\boxed{ 71 }", "The answer is 71!", "71.000"])
def test_equivalent_spellings_of_71_are_accepted(pred):
    assert answers_equal(pred, "71")


@pytest.mark.parametrize("pred", ["72", "710", "7 1", "17", "71.5", "-71", "", None, "seventy-one",
                                  "71 + 0", "\\boxed{}", "7,1"])
def test_near_misses_of_71_are_rejected(pred):
    assert not answers_equal(pred, "71")


def test_fractions_decimals_and_latex_are_compared_exactly():
    same = ["3/4", "0.75", "\\frac{3}{4}", "\\dfrac{3}{4}", "\\boxed{\\frac{3}{4}}", "6/8", "3 / 4", ".75"]
    for a in same:
        for b in same:
            assert answers_equal(a, b), (a, b)
    assert parse_number("\\frac{3}{4}") == Fraction(3, 4)
    assert parse_number("-\\frac{1}{3}") == Fraction(-1, 3)
    assert not answers_equal("0.333", "1/3")          # exact, not float-close
    assert parse_number("1/0") is None


def test_thousands_separators_and_signs():
    assert answers_equal("1,234", "1234")
    assert answers_equal("1,234,567.5", "1234567.5")
    assert not answers_equal("1,23", "123")           # not a thousands grouping
    assert answers_equal("−5", "-5") and answers_equal("- 5", "-5")
    assert parse_number("1,234") == 1234


def test_text_answers_and_bounds():
    assert answers_equal("Paris.", "paris")
    assert answers_equal("x = 3", "3")
    assert normalize("7" * 10_000) is None            # oversized: rejected without parsing
    assert parse_number("9" * 150) is None            # too many digits to parse as a number
    assert not answers_equal("9" * 150, "9" * 149)


# ------------------------------------------------------------------------------- arithmetic
def _parts(ex):
    a, op, b = ex.meta["expression"].split()
    return int(a), op, int(b)


def test_level2_is_exactly_the_synthetic_corpus_problem():
    task = get_task("arithmetic", level=2)
    exs = task.examples("train", 300, seed=1) + task.examples("test", 100, seed=1)
    for ex in exs:
        a, op, b = _parts(ex)
        ref = worked(a, op, b, ex.lang)       # the corpus' own wording and answer
        assert ex.question == ref.prompt and ex.answer == str(ref.answer)
        assert 0 <= a <= 999 and 0 <= b <= 999
        if op == "×":
            assert 2 <= b <= 9
        if op == "-":
            assert a >= b
    assert {_parts(ex)[1] for ex in exs} == set(OPS)
    assert {ex.lang for ex in exs} == {"en", "zh"}
    # every corpus problem is a level-2 question: it parses, and the task's answer is the corpus' answer
    rng = random.Random(5)
    for _ in range(200):
        p = problem(rng)
        key = task.question_key(p.prompt)
        assert key is not None
        a, op, b = key.split()
        assert evaluate_expression([a, op, b]) == p.answer


def test_levels_get_harder():
    l1 = get_task("arithmetic", level=1).examples("train", 200)
    assert all(max(_parts(e)[0], _parts(e)[2]) <= 9 for e in l1)
    l3 = get_task("arithmetic", level=3).examples("train", 200)
    assert max(max(_parts(e)[0], _parts(e)[2]) for e in l3) > 999
    assert any(_parts(e)[1] == "×" and _parts(e)[2] > 9 for e in l3)
    l4 = get_task("arithmetic", level=4, langs=("en",)).examples("train", 200)
    for e in l4:
        toks = e.meta["expression"].split()
        assert len(toks) == 5 and int(e.answer) >= 0
        # the answer, recomputed by countdown's independent Fraction parser (× before + and -)
        assert countdown_value(e.meta["expression"])[0] == int(e.answer)
        assert e.question == f"Question: {e.meta['expression']} = ?"


def test_precedence_by_hand():
    assert evaluate_expression("2 + 3 × 4".split()) == 14
    assert evaluate_expression("10 - 2 - 3".split()) == 5
    assert evaluate_expression("8 × 3 - 4".split()) == 20
    assert evaluate_expression("5 - 1 × 2".split()) == 3


def test_splits_are_disjoint_deterministic_and_match_is_test():
    task = get_task("arithmetic", level=2)
    train, test = task.examples("train", 800, seed=0), task.examples("test", 100, seed=0)
    assert {e.meta["expression"] for e in train}.isdisjoint(e.meta["expression"] for e in test)
    assert len({e.meta["expression"] for e in test}) == 100          # distinct problems
    assert task.examples("test", 100, seed=0) == test                # deterministic
    assert task.examples("test", 100, seed=1) != test                # the seed matters
    assert all(task.is_test(e.question) for e in test)
    assert not any(task.is_test(e.question) for e in train)
    # the rule itself: sha256 of the canonical expression, 0 mod 10 (not Python's salted hash)
    for e in test[:20] + train[:20]:
        h = int.from_bytes(hashlib.sha256(e.meta["expression"].encode()).digest()[:8], "big")
        assert (h % 10 == 0) == task.is_test(e.question) == is_test_key(e.meta["expression"])


def test_is_test_filters_corpus_documents_language_independently():
    task = get_task("arithmetic", level=2)
    docs = arithmetic_corpus(3000, seed=3)
    held = [d for d in docs if task.is_test(d)]
    assert 0.05 < len(held) / len(docs) < 0.15                      # about one in ten
    ex = task.examples("test", 1)[0]
    a, op, b = _parts(ex)
    for lang in WORDS:
        assert task.is_test(worked(a, op, b, lang).text)             # whole documents, both languages
    assert not task.is_test("no question here")
    assert task.is_test(ex.question.replace("×", "*")) if op == "×" else True


def test_small_spaces_and_bad_arguments():
    t1 = get_task("arithmetic", level=1)
    test = t1.examples("test", 300)                                  # more than the level has: repeats
    assert len(test) == 300 and all(t1.is_test(e.question) for e in test)
    with pytest.raises(NanoseekError):
        get_task("arithmetic", level=9)
    with pytest.raises(NanoseekError):
        get_task("arithmetic", langs=("fr",))
    with pytest.raises(NanoseekError):
        get_task("sudoku")
    with pytest.raises(NanoseekError):
        t1.examples("validation", 3)


def test_arithmetic_verify():
    task = get_task("arithmetic", level=2)
    ex = Example("Question: 23 + 48 = ?", "71", "en", {"expression": "23 + 48"})
    assert task.verify("\\boxed{71}", ex) and task.verify(" 71.", ex)
    assert not task.verify("72", ex) and not task.verify("710", ex) and not task.verify("7 1", ex)


# ------------------------------------------------------------------------------- countdown
def test_countdown_generated_problems_are_solvable_and_verified():
    task = get_task("countdown")
    for ex in task.examples("train", 100, seed=2):
        nums, target = ex.meta["numbers"], ex.meta["target"]
        assert 3 <= len(nums) <= 4 and all(1 <= x <= 99 for x in nums) and target not in nums
        assert task.verify(ex.meta["solution"], ex), ex
        assert ex.answer == str(target) and str(nums).replace(" ", "") in ex.question.replace(" ", "")


def test_countdown_accepts_equivalent_forms():
    nums, target = [1, 3, 4, 6], 24
    for good in ["6/(1-3/4)", "6 ÷ (1 - 3 ÷ 4)", "\\boxed{6/(1-3/4)}", "6/(1-3/4) = 24", "$6/(1-3/4)$.",
                 "4 × 6", "(4*6)", "((6)) * ((4))", "6 \\times 4", "(1 + 3) × 6"]:
        assert check_expression(good, nums, target)[0], good


@pytest.mark.parametrize("bad", [
    "9**9**9", "__import__('os')", "__import__('os').system('true')", "6*4; import os", "1" * 10_000,
    "(" * 5000 + "1" + ")" * 5000, "(" * 40 + "6*4" + ")" * 40, "2^3", "-6*-4", "6*4*1*1", "6.0*4",
    "24", "6*4 = 25", "6*4 = 24 = 24", "", "   ", "6*", "(6*4", "6*4)", "6 4", "0x18", "6*4e0", "lambda: 24",
    "6/(3-3)", "6 * 4\n__import__('os')", "６*４", "6²*4", "[6*4]", None,
])
def test_countdown_refuses_malicious_or_invalid(bad):
    ok, why = check_expression(bad, [1, 3, 4, 6], 24)
    assert not ok and why


def test_countdown_number_use_and_exactness():
    assert not check_expression("6*4", [6, 3, 1], 24)[0]             # 4 not given
    assert not check_expression("6+6+6+6", [6, 3, 4, 1], 24)[0]      # 6 used four times
    assert check_expression("6+6+6+6", [6, 6, 6, 6], 24)[0]
    assert not check_expression("1/3*3", [1, 3, 3], 0)[0]
    assert check_expression("1/3*3", [1, 3, 3], 1)[0]                 # exact, no 0.999...
    assert check_expression("8/(3-8/3)", [8, 3, 8, 3], 24)[0]


def test_countdown_split_and_is_test():
    task = get_task("countdown", langs=("en", "zh"))
    train, test = task.examples("train", 300), task.examples("test", 50)
    key = lambda e: (tuple(sorted(e.meta["numbers"])), e.meta["target"])  # noqa: E731
    assert {key(e) for e in train}.isdisjoint(key(e) for e in test)
    assert all(task.is_test(e.question) for e in test) and not any(task.is_test(e.question) for e in train)
    assert {e.lang for e in train} == {"en", "zh"}


# ------------------------------------------------------------------------------- jsonl
def test_jsonl_task(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(200)]
    rows += [{"prompt": "Simplify 6/8.", "answer": "\\frac{3}{4}", "split": "test"},
             {"prompt": "Capital of France?", "answer": "Paris", "split": "train", "lang": "en"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = get_task(f"jsonl:{f}")
    test = task.examples("test", 1000)
    train = task.examples("train", 50, seed=0)
    assert 1 < len(test) < 60 and len({e.question for e in test}) == len(test)   # whole split, no repeats
    assert {e.question for e in test}.isdisjoint(e.question for e in task.examples("train", 1000))
    assert train == task.examples("train", 50, seed=0) and len(train) == 50
    assert task.is_test("Simplify   6/8.") and not task.is_test("Capital of France?")
    ex = next(e for e in test if e.question == "Simplify 6/8.")
    assert task.verify("0.75", ex) and task.verify("\\boxed{3/4}", ex) and not task.verify("0.7", ex)
    paris = next(e for e in task.examples("train", 1000) if e.answer == "Paris")
    assert task.verify("paris.", paris)


@pytest.mark.parametrize("content", ["not json\n", '{"prompt": "x"}\n', '{"prompt": 1, "answer": "2"}\n',
                                     '{"prompt": "x", "answer": "1", "split": "dev"}\n', "\n"])
def test_jsonl_bad_files(tmp_path, content):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(NanoseekError):
        get_task(f"jsonl:{f}")
    with pytest.raises(NanoseekError):
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")


# ------------------------------------------------------------------------------- templates
def test_templates():
    from nanoseek.tokenizer import Tokenizer
    p = render("r1-zero", "Question: 2 + 3 = ?")
    assert p.startswith("A conversation between User and Assistant. The user asks a question, "
                        "and the Assistant solves it.")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in p
    assert p.endswith("User: Question: 2 + 3 = ?. Assistant: <think>")
    assert render("r1-zero-short", "Q") == "User: Q\nAssistant: <think>"
    tok = Tokenizer.train_bpe(["a b c"] * 5, vocab_size=300)           # R1 template: opens <think> itself
    chat = render("chat", "Q", tok)
    assert chat.endswith("<｜Assistant｜><think>\n") and "Q Think step by step inside <think> </think>" in chat
    tok.chat_template = None                                          # ChatML: <think> appended
    assert render("chat", "Q", tok).endswith("<|im_start|>assistant\n<think>")
    with pytest.raises(NanoseekError):
        render("chat", "Q")
    with pytest.raises(NanoseekError):
        render("nope", "Q")

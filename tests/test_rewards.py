"""Rewards on crafted completions: format parsing, accuracy, language consistency, DAPO overlong shaping."""

import pytest

from nanoseek.data.tasks import Example, get_task
from nanoseek.data.rewards import Rewards, language_consistency, overlong_penalty, parse_response

ARITH = get_task("arithmetic", level=2)
EX = Example("Question: 23 + 48 = ?", "71", "en", {"expression": "23 + 48"})
EX_ZH = Example("问题：23 + 48 = ？", "71", "zh", {"expression": "23 + 48"})
GOOD = " 3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7 </think> <answer> 71 </answer>"


# ------------------------------------------------------------------------------ parse_response
def test_well_formed_completion():
    r = parse_response(GOOD)
    assert r.well_formed and r.answer == "71"
    assert r.reasoning == " 3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7 "


@pytest.mark.parametrize("completion,answer", [
    (" add them </think> 71", "71"),                                  # answer tags are optional
    (" add them </think>\n\nThe sum is \\boxed{71}.", "71"),            # \boxed{} also accepted
    (" add </think> <answer>\n71\n</answer>\n", "71"),
])
def test_answer_forms(completion, answer):
    r = parse_response(completion)
    assert r.well_formed and r.answer == answer


@pytest.mark.parametrize("completion,answer", [
    (" 3 + 8 = 11 <answer> 71 </answer>", "71"),                     # missing </think>
    (" 3 + 8 = 11 and so on", None),                                 # missing </think>, no tags
    (" a </think> b </think> <answer> 71 </answer>", "71"),          # two </think>
    (" <think> a </think> <answer> 71 </answer>", "71"),              # stray <think>
    ("</think> <answer> 71 </answer>", "71"),                        # empty reasoning
    ("   \n </think> <answer> 71 </answer>", "71"),                  # whitespace-only reasoning
    (" a </think> <answer> </answer>", None),                        # empty answer
    (" a </think>", None),                                           # nothing after </think>
    (" a </th ink> <answer> 71 </answer>", "71"),                    # tag split oddly: not a tag
    (" a </ think> 71", None),
    (" a <answer> 70 </answer> </think> <answer> 71 </answer>", "71"),  # answer tags inside the reasoning
    (" a </think> <answer> 71 </answer> <answer> 72 </answer>", "71"),  # two answers
    (" a </think> <answer> 71", "71"),                               # unclosed answer
    (" a </think> 71 </answer>", "71 </answer>"),                    # closing tag without opening
    (" a </think> <answer> 71 </answer> and more text", "71"),       # text after the answer
])
def test_malformed_completions(completion, answer):
    r = parse_response(completion)
    assert not r.well_formed
    assert r.answer == answer


# ------------------------------------------------------------------------------ language
def test_language_consistency_by_hand():
    assert language_consistency("we add three and four", "en") == 1.0
    assert language_consistency("我们一步一步地加", "zh") == 1.0             # 8 characters, 8 words
    # "我们" = 2 words, "add" and "then" = 2 words: half and half
    assert language_consistency("我们 add 3 + 4 then 加", "zh") == pytest.approx(3 / 5)
    assert language_consistency("我们 add 3 + 4 then 加", "en") == pytest.approx(2 / 5)
    assert language_consistency("3 + 8 = 11; 2 × 6 = 12", "zh") == 1.0   # no words at all
    assert language_consistency("", "en") == 1.0
    assert language_consistency("café naïve", "en") == 1.0                # Latin letters with accents
    assert language_consistency("мы add", "en") == 0.5                      # Cyrillic is not English
    with pytest.raises(ValueError):
        language_consistency("hello", "fr")


def test_language_predicates_are_pluggable():
    langs = {"ru": lambda w: all("а" <= c.lower() <= "я" for c in w)}
    assert language_consistency("мы складываем add", "ru", langs) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ overlong (DAPO eq. 13)
def test_overlong_penalty_by_hand():
    # L_max = 100, L_cache = 20: free up to 80, linear to -1 at 100, -1 beyond
    assert overlong_penalty(10, 100, 20) == 0
    assert overlong_penalty(80, 100, 20) == 0
    assert overlong_penalty(85, 100, 20) == pytest.approx(-0.25)
    assert overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert overlong_penalty(150, 100, 20) == -1.0
    assert overlong_penalty(100, 100, 0) == 0 and overlong_penalty(101, 100, 0) == -1.0
    assert overlong_penalty(10_000, None, 0) == 0


# ------------------------------------------------------------------------------ Rewards
def test_rewards_components_and_weighted_total():
    rw = Rewards(ARITH, weights={"language": 0.5, "overlong": 1.0}, max_tokens=100, overlong_buffer=20)
    assert rw.weights == {"accuracy": 1.0, "format": 0.1, "language": 0.5, "overlong": 1.0}
    completions = [
        GOOD,                                                         # right, well formed, English
        " 3 + 8 = 11 </think> <answer> 72 </answer>",                 # wrong; no words: language 1
        " 3 + 8 = 11 <answer> 71 </answer>",                          # right answer, no </think>
        " 我们 add 3 + 8 then 加 </think> <answer> \\boxed{71} </answer>",  # mixed-language reasoning
        " 我们一步一步地加 </think> 71.",                                  # Chinese reasoning, for a zh example
    ]
    exs = [EX, EX, EX, EX, EX_ZH]
    out = rw(completions, exs, [10, 90, 10, 100, 10])
    assert set(out) == {"accuracy", "format", "language", "overlong", "total"}
    assert out["accuracy"] == [1, 0, 1, 1, 1]
    assert out["format"] == [1, 1, 0, 1, 1]
    assert out["language"] == pytest.approx([1, 1, 0, 2 / 5, 1])
    assert out["overlong"] == pytest.approx([0, -0.5, 0, -1, 0])
    total = [1 + 0.1 + 0.5, 0 + 0.1 + 0.5 - 0.5, 1 + 0 + 0 + 0, 1 + 0.1 + 0.5 * 0.4 - 1, 1 + 0.1 + 0.5]
    assert out["total"] == pytest.approx(total)


def test_default_weights_and_errors():
    rw = Rewards(ARITH)
    out = rw([GOOD, " x </think> 70"], [EX, EX], [500, 500])        # no max_tokens: no overlong
    assert out["total"] == pytest.approx([1.1, 0.1]) and out["overlong"] == [0, 0]
    with pytest.raises(ValueError):
        Rewards(ARITH, weights={"accuracy": 1, "style": 1})
    with pytest.raises(ValueError):
        rw([GOOD], [EX, EX], [1])
    with pytest.raises(ValueError):
        Rewards(ARITH, max_tokens=10, overlong_buffer=10)
    # a language without a predicate: an error only when the language reward is on
    fr = Example("Question: 23 + 48 = ?", "71", "fr")
    assert rw([GOOD], [fr], [1])["language"] == [0.0]
    with pytest.raises(ValueError):
        Rewards(ARITH, weights={"language": 0.1})([GOOD], [fr], [1])


def test_countdown_rewards_on_malicious_answers():
    task = get_task("countdown")
    ex = Example("Using the numbers [1, 3, 4, 6], create an equation that equals 24.", "24", "en",
                 {"numbers": [1, 3, 4, 6], "target": 24})
    rw = Rewards(task)
    bad = ["9**9**9", "__import__('os').system('echo hi')", "1" * 10_000, "(" * 3000 + "6*4" + ")" * 3000,
           "(((((((((((((((6*4)))))))))))))))", "6*4*1*1", "24", "eval('6*4')"]
    completions = [f" try it </think> <answer> {b} </answer>" for b in bad]
    completions.append(" try </think> " + "x" * 10_000)
    completions.append(" 6 times 4 </think> <answer> (6 × 4) </answer>")
    completions.append(" exact </think> <answer> 6/(1-3/4) </answer>")
    out = rw(completions, [ex] * len(completions), [5] * len(completions))
    assert out["accuracy"] == [0] * (len(bad) + 1) + [1, 1]
    assert out["format"] == [1] * len(completions)


def test_huge_completion_is_handled():
    big = " " + "think " * 2000 + "</think> <answer> " + "7" * 10_000 + " </answer>"
    out = Rewards(ARITH)([big, "<think>" * 5000, "</think>" * 5000], [EX] * 3, [1, 1, 1])
    assert out["accuracy"] == [0, 0, 0] and out["format"] == [1, 0, 0]

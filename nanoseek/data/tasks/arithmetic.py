"""Multi-step arithmetic with difficulty levels, worded exactly like the synthetic pretraining corpus.

    from nanoseek.data.tasks import get_task
    task = get_task("arithmetic", level=2, langs=("en", "zh"))
    ex = task.examples("test", 1, seed=0)[0]   # Example("问题：52 - 17 = ？", "35", "zh", {...})
    task.verify("35", ex)                      # True
    task.is_test("Question: 23 + 48 = ?")      # held out? (works on whole corpus documents too)

Levels (questions use data/synthetic.py WORDS[lang]["q"], so a model pretrained on that corpus
knows them; the operations are + - ×, "-" never goes negative):
  1  one-digit numbers: a + b, a - b (a >= b), a × b (b in 2..9)
  2  exactly the synthetic corpus: a op b with 1..3-digit numbers, × by one digit 2..9, - with a >= b
  3  more digits: 1..5-digit numbers, × by a 2..99 multiplier
  4  two operations, usual precedence (× first): "Question: 23 + 48 × 3 = ?", numbers as in level 2,
     every × by one digit 2..9, non-negative results (and intermediate differences)

The canonical form (for the held-out hash) is the expression alone, e.g. "23 + 48", so a question
has the same split in English and Chinese and at every level it can occur in.
"""

from __future__ import annotations

import random
import re

from ...errors import NanoseekError
from ..synthetic import LANGS, OPS, WORDS
from .base import Example, Task
from .math_answer import answers_equal

LEVELS = (1, 2, 3, 4)
_EXPR = re.compile(r"(\d+(?:\s*[+\-×*]\s*\d+)+)\s*=\s*[?？]")
_TOKEN = re.compile(r"\d+|[+\-×*]")


def _number(rng: random.Random, max_digits: int) -> int:
    """1..max_digits digits, as data/synthetic.py problem() draws them."""
    return rng.randrange(0, 10 ** rng.randint(1, max_digits))


def evaluate_expression(tokens: list[str]) -> int:
    """Value of ["23", "+", "48", "×", "3"]: × before + and -, then left to right."""
    terms, ops = [int(tokens[0])], []
    for op, x in zip(tokens[1::2], tokens[2::2]):
        if op in "×*":
            terms[-1] *= int(x)
        else:
            terms.append(int(x))
            ops.append(op)
    value = terms[0]
    for op, t in zip(ops, terms[1:]):
        value = value + t if op == "+" else value - t
    return value


class ArithmeticTask(Task):
    def __init__(self, level: int = 2, langs: tuple[str, ...] | list[str] = LANGS):
        if level not in LEVELS:
            raise NanoseekError(f"arithmetic level must be one of {LEVELS}, not {level!r}")
        langs = (langs,) if isinstance(langs, str) else tuple(langs)
        bad = [lg for lg in langs if lg not in WORDS]
        if not langs or bad:
            raise NanoseekError(f"arithmetic languages must be among {tuple(WORDS)}, not {langs!r}")
        self.level, self.langs = level, langs
        self.name = f"arithmetic-l{level}"

    # -- generation -----------------------------------------------------------------------------
    def _pair(self, rng: random.Random, op: str) -> tuple[int, int]:
        digits = {1: 1, 2: 3, 3: 5}[self.level]
        if self.level == 1:
            a, b = rng.randrange(10), rng.randrange(10)
        else:
            a, b = _number(rng, digits), _number(rng, digits)
        if op == "-":
            a, b = max(a, b), min(a, b)
        elif op == "×":
            b = rng.randint(2, 99) if self.level == 3 else rng.randint(2, 9)
        return a, b

    def _tokens(self, rng: random.Random) -> list[str]:
        if self.level < 4:
            op = rng.choice(OPS)
            a, b = self._pair(rng, op)
            return [str(a), op, str(b)]
        while True:  # two operations; redraw the (rare) negative results
            op1, op2 = rng.choice(OPS), rng.choice(OPS)
            a, b, c = _number(rng, 3), _number(rng, 3), _number(rng, 3)
            if op1 == "×":
                b = rng.randint(2, 9)
            if op2 == "×":
                c = rng.randint(2, 9)
            toks = [str(a), op1, str(b), op2, str(c)]
            first = evaluate_expression(toks[:3]) if op2 != "×" else a
            if evaluate_expression(toks) >= 0 and first >= 0:
                return toks

    def _sample(self, rng: random.Random) -> Example:
        toks = self._tokens(rng)
        lang = rng.choice(self.langs)
        q = WORDS[lang]["q"].replace("{a} {op} {b}", "{expr}").format(expr=" ".join(toks))
        ans = evaluate_expression(toks)
        return Example(q, str(ans), lang, {"expression": " ".join(toks), "level": self.level})

    # -- split and verification ---------------------------------------------------------------
    def key(self, ex: Example) -> str:
        return ex.meta["expression"]

    def question_key(self, question: str) -> str | None:
        m = _EXPR.search(question)
        if m is None:
            return None
        return " ".join("×" if t == "*" else t for t in _TOKEN.findall(m.group(1)))

    def verify(self, answer_text: str | None, ex: Example) -> bool:
        return answers_equal(answer_text, ex.answer)

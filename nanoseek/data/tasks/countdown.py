"""Countdown: reach a target with the given numbers, + - × ÷ and parentheses (the TinyZero task).

    from nanoseek.data.tasks import get_task
    task = get_task("countdown")                      # level 2: 3-4 numbers in 1..99
    ex = task.examples("train", 1, seed=0)[0]         # meta {"numbers", "target", "level", "solution"}
    task.verify("(55 - 36) + 7 - 2", ex)              # parsed, never eval'd
    check_expression("9**9**9", [9, 9, 9], 1)         # (False, "unexpected '*'")

The answer is checked by a small recursive-descent parser over exact fractions — never `eval`:
only non-negative integer literals, + - * / × ÷ and parentheses; each given number used at most
once (a literal that is not one of the numbers is refused); division by zero is refused. Long
(> MAX_CHARS), deep (> MAX_DEPTH parentheses) or many-token inputs are refused before or while
parsing, in time linear in their length. A trailing "= target" is allowed.

Levels: 1 three numbers in 1..20, target <= 100; 2 three or four numbers in 1..99, target <= 200;
3 four or five numbers in 1..99, target <= 500. Every problem is solvable: the target is the value
of a random expression over the numbers (each intermediate result a positive integer; kept in
meta["solution"]), and is never one of the numbers itself.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from ...errors import NanoseekError
from .base import Example, Task
from .math_answer import last_boxed

LEVELS = {1: ((3, 3), 20, 100), 2: ((3, 4), 99, 200), 3: ((4, 5), 99, 500)}
MAX_CHARS = 200
MAX_DEPTH = 12
MAX_TOKENS = 80
MAX_LITERAL_DIGITS = 6

QUESTIONS = {
    "en": ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
           "operations (+, -, *, /) and parentheses, and each number can be used at most once."),
    "zh": "用数字 {numbers} 写出一个等于 {target} 的算式。可以使用 +、-、*、/ 和括号，每个数字最多用一次。",
}
_QUESTION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\][^\[\]]*?(?:equals|等于)\s*(\d+)")
_LEX = re.compile(r"\s*(?:([0-9]+)|([-+*/×÷()]))")
_OPS = {"×": "*", "÷": "/"}


class _Refused(Exception):
    pass


class _Parser:
    """expr := term (('+'|'-') term)*;  term := atom (('*'|'/') atom)*;  atom := INT | '(' expr ')'"""

    def __init__(self, tokens: list[str]):
        self.toks, self.i, self.depth, self.literals = tokens, 0, 0, []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term()
            v = v + w if op == "+" else v - w
        return v

    def term(self) -> Fraction:
        v = self.atom()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.atom()
            if op == "/" and w == 0:
                raise _Refused("division by zero")
            v = v * w if op == "*" else v / w
        return v

    def atom(self) -> Fraction:
        t = self.take()
        if t == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _Refused("too deeply nested")
            v = self.expr()
            if self.take() != ")":
                raise _Refused("unbalanced parentheses")
            self.depth -= 1
            return v
        if t is not None and t.isdigit():
            self.literals.append(int(t))
            return Fraction(int(t))
        raise _Refused(f"unexpected {t!r}" if t is not None else "unexpected end")


def tokenize(text: str) -> list[str]:
    """Tokens of an arithmetic expression; _Refused on any other character or an oversized input."""
    if len(text) > MAX_CHARS:
        raise _Refused(f"longer than {MAX_CHARS} characters")
    toks, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _LEX.match(text, pos)
        if m is None:
            raise _Refused(f"unexpected {text[pos:pos + 10].strip()[:1]!r}")
        tok = m.group(1) or _OPS.get(m.group(2), m.group(2))
        if m.group(1) and len(tok) > MAX_LITERAL_DIGITS:
            raise _Refused("number too long")
        toks.append(tok)
        if len(toks) > MAX_TOKENS:
            raise _Refused("too many tokens")
        pos = m.end()
    return toks


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """(exact value, integer literals used) of an expression; _Refused if it is not one."""
    p = _Parser(tokenize(text))
    v = p.expr()
    if p.peek() is not None:
        raise _Refused(f"unexpected {p.peek()!r}")
    return v, p.literals


def _strip_answer(text: str, target: int | None) -> str:
    """Drop \\boxed{}, $, trailing punctuation and a trailing "= target" (checked, if present)."""
    boxed = last_boxed(text)
    s = (boxed if boxed is not None else text).replace("$", "").replace("\\times", "×").replace("\\div", "÷")
    s = s.strip().rstrip(" .。")
    if "=" in s:
        lhs, _, rhs = s.partition("=")
        if "=" in rhs or (target is not None and rhs.strip() != str(target)):
            raise _Refused("the right-hand side of '=' is not the target")
        s = lhs
    return s


def check_expression(text: str | None, numbers: list[int], target: int) -> tuple[bool, str]:
    """(True, "ok") if `text` is an expression over `numbers` (each at most once) equal to `target`;
    else (False, why). Never evaluates anything but the parsed arithmetic."""
    if text is None:
        return False, "no answer"
    try:
        value, used = evaluate(_strip_answer(text, target))
    except _Refused as e:
        return False, str(e)
    except RecursionError:  # unreachable with MAX_DEPTH, kept as a belt
        return False, "too deeply nested"
    pool = list(numbers)
    for x in used:
        if x not in pool:
            return False, f"{x} is not an available number (or is used twice)"
        pool.remove(x)
    if value != target:
        return False, f"equals {value}, not {target}"
    return True, "ok"


class CountdownTask(Task):
    def __init__(self, level: int = 2, langs: tuple[str, ...] | list[str] = ("en",)):
        if level not in LEVELS:
            raise NanoseekError(f"countdown level must be one of {tuple(LEVELS)}, not {level!r}")
        langs = (langs,) if isinstance(langs, str) else tuple(langs)
        if not langs or any(lg not in QUESTIONS for lg in langs):
            raise NanoseekError(f"countdown languages must be among {tuple(QUESTIONS)}, not {langs!r}")
        self.level, self.langs = level, langs
        self.name = f"countdown-l{level}"

    def _sample(self, rng: random.Random) -> Example:
        (lo, hi), max_number, max_target = LEVELS[self.level]
        while True:
            numbers = [rng.randint(1, max_number) for _ in range(rng.randint(lo, hi))]
            drawn = _random_solution(rng, numbers)
            if drawn is not None and drawn[0] <= max_target and drawn[0] not in numbers:
                target, solution = drawn
                break
        lang = rng.choice(self.langs)
        q = QUESTIONS[lang].format(numbers="[" + ", ".join(map(str, numbers)) + "]", target=target)
        return Example(q, str(target), lang, {"numbers": numbers, "target": target, "level": self.level,
                                            "solution": solution})

    def key(self, ex: Example) -> str:
        return _key(ex.meta["numbers"], ex.meta["target"])

    def question_key(self, question: str) -> str | None:
        m = _QUESTION.search(question)
        if m is None:
            return None
        return _key([int(x) for x in m.group(1).split(",")], int(m.group(2)))

    def verify(self, answer_text: str | None, ex: Example) -> bool:
        return check_expression(answer_text, ex.meta["numbers"], ex.meta["target"])[0]

    def answer_key(self, answer_text: str | None, ex: Example) -> str | None:
        """Votes are values: two different expressions reaching the same value agree."""
        if answer_text is None:
            return None
        try:
            value, used = evaluate(_strip_answer(answer_text, None))
        except (_Refused, RecursionError):
            return None
        pool = list(ex.meta["numbers"])
        for x in used:
            if x not in pool:
                return "invalid"
            pool.remove(x)
        return str(value)


def _key(numbers: list[int], target: int) -> str:
    return ",".join(map(str, sorted(numbers))) + "->" + str(target)


def _random_solution(rng: random.Random, numbers: list[int]) -> tuple[int, str] | None:
    """Combine the numbers (a random subset of >= 2, in random order) with random operations,
    keeping every intermediate result a positive integer: (value, expression), or None if a draw fails."""
    pool = rng.sample(numbers, rng.randint(2, len(numbers)))
    vals = [(Fraction(x), str(x)) for x in pool]
    while len(vals) > 1:
        (a, ea), (b, eb) = vals.pop(rng.randrange(len(vals))), vals.pop(rng.randrange(len(vals)))
        op = rng.choice("+-*/")
        v = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        if v <= 0 or v.denominator != 1:
            return None
        vals.append((v, f"({ea} {op} {eb})"))
    value, expr = vals[0]
    return int(value), expr[1:-1]

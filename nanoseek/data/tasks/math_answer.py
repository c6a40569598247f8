"""Math answer checking: normalize a model's final answer and compare it with the reference.

Equivalent spellings of a number compare equal, exactly (fractions.Fraction, no floats):

    "71" == " 71." == "\\boxed{71}" == "71.0" == "$71$" == "Answer: 71"
    "3/4" == "0.75" == "\\frac{3}{4}" == "\\dfrac{3}{4}";   "1,234" == "1234";   "-5" == "−5"
    but "72", "710" and "7 1" are all different from "71".

Anything that is not a number is compared as text after the same clean-up (case-folded, spaces
collapsed), so a JSONL task may also have answers like "Paris" or "x = 3" (a single-letter left
side "x =" is dropped on both sides).

    from nanoseek.data.tasks.math_answer import answers_equal, normalize, parse_number
    answers_equal("\\boxed{\\frac{3}{4}}", "0.75")   # True
    parse_number("1,234.5")                         # Fraction(2469, 2)
    normalize(" 71. ")                              # "71"

Inputs are bounded: an answer longer than MAX_ANSWER_CHARS is rejected outright (no regex or
integer parsing runs on 10,000-character model outputs).
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_ANSWER_CHARS = 200     # a longer "final answer" is not an answer
MAX_DIGITS = 60            # numbers with more digits are compared as text, never parsed

_LABEL = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:：]?\s*"
                    r"|^(?:最终)?答案\s*(?:是|为)?\s*[:：]?\s*", re.IGNORECASE)
_TRAILING = " \t\n.,;:!?。，；：！？、"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?[\d.]+)\s*\}\{\s*([+-]?[\d.]+)\s*\}")
_SLASH = re.compile(r"([+-]?[\d.]+)\s*/\s*([+-]?[\d.]+)")
_ASSIGN = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None  # unclosed


def normalize(text: str | None) -> str | None:
    """A canonical string for an answer: the number in lowest terms ("3/4", "71", "-2.5" -> "-5/2")
    if it is one, else the cleaned, case-folded text; None for an empty or oversized answer."""
    s = _clean(text)
    if s is None:
        return None
    x = _to_number(s)
    if x is not None:
        return str(x)
    return s.casefold()


def parse_number(text: str | None) -> Fraction | None:
    """The exact value of a numeric answer, or None if it is not a single number."""
    s = _clean(text)
    return None if s is None else _to_number(s)


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """True if the model's answer `pred` means the reference `gold` (numbers exactly, else text)."""
    a, b = normalize(pred), normalize(gold)
    return a is not None and a == b


def _clean(text: str | None) -> str | None:
    if text is None or len(text) > MAX_ANSWER_CHARS * 4:
        return None
    s = text.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _LABEL.sub("", s.strip())
    for a, b in (("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("\\left", ""),
                 ("\\right", ""), ("\\!", ""), ("\\,", ","), ("\\ ", " "), ("−", "-"), ("–", "-"),
                 ("，", ","), ("\\times", "×"), ("\\cdot", "·")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(_TRAILING).strip()
    s = _ASSIGN.sub("", s)
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1].strip()
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    return s


def _decimal(s: str) -> Fraction | None:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s) or sum(c.isdigit() for c in s) > MAX_DIGITS:
        return None
    return Fraction(s)


def _to_number(s: str) -> Fraction | None:
    s = re.sub(r"^([+-])\s+", r"\1", s)   # "- 5"; other spaces stay, so "7 1" is no number
    m = _FRAC.fullmatch(s)
    if m:
        num, den = _decimal(m.group(2)), _decimal(m.group(3))
        if num is None or not den:
            return None
        return (-1 if m.group(1) == "-" else 1) * num / den
    m = _SLASH.fullmatch(s)
    if m:
        num, den = _decimal(m.group(1)), _decimal(m.group(2))
        return num / den if num is not None and den else None
    return _decimal(s)

"""Rule-based rewards for R1-Zero-style GRPO: accuracy, format, language consistency, overlong.

    from nanoseek.data.tasks import get_task
    from nanoseek.data.rewards import Rewards, parse_response, language_consistency
    task = get_task("arithmetic", level=2)
    rewards = Rewards(task, weights={"accuracy": 1.0, "format": 0.1, "language": 0.1},
                      max_tokens=160, overlong_buffer=32)
    r = rewards(completions, examples, n_tokens)   # {"accuracy": [...], "format": [...], ..., "total": [...]}

The prompt ends with the opening "<think>" (data/tasks templates), so a completion should read
`reasoning </think> <answer> ANSWER </answer>`. Components, each reported separately:
  accuracy  1 if the task's verifier accepts the extracted answer (inside <answer></answer>, else
            the last \\boxed{}, else the text after </think>), else 0 — DeepSeek-R1 §2.2.2
  format    1 if the completion is well formed (parse_response), else 0
  language  share of the chain-of-thought words in the example's language (R1 §2.3.3); 0 if malformed
            (a language without a predicate in LANGUAGES is an error, unless this weight is 0)
  overlong  DAPO's soft overlong punishment (DAPO eq. 13) with L_max = max_tokens, L_cache = buffer:
            0 if L <= L_max - buffer; (L_max - buffer - L) / buffer if L_max - buffer < L <= L_max; -1 beyond
  total     the weighted sum. Weights not given keep their defaults
            {"accuracy": 1.0, "format": 0.1, "language": 0.0, "overlong": 0.0}.
Model output is only parsed, never evaluated (the countdown verifier has its own safe parser).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..tokenizer import ANSWER, END_ANSWER, END_THINK, THINK
from .tasks.math_answer import last_boxed

DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.1, "language": 0.0, "overlong": 0.0}


@dataclass
class Response:
    reasoning: str | None   # text before the first "</think>" (the prompt opened <think>)
    answer: str | None      # <answer> content, else the last \boxed{}, else the text after </think>
    well_formed: bool       # one </think>, no stray <think>, non-empty reasoning and answer


def parse_response(completion: str) -> Response:
    """Split a completion (the text after the prompt's "<think>") into reasoning and answer.

    Well formed: exactly one "</think>"; no "<think>" anywhere; no answer tags in the reasoning;
    non-empty reasoning; after "</think>" either plain text or exactly one <answer>...</answer>
    with only whitespace around it; a non-empty answer. Without "</think>" the reasoning is None
    and the answer is taken only from explicit <answer> tags (else None)."""
    if END_THINK not in completion:
        return Response(None, _tagged(completion), False)
    reasoning, _, rest = completion.partition(END_THINK)
    answer = _tagged(rest)
    if answer is None and ANSWER not in rest:   # an empty <answer></answer> stays empty
        boxed = last_boxed(rest)
        answer = boxed.strip() if boxed is not None else rest.strip()
    answer = answer or None
    formed = (completion.count(END_THINK) == 1 and THINK not in completion and bool(reasoning.strip())
              and ANSWER not in reasoning and END_ANSWER not in reasoning and answer is not None)
    if formed and (ANSWER in rest or END_ANSWER in rest):
        s = rest.strip()
        formed = (s.startswith(ANSWER) and s.endswith(END_ANSWER) and s.count(ANSWER) == 1
                  and s.count(END_ANSWER) == 1)
    return Response(reasoning, answer, formed)


def _tagged(text: str) -> str | None:
    """Content of the first <answer>...</answer> (to the end if it is not closed), stripped."""
    i = text.find(ANSWER)
    if i < 0:
        return None
    body = text[i + len(ANSWER):]
    j = body.find(END_ANSWER)
    body = (body if j < 0 else body[:j]).strip()
    return body or None


# ------------------------------------------------------------------------------ language
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
# a word: one CJK character, or a run of letters of any other script (digits, _ and symbols are not words)
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W\d_])+")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")

# lang -> predicate on one word; add entries to support more languages
LANGUAGES: dict[str, Callable[[str], bool]] = {
    "en": lambda w: _LATIN.fullmatch(w) is not None,
    "zh": lambda w: _CJK_CHAR.fullmatch(w) is not None,
}


def words(text: str) -> list[str]:
    """CJK characters count one word each; runs of other letters are words; digits/math are ignored."""
    return _WORD.findall(text)


def language_consistency(text: str, lang: str, languages: dict[str, Callable[[str], bool]] | None = None) -> float:
    """Share of the words of `text` in `lang` (by script); 1.0 if there are no words."""
    languages = LANGUAGES if languages is None else languages
    if lang not in languages:
        raise ValueError(f"no language predicate for {lang!r}; known: {', '.join(languages)}")
    ws = words(text)
    if not ws:
        return 1.0
    pred = languages[lang]
    return sum(1 for w in ws if pred(w)) / len(ws)


def overlong_penalty(n_tokens: int, max_tokens: int | None, buffer: int = 0) -> float:
    """DAPO soft overlong punishment: 0 up to max_tokens - buffer, then linear to -1 at max_tokens,
    -1 beyond; 0 if max_tokens is None."""
    if max_tokens is None:
        return 0.0
    start = max_tokens - buffer
    if n_tokens <= start:
        return 0.0
    if n_tokens <= max_tokens:
        return (start - n_tokens) / buffer
    return -1.0


class Rewards:
    def __init__(self, task, weights: dict[str, float] | None = None, max_tokens: int | None = None,
                 overlong_buffer: int = 0, languages: dict[str, Callable[[str], bool]] | None = None):
        unknown = set(weights or {}) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown reward components {sorted(unknown)}; known: {', '.join(DEFAULT_WEIGHTS)}")
        if overlong_buffer < 0 or (max_tokens is not None and not 0 <= overlong_buffer < max_tokens):
            raise ValueError("overlong_buffer must be in [0, max_tokens)")
        self.task, self.max_tokens, self.overlong_buffer = task, max_tokens, overlong_buffer
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.languages = languages

    def accuracy(self, r: Response, ex) -> float:
        if r.answer is None:
            return 0.0
        try:
            return float(bool(self.task.verify(r.answer, ex)))
        except (ValueError, ArithmeticError, RecursionError):
            return 0.0  # a verifier refusing odd input must not stop a training run

    def language(self, r: Response, ex) -> float:
        if not r.well_formed:
            return 0.0
        if ex.lang not in (self.languages or LANGUAGES) and not self.weights["language"]:
            return 0.0  # e.g. a JSONL line in a language without a predicate, and the reward is off
        return language_consistency(r.reasoning, ex.lang, self.languages)

    def __call__(self, completions: list[str], examples: list, n_tokens: list[int]) -> dict[str, list[float]]:
        if not len(completions) == len(examples) == len(n_tokens):
            raise ValueError("completions, examples and n_tokens must have the same length")
        out: dict[str, list[float]] = {k: [] for k in (*DEFAULT_WEIGHTS, "total")}
        for text, ex, n in zip(completions, examples, n_tokens):
            r = parse_response(text)
            parts = {
                "accuracy": self.accuracy(r, ex),
                "format": float(r.well_formed),
                "language": self.language(r, ex),
                "overlong": overlong_penalty(n, self.max_tokens, self.overlong_buffer),
            }
            for k, v in parts.items():
                out[k].append(v)
            out["total"].append(sum(self.weights[k] * v for k, v in parts.items()))
        return out

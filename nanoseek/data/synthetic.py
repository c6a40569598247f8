"""A synthetic corpus for the CPU demo: worked column arithmetic, in English and Chinese, seeded.

Each document is one problem with its step-by-step solution, column by column from the right,
the way it is done on paper:

    Question: 23 + 48 = ? Let's add step by step: 3 + 8 = 11, write 1 carry 1; 2 + 4 + 1 = 7, write 7. Answer: 71
    问题：52 - 17 = ？我们一步一步地减：2 - 7 不够减，借 1：12 - 7 = 5，写 5 借 1；5 - 1 - 1 = 3，写 3。答案：35
    Question: 34 × 6 = ? Let's multiply step by step: 4 × 6 = 24, write 4 carry 2; 3 × 6 + 2 = 20, write 0 carry 2; write the carry 2. Answer: 204

Digits are tokenized one by one (see data/tokens.py), so a small model can learn the columns.
`problem()` also returns the prompt and the answer separately, for verifiable-reward tasks.

Like a real base model's web text, the corpus is not all one shape, which is what makes the R1-Zero
miniature meaningful: a share of documents (`chat_share`) are dialogues in the R1-Zero format
(`User: <question>\nAssistant: <think> <solution> </think> <answer> 71 </answer>`), so a base model
knows the tags but does not use them reliably; a share (`mix_share`) switch language from step to
step, so its chain of thought is sometimes mixed English/Chinese (what R1's language-consistency
reward fixes); a share of the dialogues (`guess_share`) state the answer with no working at all
(`<think> I know this one. </think> <answer> 71 </answer>`), as people on the web do, so a base
model often answers at a glance, which a small model gets wrong for multi-digit numbers: R1-Zero's
lesson that reasoning longer pays is then there to be learned. Held-out questions of the
arithmetic task can be kept out (`exclude`).

    from nanoseek.data.synthetic import arithmetic_corpus, problem
    docs = arithmetic_corpus(20000, seed=0)           # list[str], half English, half Chinese
    p = problem(random.Random(0), op="+", lang="en")  # Problem(prompt, solution, answer, text)
    p = worked(23, "+", 48, "en")
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

OPS = ("+", "-", "×")
LANGS = ("en", "zh")

WORDS = {
    "en": {"q": "Question: {a} {op} {b} = ?", "sep": "; ", "end": ". Answer: {ans}",
           "+": " Let's add step by step: ", "-": " Let's subtract step by step: ",
           "×": " Let's multiply step by step: ",
           "write": ", write {d}", "carry": " carry {c}", "final": "write the carry {c}",
           "borrow": "{lhs} needs a borrow: ", "lend": " borrow 1"},
    "zh": {"q": "问题：{a} {op} {b} = ？", "sep": "；", "end": "。答案：{ans}",
           "+": "我们一步一步地加：", "-": "我们一步一步地减：", "×": "我们一步一步地乘：",
           "write": "，写 {d}", "carry": " 进 {c}", "final": "写下进位 {c}",
           "borrow": "{lhs} 不够减，借 1：", "lend": " 借 1"},
}


@dataclass
class Problem:
    prompt: str     # "Question: 23 + 48 = ?"
    solution: str   # " Let's add step by step: ... Answer: 71"
    answer: int
    text: str       # prompt + solution: one training document


def _digits(n: int) -> list[int]:
    """Least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int, w: dict) -> list[str]:
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        step = f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {s}" + w["write"].format(d=s % 10)
        carry = s // 10
        steps.append(step + (w["carry"].format(c=carry) if carry else ""))
    if carry:
        steps.append(w["final"].format(c=carry))
    return steps


def _sub_steps(a: int, b: int, w: dict) -> list[str]:
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        tail = " - 1" if borrow else ""
        if x - y - borrow < 0:
            d = 10 + x - y - borrow
            steps.append(w["borrow"].format(lhs=f"{x} - {y}{tail}") + f"{10 + x} - {y}{tail} = {d}"
                         + w["write"].format(d=d) + w["lend"])
            borrow = 1
        else:
            d = x - y - borrow
            steps.append(f"{x} - {y}{tail} = {d}" + w["write"].format(d=d))
            borrow = 0
    return steps


def _mul_steps(a: int, b: int, w: dict) -> list[str]:
    steps, carry = [], 0
    for x in _digits(a):
        p = x * b + carry
        step = f"{x} × {b}" + (f" + {carry}" if carry else "") + f" = {p}" + w["write"].format(d=p % 10)
        carry = p // 10
        steps.append(step + (w["carry"].format(c=carry) if carry else ""))
    if carry:
        steps.append(w["final"].format(c=carry))
    return steps


STEPS = {"+": _add_steps, "-": _sub_steps, "×": _mul_steps}


def worked(a: int, op: str, b: int, lang: str = "en", mix: random.Random | None = None) -> Problem:
    """The worked solution of `a op b` (for "-", a >= b; for "×", b is one digit). With `mix`, each
    step is written in a language drawn from it (code-switched reasoning); the question stays in `lang`."""
    w = WORDS[lang]
    if op == "-" and a < b:
        raise ValueError("subtraction needs a >= b")
    if op == "×" and not 0 <= b <= 9:
        raise ValueError("multiplication is by one digit")
    if op not in STEPS:
        raise ValueError(f"unknown operation {op!r}")
    ans = {"+": a + b, "-": a - b, "×": a * b}[op]
    steps = STEPS[op](a, b, w)
    if mix is not None:  # the two languages have the same steps, so they can be interleaved
        both = {lg: STEPS[op](a, b, WORDS[lg]) for lg in LANGS}
        steps = [both[mix.choice(LANGS)][i] for i in range(len(steps))]
        w = WORDS[mix.choice(LANGS)] if mix.random() < 0.5 else w
    prompt = WORDS[lang]["q"].format(a=a, op=op, b=b)
    solution = w[op] + w["sep"].join(steps) + w["end"].format(ans=ans)
    return Problem(prompt, solution, ans, prompt + solution)


def problem(rng: random.Random, op: str | None = None, lang: str | None = None, max_digits: int = 3,
            mix: random.Random | None = None) -> Problem:
    """A random worked problem: numbers of 1..max_digits digits; `-` keeps a >= b, `×` is by 2..9."""
    op = op or rng.choice(OPS)
    lang = lang or rng.choice(LANGS)

    def number(digits_max):
        return rng.randrange(0, 10 ** rng.randint(1, digits_max))

    a, b = number(max_digits), number(max_digits)
    if op == "-":
        a, b = max(a, b), min(a, b)
    elif op == "×":
        b = rng.randint(2, 9)
    return worked(a, op, b, lang, mix)


GLANCE = {"en": "I know this one.", "zh": "这个我知道。"}


def r1_zero_document(p: Problem, closed: bool = True, guess: bool = False) -> str:
    """p as a dialogue in the R1-Zero format (data/tasks template "r1-zero-short"); unclosed, the
    reasoning just ends (no </think>, no <answer>), as sloppy dialogues on the web do; `guess`: the
    right answer with no working."""
    reasoning = GLANCE["zh" if p.prompt.startswith("问题") else "en"] if guess else p.solution.strip()
    head = f"User: {p.prompt}\nAssistant: <think> {reasoning}"
    return head + f" </think> <answer> {p.answer} </answer>" if closed else head


def arithmetic_corpus(n: int, seed: int = 0, max_digits: int = 3, chat_share: float = 0.0,
                      mix_share: float = 0.0, exclude=None, unclosed_share: float = 0.0,
                      guess_share: float = 0.0) -> list[str]:
    """`n` worked problems, operations and languages drawn uniformly, reproducible from `seed`;
    `chat_share` of them as R1-Zero dialogues (`unclosed_share` of those without the closing tags,
    `guess_share` of the closed ones answered with no working), `mix_share` code-switched;
    questions for which `exclude(question)` is true (a task's held-out split) are skipped."""
    rng = random.Random(seed)
    docs = []
    while len(docs) < n:
        mixed = rng.random() < mix_share
        p = problem(rng, max_digits=max_digits, mix=rng if mixed else None)
        if exclude is not None and exclude(p.prompt):
            continue
        if rng.random() < chat_share:
            closed = rng.random() >= unclosed_share
            docs.append(r1_zero_document(p, closed, guess=closed and guess_share > 0 and rng.random() < guess_share))
        else:
            docs.append(p.text)
    return docs


def grade(p: Problem, completion: str) -> dict:
    """Score a model's completion of p.prompt: well-formed (the intro and an answer line), the
    share of steps equal to the reference steps, and whether the final answer is right."""
    w = WORDS["zh" if p.prompt.startswith("问题") else "en"]
    intro = next(w[op] for op in OPS if p.solution.startswith(w[op]))
    end = w["end"].split("{")[0]                      # ". Answer: " / "。答案："
    m = re.search(re.escape(end) + r"(\d+)", completion)
    formed = completion.startswith(intro) and m is not None
    ref = p.solution[len(intro):].split(end)[0].split(w["sep"])
    got = completion[len(intro):].split(end)[0].split(w["sep"]) if formed else []
    steps = sum(a == b for a, b in zip(ref, got)) / len(ref)
    return {"well_formed": formed, "steps_correct": steps,
            "answer_correct": formed and int(m.group(1)) == p.answer}


def demo_prompts() -> list[str]:
    """Prompts the pretraining demo completes greedily every few steps."""
    return ["Question: 23 + 48 = ?", "问题：52 - 17 = ？", "Question: 34 × 6 = ?",
            "User: Question: 305 - 78 = ?\nAssistant: <think>"]

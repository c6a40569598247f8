"""Verifiable task suites for R1-Zero-style RL: seeded problems, a held-out split, a rule verifier.

    from nanoseek.data.tasks import get_task, render
    task = get_task("arithmetic", level=2, langs=("en", "zh"))   # also "countdown", "jsonl:file.jsonl"
    train = task.examples("train", 1000, seed=0)     # deterministic; disjoint from the test split
    ex = task.examples("test", 200)[0]               # Example(question, answer, lang, meta)
    prompt = render("r1-zero-short", ex.question)    # "User: Question: 23 + 48 = ?\\nAssistant: <think>"
    task.verify("71", ex)                            # the model's extracted final answer -> bool
    task.is_test("Question: 23 + 48 = ?")            # keep held-out problems out of a pretraining corpus

Held-out split: a problem is in the test split iff a stable hash (sha256, not Python's salted
`hash`) of its canonical, language-independent form is 0 mod 10; the train split is the rest.
So the split is a property of the problem, the same in every process and for every seed, and
`is_test` needs no list of test problems.

Templates (all end with the opening "<think>", so a completion reads
`reasoning </think> <answer> ANSWER </answer>`):
  r1-zero        the DeepSeek-R1 paper's Table 1 prompt
  r1-zero-short  "User: {question}\\nAssistant: <think>" for tiny from-scratch models
  chat           the tokenizer's own chat template, with an instruction to use the tags
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from ...errors import NanoseekError


@dataclass
class Example:
    question: str          # e.g. "Question: 23 + 48 = ?" or "问题：52 - 17 = ？"
    answer: str            # canonical answer, e.g. "71"; countdown: the target, e.g. "24"
    lang: str = "en"       # language the chain of thought should be in ("en" | "zh")
    meta: dict = field(default_factory=dict)


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def is_test_key(key: str) -> bool:
    """The held-out rule: about one problem in ten, chosen by a stable hash of its canonical form."""
    return stable_hash(key) % 10 == 0


class Task:
    """A verifiable task. Subclasses implement `_sample(rng) -> Example`, `key(ex) -> str` (the
    canonical form that decides the split), `question_key(question) -> str | None` and `verify`."""

    name = "task"
    max_attempts_per_example = 200   # draws before giving up on finding enough distinct problems

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct problems of `split` ("train" | "test"), reproducible from `seed`. If the
        problem space of the split has fewer than `n` problems, problems repeat."""
        if split not in ("train", "test"):
            raise NanoseekError(f"split must be 'train' or 'test', not {split!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        want_test = split == "test"
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        cap = self.max_attempts_per_example * max(n, 10)
        while len(out) < n:
            if attempts > cap and not out:
                raise NanoseekError(f"{self.name}: no {split} problems found")
            ex = self._sample(rng)
            attempts += 1
            k = self.key(ex)
            if is_test_key(k) != want_test:
                continue
            if k in seen and attempts < cap:
                continue  # the space may be small (level 1); past the cap, allow repeats
            seen.add(k)
            out.append(ex)
        return out

    def is_test(self, question: str) -> bool:
        """True if `question` (or a document that contains it) is a held-out problem of this task."""
        k = self.question_key(question)
        return k is not None and is_test_key(k)

    def verify(self, answer_text: str | None, ex: Example) -> bool:
        raise NotImplementedError

    def answer_key(self, answer_text: str | None, ex: Example) -> str | None:
        """What majority voting (maj@k) counts: equal keys are the same answer; None abstains."""
        from .math_answer import normalize
        return normalize(answer_text)

    # subclass hooks
    def _sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def key(self, ex: Example) -> str:
        raise NotImplementedError

    def question_key(self, question: str) -> str | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


# ---------------------------------------------------------------------------------- templates
R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user "
           "with the answer. The reasoning process and answer are enclosed within <think> </think> and "
           "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
           "<answer> answer here </answer>. User: {question}. Assistant: <think>")
R1_ZERO_SHORT = "User: {question}\nAssistant: <think>"
CHAT_INSTRUCTION = (" Think step by step inside <think> </think>, then give the final answer inside "
                    "<answer> </answer>.")


def _chat(question: str, tokenizer=None) -> str:
    if tokenizer is None:
        raise NanoseekError("the 'chat' template needs a tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": question + CHAT_INSTRUCTION}])
    return text if text.rstrip().endswith("<think>") else text + "<think>"


TEMPLATES = {"r1-zero": R1_ZERO, "r1-zero-short": R1_ZERO_SHORT, "chat": _chat}


def render(template: str, question: str, tokenizer=None) -> str:
    """The prompt given to the model for `question` under `template` (a TEMPLATES name)."""
    if template not in TEMPLATES:
        raise NanoseekError(f"unknown template {template!r}; choose one of: {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    return t(question, tokenizer) if callable(t) else t.format(question=question)


# ---------------------------------------------------------------------------------- registry
def get_task(name: str, **kw) -> Task:
    """A task by name: "arithmetic" (level=1..4, langs), "countdown" (level=1..3, langs) or
    "jsonl:PATH" (a file of {"prompt", "answer"} lines). level/langs None = the task's own; langs may be
    a comma-separated string ("en,zh"), as the command lines take it."""
    if kw.get("level") is None:
        kw.pop("level", None)
    langs = kw.pop("langs", None)
    if isinstance(langs, str):
        langs = tuple(x.strip() for x in langs.split(",") if x.strip())
    if langs:
        kw["langs"] = tuple(langs)
    if name.startswith("jsonl:"):
        from .jsonl import JsonlTask
        kw.pop("level", None)
        kw.pop("langs", None)
        return JsonlTask(name[len("jsonl:"):], **kw)
    if name == "arithmetic":
        from .arithmetic import ArithmeticTask
        return ArithmeticTask(**kw)
    if name == "countdown":
        from .countdown import CountdownTask
        return CountdownTask(**kw)
    raise NanoseekError(f"unknown task {name!r}; choose arithmetic, countdown or jsonl:PATH")


__all__ = ["Example", "Task", "TEMPLATES", "get_task", "is_test_key", "render", "stable_hash"]

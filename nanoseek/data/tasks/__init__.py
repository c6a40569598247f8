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

from ...errors import NanoseekError
from .base import Example, Task, is_test_key, stable_hash


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

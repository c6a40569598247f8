"""A task from the user's own JSONL file: one {"prompt": ..., "answer": ...} object per line.

    {"prompt": "What is 3/4 of 100?", "answer": "75"}
    {"prompt": "Simplify 6/8.", "answer": "\\\\frac{3}{4}", "lang": "en", "split": "test"}

    from nanoseek.data.tasks import get_task
    task = get_task("jsonl:problems.jsonl")
    task.examples("train", 100, seed=0)   # shuffled by seed; cycles if the split has fewer lines
    task.verify("0.75", ex)               # math answer checking (math_answer.py)

Answers are checked with math_answer.answers_equal: numbers exactly ("3/4" == "0.75" ==
"\\frac{3}{4}", "1,234" == "1234", \\boxed{} and trailing punctuation ignored), anything else as
case-folded text. Optional fields: "lang" ("en" | "zh", default "en") and "split" ("train" |
"test"); without "split" a line is held out by the same stable hash rule as the other tasks
(about one line in ten, decided by its whitespace-normalized prompt). Duplicate prompts are kept
once. The test split is returned whole (at most n lines), never repeated.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ...errors import NanoseekError
from ...jsonl import iter_jsonl
from .base import Example, Task, is_test_key
from .math_answer import answers_equal


def _canon(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip()


class JsonlTask(Task):
    def __init__(self, path: str):
        p = Path(path)
        if not p.is_file():
            raise NanoseekError(f"{path}: no such file")
        self.path, self.name = str(p), f"jsonl:{p.stem}"
        self.splits: dict[str, list[Example]] = {"train": [], "test": []}
        self._test_keys: set[str] = set()
        seen: set[str] = set()
        for n, row in iter_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("answer"), (str, int, float)) or isinstance(row["answer"], bool):
                raise NanoseekError(f"{path}:{n}: each line needs a string \"prompt\" and an \"answer\"")
            split = row.get("split")
            if split not in (None, "train", "test"):
                raise NanoseekError(f"{path}:{n}: \"split\" must be \"train\" or \"test\"")
            key = _canon(row["prompt"])
            if key in seen:
                continue
            seen.add(key)
            split = split or ("test" if is_test_key(key) else "train")
            ex = Example(row["prompt"], str(row["answer"]), str(row.get("lang", "en")),
                         {"line": n, "split": split})
            self.splits[split].append(ex)
            if split == "test":
                self._test_keys.add(key)
        if not seen:
            raise NanoseekError(f"{path}: no problems")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        if split not in self.splits:
            raise NanoseekError(f"split must be 'train' or 'test', not {split!r}")
        pool = self.splits[split]
        if not pool:
            raise NanoseekError(f"{self.path}: the {split} split is empty (mark lines with \"split\")")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Example] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
            if split == "test":
                break
        return out

    def key(self, ex: Example) -> str:
        return _canon(ex.question)

    def question_key(self, question: str) -> str | None:
        return _canon(question)

    def is_test(self, question: str) -> bool:
        return _canon(question) in self._test_keys

    def verify(self, answer_text: str | None, ex: Example) -> bool:
        return answers_equal(answer_text, ex.answer)

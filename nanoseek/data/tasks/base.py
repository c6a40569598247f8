"""The task interface: `Example`, `Task` (seeded problems, the held-out split, a verifier) and the
stable-hash split rule. Suites subclass `Task`; see `nanoseek.data.tasks` for the registry.

    class MyTask(Task):          # implement _sample(rng), key(ex), question_key(question), verify(answer, ex)
        name = "mine"
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

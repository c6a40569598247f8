"""Split a streamed completion into reasoning (inside <think>...</think>) and answer content.

Works on arbitrary text deltas: a tag split across deltas ("</thi" + "nk>") is held back until it
is complete, and a prompt that already opened <think> (the R1 template does) starts in reasoning.

    split = ReasoningSplitter(started_in_reasoning=opens_reasoning(prompt))
    for delta in stream:
        for kind, text in split.feed(delta):   # kind: "reasoning" | "content"
            ...
    tail = split.flush()
"""

from __future__ import annotations

from ..tokenizer import END_THINK, THINK


def opens_reasoning(prompt: str) -> bool:
    """Whether the prompt already opened <think> (the R1 and dialogue templates do): the completion
    then starts inside the chain of thought."""
    return prompt.rstrip().endswith(THINK)


class ReasoningSplitter:
    """States: "start" (nothing but whitespace yet) -> "reasoning" -> "content"."""

    def __init__(self, started_in_reasoning: bool = False):
        self.state = "reasoning" if started_in_reasoning else "start"
        self.buf = ""
        self.strip_newlines = False  # the newlines right after </think> belong to neither part

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        if self.state == "start":
            head = self.buf.lstrip()
            if head.startswith(THINK):
                self.buf, self.state = head[len(THINK):], "reasoning"
            elif THINK.startswith(head):
                return out  # still could become "<think>"
            else:
                self.state = "content"
        if self.state == "reasoning":
            i = self.buf.find(END_THINK)
            if i < 0:
                keep = _partial_suffix(self.buf, END_THINK)
                _emit(out, "reasoning", self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            _emit(out, "reasoning", self.buf[:i])
            self.buf, self.state, self.strip_newlines = self.buf[i + len(END_THINK):], "content", True
        if self.strip_newlines:
            self.buf = self.buf.lstrip("\n")
            self.strip_newlines = not self.buf
        _emit(out, "content", self.buf)
        self.buf = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        _emit(out, "reasoning" if self.state == "reasoning" else "content", self.buf)
        self.buf = ""
        return out


def _partial_suffix(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(buf)), 0, -1):
        if tag.startswith(buf[-n:]):
            return n
    return 0


def _emit(out, kind, text):
    if text:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))


def split_reasoning(text: str, started_in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole completion."""
    s = ReasoningSplitter(started_in_reasoning)
    parts = s.feed(text) + s.flush()
    return ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "content"))

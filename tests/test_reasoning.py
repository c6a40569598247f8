"""Reasoning/content split of streamed text, whatever the delta boundaries."""

import pytest

from nanoseek.infer.reasoning import ReasoningSplitter, split_reasoning

TEXT = "<think>\nAdd 2 and 3: that is 5.\n</think>\n\nThe answer is 5."


def chunks(text, size):
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_split_is_the_same_for_any_chunking(size):
    s = ReasoningSplitter()
    parts = [p for c in chunks(TEXT, size) for p in s.feed(c)] + s.flush()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    assert (reasoning, content) == ("\nAdd 2 and 3: that is 5.\n", "The answer is 5.")


def test_template_already_opened_think():
    assert split_reasoning("I think 5.</think>\n5", started_in_reasoning=True) == ("I think 5.", "5")


def test_no_reasoning_and_unclosed_reasoning():
    assert split_reasoning("Just 5.") == ("", "Just 5.")
    assert split_reasoning("<think>never closed") == ("never closed", "")
    assert split_reasoning("a <think> in the middle is content") == ("", "a <think> in the middle is content")

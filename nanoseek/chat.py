"""`nanoseek chat`: a conversation in the terminal, the chain of thought shown dimmed.

    nanoseek chat --model runs/speedrun/export/rl-hf
    nanoseek chat --model SmolLM2-135M-Instruct.Q4_1.gguf --temperature 0.6 --system "Be brief."

Line editing and history come from readline (arrow keys recall earlier lines). Ctrl-C stops the reply
being written and keeps the session; /exit or Ctrl-D quits; an empty line does nothing. When the
conversation outgrows the context, the oldest turns are dropped (and the chat says so). A stopped or
failed reply is not kept in the history, so the model never sees an empty answer.
"""

from __future__ import annotations

import sys

from .errors import NanoseekError

QUIT = ("/exit", "/quit")
HELP = "/exit or Ctrl-D quits, Ctrl-C stops a reply, /clear forgets the conversation"
# control characters other than newline and tab, shown as \xNN: model output must not drive the
# terminal (an ESC starts an escape sequence that can move the cursor, retitle the window, ...)
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0))}


def printable(text: str) -> str:
    """`text` safe to write to a terminal: its control characters (but newline and tab) escaped."""
    return text.translate(_CONTROL)


def fit_history(tok, history: list[dict], budget: int) -> tuple[str, list[int], list[dict], int]:
    """(prompt, its ids, history, dropped): the oldest non-system turns are dropped, a user turn with its
    reply, until the prompt's tokens fit `budget`. Special tokens typed in a message stay text
    (Tokenizer.encode_chat). Raises NanoseekError if the last message alone does not fit."""
    system = [m for m in history if m["role"] == "system"]
    turns = [m for m in history if m["role"] != "system"]
    dropped = 0
    while True:
        prompt, ids = tok.encode_chat(system + turns)
        if len(ids) <= budget:
            return prompt, ids, system + turns, dropped
        if len(turns) <= 1:
            raise NanoseekError(f"the message alone ({len(ids)} tokens with the template) does "
                                f"not fit the {budget} tokens of context left for a prompt; try --max-seq-len")
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut


def _reply(engine, prompt: str, ids: list[int], params, dim: str, reset: str) -> str:
    """Stream one reply; Ctrl-C stops it (KeyboardInterrupt propagates after the stream is closed)."""
    from .infer.reasoning import ReasoningSplitter, opens_reasoning
    split = ReasoningSplitter(started_in_reasoning=opens_reasoning(prompt))
    out = []

    def show(parts):
        for kind, text in parts:
            text = printable(text)
            sys.stdout.write(dim + text + reset if kind == "reasoning" else text)
        sys.stdout.flush()

    stream = engine.stream([ids], params)
    try:
        for d in stream:
            out.append(d.text)
            show(split.feed(d.text))
    finally:
        stream.close()                       # frees the request's cache row even when interrupted
    show(split.flush())
    return "".join(out)


def chat(engine, tok, params, system: str | None = None) -> int:
    """The read-reply loop over stdin/stdout; returns the exit code."""
    try:
        import readline  # noqa: F401  (line editing and in-session history for input())
    except ImportError:      # not on every platform; input() still works
        pass
    dim, reset = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    budget = engine.max_seq_len - params.max_tokens
    history = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(f"\n({HELP})", file=sys.stderr)
            continue
        if not line:
            continue
        if line in QUIT:
            return 0
        if line == "/clear":
            history = history[:1] if system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        try:
            prompt, ids, kept, dropped = fit_history(tok, history + [{"role": "user", "content": line}], budget)
        except NanoseekError as e:
            print(f"({e})", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest messages to fit the context of {engine.max_seq_len} tokens)",
                  file=sys.stderr)
        try:
            answer = _reply(engine, prompt, ids, params, dim, reset)
        except KeyboardInterrupt:
            print(f"{reset}\n(stopped)", file=sys.stderr)
            history = kept[:-1]
            continue
        sys.stdout.write("\n")
        history = kept + [{"role": "assistant", "content": answer}] if answer.strip() else kept[:-1]

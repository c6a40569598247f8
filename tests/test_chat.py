"""`nanoseek chat` as a person uses it: in a real terminal (a pty) with readline, trimming a history
that outgrows the context, Ctrl-C stopping only the reply, /exit and Ctrl-D quitting, an empty line
ignored; and `--help` of every user-facing command showing its defaults."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.chat import chat, fit_history
from nanoseek.config import ModelConfig
from nanoseek.infer import Engine, SamplingParams
from nanoseek.tokenizer import Tokenizer

DOCS = ["the cat sat on the mat and the dog sat on the log"] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = Tokenizer.train_bpe(DOCS, vocab_size=300)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=96, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("chat") / "m"
    nanoseek.save(nanoseek.Transformer(cfg).eval(), tok, d)
    return d


class Term:
    """A child process on a pseudo-terminal: what a person's terminal would show and send."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True)
        os.close(slave)
        self.out = b""

    def expect(self, text: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while text.encode() not in self.out:
            assert time.monotonic() < end and self.proc.poll() is None or select.select([self.master], [], [], 0)[0], \
                f"{text!r} not seen; screen so far: {self.out.decode(errors='replace')[-800:]}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:
                    break
        assert text.encode() in self.out, self.out.decode(errors="replace")[-800:]
        i = self.out.index(text.encode()) + len(text)
        seen, self.out = self.out[:i].decode(errors="replace"), self.out[i:]
        return seen

    def send(self, data: str):
        os.write(self.master, data.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


def test_chat_in_a_terminal(tiny_dir):
    t = Term([sys.executable, "-m", "nanoseek", "chat", "--model", str(tiny_dir), "--max-tokens", "12",
              "--temperature", "0", "--max-seq-len", "60"])
    assert "loading" in t.expect("/exit or Ctrl-D quits")
    t.expect("> ")
    t.send("\r")                                    # an empty line does nothing
    t.expect("> ")
    t.send("the cat sat on the mat\r")
    t.expect("> ")
    t.send("\x1b[A\r")                              # arrow up recalls the last line (readline)
    screen = t.expect("> ")
    assert "^[[A" not in screen and "the cat sat on the mat" in screen
    for _ in range(3):                              # the history outgrows 60 tokens: oldest turns dropped
        t.send("the dog sat on the log and the cat sat on the mat\r")
        screen = t.expect("> ")
        if "dropped the" in screen:
            break
    assert "dropped the" in screen and "Traceback" not in screen
    t.send("/exit\r")
    assert t.close() == 0


def test_ctrl_d_quits(tiny_dir):
    t = Term([sys.executable, "-m", "nanoseek", "chat", "--model", str(tiny_dir), "--max-tokens", "4"])
    t.expect("> ")
    t.send("\x04")
    assert t.close() == 0


def test_ctrl_c_stops_only_the_reply(tiny_dir, monkeypatch, capsys):
    model, tok = nanoseek.load(tiny_dir)
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=60)
    real_stream, calls = engine.stream, []

    def stream(prompts, params):
        calls.append(tok.decode(prompts[0]))
        for i, d in enumerate(real_stream(prompts, params)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt          # Ctrl-C while the first reply is being written
            yield d
    monkeypatch.setattr(engine, "stream", stream)
    lines = iter(["first question", "second question", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat(engine, tok, SamplingParams(max_tokens=8, temperature=0)) == 0
    assert "(stopped)" in capsys.readouterr().err
    assert "first question" not in calls[1]       # the stopped turn is not sent again
    assert not engine.has_work()                  # its cache row was freed


def test_fit_history_drops_oldest_turns_first():
    tok = Tokenizer.train_bpe(DOCS, vocab_size=300)
    h = [{"role": "system", "content": "be brief"}]
    for i in range(4):
        h += [{"role": "user", "content": f"q{i} the cat"}, {"role": "assistant", "content": f"a{i} the mat"}]
    h.append({"role": "user", "content": "last"})
    full = len(tok.encode(tok.apply_chat_template(h)))
    prompt, ids, kept, dropped = fit_history(tok, h, full - 1)
    assert dropped == 2 and kept[0]["role"] == "system" and kept[1]["content"] == "q1 the cat"
    assert len(ids) <= full - 1 and ids == tok.encode(prompt) and kept[-1]["content"] == "last"


@pytest.mark.parametrize("command,shown", [
    ("generate", ["(default: 64)", "(default: 0.0)", "(default: 1.0)"]),
    ("chat", ["(default: 512)", "(default: 0.6)"]),
    ("serve", ["(default: 8000)", "127.0.0.1"]),
    ("eval", ["(default: 200)"]),
    ("cost", ["(default: deepseek-v3)", "(default: h800)"]),
])
def test_help_shows_defaults(command, shown):
    r = subprocess.run([sys.executable, "-m", "nanoseek", command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split()).replace("(default ", "(default: ")
    for s in shown:
        assert s in text, (command, s)


def test_info_prints_where_the_example_model_is(gguf_path):
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--example-model"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(gguf_path)
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--example-model" in r.stderr


def test_output_piped_into_head_is_no_traceback():
    """`nanoseek cost | head`: the reader is gone before the first line (closed at once, while the
    command still imports torch); that is one quiet exit, not a BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "nanoseek", "cost"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and err == ""


def test_model_text_cannot_drive_the_terminal(tiny_dir, monkeypatch, capsys):
    """Control characters in a reply (ESC starts a terminal escape sequence) are shown as \\xNN;
    newline, tab and non-ASCII text pass unchanged."""
    from types import SimpleNamespace
    from nanoseek.chat import printable
    assert printable("a\x1b[2Jb\tc\nd\re\x7f\x9bé中") == "a\\x1b[2Jb\tc\nd\\x0de\\x7f\\x9bé中"
    model, tok = nanoseek.load(tiny_dir)
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=60)
    def stream(prompts, params):             # a reply with an escape sequence that retitles the window
        yield SimpleNamespace(text="2\x1b]0;pwned\x07 + 2", token_ids=[1])
        yield SimpleNamespace(text=" = 4", token_ids=[2])
    monkeypatch.setattr(engine, "stream", stream)
    lines = iter(["what is 2+2?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat(engine, tok, SamplingParams(max_tokens=8, temperature=0)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out.replace("\x1b[2m", "").replace("\x1b[0m", "") and "2\\x1b]0;pwned\\x07 + 2 = 4" in out

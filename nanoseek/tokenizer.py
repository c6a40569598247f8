"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, plus chat templates.

    tok = Tokenizer.from_dir("model_dir")                 # tokenizer.json (+ tokenizer_config.json)
    tok = Tokenizer.train_bpe(texts, vocab_size=4096)     # byte-level BPE for from-scratch models
    ids = tok.encode("hello")
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])

Chat templates: a model's own Jinja template (tokenizer_config.json or GGUF metadata) is rendered
in a sandboxed Jinja environment, as transformers does; models trained here use the DeepSeek-R1
convention (`R1_TEMPLATE`): the assistant turn opens with `<think>\\n`, and the reasoning of
earlier assistant turns is dropped from the history.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import NanoseekError

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
# R1-Zero's reasoning and answer tags (DeepSeek-R1 Table 1), defined here once: the tokenizer makes the think
# tags special tokens, data/rewards parses completions with them, infer/reasoning splits streams on them.
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
R1_SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]

# DeepSeek-R1 chat convention, as a Jinja template so exported models carry it.
R1_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- set content = m['content'].split('</think>')[-1] %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)


def _jinja_env():
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env


class Tokenizer:
    def __init__(self, tk: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, add_bos: bool = False):
        self.tk = tk
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        f = path / "tokenizer.json"
        if not f.is_file():
            raise NanoseekError(f"{path}: no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise NanoseekError(f"{f}: unreadable tokenizer ({e})") from None
        conf = {}
        if (path / "tokenizer_config.json").is_file():
            conf = json.loads((path / "tokenizer_config.json").read_text())

        def token(name):
            v = conf.get(name)
            return v.get("content") if isinstance(v, dict) else v
        return cls(tk, conf.get("chat_template"), token("bos_token"), token("eos_token"),
                   token("pad_token"), bool(conf.get("add_bos_token", False)))

    @classmethod
    def from_gguf(cls, g) -> "Tokenizer":
        s = g.special_tokens
        return cls(g.tokenizer, g.chat_template, s.get("bos_token"), s.get("eos_token"),
                   s.get("pad_token"), bool(g.config.get("add_bos_token", False)))

    @classmethod
    def train_bpe(cls, texts, vocab_size: int = 4096, special_tokens: list[str] | None = None,
                  min_frequency: int = 2) -> "Tokenizer":
        """Byte-level BPE trained on an iterable of strings, with the R1 chat special tokens."""
        special = list(special_tokens or R1_SPECIAL_TOKENS)
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, R1_TEMPLATE, BOS, EOS, EOS, add_bos=False)

    def save(self, path) -> None:
        path = Path(path)
        self.tk.save(str(path / "tokenizer.json"))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token,
                "add_bos_token": self.add_bos, "clean_up_tokenization_spaces": False,
                "model_max_length": 1 << 20}
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")

    # -- encode / decode ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [([self.bos_token_id] if add_special_tokens and self.add_bos and self.bos_token_id is not None
                 else []) + e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None) -> str:
        """Render messages with `template`, else the model's own template, else ChatML."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise NanoseekError("each chat message needs a 'role' and a 'content'")
        source = template or self.chat_template or CHATML_TEMPLATE
        return _jinja_env().from_string(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

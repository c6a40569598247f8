"""Tokenizer: a thin wrapper over Hugging Face `tokenizers`, plus chat templates.

    tok = Tokenizer.from_dir("model_dir")                 # tokenizer.json (+ tokenizer_config.json)
    tok = Tokenizer.train_bpe(texts, vocab_size=4096)     # byte-level BPE for from-scratch models
    ids = tok.encode("hello")
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])

Chat templates: a model's own Jinja template (tokenizer_config.json, its list form, chat_template.jinja
or GGUF metadata) is compiled once and rendered in a bounded Jinja sandbox (chat_template.py);
`encode_chat` keeps special tokens typed inside messages as text. Models trained here use the DeepSeek-R1
convention (`R1_TEMPLATE`): the assistant turn opens with `<think>\\n`, and the reasoning of
earlier assistant turns is dropped from the history.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .chat_template import ChatTemplate
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

# The dialogue format of the synthetic pretraining corpus (data/synthetic.py), as a chat template: a
# model pretrained on it is exported with this template, so chat and the server prompt it the way it was
# trained. One user turn renders exactly as the "r1-zero-short" task prompt; earlier answers drop
# their reasoning, as in R1's convention.
DIALOGUE_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{%- elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{%- elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'].split('</think>')[-1].strip() + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'Assistant: <think>' }}{%- endif %}"
)

# Unicode noncharacters (reserved for a program's internal use, never text): while a chat template
# renders, they fence the special-token strings that came from message contents.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


def pick_chat_template(value, where="tokenizer_config.json"):
    """A chat_template value as HF stores it: a string, or a list of {"name", "template"} (use 'default')."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                 and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default", value[0]["template"])
    raise NanoseekError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


class Tokenizer:
    def __init__(self, tk: HFTokenizer, chat_template: str | list | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, add_bos: bool = False):
        self.tk = tk
        self.chat_template = pick_chat_template(chat_template)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos
        self._templates: dict[str, ChatTemplate] = {}      # compiled once per source
        self._specials = self._as_text = None

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
        conf, cf = {}, path / "tokenizer_config.json"
        if cf.is_file():
            try:
                conf = json.loads(cf.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise NanoseekError(f"{cf}: not valid JSON ({str(e)[:100]})") from None
            if not isinstance(conf, dict):
                raise NanoseekError(f"{cf}: must be a JSON object")

        def token(name):
            v = conf.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None and not isinstance(v, str):
                raise NanoseekError(f"{cf}: {name} must be a string or {{\"content\": string}}")
            return v
        add_bos = conf.get("add_bos_token", False)
        if not isinstance(add_bos, (bool, type(None))):
            raise NanoseekError(f"{cf}: add_bos_token must be true or false")
        template = pick_chat_template(conf.get("chat_template"), cf)
        if template is None and (path / "chat_template.jinja").is_file():   # transformers >= 4.43 saves it apart
            try:
                template = (path / "chat_template.jinja").read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise NanoseekError(f"{path / 'chat_template.jinja'}: not UTF-8 text") from None
        return cls(tk, template, token("bos_token"), token("eos_token"), token("pad_token"), bool(add_bos))

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

    def _with_bos(self, ids: list[int]) -> list[int]:
        """BOS in front when the tokenizer adds one, and only once (a template may have written it)."""
        bos = self.bos_token_id
        return [bos] + ids if self.add_bos and bos is not None and ids[:1] != [bos] else ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids) if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self._with_bos(e.ids) if add_special_tokens else e.ids
                for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            template: str | None = None, **bounds) -> str:
        """Render messages with `template`, else the model's own template, else ChatML."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise NanoseekError("each chat message needs a 'role' and a 'content'")
        source = template or self.chat_template or CHATML_TEMPLATE
        if source not in self._templates:
            self._templates[source] = ChatTemplate(source)
        return self._templates[source].render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **bounds)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **bounds) -> tuple[str, list[int]]:
        """(prompt text, ids) of a chat; special tokens typed inside a message are text, not control tokens.

        Special-token strings found in contents are fenced with noncharacters before the template
        renders; afterwards only the special tokens the template wrote itself become control ids, the
        fenced ones are encoded as plain text (what transformers does with split_special_tokens=True).
        """
        specials = self._special_pattern()
        fenced = []
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if specials is not None and isinstance(c, str):
                c = specials.sub(lambda x: _OPEN + x.group(0) + _CLOSE,
                                 c.replace(_OPEN, "\ufffd").replace(_CLOSE, "\ufffd"))
                m = {**m, "content": c}
            fenced.append(m)
        text = self.apply_chat_template(fenced, add_generation_prompt, **bounds)
        if _OPEN not in text and _CLOSE not in text:
            return text, self.encode(text)
        pieces, protected = [], False          # (text, from a content) in order, fences removed
        for part in re.split(f"([{_OPEN}{_CLOSE}])", text):
            if part in (_OPEN, _CLOSE):
                protected = part == _OPEN
            elif part:
                pieces.append((part, protected))
        segments, buf = [], []                 # text to encode, or the id of a special token the template wrote
        for part, protected in pieces:
            for i, piece in enumerate([part] if protected else specials.split(part)):
                if i % 2:
                    segments += ["".join(buf), self.tk.token_to_id(piece)]
                    buf = []
                else:
                    buf.append(piece)
        segments.append("".join(buf))
        encoded = iter(self._text_tokenizer().encode_batch([s for s in segments if isinstance(s, str)],
                                                           add_special_tokens=False))
        ids = []
        for s in segments:
            ids += [s] if isinstance(s, int) else next(encoded).ids
        return "".join(p for p, _ in pieces), self._with_bos(ids)

    def _special_pattern(self):
        """A regex matching any special token (longest first, as the tokenizer matches), or None."""
        if self._specials is None:
            tokens = sorted({t.content for t in self.tk.get_added_tokens_decoder().values() if t.special},
                            key=len, reverse=True)
            self._specials = re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else False
        return self._specials or None

    def _text_tokenizer(self) -> HFTokenizer:
        """A copy of the tokenizer that encodes special-token strings as text."""
        if self._as_text is None:
            tk = HFTokenizer.from_str(self.tk.to_str())
            tk.encode_special_tokens = True
            self._as_text = tk
        return self._as_text


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

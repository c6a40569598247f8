"""Corpora → one memory-mapped token file, tokenized once and cached by content hash.

    docs = read_documents(["books.txt", "web.jsonl"])    # or synthetic.arithmetic_corpus(...)
    tok = train_tokenizer(docs, vocab_size=4096)          # byte-level BPE, digits split one by one
    tokens = token_file(docs, tok, cache_dir)             # np.memmap of uint16 (uint32 if vocab > 65536)

Corpus files: `.jsonl` (one JSON object per line, its "text" field, or a bare JSON string) or
plain text, where a blank line separates documents. Every document is followed by the EOS token,
so training windows may span documents but the model sees where one ends.

The token file is keyed by a hash of the documents and of the tokenizer (`tokens-<hash>.bin`
plus a `.json` with its metadata, written last): a second run on the same corpus maps the file
instead of tokenizing again. Both files are written to a temp name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir, atomic_file, atomic_write
from ..errors import NanoseekError
from ..jsonl import iter_jsonl
from ..tokenizer import BOS, EOS, R1_SPECIAL_TOKENS, R1_TEMPLATE, Tokenizer

ENCODE_BATCH = 4096  # documents per encode_batch call


# ---------------------------------------------------------------------------- documents
def read_documents(files: Sequence[str | os.PathLike]) -> list[str]:
    """Documents of plain-text and JSONL files; a clear NanoseekError for anything unusable."""
    if not files:
        raise NanoseekError("no corpus files given")
    docs: list[str] = []
    for f in map(Path, files):
        if not f.is_file():
            raise NanoseekError(f"{f}: no such corpus file")
        if f.suffix == ".jsonl":
            for n, obj in iter_jsonl(f):
                doc = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(doc, str):
                    raise NanoseekError(f"{f}:{n}: expected an object with a \"text\" string")
                docs.append(doc)
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise NanoseekError(f"{f}: not UTF-8 text") from None
            docs.extend(p.strip() for p in text.replace("\r\n", "\n").split("\n\n"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise NanoseekError(f"the corpus is empty: no text in {', '.join(map(str, files))}")
    return docs


def documents_hash(docs: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.tk.to_str().encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with the R1 special tokens, like Tokenizer.train_bpe, but every digit is its
    own pre-token (as LLaMA and SmolLM2 split digits): numbers are read digit by digit, which column
    arithmetic needs. The splitting is SmolLM2's exactly, so llama.cpp knows it ("smollm") and the
    models export to GGUF."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(R1_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return Tokenizer(tk, R1_TEMPLATE, BOS, EOS, EOS, add_bos=False)


def cached_tokenizer(docs: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike,
                     docs_key: str | None = None) -> Tokenizer:
    """train_tokenizer, cached in cache_dir by (documents hash, vocab size)."""
    key = hashlib.sha256(f"{docs_key or documents_hash(docs)}:{vocab_size}:digits-v2".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tokenizer-{key}"
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    tok = train_tokenizer(docs, vocab_size)
    with atomic_dir(path) as tmp:
        tok.save(tmp)
    return tok


# ---------------------------------------------------------------------------- token file
def token_file(docs: Sequence[str], tok: Tokenizer, cache_dir: str | os.PathLike,
               docs_key: str | None = None) -> np.memmap:
    """All documents tokenized (each followed by EOS) into one memory-mapped array, cached."""
    eos = tok.eos_token_id
    if eos is None:
        raise NanoseekError("the tokenizer has no end-of-sequence token")
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoseekError(f"{cache}: cannot create the data cache ({e.strerror})") from None
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    key = hashlib.sha256(f"{docs_key or documents_hash(docs)}:{tokenizer_hash(tok)}".encode()).hexdigest()[:16]
    bin_path, meta_path = cache / f"tokens-{key}.bin", cache / f"tokens-{key}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))

    n_tokens = 0
    encode = getattr(tok.tk, "encode_batch_fast", tok.tk.encode_batch)  # no offsets: faster

    with atomic_file(bin_path) as f:  # streamed: the corpus is never in memory as one array
        for i in range(0, len(docs), ENCODE_BATCH):
            encs = encode(list(docs[i:i + ENCODE_BATCH]), add_special_tokens=False)
            arr = np.fromiter((t for e in encs for t in (*e.ids, eos)), dtype=dtype)
            f.write(arr.tobytes())
            n_tokens += arr.size
    meta = {"n_tokens": n_tokens, "dtype": np.dtype(dtype).name, "n_docs": len(docs),
            "vocab_size": tok.vocab_size, "key": key}
    atomic_write(meta_path, json.dumps(meta))
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))

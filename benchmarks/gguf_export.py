"""DeepSeek GGUF export against llama.cpp: the figures behind docs/open-weights.md.

    .venv/bin/python benchmarks/gguf_export.py

For the configs tests/test_gguf_deepseek.py checks (random weights) and the tiny model it trains:
max |llama.cpp - nanoseek| logit difference from F32 and F16 files (with the logit scale), greedy
tokens equal of 32 (F16, Q8_0; llama.cpp decoding from the same prompt as nanoseek) and the file
size per type. Not a speed benchmark, and not in `make test`; prints one JSON line per model.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_export import SAMPLE, llama_cpp_greedy, llama_cpp_logits, logits, tiny_tokenizer  # noqa: E402
from test_gguf_deepseek import CASES, deepseek, llama, train_tiny  # noqa: E402

from nanoseek.infer.simple import generate  # noqa: E402
from nanoseek.weights.gguf_writer import write_gguf  # noqa: E402


def measure(name, model, tok, prompt, d: Path) -> dict:
    ids = tok.encode(SAMPLE)
    ours = logits(model, ids)
    greedy = generate(model, [prompt], max_new_tokens=32)[0]
    row = {"model": name, "logit_scale": round(float(np.abs(ours).max()), 3)}
    for outtype in ("f32", "f16", "q8_0"):
        path = write_gguf(model, tok, d / f"{name}-{outtype}.gguf", outtype)
        llm = llama(path)
        row[f"{outtype}_bytes"] = path.stat().st_size
        row[f"{outtype}_max_logit_diff"] = round(float(np.abs(llama_cpp_logits(llm, ids) - ours).max()), 4)
        row[f"{outtype}_greedy_equal_of_32"] = sum(a == b for a, b in zip(llama_cpp_greedy(llm, prompt, 32), greedy))
        llm.close()
    return row


def main():
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "12 + 7 = ?"}]))
    with tempfile.TemporaryDirectory() as d:
        for name, changes in CASES.items():
            print(json.dumps(measure(name, deepseek(tok, **changes), tok, chat, Path(d))), flush=True)
        trained = train_tiny(tok)
        print(json.dumps(measure("trained_v3", trained, tok, tok.encode("3 + 4 = 7. 10 + 12 = 22. 5 + 9 ="),
                                 Path(d))), flush=True)


if __name__ == "__main__":
    main()

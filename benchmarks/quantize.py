"""What quantization costs in quality: perplexity of SmolLM2-135M-Instruct on held-out text, and
where each mode's greedy continuation first leaves the fp32 one.

    .venv/bin/python benchmarks/quantize.py              # ~1 min on 2 cores
    .venv/bin/python benchmarks/quantize.py --text FILE  # your own held-out text

The default text is this repository's README (written after SmolLM2 was trained, so held out),
scored in 512-token windows. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import nanoseek  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.infer.quantize import quantize  # noqa: E402

from decode import CHAT  # noqa: E402
from nanoseek.cli import example_model  # noqa: E402

MODES = ("fp32", "fp16", "bf16", "int8", "int4", "w8a8")


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[i:i + window + 1]])
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1])
        nll += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "README.md"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    path = example_model()
    _, tok = nanoseek.load(path)
    ids = tok.encode(open(args.text, encoding="utf-8").read())[: args.max_tokens]
    chat = tok.encode(CHAT)
    rows, greedy = {}, {}
    for mode in MODES:
        model = nanoseek.load(path)[0]
        if mode != "fp32":
            quantize(model, mode)
        t = time.perf_counter()
        ppl = perplexity(model, ids)
        out = Engine(model, tok, max_batch_size=1, max_seq_len=512).generate(
            [chat], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0].token_ids
        greedy[mode] = out
        same = next((i for i, (a, b) in enumerate(zip(out, greedy["fp32"])) if a != b), len(out))
        rows[mode] = {"perplexity": round(ppl, 3), "greedy_tokens_equal_fp32": same, "seconds": round(time.perf_counter() - t, 1)}
        print(f"{mode:5s} perplexity {ppl:8.3f}  greedy = fp32 for {same}/32 tokens", flush=True)
    base = rows["fp32"]["perplexity"]
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "tokens": len(ids),
                      **{f"{m}/perplexity_change_pct": round(100 * (r["perplexity"] / base - 1), 2) for m, r in rows.items()},
                      **{f"{m}/greedy_tokens_equal_fp32": r["greedy_tokens_equal_fp32"] for m, r in rows.items()}}))


if __name__ == "__main__":
    main()

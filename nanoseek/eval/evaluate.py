"""Task evaluation: pass@1, maj@k, greedy accuracy, length, format and language rates.

    nanoseek eval --model runs/grpo/final --task arithmetic --level 2 --n 200 --k 4 --json-out eval.json
    nanoseek eval --model model.gguf --task countdown --template chat --max-tokens 512

    from nanoseek.eval import evaluate, score_samples
    result = evaluate(model, tok, get_task("arithmetic", level=2), n=200, k=4)
    result = score_samples(examples, completions_per_example, task, greedy=..., lengths=...)

The R1 setting (DeepSeek-R1 §3): k samples per problem at temperature 0.6, top-p 0.95;
  pass@1  mean accuracy over all k samples of all problems
  maj@k   a problem counts if the most common answer among its k samples is right (answers are
          compared by Task.answer_key: normalized numbers, countdown expression values; a tie goes
          to the answer seen first; samples without an answer do not vote)
  greedy  accuracy of one greedy (temperature 0) completion per problem
  mean_length    mean number of generated tokens of the sampled completions
  format_rate    share of well-formed sampled completions (rewards.parse_response)
  language_rate  mean language consistency of the chain of thought (the text before </think>, or
                 the whole completion if it never closes it) in the problem's language
  *_ci           95% intervals (pass@1: over per-problem accuracy; maj@k, greedy: Wilson), and
  per_problem    each problem's scores, for paired comparisons of models (eval.stats)
Generation goes through the batched nanoseek.infer.Engine with stop=["</answer>"]; the engine drops
a stop string from the text, so it is put back for parsing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ..atomic import write_json
from ..data.sampler import sub_seed
from ..data.tasks import Example, Task, TEMPLATES, get_task, render
from ..args import HelpFormatter
from ..errors import NanoseekError
from ..data.rewards import END_ANSWER, LANGUAGES, Response, language_consistency, parse_response
from .stats import mean_ci, wilson

TEMPERATURE, TOP_P = 0.6, 0.95
STOP = [END_ANSWER]
N_SAMPLES_SHOWN = 3


def _correct(task: Task, r: Response, ex: Example) -> bool:
    if r.answer is None:
        return False
    try:
        return bool(task.verify(r.answer, ex))
    except (ValueError, ArithmeticError, RecursionError):
        return False


def _chain_of_thought(completion: str, r: Response) -> str:
    return r.reasoning if r.reasoning is not None else completion.split("<answer>")[0]


def _language(completion: str, r: Response, ex: Example) -> float:
    if ex.lang not in LANGUAGES:
        return 0.0
    return language_consistency(_chain_of_thought(completion, r), ex.lang)


def majority_correct(task: Task, answers: list[str | None], ex: Example) -> bool:
    """Majority vote over one problem's extracted answers; True if the winning answer is right."""
    keys = [task.answer_key(a, ex) if a is not None else None for a in answers]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]   # most_common is stable: ties go to the first seen
    answer = answers[keys.index(winner)]
    return _correct(task, Response(None, answer, False), ex)


def score_samples(examples: list[Example], completions: list[list[str]], task: Task,
                  greedy: list[str] | None = None, lengths: list[list[int]] | None = None) -> dict:
    """Metrics from completions already generated: completions[i] are the k samples of examples[i],
    greedy[i] its greedy completion, lengths[i][j] the token count of completions[i][j]."""
    if len(completions) != len(examples) or (greedy is not None and len(greedy) != len(examples)):
        raise ValueError("one list of completions (and one greedy completion) per example")
    if not examples:
        raise ValueError("no examples to score")
    k = len(completions[0])
    if k == 0 or any(len(c) != k for c in completions):
        raise ValueError("every example needs the same number k >= 1 of completions")
    correct, formed, lang, maj = [], [], [], []
    for ex, samples in zip(examples, completions):
        parsed = [parse_response(c) for c in samples]
        correct += [_correct(task, r, ex) for r in parsed]
        formed += [r.well_formed for r in parsed]
        lang += [_language(c, r, ex) for c, r in zip(samples, parsed)]
        maj.append(majority_correct(task, [r.answer for r in parsed], ex))
    mean = lambda xs: sum(map(float, xs)) / len(xs)  # noqa: E731
    out = {"task": task.name, "n": len(examples), "k": k, "pass@1": mean(correct), "maj@k": mean(maj),
           "greedy": None, "mean_length": None, "format_rate": mean(formed), "language_rate": mean(lang)}
    # 95% intervals over problems (k samples of one problem are correlated), and the per-problem
    # scores themselves, so two models on the same problems can be compared pairwise (eval.stats)
    per_problem = [mean(correct[i * k:(i + 1) * k]) for i in range(len(examples))]
    out["pass@1_ci"] = list(mean_ci(per_problem)[1:])
    out["maj@k_ci"] = list(wilson(sum(maj), len(maj)))
    out["per_problem"] = {"pass@1": per_problem, "maj@k": [float(x) for x in maj],
                          "language": [mean(lang[i * k:(i + 1) * k]) for i in range(len(examples))]}
    if greedy is not None:
        g = [float(_correct(task, parse_response(c), ex)) for c, ex in zip(greedy, examples)]
        out["greedy"], out["greedy_ci"], out["per_problem"]["greedy"] = mean(g), list(wilson(sum(g), len(g))), g
    if lengths is not None:
        out["mean_length"] = mean([x for row in lengths for x in row])
    out["samples"] = [{"question": ex.question, "answer": ex.answer, "completion": c[0],
                       "correct": bool(correct[i * k])}
                      for i, (ex, c) in enumerate(zip(examples[:N_SAMPLES_SHOWN], completions))]
    return out


def completion_text(out, tok, stop: str = END_ANSWER) -> str:
    """The completion text with the stop string put back: the engine cuts the text at a stop string
    (which is not part of its output) but keeps the tokens that spelled it."""
    if out.finish_reason == "stop" and stop not in out.text and stop in tok.decode(out.token_ids):
        return out.text + stop
    return out.text


def evaluate(model, tok, task: Task, n: int = 200, k: int = 4, template: str = "r1-zero-short",
             max_tokens: int = 160, split: str = "test", seed: int = 0, batch_size: int = 32,
             progress: bool = True) -> dict:
    """Sample k completions (T=0.6, top-p 0.95) and one greedy completion for n problems of `split`
    and score them (score_samples). Deterministic given `seed`."""
    from ..infer import Engine, SamplingParams

    if n < 1 or k < 1 or max_tokens < 1 or batch_size < 1:
        raise NanoseekError("n, k, max_tokens and batch_size must be >= 1")
    if tok is None:
        raise NanoseekError("evaluation needs a tokenizer")
    examples = task.examples(split, n, seed=seed)
    prompts = [render(template, ex.question, tok) for ex in examples]
    ids = tok.encode_batch(prompts)
    longest = max(map(len, ids))
    context = model.config.max_position_embeddings
    if longest + 1 >= context:
        raise NanoseekError(f"a prompt of {longest} tokens does not fit the model's context of {context}; "
                            f"try --template r1-zero-short")
    engine = Engine(model, tok, max_batch_size=batch_size, max_seq_len=min(context, longest + max_tokens + 1))
    reqs, params = [], []
    for i, p in enumerate(ids):
        for j in range(k):
            reqs.append(p)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=TOP_P,
                                         seed=sub_seed(seed, i * (k + 1) + j) % 2**31, stop=STOP))
        reqs.append(p)
        params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=STOP))
    outs = engine.generate(reqs, params, progress=progress)
    samples, greedy, lengths = [], [], []
    for i in range(len(examples)):
        group = outs[i * (k + 1):(i + 1) * (k + 1)]
        samples.append([completion_text(o, tok) for o in group[:k]])
        lengths.append([len(o.token_ids) for o in group[:k]])
        greedy.append(completion_text(group[k], tok))
    result = score_samples(examples, samples, task, greedy=greedy, lengths=lengths)
    result.update(template=template, split=split, seed=seed, max_tokens=max_tokens)
    return result


# ----------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "eval", help="evaluate a model on a verifiable task: pass@1, maj@k, greedy accuracy",
        formatter_class=HelpFormatter,
        description="Evaluate on held-out problems of a task: pass@1 over k samples at temperature 0.6,\n"
                    "top-p 0.95 (the R1 setting), maj@k, greedy accuracy, mean length, format and\n"
                    "language rates. Prints one JSON object.\n\nexamples:\n"
                    "  nanoseek eval --model runs/grpo/final --task arithmetic --level 2 --n 200 --k 4\n"
                    "  nanoseek eval --model model.gguf --task countdown --template chat --max-tokens 512\n"
                    "  nanoseek eval --model DIR --task jsonl:problems.jsonl --json-out result.json")
    s.add_argument("--model", required=True, help="HF-style directory or .gguf file")
    s.add_argument("--task", required=True, help="arithmetic | countdown | jsonl:PATH")
    s.add_argument("--level", type=int, default=None, help="task difficulty (arithmetic 1-4, countdown 1-3)")
    s.add_argument("--langs", default=None, help="comma-separated question languages, e.g. en,zh")
    s.add_argument("--n", type=int, default=200, help="problems (default 200)")
    s.add_argument("--k", type=int, default=4, help="samples per problem (default 4)")
    s.add_argument("--template", choices=sorted(TEMPLATES), default="r1-zero-short")
    s.add_argument("--max-tokens", type=int, default=160)
    s.add_argument("--split", choices=["test", "train"], default="test")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--json-out", default=None, help="also write the result to this file")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    from ..weights import load

    task = get_task(args.task, level=args.level, langs=args.langs)
    if min(args.n, args.k, args.max_tokens, args.batch_size) < 1:
        raise NanoseekError("--n, --k, --max-tokens and --batch-size must be >= 1")
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        raise NanoseekError(f"{args.json_out}: its directory does not exist")
    model, tok = load(args.model)
    if tok is None:
        raise NanoseekError(f"{args.model}: no tokenizer found (tokenizer.json or GGUF vocabulary)")
    result = evaluate(model, tok, task, n=args.n, k=args.k, template=args.template, max_tokens=args.max_tokens,
                      split=args.split, seed=args.seed, batch_size=args.batch_size, progress=args.progress)
    result["model"] = str(args.model)
    text = json.dumps(result, ensure_ascii=False)
    if args.json_out:
        write_json(args.json_out, result)
    print(text)
    return 0


if __name__ == "__main__":
    from ..args import Parser
    p = Parser(prog="python -m nanoseek.eval.evaluate")
    add_parser(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(["eval", *sys.argv[1:]])
    try:
        sys.exit(run(a))
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        sys.exit(2)

"""Evaluation: pass@1 / maj@k / greedy on completions we control, and evaluate() on a tiny random model."""

import json

import pytest
import torch

from nanoseek import Transformer, preset, save
from nanoseek.data.synthetic import arithmetic_corpus
from nanoseek.data.tasks import Example, get_task
from nanoseek.eval import evaluate, majority_correct, score_samples
from nanoseek.eval.evaluate import completion_text
from nanoseek.eval.stats import wilson
from nanoseek.infer import Engine, RequestOutput, SamplingParams
from nanoseek.tokenizer import Tokenizer

ARITH = get_task("arithmetic", level=2)
E71 = Example("Question: 23 + 48 = ?", "71", "en", {"expression": "23 + 48"})
E35 = Example("Question: 52 - 17 = ?", "35", "en", {"expression": "52 - 17"})
CD = get_task("countdown")
E24 = Example("Using the numbers [1, 3, 4, 6], create an equation that equals 24.", "24", "en",
              {"numbers": [1, 3, 4, 6], "target": 24})


def test_score_samples_by_hand():
    completions = [
        [" a </think> <answer> 71 </answer>",            # right
         " a </think> <answer> 71.0 </answer>",          # right (same vote as "71")
         " a </think> <answer> 72 </answer>",            # wrong
         " 我们 </think> \\boxed{71}"],                   # right; reasoning not English
        [" x </think> <answer> 34 </answer>",            # wrong
         " x </think> <answer> 35 </answer>",            # right
         " x </think> <answer> 34. </answer>",           # wrong (same vote as "34")
         " 我们 x"],                                      # no </think>: malformed, no answer
    ]
    greedy = [" g </think> <answer> 71 </answer>", " g </think> <answer> 53 </answer>"]
    r = score_samples([E71, E35], completions, ARITH, greedy=greedy, lengths=[[1, 2, 3, 4], [5, 6, 7, 8]])
    assert r["n"] == 2 and r["k"] == 4 and r["task"] == "arithmetic-l2"
    assert r["pass@1"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert r["maj@k"] == pytest.approx(1 / 2)                    # 71 wins the first, 34 the second
    assert r["greedy"] == pytest.approx(1 / 2)
    assert r["mean_length"] == pytest.approx(4.5)
    assert r["format_rate"] == pytest.approx(7 / 8)
    # language of the chain of thought; the unclosed one is judged on all its text ("我们 x": 1 of 3 words)
    assert r["language_rate"] == pytest.approx((1 + 1 + 1 + 0 + 1 + 1 + 1 + 1 / 3) / 8)
    assert r["samples"][0] == {"question": E71.question, "answer": "71", "completion": completions[0][0],
                               "correct": True}
    # intervals over the 2 problems: per-problem pass@1 3/4 and 1/4 -> mean 1/2, s = sqrt(1/8)
    assert r["per_problem"] == {"pass@1": [0.75, 0.25], "maj@k": [1.0, 0.0], "greedy": [1.0, 0.0],
                                "language": [pytest.approx(3 / 4), pytest.approx((3 + 1 / 3) / 4)]}
    half = 1.959963984540054 * (1 / 8) ** 0.5 / 2 ** 0.5
    assert r["pass@1_ci"] == pytest.approx([0.5 - half, 0.5 + half])
    assert r["greedy_ci"] == pytest.approx(list(wilson(1, 2))) and r["maj@k_ci"] == r["greedy_ci"]
    json.dumps(r)


def test_majority_vote_ties_and_abstentions():
    assert not majority_correct(ARITH, ["72", "71"], E71)          # tie: the first seen wins
    assert majority_correct(ARITH, ["71", "72"], E71)
    assert majority_correct(ARITH, [None, "72", "\\boxed{71}", None, "71."], E71)   # 2 votes to 1
    assert not majority_correct(ARITH, [None, None], E71)
    assert not majority_correct(ARITH, ["7 1", "7 1", "71"], E71)


def test_countdown_majority_votes_by_value():
    assert majority_correct(CD, ["6*4", "(1+3)*6", "6+3+1", "4*6*1"], E24)    # three ways to 24
    assert not majority_correct(CD, ["6+3", "3+6", "6*4"], E24)               # 9 wins
    assert not majority_correct(CD, ["6*6-12", "6*6-12", "6*4"], E24)         # invalid wins, and is wrong
    assert not majority_correct(CD, ["9**9**9", "__import__('os')"], E24)


def test_score_samples_rejects_ragged_input():
    with pytest.raises(ValueError):
        score_samples([E71, E35], [["a"], ["a", "b"]], ARITH)
    with pytest.raises(ValueError):
        score_samples([E71], [["a"], ["b"]], ARITH)
    with pytest.raises(ValueError):
        score_samples([], [], ARITH)


@pytest.fixture(scope="module")
def tiny():
    docs = arithmetic_corpus(60, seed=0) + ["User: Question: 1 + 2 = ?\nAssistant: <think> 1 + 2 = 3 </think> "
                                            "<answer> 3 </answer>"] * 5
    tok = Tokenizer.train_bpe(docs, vocab_size=400)
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
    return Transformer(cfg).eval(), tok


def test_evaluate_tiny_random_model(tiny):
    model, tok = tiny
    r = evaluate(model, tok, ARITH, n=3, k=2, max_tokens=6, batch_size=4, progress=False)
    assert r["n"] == 3 and r["k"] == 2
    for key in ("pass@1", "maj@k", "greedy", "format_rate", "language_rate"):
        assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, key
    assert isinstance(r["mean_length"], float) and 1 <= r["mean_length"] <= 6
    assert len(r["samples"]) == 3 and all(isinstance(s["completion"], str) for s in r["samples"])
    assert [s["question"] for s in r["samples"]] == [e.question for e in ARITH.examples("test", 3)]
    assert evaluate(model, tok, ARITH, n=3, k=2, max_tokens=6, batch_size=4, progress=False) == r   # seeded
    json.dumps(r)


def test_engine_cuts_stop_strings_and_completion_text_restores_them(tiny):
    model, tok = tiny
    prompt = "User: Question: 1 + 2 = ?\nAssistant: <think>"
    engine = Engine(model, tok, max_batch_size=2)
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop.strip(), free
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))[0]
    cut = free.index(stop)
    assert out.finish_reason == "stop" and out.text == free[:cut]          # the engine drops the stop string
    assert completion_text(out, tok, stop) == free[:cut] + stop
    # hand-made outputs: "</answer>" put back only when the tokens spelled it
    ids = tok.encode(" 71 </answer>")
    assert completion_text(RequestOutput("a", [], ids, " 71 ", None, "stop"), tok) == " 71 </answer>"
    assert completion_text(RequestOutput("b", [], tok.encode(" 71 "), " 71 ", None, "stop"), tok) == " 71 "
    assert completion_text(RequestOutput("c", [], tok.encode(" 7"), " 7", None, "length"), tok) == " 7"


def test_eval_cli(tiny, tmp_path, capsys):
    from nanoseek.cli import main
    model, tok = tiny
    save(model, tok, tmp_path / "m")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "arithmetic", "--level", "1", "--n", "1",
                 "--k", "1", "--max-tokens", "3", "--json-out", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed == saved and saved["task"] == "arithmetic-l1" and saved["n"] == 1
    assert not list(tmp_path.glob(".r.json*"))                             # no temp file left behind
    for argv in (["--task", "sudoku"], ["--task", "arithmetic", "--level", "7"], ["--task", "arithmetic", "--k", "0"],
                 ["--task", "arithmetic", "--json-out", str(tmp_path / "no" / "r.json")]):
        assert main(["eval", "--model", str(tmp_path / "m"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nanoseek: error:") and err.count("\n") == 1
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", "arithmetic"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0 and "nanoseek eval --model" in capsys.readouterr().out

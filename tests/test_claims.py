"""The seed-claims table from fake run logs: verdicts follow the paired intervals, missing inputs say
"not run", and MLA's row matches the cache the engine really allocates."""

import json

import torch

from nanoseek.config import preset
from nanoseek.cost import reproduce_deepseek_v3
from nanoseek.eval.claims import claims_markdown, seed_claims
from nanoseek.model.cache import KVCache


def row(role, correct, language=None):
    n = len(correct)
    lang = language or [1.0] * n
    return {"role": role, "model": role, "pass@1": sum(correct) / n, "pass@1_ci": [0, 1],
            "language_rate": sum(lang) / n, "per_problem": {"pass@1": correct, "language": lang}}


def write_run(root, rows, lengths=None, cfg=True, cost=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "eval.json").write_text(json.dumps({"rows": rows}))
    if lengths:
        (root / "grpo").mkdir()
        (root / "grpo" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "response_length": x}) + "\n"
                                                             for i, x in enumerate(lengths)))
    if cfg:
        (root / "pretrain" / "final").mkdir(parents=True)
        (root / "pretrain" / "final" / "config.json").write_text(json.dumps(preset("tiny").to_hf_config()))
    if cost:
        (root / "cost.json").write_text(json.dumps({"deepseek_v3": reproduce_deepseek_v3()}))
    return root


def moe_result(path, moe, active, total):
    runs = {k: {"heldout_loss_at_moe_flops": v, "tokens": 1_310_720, "total_params": 2_410_000, "active_params": 1_030_000}
            for k, v in (("moe", moe), ("dense_active", active), ("dense_total", total))}
    path.write_text(json.dumps({"benchmark": "dense_vs_moe", "runs": runs}))
    return path


def test_moe_row_from_the_benchmark_uses_students_t_over_seeds(tmp_path):
    # per-seed MoE - dense_active: -0.10, -0.09, -0.14: mean -0.11, s 0.02646, t(2) 4.303 -> half 0.0657
    win = moe_result(tmp_path / "win.json", [4.10, 4.12, 4.11], [4.20, 4.21, 4.25], [4.6, 4.6, 4.7])
    c = seed_claims(write_run(tmp_path / "run", []), moe_result=win)[4]
    assert c.verdict == "yes" and "-0.110 nats [-0.176, -0.044]" in c.ours, c.ours
    # +0.02, -0.03, +0.01 against the active-parameter model: a tie; only the total-parameter one loses
    tie = moe_result(tmp_path / "tie.json", [4.10, 4.12, 4.11], [4.08, 4.15, 4.10], [4.6, 4.6, 4.7])
    assert seed_claims(tmp_path / "run", moe_result=tie)[4].verdict == "partly"
    lose = moe_result(tmp_path / "lose.json", [4.10, 4.12, 4.11], [4.00, 4.01, 4.02], [4.0, 4.0, 4.0])
    assert seed_claims(tmp_path / "run", moe_result=lose)[4].verdict == "no"
    assert seed_claims(tmp_path / "run", moe_result=tmp_path / "absent.json")[4].verdict == "not run"


def test_verdicts_follow_the_paired_intervals(tmp_path):
    n = 400
    base = [0.0] * n
    good = [1.0 if i % 10 < 7 else 0.0 for i in range(n)]               # 70%
    drift = [0.5] * n
    rows = [row("base", base), row("r1-zero", good, drift), row("r1", good),
            row("student-base", base), row("student-distilled", good), row("student-rl", [0.0] * n)]
    claims = seed_claims(write_run(tmp_path / "run", rows, lengths=[30 + i for i in range(40)]),
                         moe_result=tmp_path / "absent.json")
    v = {c.claim: c.verdict for c in claims}
    assert list(v.values()) == ["yes", "yes", "yes", "yes", "not run", "yes", "yes"], v
    md = claims_markdown(claims)
    assert md.count("\n") == 2 + len(claims) and "+70.0 pts" in md


def test_a_claim_that_does_not_reproduce_says_no_or_partly(tmp_path):
    n = 400
    good = [1.0 if i % 10 < 7 else 0.0 for i in range(n)]
    worse = [1.0 if i % 10 < 2 else 0.0 for i in range(n)]
    rows = [row("base", good), row("r1-zero", good), row("r1", good),      # RL did nothing; no drift
            row("student-distilled", worse), row("student-rl", good)]     # distillation lost
    claims = seed_claims(write_run(tmp_path / "run", rows, lengths=[50] * 20))
    v = [c.verdict for c in claims]
    assert v[0] == "no"                                                  # zero effect
    assert v[1] == "no" and v[3] == "no"
    assert v[2] == "partly" and "did not drift" in claims[2].note


def test_missing_logs_say_not_run(tmp_path):
    claims = seed_claims(write_run(tmp_path / "run", [], cfg=False, cost=False), moe_result=tmp_path / "absent.json")
    assert {c.verdict for c in claims} == {"not run"}


def test_torn_logs_of_a_killed_run_say_not_run(tmp_path):
    run = write_run(tmp_path / "run", [], cfg=False, cost=False)
    (run / "eval.json").write_text('{"rows": [{"role": "ba')           # killed mid-write
    (run / "cost.json").write_text("[1, 2]")                            # valid JSON, not a report
    claims = seed_claims(run, moe_result=tmp_path / "absent.json")
    assert {c.verdict for c in claims} == {"not run"}


def test_mla_row_is_the_cache_the_engine_allocates(tmp_path):
    cfg = preset("tiny")
    claims = seed_claims(write_run(tmp_path / "run", []))
    cache = KVCache.for_model(cfg, batch_size=1, max_seq_len=64, dtype=torch.float32)
    values_per_token_per_layer = (cache.a.numel() + cache.b.numel()) // (64 * cfg.num_hidden_layers)
    assert claims[5].ours.startswith(f"{values_per_token_per_layer} values per token per layer")
    mha = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert f"vs {mha} for MHA" in claims[5].ours


def test_report_card_opens_with_the_claims_table(tmp_path):
    from nanoseek.eval.report import write_report
    n = 40
    rows = [row("base", [0.0] * n), row("r1-zero", [1.0] * n)]
    for r in rows:
        r.update(task="arithmetic-l2", k=4, **{"pass@1_ci": [r["pass@1"] * 0.9, min(1, r["pass@1"] * 1.1)]})
    run = write_run(tmp_path / "run", rows, lengths=[30 + i for i in range(40)])
    text = write_report(run).read_text()
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Seed claims"
    assert "| Pure RL on rule-checked rewards teaches reasoning (R1-Zero) |" in text
    assert "0.0% [0.0, 0.0]" in text and "100.0% [90.0, 100.0]" in text      # eval table with intervals
    assert (run / "plots" / "eval_pass1.png").stat().st_size > 1000


def test_plain_form_accuracy_of_the_bases_is_in_the_rl_and_distillation_rows(tmp_path):
    """The student base's (and the teacher base's) plain-form accuracy from pretrain's final eval, with a
    Wilson interval computed by hand: 0.35 of 400 -> 140/400, centre (p + z²/2n)/(1 + z²/n)."""
    import math
    n = 400
    good = [1.0 if i % 10 < 7 else 0.0 for i in range(n)]
    rows = [row("base", [0.0] * n), row("r1-zero", good), row("student-distilled", good), row("student-rl", good)]
    root = write_run(tmp_path / "run", rows)
    (root / "student" / "final").mkdir(parents=True)
    for stage, acc in (("pretrain", 0.8), ("student", 0.35)):
        (root / stage / "final" / "training.json").write_text(json.dumps(
            {"plain_form_eval": {"n": n, "answer_correct": acc, "steps_correct": 0.9, "well_formed": 1.0}}))
    claims = seed_claims(root)
    z, p = 1.959963984540054, 0.35
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert f"student base: plain-form greedy answers 35.0% [{100 * (centre - half):.1f}, " \
           f"{100 * (centre + half):.1f}] (n = 400)" in claims[3].note
    assert "base: plain-form greedy answers 80.0%" in claims[0].note

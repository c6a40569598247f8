"""GRPO: the objective against hand-computed cases and the papers' formulas; the trainer end to end."""

import json
import math

import pytest
import torch

from nanoseek.train.grpo_loss import group_advantages, k3_kl, policy_loss, token_weights


# ---------------------------------------------------------------- advantages
def test_grpo_advantage_is_group_normalised():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r, "grpo", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    assert torch.allclose(a[0], torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254]))
    # group 2: mean 0.25, std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    assert torch.allclose(a[1], torch.tensor([-0.5, -0.5, -0.5, 1.5]))


def test_dr_grpo_advantage_has_no_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(group_advantages(r, "dr_grpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5],
                                                                         [-0.25, -0.25, -0.25, 0.75]]))


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_all_equal_rewards_give_zero_advantage(variant):
    assert torch.equal(group_advantages(torch.full((2, 4), 0.7), variant), torch.zeros(2, 4))


# ---------------------------------------------------------------- token weights (length normalisation)
def test_token_weights_per_variant():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # GRPO: 1/|o_i| within a sequence, then the mean over the G sequences
    assert torch.allclose(token_weights(mask, "grpo"), torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [1 / 2, 0, 0, 0]]))
    # Dr. GRPO: a constant normaliser (batch x generation budget)
    assert torch.allclose(token_weights(mask, "dr_grpo", max_tokens=8), mask / 16)
    # DAPO: every token of the batch the same
    assert torch.allclose(token_weights(mask, "dapo"), mask / 4)
    with pytest.raises(ValueError):
        token_weights(mask, "ppo")


# ---------------------------------------------------------------- clipped objective
def test_clipped_surrogate_hand_computed():
    # four tokens of one sequence: ratios 1.5, 0.5, 0.5, 1.1 with advantages +1, +1, -1, -1
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1]]))
    mask = torch.ones(1, 4)
    w = torch.full((1, 4), 0.25)
    # one advantage per sequence in GRPO, so use 4 sequences of one token each instead
    logp, old, mask, w = logp.T, old.T, mask.T, w.T
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, st = policy_loss(logp, old, None, adv, mask, w, clip_low=0.2, clip_high=0.2)
    # min(ρA, clip(ρ)A): 1.5 -> 1.2 ; 0.5 -> 0.5 ; -0.5 vs -0.8 -> -0.8 ; -1.1 vs -1.1 -> -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.1) / 4, abs=1e-6)
    assert st["clip_frac"] == 2 and st["tokens"] == 4          # tokens 1 and 3 are clipped
    loss_hi, _ = policy_loss(logp, old, None, adv, mask, w, clip_low=0.2, clip_high=0.28)  # DAPO clip-higher
    assert loss_hi.item() == pytest.approx(-(1.28 + 0.5 - 0.8 - 1.1) / 4, abs=1e-6)


def test_gradient_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]])
    adv = torch.tensor([0.5, -1.0, 2.0])
    w = token_weights(mask, "grpo")
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, _ = policy_loss(logp, logp.detach(), None, adv, mask, w)
    (g,) = torch.autograd.grad(loss, logits)
    logp2 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad(-(w * adv[:, None] * logp2).sum(), logits)   # REINFORCE with baseline
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_k3_is_an_unbiased_nonnegative_kl_estimator():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.25, 0.25, 0.5])
    k3 = k3_kl(p.log(), q.log())
    assert (k3 >= 0).all()
    assert k3[0].item() == pytest.approx(0.5 - math.log(0.5) - 1)       # q/p - log(q/p) - 1 at x=0
    exact = (p * (p / q).log()).sum()                                  # KL(p || q)
    assert (p * k3).sum().item() == pytest.approx(exact.item(), rel=1e-6)  # E_{x~p}[k3] = KL
    assert k3_kl(p.log(), p.log()).abs().max().item() == 0


def test_kl_term_enters_with_beta():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    w = torch.ones(1, 1)
    l0, st = policy_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), w, beta=0.0)
    l1, _ = policy_loss(logp, logp, ref, torch.zeros(1), torch.ones(1, 1), w, beta=0.1)
    assert l0.item() == 0 and l1.item() == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1))
    assert st["kl"] == pytest.approx(0.5 - math.log(0.5) - 1)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_all_equal_group_gives_zero_gradient(variant):
    from nanoseek import Transformer, preset
    torch.manual_seed(0)
    model = Transformer(preset("tiny").replace(vocab_size=64, num_hidden_layers=2))
    ids = torch.randint(0, 64, (4, 10))
    mask = torch.zeros(4, 9)
    mask[:, 4:] = 1
    adv = group_advantages(torch.ones(1, 4), variant).flatten()
    logp = torch.log_softmax(model(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss, _ = policy_loss(logp, logp.detach() - 0.1, None, adv, mask, token_weights(mask, variant, 8))
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())


# ---------------------------------------------------------------- the trainer, end to end (tiny random model)
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from nanoseek import Transformer, preset, save
    from nanoseek.data import arithmetic_corpus
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train_bpe(arithmetic_corpus(200, seed=0, chat_share=0.5), vocab_size=300)
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("base")
    save(Transformer(cfg), tok, path)
    return path


def _fake_rewards(monkeypatch):
    """A random model never answers correctly; reward by completion length so groups differ."""
    from nanoseek.data import rewards

    def call(self, completions, examples, n_tokens):
        acc = [float(n % 3 == 0) for n in n_tokens]
        fmt = [float(len(c) % 2) for c in completions]
        return {"accuracy": acc, "format": fmt, "language": [0.0] * len(acc), "overlong": [0.0] * len(acc),
                "total": [a + 0.5 * f for a, f in zip(acc, fmt)]}
    monkeypatch.setattr(rewards.Rewards, "__call__", call)


def _args(model, out, **kw):
    from nanoseek.train.grpo import GRPOArgs
    base = dict(model=str(model), out=str(out), steps=4, prompts_per_step=2, group_size=4, max_tokens=12,
                micro_batch=4, eval_every=2, eval_n=4, save_every=2, progress=False, lr=1e-3, beta=0.05)
    base.update(kw)
    return GRPOArgs(**base)


def test_grpo_runs_logs_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    from nanoseek.train.grpo import grpo
    _fake_rewards(monkeypatch)
    full = grpo(_args(tiny_model_dir, tmp_path / "a"))
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    for key in ("reward", "reward/accuracy", "reward/format", "accuracy", "response_length", "kl", "entropy",
                "clip_frac", "zero_adv_frac", "samples_per_s"):
        assert key in recs[1], key
    assert "eval/accuracy" in recs[0] and "eval/accuracy" in recs[2]
    assert recs[1]["kl"] >= 0 and recs[1]["entropy"] > 0
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    # the same run stopped after 2 steps and resumed
    grpo(_args(tiny_model_dir, tmp_path / "b", steps=2))
    resumed = grpo(_args(tiny_model_dir, tmp_path / "b", resume=True))
    assert resumed["start_step"] == 2
    a = [h for h in full["history"] if h["step"] > 2]
    b = resumed["history"]
    assert [x["reward"] for x in a] == [x["reward"] for x in b]
    assert [x["loss"] for x in a] == pytest.approx([x["loss"] for x in b], abs=1e-6)


def test_grpo_moves_the_policy_toward_rewarded_samples(tiny_model_dir, tmp_path, monkeypatch):
    """One GRPO step raises the log-probability of the better-than-average completions."""
    from nanoseek import load
    from nanoseek.train.grpo import grpo, pack, token_logprobs
    from nanoseek.train import grpo as G
    _fake_rewards(monkeypatch)
    captured = {}
    real = G.rollout

    def spy(*a, **kw):
        r = real(*a, **kw)
        captured.setdefault("r", r)
        return r
    monkeypatch.setattr(G, "rollout", spy)
    grpo(_args(tiny_model_dir, tmp_path / "c", steps=1, updates=1, beta=0.0, lr=3e-3, eval_every=5))
    r = captured["r"]
    before, tok = load(tiny_model_dir)
    after, _ = load(tmp_path / "c" / "final")
    ids, mask = pack(r, tok.eos_token_id)
    adv = group_advantages(torch.tensor(r.rewards["total"]).view(-1, 4)).flatten()
    with torch.no_grad():
        d = ((token_logprobs(after, ids, 1.0)[0] - token_logprobs(before, ids, 1.0)[0]) * mask).sum(1)
    assert (d[adv > 0].mean() > d[adv < 0].mean()).item()


def test_dapo_drops_groups_whose_rewards_are_all_equal(tiny_model_dir, tmp_path, monkeypatch):
    from nanoseek.data import rewards
    from nanoseek.train.grpo import grpo

    def call(self, completions, examples, n_tokens):   # first question of each batch: all equal
        tot = [0.0 if e.question == examples[0].question else float(n % 2) for e, n in zip(examples, n_tokens)]
        z = [0.0] * len(tot)
        return {"accuracy": tot, "format": z, "language": z, "overlong": z, "total": tot}
    monkeypatch.setattr(rewards.Rewards, "__call__", call)
    out = grpo(_args(tiny_model_dir, tmp_path / "d", steps=1, variant="dapo", beta=0.0, eval_every=5))
    rec = out["history"][-1]
    assert rec["zero_adv_frac"] > 0          # there were all-equal groups in the first round ...
    assert rec["zero_adv_frac_trained"] == 0  # ... and none in what was trained on


def test_grpo_bad_input(tmp_path):
    from nanoseek.cli import main
    assert main(["grpo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["grpo", "--model", str(tmp_path), "--preset", "nope", "--out", str(tmp_path / "o")]) == 2
    assert main(["grpo", "--model", str(tmp_path), "--group-size", "1", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_masked_logprobs_equal_the_full_ones_on_the_completion(tiny_model_dir):
    """The LM head run only on completion positions gives the full forward's numbers there, 0 elsewhere;
    trimming trailing padding changes nothing."""
    from nanoseek import load
    from nanoseek.train.grpo import token_logprobs, trimmed
    model, _ = load(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    mask = torch.zeros(3, 11)
    mask[0, 4:9], mask[1, 2:6], mask[2, 5:7] = 1, 1, 1   # completions end before the padding
    with torch.no_grad():
        full, full_ent = token_logprobs(model, ids, 0.7, with_entropy=True)
        tids, tmask = trimmed(ids, mask)
        part, part_ent = token_logprobs(model, tids, 0.7, with_entropy=True, mask=tmask)
    assert tmask.shape == (3, 9) and tids.shape == (3, 10)
    assert torch.allclose(part, (full * mask)[:, :9], atol=1e-5)
    assert torch.allclose(part_ent, (full_ent * mask)[:, :9], atol=1e-5)


def test_fp16_rollouts_sample_from_a_refreshed_copy_of_the_policy(tiny_model_dir, tmp_path, monkeypatch):
    """rollout_dtype="fp16": rollouts come from an fp16-weight copy, re-made from the policy after
    every update (its logits follow the updated policy, not the initial one)."""
    from nanoseek import load
    from nanoseek.infer.quantize import FP16Linear
    from nanoseek.train import grpo as G
    _fake_rewards(monkeypatch)
    engines = []
    real = G.rollout

    def spy(engine, *a, **kw):
        engines.append(engine.model)
        return real(engine, *a, **kw)
    monkeypatch.setattr(G, "rollout", spy)
    G.grpo(_args(tiny_model_dir, tmp_path / "f", steps=2, updates=1, beta=0.0, save_every=1, keep=5, eval_every=5,
                 rollout_dtype="fp16"))
    assert len(engines) == 2 and engines[0] is not engines[1]
    assert any(isinstance(m, FP16Linear) for m in engines[1].modules())
    base, tok = load(tiny_model_dir)
    step1, _ = load(tmp_path / "f" / "checkpoints" / "step-00000001")
    ids = torch.tensor([tok.encode("User: Question: 23 + 48 = ?\nAssistant: <think>")])
    with torch.no_grad():
        copy1, want, old = engines[1](ids), step1(ids), base(ids)
    assert (want - old).abs().max() > 20 * (copy1 - want).abs().max()   # the copy is of the updated policy
    torch.testing.assert_close(copy1, want, atol=2e-3, rtol=0)           # up to fp16 rounding


@pytest.mark.parametrize("arch", ["deepseek_v3", "llama"])
def test_shared_prompt_packing_gives_each_rows_logprobs_and_gradients(arch):
    """A prompt and its G completions packed in one row under a block mask: the same log-probs,
    entropies and gradients as one row per sequence (MLA + MoE and GQA models)."""
    from nanoseek import Transformer, preset
    from nanoseek.train.grpo import Rollouts, pack, pack_shared, token_logprobs
    cfg = preset("tiny").replace(vocab_size=64, num_hidden_layers=2)
    if arch == "llama":
        cfg = preset("tiny").replace(model_type="llama", vocab_size=64, num_hidden_layers=2, n_routed_experts=0,
                                     q_lora_rank=None, kv_lora_rank=None, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    from nanoseek.model.attention import GQA
    assert any(isinstance(m, GQA) for m in model.modules()) == (arch == "llama")
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(2, 64, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(7)] * 3 + [rnd(20)] * 3                               # two groups, G = 3
    comps = [rnd(5), [], rnd(9), rnd(3), rnd(12), rnd(20)]              # [] stopped at once; 40 sets T
    r = Rollouts([None] * 6, [""] * 6, prompts, comps, {}, [False] * 6)
    ids, mask = pack(r, pad_id=0)
    sp = pack_shared(prompts, comps, 3, pad_id=0)
    assert sp.ids.shape == (2, 20 + 35) and len(sp.targets) == mask.sum()  # each prompt once per group
    w = torch.randn(mask.shape, generator=g) * mask
    grads = []
    for shared in (None, sp):
        model.zero_grad()
        logp, ent = token_logprobs(model, ids, 0.8, with_entropy=True, mask=mask, shared=shared)
        (logp * w).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if shared is None:
            want, want_ent = logp.detach(), ent
    torch.testing.assert_close(logp.detach(), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=2e-5, rtol=0)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def test_sharing_saves_compares_the_forward_flops_of_both_packings():
    """pack_shared only where it costs fewer FLOPs: counted here from the module's own linear layers
    (2 per weight per token) and attention (2 x heads x (q·k + p·v) per attended pair): a shared row
    attends over all L^2 pairs of its block mask, a separate causal row over T(T+1)/2."""
    from nanoseek import Transformer, preset
    from nanoseek.train.grpo import sharing_saves
    cfg = preset("tiny").replace(model_type="llama", vocab_size=64, num_hidden_layers=2, n_routed_experts=0,
                                 q_lora_rank=None, kv_lora_rank=None, num_nextn_predict_layers=0)
    model = Transformer(cfg)
    layers = model.model.layers
    per_token = 2 * sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    hd = layers[0].self_attn.q_proj.out_features // cfg.num_attention_heads
    per_pair = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * 2 * hd
    g = torch.Generator().manual_seed(0)
    for P, C, G in ((30, 2, 4), (2, 60, 4), (20, 62, 8), (60, 20, 8), (10, 10, 2), (40, 120, 4)):
        prompts = [[5] * P] * (2 * G)
        comps = [[6] * int(torch.randint(C // 2 + 1, C + 1, (1,), generator=g)) for _ in range(2 * G)]
        L = max(P + sum(map(len, comps[i:i + G])) for i in (0, G))
        T = P + max(map(len, comps))
        shared = 2 * (L * per_token + L * L * per_pair)
        rows = 2 * G * (T * per_token + T * (T + 1) / 2 * per_pair)
        assert sharing_saves(cfg, prompts, comps, G) == (shared < rows), (P, C, G)
    assert sharing_saves(cfg, [[5] * 30] * 4, [[6] * 2] * 4, 4)          # long prompt, short answers: share
    assert not sharing_saves(cfg, [[5] * 2] * 4, [[6] * 60] * 4, 4)      # short prompt, long answers: rows

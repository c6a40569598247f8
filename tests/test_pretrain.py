"""Pretraining: the objective against the DeepSeek-V3 formulas on hand-built examples, the
auxiliary-loss-free bias update, exact resume from a checkpoint, bad input, and 2-process (gloo)
DDP, FSDP2 and expert parallelism against one process."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model.moe import MoE
from nanoseek.train import checkpoint
from nanoseek.train.objective import (load_stats, mtp_loss, mtp_weight, next_token_loss,
                                      sequence_balance_loss, update_bias)
from nanoseek.train.optim import lr_at, param_groups
from nanoseek.train.pretrain import PretrainArgs, main, pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**kw) -> ModelConfig:
    base = dict(model_type="deepseek_v3", vocab_size=300, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, routed_scaling_factor=2.5,
                norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", first_k_dense_replace=1,
                num_nextn_predict_layers=1)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("cfg") / "config.json"
    f.write_text(json.dumps(tiny_config().to_hf_config()))
    return str(f)


def args(out, config_file, **kw) -> PretrainArgs:
    base = dict(out=str(out), config=config_file, synthetic_docs=300, vocab_size=300, steps=8, seq_len=32,
                batch_size=8, lr=1e-2, warmup=2, save_every=4, keep=10, log_every=100, sample_every=100,
                sample_tokens=4, final_eval=0, progress=False)  # the final greedy eval is slow, not checked here
    return PretrainArgs(**{**base, **kw})


# ------------------------------------------------------------------------------ objective
def test_mtp_loss_uses_tokens_two_or_more_ahead():
    V, T = 11, 6
    window = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])  # T + 1 tokens
    onehot = lambda ids: F.one_hot(ids, V).float() * 50  # noqa: E731  (a confident prediction)
    depth0_right = onehot(window[:, 2:])        # position i predicts token i + 2
    depth1_right = onehot(window[:, 3:])        # depth 1: token i + 3
    assert mtp_loss([depth0_right, depth1_right], window) < 1e-6
    wrong = onehot(window[:, 1:T])              # i + 1 is the main head's target, not MTP's
    assert mtp_loss([wrong], window) > 10
    assert next_token_loss(onehot(window[:, 1:]), window) < 1e-6
    assert mtp_loss([], window) == 0


def test_mtp_loss_against_the_model_and_an_explicit_loop():
    torch.manual_seed(0)
    model = nanoseek.Transformer(tiny_config())
    window = torch.randint(0, 300, (2, 9))
    logits, mtp = model(window[:, :-1], return_mtp=True)
    assert mtp[0].shape[1] == 7
    # eq. 24: -(1/T) sum over the T - 1 predictable positions, T = 8 input tokens
    expected = torch.stack([F.cross_entropy(mtp[0][b, i], window[b, i + 2])
                            for b in range(2) for i in range(7)]).sum() / (2 * 8)
    torch.testing.assert_close(mtp_loss(mtp, window), expected)


def test_mtp_lambda_schedule():
    assert mtp_weight(0, 148) == 0.3 and mtp_weight(99, 148) == 0.3
    assert mtp_weight(100, 148) == 0.1 and mtp_weight(147, 148) == 0.1  # after 10T of 14.8T tokens


def test_balance_loss_equals_the_formula_by_hand():
    # T = 2 tokens, N_r = 4 experts, K_r = 2.
    s = torch.tensor([[0.9, 0.8, 0.1, 0.2],
                      [0.6, 0.1, 0.7, 0.2]], requires_grad=True)
    # top-2: token 1 -> {0, 1}, token 2 -> {2, 0}; f = N_r/(K_r T) * counts = [2, 1, 1, 0]
    # s' = s / row sums (2.0, 1.6); P = mean over tokens = [0.4125, 0.23125, 0.24375, 0.1125]
    # sum f P = 0.825 + 0.23125 + 0.24375 + 0 = 1.3
    loss = sequence_balance_loss(s, top_k=2, alpha=1e-4)
    assert loss.item() == pytest.approx(1.3e-4, rel=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0  # through P; f is a constant
    # perfectly balanced routing gives alpha exactly; a batch averages its sequences
    uniform = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]) + 1e-3
    balanced = sequence_balance_loss(uniform, 2, 1.0)
    assert balanced.item() == pytest.approx(1.0, rel=1e-2)
    batch = torch.stack([s.detach(), uniform])
    assert sequence_balance_loss(batch, 2, 1e-4).item() == pytest.approx((1.3e-4 + balanced.item() * 1e-4) / 2,
                                                                          rel=1e-5)


def test_bias_update_direction():
    cfg = tiny_config()
    moe = MoE(cfg)
    update_bias([moe], torch.tensor([[10.0, 2.0, 4.0, 4.0]]), gamma=0.01)  # mean 5
    assert moe.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])


def test_bias_update_moves_a_skewed_load_toward_uniform():
    torch.manual_seed(0)
    cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2)
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.gate.weight[:2] += 1.0  # experts 0 and 1 win for most tokens
    x = torch.randn(512, cfg.hidden_size) + 0.5

    def load():
        with torch.no_grad():
            return moe(x)[1].load.float()[None]

    before = load_stats(load())[0]
    for _ in range(300):
        update_bias([moe], load(), gamma=1e-2)
    after = load_stats(load())[0]
    assert before > 3 and after < 1.6, (before, after)  # 3.9 -> 1.5 (sign steps jitter around balance)


def test_optimizer_groups_and_schedules():
    model = nanoseek.Transformer(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 and "embed_tokens" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].endswith("experts.gate_up_proj") for p in decay["params"])  # [E, 2I, H]: matrices
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(9, 100, 1.0, 10) == 1.0
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1)            # cosine ends at min_ratio
    assert lr_at(50, 100, 1.0, 10, "wsd") == 1.0                     # stable phase
    assert lr_at(99, 100, 1.0, 10, "wsd") == pytest.approx(0.1)      # decayed


# ------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, config_file):
    out = tmp_path_factory.mktemp("full")
    return out, pretrain(args(out, config_file))


def test_loss_decreases_and_everything_is_logged(full_run):
    out, summary = full_run
    losses = summary["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    for key in ("loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "load_max_mean"):
        assert recs[-1][key] is not None, key
    assert len(recs[-1]["load_max_mean"]) == 2  # the MoE layer and the MTP block's MoE
    model, tok = nanoseek.load(out / "final")   # a loadable HF directory, tokenizer included
    assert tok is not None and model.config.num_nextn_predict_layers == 1
    assert json.loads((out / "final" / "training.json").read_text())["steps"] == 8
    assert [p.name for _, p in checkpoint.step_dirs(out / "checkpoints")] == ["step-00000004", "step-00000008"]


def assert_same_weights(a_dir, b_dir):
    a, _ = nanoseek.load(a_dir)
    b, _ = nanoseek.load(b_dir)
    assert a.state_dict().keys() == b.state_dict().keys()
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_resume_reproduces_the_uninterrupted_run_exactly(full_run, tmp_path, config_file):
    out, summary = full_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "final")
    shutil.rmtree(crashed / "checkpoints" / "step-00000008")
    # a checkpoint write killed halfway: a temp dir, and a step dir without its state file
    half = crashed / "checkpoints" / ".step-00000006.tmp-x1y2"
    shutil.copytree(out / "checkpoints" / "step-00000008", half)
    (crashed / "checkpoints" / "step-00000007").mkdir()
    (crashed / "checkpoints" / "step-00000007" / "config.json").write_text("{}")
    assert checkpoint.latest(crashed / "checkpoints").name == "step-00000004"

    resumed = pretrain(args(crashed, config_file, resume=True))
    assert resumed["start_step"] == 4
    assert resumed["losses"] == summary["losses"][4:]  # bit-for-bit on CPU
    recs = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert not half.exists()
    assert_same_weights(out / "final", crashed / "final")


def test_killed_after_the_last_checkpoint_resume_writes_final(full_run, tmp_path, config_file):
    # killed between the step-8 checkpoint and final/: nothing is left to train, but final/ is owed
    out, _ = full_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "final")
    pretrain(args(crashed, config_file, resume=True))
    assert_same_weights(out / "final", crashed / "final")
    assert json.loads((crashed / "final" / "training.json").read_text())["steps"] == 8


def test_bad_inputs(tmp_path, config_file, full_run, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (dict(corpus=[str(empty)]), "empty"),
        (dict(corpus=[str(short)]), "fewer than one training sequence"),
        (dict(config=None, preset="huge"), "unknown preset"),
        (dict(out=str(a_file / "sub")), "cannot write the output directory"),
    ]
    for kw, msg in cases:
        with pytest.raises(NanoseekError, match=msg):
            pretrain(args(kw.pop("out", tmp_path / "run"), config_file, **kw))

    out, _ = full_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(NanoseekError, match="already has checkpoints"):
        pretrain(args(out, config_file))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(tiny_config(hidden_size=48).to_hf_config()))
    with pytest.raises(NanoseekError, match="different model config"):
        pretrain(args(out, str(other), resume=True, steps=12))
    with pytest.raises(NanoseekError, match="seq_len"):
        pretrain(args(out, config_file, resume=True, steps=12, seq_len=16))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing overwritten

    capsys.readouterr()
    assert main(["--out", str(tmp_path / "r"), "--preset", "huge", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanoseek: error: unknown preset")


BAD_INPUT = {  # case -> (extra flags, what the one line says)
    "empty corpus": (lambda d: ["--corpus", str(d / "empty.txt")], "the corpus is empty"),
    "corpus shorter than one sequence": (lambda d: ["--corpus", str(d / "short.txt")],
                                         "fewer than one training sequence"),
    "unknown preset": (lambda d: ["--preset", "huge"], "unknown preset 'huge'"),
    "unwritable output dir": (lambda d: ["--out", str(d / "a_file" / "sub")], "cannot write the output directory"),
    "resume from a different config": (lambda d: ["--config", str(d / "other.json"), "--resume", "--steps", "12"],
                                       "different model config"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_from_the_cli_is_one_line_and_exit_2(case, tmp_path, config_file, full_run, capsys):
    from nanoseek.cli import main as cli
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "other.json").write_text(json.dumps(tiny_config(hidden_size=48).to_hf_config()))
    resumed_out, _ = full_run
    out = resumed_out if case.startswith("resume") else tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in resumed_out.rglob("*")}
    extra, message = BAD_INPUT[case]
    flags = ["--out", str(out), "--config", config_file, "--synthetic-docs", "300", "--vocab-size", "300",
             "--steps", "2", "--seq-len", "32", "--batch-size", "8", "--no-progress"]
    if case == "unknown preset":
        flags.remove("--config"), flags.remove(config_file)
    capsys.readouterr()
    assert cli(["pretrain", *flags, *extra(tmp_path)]) == 2  # argparse keeps the last --out / --config / --steps
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nanoseek: error: ") and message in err[0], err
    assert {p: p.stat().st_mtime_ns for p in resumed_out.rglob("*")} == before  # nothing overwritten
    assert not any((tmp_path / "run" / name).exists() for name in ("checkpoints", "final", "metrics.jsonl"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, config_file):
    one = pretrain(args(tmp_path / "one", config_file, steps=3, save_every=100))
    acc = pretrain(args(tmp_path / "acc", config_file, steps=3, save_every=100, micro_batch=2))
    assert acc["losses"] == pytest.approx(one["losses"], abs=1e-5)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, config_file):
    return pretrain(args(tmp_path_factory.mktemp("single"), config_file, steps=4, save_every=100))


MODES = {"DDP": ([], "gloo, DDP"), "FSDP2": (["--fsdp"], "gloo, FSDP2"),
         "expert parallel": (["--expert-parallel"], "gloo, DDP + expert parallel")}


@pytest.mark.parametrize("mode", ["DDP", "FSDP2", pytest.param("expert parallel", marks=pytest.mark.skipif(
    "expert_parallel" not in PretrainArgs.__dataclass_fields__, reason="pretrain has no --expert-parallel yet"))])
def test_two_process_gloo_matches_one_process_and_resumes_in_one(tmp_path, config_file, single_process, mode):
    single = single_process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nanoseek.train.pretrain", "--out", str(tmp_path / "ddp"), "--config", config_file,
           "--synthetic-docs", "300", "--vocab-size", "300", "--steps", "4", "--seq-len", "32",
           "--batch-size", "8", "--lr", "0.01", "--warmup", "2", "--save-every", "2",
           "--sample-every", "100", "--sample-tokens", "4", "--final-eval", "0", "--no-progress"] + MODES[mode][0]
    # own process group: on a timeout the workers die with the launcher
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs] == pytest.approx(single["losses"], abs=1e-4)
    assert "2 proc" in stderr and MODES[mode][1] in stderr
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    # the step-2 checkpoint (full weights and a name-keyed optimizer state, gathered from the
    # shards under FSDP2 / the ranks' experts; the step-4 one was written after the greedy samples)
    # resumes in one process
    for step in (2, 4):
        ckpt = checkpoint.read(tmp_path / "ddp" / "checkpoints" / f"step-{step:08d}")
        assert set(ckpt.optimizer["state"]) == {n for n, _ in nanoseek.Transformer(ckpt.config).named_parameters()}
    one = tmp_path / "one"
    shutil.copytree(tmp_path / "ddp", one)
    shutil.rmtree(one / "final")
    shutil.rmtree(one / "checkpoints" / "step-00000004")
    resumed = pretrain(args(one, config_file, steps=4, save_every=100, resume=True))
    assert resumed["start_step"] == 2
    assert resumed["losses"] == pytest.approx(single["losses"][2:], abs=1e-4)


def test_document_mask_makes_each_packed_document_see_only_itself():
    # a packed window of three documents (ending at EOS = 1) must give every token the logits (and MTP
    # logits) of its document run alone: RoPE is relative, so only the other documents' tokens can differ
    from nanoseek.config import preset
    from nanoseek.model.transformer import Transformer
    from nanoseek.train.pretrain import document_mask
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=64, num_hidden_layers=2)
    model = Transformer(cfg).eval()
    docs = [torch.randint(2, 64, (n,)).tolist() + [1] for n in (5, 9, 6)]
    x = torch.tensor([sum(docs, [])])
    mask = document_mask(x, eos=1)
    assert mask.shape == (1, 1, x.shape[1], x.shape[1])
    with torch.no_grad():
        logits, mtp = model(x, return_mtp=True, mask=mask)
        start = 0
        for d in docs:
            alone, alone_mtp = model(torch.tensor([d]), return_mtp=True)
            part = logits[:, start:start + len(d)]
            assert torch.allclose(part, alone, atol=1e-4 * alone.abs().max()), (part - alone).abs().max()
            n = len(d) - 1   # the MTP positions of this document that stay inside it
            assert torch.allclose(mtp[0][:, start:start + n - 1], alone_mtp[0][:, :n - 1], atol=1e-4 * alone.abs().max())
            start += len(d)
        unmasked = model(x)
    assert not torch.allclose(unmasked[:, len(docs[0]):], logits[:, len(docs[0]):], atol=1e-3)


_FAULTS = """
import resource, sys, torch
from nanoseek.train.run import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 24)                      # 64 MiB, over glibc's largest dynamic mmap threshold (32 MiB)
before = faults()
for _ in range(20):
    torch.ones(1 << 24)                  # allocated, written, freed
print(took, faults() - before)
"""


def test_keep_freed_memory_stops_the_page_faults_of_reallocated_tensors():
    """Without it each 64 MiB tensor comes back as 16K fresh pages that fault in; with it the freed
    block is reused: of twenty allocations at most a quarter fault their pages in (page counts, not
    timings; which ones grow the heap depends on the machine's address layout: 1 here, 3 on a CI host)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    runs = {mode: subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env,
                                 check=True).stdout.split() for mode in ("keep", "default")}
    if runs["keep"][0] != "True":
        pytest.skip("not glibc: malloc's thresholds cannot be set")
    pages = (1 << 24) * 4 // os.sysconf("SC_PAGE_SIZE")
    assert int(runs["default"][1]) >= 10 * pages    # measured: 20 x 16,384 on glibc 2.36
    assert int(runs["keep"][1]) <= 5 * pages        # measured: 1 or 3 x 16,384 (the heap grows)

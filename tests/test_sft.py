"""SFT: assistant-only loss masks (hand-built ChatML, the R1 template, transformers' own
assistant mask), packing, the loss going down, exact resume, a GGUF model being trainable, bad input."""

import json
import random
import shutil

import pytest
import torch

import nanoseek
from nanoseek.cli import main as cli_main
from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import CHATML_TEMPLATE, EOS, Tokenizer
from nanoseek.train.sft import (PackedStream, SFTArgs, encode_chat, encode_prompt_completion, encode_record,
                                masked_loss_sum, pack, read_records, train_sft)

CORPUS = [f"Question: {a} + {b} = ? {a} plus {b} is {a + b}. The answer is {a + b}."
          for a in range(30) for b in range(0, 30, 3)] + ["Hello there, how are you? I am fine, thanks."] * 20
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def r1_tok():
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def chatml_tok():
    t = Tokenizer.train_bpe(CORPUS, vocab_size=300, special_tokens=[IM_START, IM_END, "<pad>"])
    return Tokenizer(t.tk, CHATML_TEMPLATE, None, IM_END, "<pad>")


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    return nanoseek.Transformer(cfg)


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question: 3 + 4 = ?"},
        {"role": "assistant", "content": "3 plus 4 is 7."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "I am fine, thanks."}]


# ------------------------------------------------------------------------------ masks
def test_chatml_mask_is_exactly_the_assistant_content_and_end_of_turn(chatml_tok):
    tok = chatml_tok
    ids, mask = encode_chat(CHAT, tok)
    # built by hand from the ChatML format, not by the template engine
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    im_end = tok.token_to_id(IM_END)
    pieces = [(enc(f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nQuestion: 3 + 4 = ?{IM_END}\n"
                   f"{IM_START}assistant\n"), False),
              (enc("3 plus 4 is 7.") + [im_end], True),
              (enc(f"\n{IM_START}user\nHello there{IM_END}\n{IM_START}assistant\n"), False),
              (enc("I am fine, thanks.") + [im_end], True),
              (enc("\n"), False)]
    assert ids == [i for p, _ in pieces for i in p]
    assert mask == [m for p, m in pieces for _ in p]
    assert sum(mask) == len(enc("3 plus 4 is 7.")) + 1 + len(enc("I am fine, thanks.")) + 1
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == f"3 plus 4 is 7.{IM_END}I am fine, thanks.{IM_END}"
    # the same tokens as encoding the whole rendered text at once
    assert ids == enc(tok.apply_chat_template(CHAT, add_generation_prompt=False))


def test_r1_template_mask(r1_tok):
    tok = r1_tok  # DeepSeek-R1 template: <｜Assistant｜> content <｜end▁of▁sentence｜>
    msgs = [{"role": "user", "content": "Question: 3 + 4 = ?"}, {"role": "assistant", "content": "The answer is 7."}]
    ids, mask = encode_chat(msgs, tok)
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == tok.encode("The answer is 7.", add_special_tokens=False) + [tok.token_to_id(EOS)]
    assert tok.decode([i for i, m in zip(ids, mask) if not m]).endswith("<｜Assistant｜>")
    # a prompt/completion line under --template chat is the same conversation
    assert encode_record({"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}, tok, "chat") == (ids, mask)


def test_mask_matches_transformers_assistant_mask(chatml_tok):
    transformers = pytest.importorskip("transformers")
    # ChatML with transformers' {% generation %} markers around what the assistant says
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
                "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=chatml_tok.tk, eos_token=IM_END)
    ref = hf.apply_chat_template(CHAT, chat_template=template, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, mask = encode_chat(CHAT, chatml_tok)
    assert ids == list(ref["input_ids"])
    assert [int(m) for m in mask] == list(ref["assistant_masks"])


def test_prompt_completion_mask(r1_tok):
    ids, mask = encode_prompt_completion("Question: 3 + 4 = ?", " 3 plus 4 is 7.", r1_tok)
    p = r1_tok.encode("Question: 3 + 4 = ?")
    c = r1_tok.encode(" 3 plus 4 is 7.", add_special_tokens=False)
    assert ids == p + c + [r1_tok.eos_token_id]
    assert mask == [False] * len(p) + [True] * (len(c) + 1)
    with pytest.raises(NanoseekError, match="prompt"):
        encode_record({"messages": CHAT}, r1_tok, "none")


# ------------------------------------------------------------------------------ packing
def test_packing_keeps_every_example_and_its_mask():
    rng = random.Random(0)
    examples = []
    for _ in range(40):
        n = rng.randint(1, 17)
        examples.append(([rng.randint(1, 99) for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]))
    ids, mask, spans, doc = pack(examples, 17, pad_id=0)
    assert len(spans) == len(examples)
    for j, (e_ids, _) in enumerate(examples):                # each example's tokens carry its number
        r, s = spans[j]
        assert (doc[r, s:s + len(e_ids)] == j).all()
    used = torch.zeros_like(mask, dtype=torch.int)
    for (e_ids, e_mask), (r, s) in zip(examples, spans):
        n = len(e_ids)
        assert ids[r, s:s + n].tolist() == e_ids
        assert mask[r, s:s + n].tolist() == e_mask
        used[r, s:s + n] += 1
    assert used.max() == 1                                   # no overlap
    assert not mask[used == 0].any() and (ids[used == 0] == 0).all()   # padding: no loss
    assert int(mask.sum()) == sum(sum(m) for _, m in examples)
    # greedy in order: the next example did not fit in what was left of the previous row
    for j in range(1, len(examples)):
        (r0, s0), (r1, s1) = spans[j - 1], spans[j]
        if r1 != r0:
            assert s0 + len(examples[j - 1][0]) + len(examples[j][0]) > 17 and s1 == 0
    with pytest.raises(ValueError):
        pack([([1] * 18, [True] * 18)], 17, 0)


def test_packed_stream_epochs_are_permutations_and_batches_cross_them():
    examples = [([i + 1] * (1 + i % 5), [True] * (1 + i % 5)) for i in range(23)]
    stream = PackedStream(examples, row_len=8, pad_id=0, seed=3)
    e0, e1 = stream.epoch(0)[0], stream.epoch(1)[0]
    for e in (e0, e1):
        assert sorted(int(t) for t in e.flatten() if t) == sorted(t for ids, _ in examples for t in ids)
    n0 = len(e0)
    rows, _, _ = stream.batch(1, n0 - 1)  # rows n0-1 .. 2n0-3: the last of epoch 0, then epoch 1
    assert torch.equal(rows[0], e0[-1]) and torch.equal(rows[1:], e1[:n0 - 2])


def test_a_packed_example_sees_only_itself():
    # the loss of three examples packed in one row equals the sum of their losses run one by one
    torch.manual_seed(0)
    cfg = nanoseek.preset("tiny").replace(vocab_size=50, num_hidden_layers=2)
    model = nanoseek.Transformer(cfg).eval()
    examples = [(torch.randint(2, 50, (n,)).tolist(), [False] * 2 + [True] * (n - 2)) for n in (6, 9, 5)]
    ids, mask, _, doc = pack(examples, 24, pad_id=0)
    assert ids.shape[0] == 1
    with torch.no_grad():
        alone = sum(masked_loss_sum(model, torch.tensor([i]), torch.tensor([m])) for i, m in examples)
        packed = masked_loss_sum(model, ids, mask, doc)
        crossing = masked_loss_sum(model, ids, mask)          # plain causal: later examples see earlier ones
    assert torch.allclose(packed, alone, rtol=1e-5), (packed, alone)
    assert not torch.allclose(crossing, alone, rtol=1e-3)


# ------------------------------------------------------------------------------ training
RECORDS = [{"prompt": f"Question: {a} + {b} = ?", "completion": f" {a} plus {b} is {a + b}."}
           for a, b in [(3, 4), (12, 9), (20, 6), (7, 21), (15, 15), (1, 2)]]


def sft_args(out, **kw):
    base = dict(out=str(out), template="none", seq_len=48, batch_size=2, lr=1e-2, warmup=2, steps=30,
                save_every=1000, log_every=1000, progress=False)
    return SFTArgs(**{**base, **kw})


def test_sft_loss_decreases_and_writes_metrics_and_final(tmp_path, r1_tok):
    model = tiny_model(r1_tok)
    res = train_sft(model, r1_tok, sft_args(tmp_path / "o"), records=RECORDS)
    L = res["losses"]
    assert len(L) == 30 and sum(L[-5:]) / 5 < 0.5 * L[0]
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert all({"loss", "lr", "tokens_per_s"} <= set(x) for x in lines)
    back, tok = nanoseek.load(tmp_path / "o" / "final")
    rows = torch.tensor([encode_prompt_completion(RECORDS[0]["prompt"], RECORDS[0]["completion"], tok)[0]])
    torch.testing.assert_close(back(rows), model(rows))


def test_sft_resume_reproduces_the_uninterrupted_losses(tmp_path, r1_tok):
    a = sft_args(tmp_path / "full", steps=8, save_every=3, keep=10)
    full = train_sft(tiny_model(r1_tok), r1_tok, a, records=RECORDS)["losses"]
    # a run killed after step 6: only its checkpoints (and metrics up to then) survive
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000006",
                    tmp_path / "cut" / "checkpoints" / "step-00000006")
    with pytest.raises(NanoseekError, match="--resume"):
        train_sft(tiny_model(r1_tok), r1_tok, sft_args(tmp_path / "cut", steps=8), records=RECORDS)
    other_init = tiny_model(r1_tok, seed=1)  # the checkpoint, not the given weights, must count
    res = train_sft(other_init, r1_tok, sft_args(tmp_path / "cut", steps=8, save_every=3, resume=True),
                    records=RECORDS)
    assert res["start_step"] == 6
    assert res["losses"] == full[6:]
    with pytest.raises(NanoseekError, match="seed"):
        train_sft(tiny_model(r1_tok), r1_tok, sft_args(tmp_path / "cut", steps=9, resume=True, seed=5),
                  records=RECORDS)


def test_sft_epochs_cover_the_data(tmp_path, r1_tok):
    res = train_sft(tiny_model(r1_tok), r1_tok, sft_args(tmp_path / "e", steps=None, epochs=2, seq_len=24),
                    records=RECORDS)
    # every example (< 25 tokens) takes its own row of 25: 6 rows per epoch, 2 per step
    assert res["total_steps"] == 6


def test_gguf_model_is_trainable(gguf_path):
    model, tok = nanoseek.load(gguf_path, dtype=torch.float32)
    model.train()
    ids, mask = encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
                             {"role": "assistant", "content": "2 + 3 = 5."}], tok)
    rows, m = torch.tensor([ids]), torch.tensor([mask])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = masked_loss_sum(model, rows, m)
    before.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    with torch.no_grad():
        assert masked_loss_sum(model, rows, m) < before


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, r1_tok):
    d = tmp_path_factory.mktemp("m") / "model"
    nanoseek.save(tiny_model(r1_tok), r1_tok, d)
    return d


@pytest.mark.parametrize("content,needle", [(None, "no such data file"), ("", "empty"), ("\n  \n", "empty"),
                                            ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: not JSON"),
                                            ('{"prompt": "a"}\n', ":1: expected"),
                                            ('{"messages": [{"role": "user", "content": "x"}]}\n', "no assistant")])
def test_bad_data_is_one_clear_error(tmp_path, capsys, model_dir, content, needle):
    data = tmp_path / "train.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    rc = cli_main(["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err and "train.jsonl" in err
    assert not out.exists()
    with pytest.raises(NanoseekError):
        read_records(data)


def test_cli_sft_runs(tmp_path, model_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "out"
    rc = cli_main(["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "2",
                   "--template", "none", "--seq-len", "32", "--no-progress"])
    assert rc == 0 and (out / "final" / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

"""The engine against the simple reference decoder and against the sampling formulas."""

import pytest
import torch

from nanoseek.infer import Engine, QueueFull, SamplingParams, kernels
from nanoseek.infer.sampling import apply_penalties, sample
from nanoseek.infer.simple import generate
from nanoseek.tokenizer import Tokenizer

from test_model import tiny_llama, tiny_v3

PROMPTS = [[5, 9, 2, 7, 1], [3, 3], [8, 1, 4, 4, 6, 2, 9], [1, 2, 3, 1, 2, 3, 1, 2], [40, 41]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["deepseek_v3", "llama"])
def model(request):
    return tiny_v3() if request.param == "deepseek_v3" else tiny_llama()


def test_greedy_equals_simple_decoding_batched_and_one_by_one(model):
    """The reference decodes with SDPA; the engine's llama decode steps use the C++ decode attention
    where it is built (rows of different lengths in one batch)."""
    ref = generate(model, PROMPTS, max_new_tokens=12)
    for batch in (1, 2, 8):  # 2 < len(PROMPTS): requests queue, join and leave
        engine = Engine(model, max_batch_size=batch, max_seq_len=64)
        assert (engine.cache.decode_attention is not None) == kernels.available()
        outs = engine.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outs] == ref
        assert all(o.finish_reason == "length" for o in outs)


def test_request_joining_mid_batch_matches_alone(model):
    alone = Engine(model, max_batch_size=4, max_seq_len=64).generate([PROMPTS[2]], GREEDY)[0].token_ids
    eng = Engine(model, max_batch_size=4, max_seq_len=64)
    eng.add_request(PROMPTS[0], GREEDY)
    eng.add_request(PROMPTS[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    got = {}
    for _ in range(5):
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    late = eng.add_request(PROMPTS[2], GREEDY)
    while eng.has_work():
        for d in eng.step():
            got.setdefault(d.request_id, []).extend(d.token_ids)
    assert got[late] == alone


def test_speculative_greedy_equals_plain_greedy(model):
    prompts = PROMPTS + [[7, 8, 9, 7, 8, 9, 7, 8, 9, 7]]
    plain = Engine(model, max_batch_size=8, max_seq_len=64).generate(prompts, GREEDY)
    eng = Engine(model, max_batch_size=8, max_seq_len=64, speculative="ngram", num_draft=3)
    spec = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats["drafted"] > 0


def test_mtp_speculative_greedy_equals_plain_greedy():
    model = tiny_v3()  # has one MTP module
    plain = Engine(model, max_batch_size=8, max_seq_len=64).generate(PROMPTS, GREEDY)
    eng = Engine(model, max_batch_size=3, max_seq_len=64, speculative="mtp")
    spec = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert eng.stats["drafted"] > 0 and 0 <= eng.acceptance_rate <= 1


def test_mtp_drafts_are_the_mtp_modules_own_predictions():
    """The draft after prefill is what Transformer.mtp_logits predicts at the last prompt position."""
    model = tiny_v3()
    eng = Engine(model, max_batch_size=2, max_seq_len=64, speculative="mtp")
    # Reference: the MTP module's greedy prediction of token i+2, computed by Transformer.mtp_logits
    ids = torch.tensor([PROMPTS[0]])
    first = Engine(model, max_seq_len=64).generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    full = torch.cat([ids, torch.tensor([first[0].token_ids])], dim=1)
    with torch.no_grad():
        _, (mtp,) = model(full, return_mtp=True)
    eng.add_request(PROMPTS[0], GREEDY)
    eng.step()  # prefill drafts from the last prompt position, reading the first sampled token
    assert int(eng.mtp_draft[0]) == int(mtp[0, len(PROMPTS[0]) - 1].argmax())


def test_seeded_sampling_reproducible_whatever_the_batch(model):
    p = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    alone = Engine(model, max_batch_size=1, max_seq_len=64).generate([PROMPTS[0]], p)[0].token_ids
    crowd = Engine(model, max_batch_size=8, max_seq_len=64).generate(
        PROMPTS, [p] + [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 4)
    assert crowd[0].token_ids == alone
    other = Engine(model, max_batch_size=1, max_seq_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=12, ignore_eos=True))
    assert other[0].token_ids != alone


def test_stop_strings_cut_exactly_and_stream_concatenates():
    corpus = [f"{a} plus {b} is {a + b}. " * 2 for a in range(30) for b in range(30)]
    tok = Tokenizer.train_bpe(corpus, vocab_size=300)
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=tok.vocab_size)
    free = Engine(model, tok, max_batch_size=4, max_seq_len=128).generate(
        ["3 plus 4 is"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 12
    stop = free.text[8:11]
    cut = free.text[: free.text.find(stop)]
    eng = Engine(model, tok, max_batch_size=4, max_seq_len=128)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    out = eng.generate(["3 plus 4 is"], params)[0]
    assert out.text == cut and out.finish_reason == "stop"
    streamed = "".join(d.text for d in eng.stream(["3 plus 4 is"], params))
    assert streamed == cut
    assert "".join(d.text for d in Engine(model, tok, max_seq_len=128).stream(
        ["3 plus 4 is"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))) == free.text


def test_stop_token_ids_and_eos_end_without_emitting_them(model):
    ref = generate(model, [PROMPTS[0]], max_new_tokens=12)[0]
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    out = Engine(model, max_seq_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == ref[:first] and out.finish_reason == "stop"


def test_logprobs_are_log_softmax_of_the_model(model):
    out = Engine(model, max_seq_len=64).generate(
        [PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, logprobs=True, ignore_eos=True))[0]
    ids = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        lsm = model(ids)[0].log_softmax(-1)
    n = len(PROMPTS[0])
    ref = [lsm[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(ref, abs=1e-4)


def test_queue_bound_and_abort(model):
    eng = Engine(model, max_batch_size=1, max_seq_len=64, max_queue=2)
    a = eng.add_request(PROMPTS[0], GREEDY)
    eng.add_request(PROMPTS[1], GREEDY)
    with pytest.raises(QueueFull):
        eng.add_request(PROMPTS[2], GREEDY)
    eng.step()
    eng.abort(a)
    assert [r.id for r in eng.running] == [] and len(eng.queue) == 1
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.add_request(list(range(64)), GREEDY)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40000
    rows = logits.expand(n, 5)
    seeds, steps = torch.arange(n), torch.zeros(n, dtype=torch.long)
    ones = torch.ones(n)

    def freq(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        t = sample(rows, ones * temperature, torch.full((n,), top_k), ones * top_p, ones * min_p, seeds, steps)
        return torch.bincount(t, minlength=5).float() / n

    assert torch.allclose(freq(), logits.softmax(-1), atol=0.01)
    assert torch.allclose(freq(temperature=0.5), (logits / 0.5).softmax(-1), atol=0.01)
    f = freq(top_k=2)
    assert torch.allclose(f, torch.cat([logits[:2].softmax(-1), torch.zeros(3)]), atol=0.01)
    p = logits.softmax(-1)  # [0.563, 0.207, 0.126, 0.076, 0.028]
    f = freq(top_p=0.7)  # nucleus: smallest prefix with mass >= 0.7 is the first two (0.770)
    assert f[2:].sum() == 0 and torch.allclose(f[:2], p[:2] / p[:2].sum(), atol=0.01)
    f = freq(top_p=0.8)  # ... and the first three for 0.8 (0.770 < 0.8 <= 0.896)
    assert f[3:].sum() == 0 and torch.allclose(f[:3], p[:3] / p[:3].sum(), atol=0.01)
    f = freq(min_p=0.2)  # keep p >= 0.2 * 0.563 = 0.113: the first three
    assert f[3:].sum() == 0 and torch.allclose(f[:3], p[:3] / p[:3].sum(), atol=0.01)


def test_top_p_among_the_top_k_tokens_picks_what_the_full_sort_picks(monkeypatch):
    """With top-p on every row the race runs among the NUCLEUS_K most likely tokens: the same tokens
    as the full sort of the vocabulary, on rows with greedy, top-k and min-p mixed in; a batch with
    a row whose nucleus is wider than K (flat logits) falls back to the full sort."""
    from nanoseek.infer import sampling
    torch.manual_seed(0)
    B, V = 256, 4096
    temp, top_k = torch.full((B,), 0.6), torch.zeros(B, dtype=torch.long)
    top_p, min_p = torch.full((B,), 0.95), torch.zeros(B)
    temp[::7], top_k[::5], top_p[::3], min_p[::11] = 0, 50, 0.5, 0.05
    seeds, steps = torch.arange(B), torch.full((B,), 3)
    for logits in (torch.randn(B, V) * 6, torch.randn(B, V) * 0.1):   # the nucleus inside K / wider
        probs = (logits / torch.where(temp == 0, 1.0, temp)[:, None]).softmax(-1)
        fast = sampling._nucleus_race(probs, torch.full((B,), 0.95), temp == 0, seeds, steps)
        got = sample(logits, temp, top_k, top_p, min_p, seeds, steps)
        monkeypatch.setattr(sampling, "NUCLEUS_K", V)                    # V: the full sort only
        want = sample(logits, temp, top_k, top_p, min_p, seeds, steps)
        monkeypatch.undo()
        assert torch.equal(got, want)
        assert (fast is not None) == (logits.std() > 1)                  # each case took the path it tests


def test_uniforms_never_reach_one_on_a_large_vocabulary():
    # float32 rounding of the top hash value to 1.0 would make -log(-log(u)) infinite: a random token
    from nanoseek.infer.sampling import seeded_uniform
    u = seeded_uniform(torch.arange(2000), torch.zeros(2000, dtype=torch.long), 129280)
    assert 0 < u.min() and u.max() < 1


def test_penalized_request_in_a_reused_row_and_a_mixed_batch_matches_it_alone(model):
    """The engine skips the penalty bookkeeping for batches without penalties: a penalized request
    admitted into a row an unpenalized one used, or decoding beside unpenalized ones, must see only
    its own prompt and outputs: greedy with a repetition penalty equals the same request alone."""
    pen = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=3.0,
                         frequency_penalty=0.5)
    alone = Engine(model, max_batch_size=1, max_seq_len=64).generate([PROMPTS[3]], pen)[0].token_ids
    plain = Engine(model, max_batch_size=1, max_seq_len=64).generate([PROMPTS[3]], GREEDY)[0].token_ids[:10]
    assert alone != plain                                      # the penalty changes this continuation
    reused = Engine(model, max_batch_size=1, max_seq_len=64).generate([PROMPTS[0], PROMPTS[3]], [GREEDY, pen])
    assert reused[1].token_ids == alone
    mixed = Engine(model, max_batch_size=3, max_seq_len=64).generate([PROMPTS[0], PROMPTS[3], PROMPTS[2]],
                                                                      [GREEDY, pen, GREEDY])
    assert mixed[1].token_ids == alone


def test_penalties_follow_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    seen = torch.tensor([[True, True, False, True]])  # token 3 only in the prompt
    out = apply_penalties(logits, counts, seen, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # repetition (CTRL): positive / r, negative * r on seen tokens; then OpenAI presence + frequency on outputs
    expected = torch.tensor([[2.0 / 2 - 0.5 - 0.75, -1.0 * 2 - 0.5 - 0.25, 0.5, 1.0 / 2]])
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("mode", [None, "int8"])
def test_compiled_decode_step_equals_eager(mode):
    """Engine(compile=True) (one dynamic-shape graph; the KV cache written in place) decodes the same
    greedy tokens as the simple reference decoder, at batch 1 and with requests joining and leaving;
    with a quantized model's default fp16 KV cache, the same as the eager engine."""
    from nanoseek.infer.quantize import quantize
    model = tiny_llama()
    if mode:
        quantize(model, mode)
    ref = generate(model, PROMPTS, max_new_tokens=12)
    for batch in (1, 3):
        eng = Engine(model, max_batch_size=batch, max_seq_len=64, compile=True, kv_cache_dtype=torch.float32)
        assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == ref
        assert eng.path.endswith("torch.compile")
        if mode and kernels.available():
            eager = Engine(model, max_batch_size=batch, max_seq_len=64).generate(PROMPTS, GREEDY)
            eng = Engine(model, max_batch_size=batch, max_seq_len=64, compile=True)
            assert eng.cache.a.dtype == torch.float16 and "fp16 KV cache" in eng.path
            assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == [o.token_ids for o in eager]

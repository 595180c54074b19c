"""The GLM-4-0414 and GLM-Z1-0414 chat layouts (glm4_jax/chat0414.py) against transformers rendering the jinja
chat template of a checkpoint directory.

The test writes the published template text into a tokenizer directory (tokenizer_config.json's `chat_template`
for GLM-4-0414, chat_template.jinja for GLM-Z1), made by transformers' converter from a tiktoken rank file, loads it
with `AutoTokenizer.from_pretrained` and compares `apply_chat_template` (text and ids) with ours.

What could not be verified here (no hub access): the two templates below are written from memory of the public
GLM-4-9B-0414 / GLM-Z1-9B-0414 files, not copied from them. The parts most likely to differ from the files are the
whitespace around `{{ meta }}` (a trailing space may follow it), the generation prompt of GLM-Z1
(`<|assistant|>\\n<think>` here) and whether GLM-Z1 keeps the reasoning of the last assistant turn (dropped from
every assistant turn here). The tests pin our code to these texts; a checkpoint's own template is the authority.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from helpers_hf import write_tokenizer_json  # noqa: E402

from glm4_jax import chat0414  # noqa: E402
from glm4_jax.fixtures import write_synthetic_tokenizer  # noqa: E402
from glm4_jax.tokenizer_json import JsonTokenizer  # noqa: E402

_TOOLS = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n"
    '{% for tool in tools %}{%- set function = tool.function if tool.get("function") else tool %}\n\n'
    "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
)


def _template(answer: str, generation_prompt: str) -> str:
    return (
        _TOOLS + "{%- for message in messages if message.role != 'system' %}"
        "{%- set role = message['role'] %}{%- set content = message['content'] %}"
        '{%- set meta = message.get("metadata", "") %}'
        "{%- if role == 'user' %}<|user|>\n{{ content }}"
        "{%- elif role == 'assistant' and not meta %}<|assistant|>\n" + answer + ""
        "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }}\n" + answer + ""
        "{%- elif role == 'observation' %}<|observation|>\n{{ content }}"
        "{%- endif %}{%- endfor %}{% if add_generation_prompt %}" + generation_prompt + "{% endif %}"
    )


GLM4_0414_TEMPLATE = _template("{{ content }}", "<|assistant|>")
GLM_Z1_0414_TEMPLATE = _template("{{ content.split('</think>')[-1].strip() }}", "<|assistant|>\n<think>")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询某个城市的天气 (weather of a city)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SEARCH = {"name": "search_docs", "description": "Search the <docs> & return 'hits'", "parameters": {}}

CASES = {
    "one_user_turn": ([{"role": "user", "content": "你好"}], None, True),
    "system_hoisted": (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "system", "content": "You are terse."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is JAX?"},
        ],
        None,
        True,
    ),
    "no_generation_prompt": (
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        None,
        False,
    ),
    "tools_call_and_observation": (
        [
            {"role": "system", "content": "Use tools when they help."},
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": '{"temperature": 23, "weather": "晴"}'},
        ],
        [WEATHER, SEARCH],
        True,
    ),
    "reasoning_in_history": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4. "},
            {"role": "user", "content": "And 3+3? Think 😀"},
            {"role": "assistant", "content": "6, without a think block"},
            {"role": "user", "content": "thanks"},
        ],
        None,
        True,
    ),
    "empty_content_and_whitespace": (
        [{"role": "user", "content": ""}, {"role": "user", "content": "  spaced \n\n"}],
        [SEARCH],
        True,
    ),
}

FORMATS = {"glm-4-0414": (GLM4_0414_TEMPLATE, False), "glm-z1-0414": (GLM_Z1_0414_TEMPLATE, True)}


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint_tokenizers(request, tmp_path_factory):
    """(ours, transformers') for one template, from one tokenizer directory."""
    from transformers import AutoTokenizer

    template, jinja_file = FORMATS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    rank_file = write_synthetic_tokenizer(root / "tokenizer.model")
    hf_dir = write_tokenizer_json(rank_file, root / "hf", chat_template=template, jinja_file=jinja_file)
    ours = JsonTokenizer.from_dir(hf_dir)
    assert ours.chat_format == request.param  # recognized from the template the directory ships
    return ours, AutoTokenizer.from_pretrained(hf_dir)


def _reference(hf, messages, tools, add_generation_prompt):
    text = hf.apply_chat_template(
        copy.deepcopy(messages), tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return text, hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", list(CASES))
def test_chat_ids_and_text_match_transformers(checkpoint_tokenizers, case):
    ours, hf = checkpoint_tokenizers
    messages, tools, gen = CASES[case]
    text, ids = _reference(hf, messages, tools, gen)
    assert ours.render_chat(messages, gen, tools) == text
    assert ours.apply_chat_template(messages, gen, tools) == ids
    assert ids[:2] == ours.prefix_ids


def test_z1_drops_earlier_reasoning_and_opens_a_think_block(checkpoint_tokenizers):
    ours, _ = checkpoint_tokenizers
    text = ours.render_chat(CASES["reasoning_in_history"][0])
    if ours.chat_format == "glm-z1-0414":
        assert "2 and 2 make 4" not in text and "<|assistant|>\nIt is 4.<|user|>" in text
        assert text.endswith("<|assistant|>\n<think>")
    else:
        assert "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4. <|user|>" in text and text.endswith("<|assistant|>")


def test_tool_calls_are_written_as_the_template_writes_metadata(checkpoint_tokenizers):
    ours, hf = checkpoint_tokenizers
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "北京"}}}],
    }
    as_metadata = {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}
    user = {"role": "user", "content": "北京天气怎么样？"}
    _, ids = _reference(hf, [user, as_metadata], [WEATHER], True)
    assert ours.apply_chat_template([user, call], True, [WEATHER]) == ids
    # the tool role is the observation role
    obs = {"role": "tool", "content": "23"}
    _, ids = _reference(hf, [user, as_metadata, {**obs, "role": "observation"}], [WEATHER], True)
    assert ours.apply_chat_template([user, call, obs], True, [WEATHER]) == ids


def test_special_token_text_in_content_stays_text(checkpoint_tokenizers):
    ours, _ = checkpoint_tokenizers
    ids = ours.apply_chat_template([{"role": "user", "content": "say <|assistant|> now"}])
    assert ids.count(ours.special_id("<|assistant|>")) == 1  # the generation prompt's only


def test_bad_messages_are_refused():
    with pytest.raises(ValueError, match="unknown role"):
        chat0414.chat_pieces([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="needs a name"):
        chat0414.chat_pieces([{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="only assistant"):
        chat0414.chat_pieces([{"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]}])

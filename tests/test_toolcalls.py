"""OpenAI tool calling on GLM-4's layout (glm4_jax.toolcalls): requests, whole replies, streamed replies."""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm4_jax import tokenizer as tokenizer_module
from glm4_jax.tokenizer import TOOLS_HEADING, Tokenizer
from glm4_jax.toolcalls import (
    BUILTIN_TOOL_NAMES,
    MAX_JSON_DEPTH,
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolRequestError,
    parse_tool_calls,
    to_glm_messages,
    to_glm_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME, {"type": "python"}, {"type": "simple_browser"}, {"type": "cogview"}]
SEP = "<|assistant|>"


# ---------------------------------------------------------------------------------------------------- whole replies

CASES = [
    # single call; whitespace around the JSON is the model's and is stripped
    ('get_weather\n{"city": "北京"}', [ToolCall("get_weather", '{"city": "北京"}')]),
    ('get_weather\n  {"city": "Paris"}\n', [ToolCall("get_weather", '{"city": "Paris"}')]),
    # several calls, one `<|assistant|>{name}\n{args}` segment each, as the template renders them
    (
        f'get_weather\n{{"city": "Paris"}}{SEP}get_time\n{{}}',
        [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}")],
    ),
    # built-ins: the body is text, reported under one JSON key
    ("python\n```python\nprint(1 + 1)\n```", [ToolCall("python", json.dumps({"code": "print(1 + 1)"}))]),
    ("python\nimport math\nmath.pi", [ToolCall("python", json.dumps({"code": "import math\nmath.pi"}))]),
    (
        'simple_browser\nsearch("北京天气")',
        [ToolCall("simple_browser", json.dumps({"command": 'search("北京天气")'}, ensure_ascii=False))],
    ),
    ("cogview\nA red fox in snow", [ToolCall("cogview", json.dumps({"prompt": "A red fox in snow"}))]),
    # content
    ("\n你好！很高兴见到你。", None),
    ("\nget_weather\n{}", None),
    ('get_weather {"city": "x"}', None),
    ("get_weather\nnot json", None),
    ('get_weather\n{"city": ', None),  # malformed (cut off)
    ('get_weather\n["a"]', None),
    ("get_weather\n", None),
    ('get_wether\n{"city": "x"}', None),  # a name that is not among the tools
    ('delete_all\n{"really": true}', None),
    ("python\n   ", None),
    (f'get_weather\n{{"city": "Paris"}}{SEP}get_time\nnot json', None),  # one bad segment: all content
    (f'get_weather\n{{"city": "Paris"}}{SEP}\nsome text', None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_parse_tool_calls(text: str, expected) -> None:
    assert parse_tool_calls(text, TOOLS) == expected


def test_only_the_requests_tools_are_calls() -> None:
    text = 'get_weather\n{"city": "Paris"}'
    assert parse_tool_calls(text, None) is None
    assert parse_tool_calls(text, []) is None
    assert parse_tool_calls(text, [TIME]) is None
    assert parse_tool_calls("python\nprint(1)", [WEATHER]) is None
    assert parse_tool_calls(text, ["get_weather"]) == [ToolCall("get_weather", '{"city": "Paris"}')]


def test_deeply_nested_json_is_content_not_recursion_error() -> None:
    deep = "get_weather\n" + '{"a": ' * 200_000 + "1" + "}" * 200_000
    assert parse_tool_calls(deep, TOOLS) is None
    assert parse_tool_calls("get_weather\n" + "[" * 100_000, TOOLS) is None
    at_limit = '{"a": ' * MAX_JSON_DEPTH + "1" + "}" * MAX_JSON_DEPTH
    assert parse_tool_calls("get_weather\n" + at_limit, TOOLS) == [ToolCall("get_weather", at_limit)]
    over = '{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)
    assert parse_tool_calls("get_weather\n" + over, TOOLS) is None
    # brackets inside strings do not count
    quoted = json.dumps({"a": "{" * 1000})
    assert parse_tool_calls("get_weather\n" + quoted, TOOLS) == [ToolCall("get_weather", quoted)]
    stream = ToolCallStream(TOOLS)
    assert stream.feed(deep) == [] and stream.close() == [ContentDelta(deep)]


def test_tokenizer_parse_tool_call_is_this_reader() -> None:
    assert tokenizer_module.parse_tool_call('get_weather\n{"a": 1}') == {"name": "get_weather", "arguments": {"a": 1}}
    over = '{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1)
    assert tokenizer_module.parse_tool_call("get_weather\n" + over) is None
    assert set(tokenizer_module.BUILTIN_TOOLS) == set(BUILTIN_TOOL_NAMES)


# ------------------------------------------------------------------------------------------------------- streaming


def _run_stream(chunks: list[str], tools=TOOLS) -> tuple[str, list[ToolCall], list]:
    ids = iter(f"call_{i}" for i in range(100))
    stream = ToolCallStream(tools, make_id=lambda: next(ids))
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.close()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls = [ToolCall(e.name, e.arguments) for e in events if isinstance(e, ToolCallDelta)]
    assert [e.index for e in events if isinstance(e, ToolCallDelta)] == list(range(len(calls)))
    assert all(not isinstance(e, ContentDelta) or e.text for e in events)
    return content, calls, events


def _expected(text: str, tools=TOOLS) -> tuple[str, list[ToolCall]]:
    calls = parse_tool_calls(text, tools)
    return ("", calls) if calls is not None else (text, [])


@pytest.mark.parametrize("text", [text for text, _ in CASES if text])
def test_stream_every_split_point_agrees_with_the_whole_text(text: str) -> None:
    whole = _expected(text)
    assert _run_stream([text])[:2] == whole
    for cut in range(len(text) + 1):
        assert _run_stream([text[:cut], text[cut:]])[:2] == whole, cut
    assert _run_stream(list(text))[:2] == whole  # one character at a time


@settings(max_examples=300, deadline=None)
@given(
    text=st.sampled_from([text for text, _ in CASES if text]),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_stream_any_split_agrees_with_the_whole_text(text: str, cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert _run_stream(chunks)[:2] == _expected(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('get_weathr\n{}":1 python<|assistant|>x')), max_size=40), st.data())
def test_stream_agrees_on_random_text(text: str, data) -> None:
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=6))
    points = sorted(set(cuts))
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert _run_stream(chunks)[:2] == _expected(text)


def test_stream_releases_content_as_soon_as_it_is_decided() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("\n") == [ContentDelta("\n")]  # an empty first line: text at once
    assert stream.feed("Hello") == [ContentDelta("Hello")]
    stream = ToolCallStream(TOOLS)
    assert stream.feed("get_") == []  # could still be get_weather / get_time
    assert stream.feed("wea") == []
    assert stream.feed("k") == [ContentDelta("get_weak")]
    stream = ToolCallStream(TOOLS)
    assert stream.feed("get_weather\n") == []
    assert stream.feed("  ") == []
    assert stream.feed("sunny") == [ContentDelta("get_weather\n  sunny")]  # a function's body must start with {
    assert stream.feed(" today") == [ContentDelta(" today")]
    assert stream.close() == []
    stream = ToolCallStream(None)  # no tools: never held
    assert stream.feed("get_weather\n{}") == [ContentDelta("get_weather\n{}")]


def test_stream_call_events() -> None:
    text = f'get_weather\n{{"city": "Paris"}}{SEP}get_time\n{{}}'
    _, calls, events = _run_stream([text[:5], text[5:20], text[20:]])
    assert events == [
        ToolCallDelta(0, "call_0", "get_weather", '{"city": "Paris"}'),
        ToolCallDelta(1, "call_1", "get_time", "{}"),
    ]
    # malformed at close: the held text comes back as content, whole
    assert _run_stream(['get_weather\n{"city": ', '"Par'])[2] == [ContentDelta('get_weather\n{"city": "Par')]
    stream = ToolCallStream(TOOLS)
    stream.close()
    with pytest.raises(RuntimeError):
        stream.feed("x")


# -------------------------------------------------------------------------------------------------------- requests


def test_to_glm_tools_and_tool_choice() -> None:
    extra = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    assert to_glm_tools([extra]) == [WEATHER]  # only name, description, parameters reach the preamble
    assert to_glm_tools(TOOLS) == TOOLS
    assert to_glm_tools(TOOLS, "auto") == TOOLS
    assert to_glm_tools(TOOLS, "required") == TOOLS
    assert to_glm_tools(TOOLS, "none") is None
    assert to_glm_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}) == [TIME]
    assert to_glm_tools(None) is None
    assert to_glm_tools([], "none") is None


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ({"type": "function"}, None, "tools"),
        (["get_weather"], None, "tools[0]"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools[0].function.description"),
        ([WEATHER, WEATHER], None, "tools[1]"),
        ([WEATHER], "always", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
        (None, "required", "tool_choice"),
    ],
)
def test_to_glm_tools_errors(tools, choice, param: str) -> None:
    with pytest.raises(ToolRequestError) as info:
        to_glm_tools(tools, choice)
    assert info.value.param == param
    assert str(info.value).startswith(param)


def test_to_glm_messages() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "python", "arguments": '{"code": "1+1"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "2"},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "developer", "content": "x"},
    ]
    assert to_glm_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"function": {"name": "python", "arguments": "```python\n1+1\n```"}},
            ],
        },
        {"role": "observation", "content": '{"temp": 21}'},
        {"role": "observation", "content": "2"},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "system", "content": "x"},
    ]


def _call(arguments, name="get_weather") -> dict:
    return {
        "role": "assistant",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}],
    }


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ({"role": "user"}, "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": "q"}, _call({"city": "x"})], "messages[1].tool_calls[0].function.arguments"),
        ([_call('{"city": ')], "messages[0].tool_calls[0].function.arguments"),
        ([_call("[1]")], "messages[0].tool_calls[0].function.arguments"),
        ([_call("{}", name="a b")], "messages[0].tool_calls[0].function.name"),
        ([{"role": "assistant", "tool_calls": {"id": "c"}}], "messages[0].tool_calls"),
        ([{"role": "assistant", "tool_calls": ["x"]}], "messages[0].tool_calls[0]"),
        ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0].function"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        ([_call("{}"), {"role": "tool", "tool_call_id": "other", "content": "x"}], "messages[1].tool_call_id"),
    ],
)
def test_to_glm_messages_errors(messages, param: str) -> None:
    with pytest.raises(ToolRequestError) as info:
        to_glm_messages(messages)
    assert info.value.param == param


# ------------------------------------------------------------------------------------------- through the template


@pytest.fixture(scope="module")
def tok(glm4_tokenizer_dir: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_file(glm4_tokenizer_dir / "tokenizer.model")


def _contains(ids: list[int], sub: list[int]) -> bool:
    return any(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


def test_a_tools_request_prompt_holds_the_preamble(tok: Tokenizer) -> None:
    messages = to_glm_messages([{"role": "user", "content": "Weather in Paris?"}])
    tools = to_glm_tools([WEATHER, {"type": "python"}], "auto")
    ids = tok.apply_chat_template(messages, tools=tools)
    assert ids == tok.apply_chat_template(
        [{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, {"type": "python"}]
    )
    system = tok.special_id("<|system|>")
    assert ids[2] == system
    assert _contains(ids, tok.encode(TOOLS_HEADING))
    assert json.dumps(WEATHER["function"], ensure_ascii=False, indent=4) in tok.decode(ids)
    assert "## python" in tok.decode(ids)
    plain = tok.apply_chat_template(messages, tools=to_glm_tools([WEATHER], "none"))
    assert system not in plain and not _contains(plain, tok.encode(TOOLS_HEADING))
    assert plain == tok.apply_chat_template(messages)
    named = tok.apply_chat_template(
        messages, tools=to_glm_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    )
    assert "## get_time" in tok.decode(named) and "## get_weather" not in tok.decode(named)


def test_past_calls_render_as_the_model_writes_them_and_parse_back(tok: Tokenizer) -> None:
    """A reply's calls, sent back as an assistant message, render to the text they were parsed from."""
    reply = f'get_weather\n{{"city": "Paris"}}{SEP}python\n```python\nprint(2)\n```'
    calls = parse_tool_calls(reply, TOOLS)
    assert calls is not None and len(calls) == 2
    openai = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(calls)
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    ]
    ids = tok.apply_chat_template(to_glm_messages(openai), tools=to_glm_tools(TOOLS), add_generation_prompt=True)
    assistant, observation = tok.special_id("<|assistant|>"), tok.special_id("<|observation|>")
    first = ids.index(assistant)
    body = ids[first + 1 : ids.index(observation)]
    assert tok.decode(body) == reply  # the separator token decodes to its text
    assert parse_tool_calls(tok.decode(body), TOOLS) == calls
    assert tok.decode(ids[ids.index(observation) :]) == "<|observation|>\nsunny<|assistant|>"

"""Tool calls through the server (glm4_jax/serve.py): the real app under uvicorn on a free loopback port, driven by
the `openai` client, with a scripted engine in place of the model, so that the reply is a chosen text (a random
model never writes a tool call). What is tested is the server's side: the canned reply's ids go through the same
decoding, tool-call parsing and OpenAI shapes, whole and streamed, one id per stream event."""

import argparse
import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from glm4_jax import serve  # noqa: E402
from glm4_jax.fixtures import write_synthetic_tokenizer  # noqa: E402
from glm4_jax.tokenizer import Tokenizer  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
PYTHON = {"type": "python"}


class _Request:
    def __init__(self, ids, on_token, on_done):
        self.ids, self.on_token, self.on_done = ids, on_token, on_done
        self.stop_reason = None
        self.logprobs = None
        self.finished = False


class ScriptedEngine:
    """Answers every request with the ids of `reply` then `<|observation|>`, one id per callback, on a thread."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.reply = ""
        self.prompts: list[list[int]] = []

    @property
    def idle(self) -> bool:
        return True

    def submit(self, ids, *, on_token, on_done, stop_ids, **kwargs):
        self.prompts.append(list(ids))
        ids = []  # a call after the first comes after the special token <|assistant|>, as the model writes it
        for k, part in enumerate(self.reply.split("<|assistant|>")):
            ids += ([self.tok.special_id("<|assistant|>")] if k else []) + self.tok.encode(part)
        r = _Request(ids + [self.tok.special_id("<|observation|>")], on_token, on_done)

        def run():
            for t in r.ids:
                time.sleep(0.001)
                r.on_token(r, t)
                if t in stop_ids:
                    break
            r.stop_reason, r.finished = "stop_id", True
            r.on_done(r)

        threading.Thread(target=run, daemon=True).start()
        return r

    def cancel(self, r):
        pass


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    tok = Tokenizer.from_file(write_synthetic_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))
    args = argparse.Namespace(api_key=None, model_name="scripted", max_batch=4, max_queue=4)
    svc = serve.Service(args)
    svc.tok, svc.engine = tok, ScriptedEngine(tok)
    svc.max_len, svc.model_name, svc.capacity = 1024, "scripted", 8
    svc.eos_ids = {tok.eos_id}
    svc.chat_stop_ids = svc.eos_ids | set(tok.stop_ids)
    svc.ready = True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serve.create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    yield svc.engine, client
    server.should_exit = True
    thread.join(30)


def _ask(client, engine, reply, tools, stream):
    engine.reply = reply
    kw = dict(model="scripted", messages=[{"role": "user", "content": "weather in Paris?"}], tools=tools)
    if not stream:
        out = client.chat.completions.create(**kw)
        (choice,) = out.choices
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        ids = [c.id for c in choice.message.tool_calls or []]
        return choice.message.content, calls, ids, choice.finish_reason
    content, parts, finish = "", {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or []:
                part = parts.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                part["id"] = d.id or part["id"]
                part["name"] += (d.function.name or "") if d.function else ""
                part["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    calls = [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())]
    ids = [p["id"] for _, p in sorted(parts.items())]
    return content or None, calls, ids, finish


CASES = {
    "single": ('get_weather\n{"city": "Paris"}', [WEATHER], [("get_weather", {"city": "Paris"})]),
    "several": (
        'get_weather\n{"city": "Paris"}<|assistant|>get_time\n{}',
        [WEATHER, CLOCK],
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    "built-in python": ("python\n```python\nprint(1 + 1)\n```", [PYTHON], [("python", {"code": "print(1 + 1)"})]),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
def test_tool_calls_become_openai_tool_calls(scripted, case, stream):
    engine, client = scripted
    reply, tools, want = CASES[case]
    content, calls, ids, finish = _ask(client, engine, reply, tools, stream)
    assert (content, calls, finish) == (None, want, "tool_calls")
    assert len(set(ids)) == len(ids) and all(i and i.startswith("call_") for i in ids)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "reply",
    ['get_weather\n{"city": "Par', 'unknown_tool\n{"a": 1}', "\nIt is sunny in Paris."],
    ids=["malformed", "unknown-name", "plain"],
)
def test_other_replies_stay_content(scripted, reply, stream):
    engine, client = scripted
    content, calls, _, finish = _ask(client, engine, reply, [WEATHER], stream)
    assert calls == [] and finish == "stop"
    assert content == reply.removeprefix("\n")


def test_a_tool_result_goes_back_as_an_observation(scripted):
    engine, client = scripted
    engine.reply = "\nSunny."
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    out = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    assert out.choices[0].message.content == "Sunny."
    tok = engine.tok
    prompt = engine.prompts[-1]
    obs = tok.special_id("<|observation|>")
    assert prompt.count(obs) == 1 and tok.decode(prompt[prompt.index(obs) + 1 :]).startswith('\n{"sky": "clear"}')

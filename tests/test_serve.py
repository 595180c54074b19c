"""The OpenAI-compatible server (glm4_jax/serve.py): the real server (uvicorn, in a subprocess) on a free loopback
port with the demo checkpoint, driven by the official `openai` client (and httpx for malformed requests).

One server for the module: 2 decode slots and room for 2 queued requests (so the queue fills with a few streams),
an API key, the demo's whole context (1024 slots). The last test stops it with SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test-key"
MAX_LEN = 1024  # the demo's context
PROMPT = "def add(a, b):"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    from glm4_jax.fixtures import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("serve") / "demo")


class _Server:
    def __init__(self, ckpt):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "glm4_jax.serve", "--ckpt", str(ckpt), "--port", str(self.port)]
        cmd += ["--max-batch", "2", "--max-queue", "2", "--api-key", KEY, "--max-len", str(MAX_LEN)]
        cmd += ["--prefill-chunk", "64", "--shutdown-timeout", "2", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        self.health_codes: list[int] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the server exited:\n" + "".join(self.log)
            try:
                code = httpx.get(f"{self.url}/health", timeout=5).status_code
                self.health_codes.append(code)
                if code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the server did not become healthy:\n" + "".join(self.log))
        self.name = os.path.basename(str(ckpt))

    def client(self, key=KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(demo_ckpt):
    s = _Server(demo_ckpt)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tok(demo_ckpt):
    from glm4_jax.tokenizer_json import load_tokenizer

    return load_tokenizer(demo_ckpt)


def _error(e) -> dict:
    return e.response.json()["error"]


def _post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)


# ---- the CLI --------------------------------------------------------------------------------------------------


def test_cli_bad_arguments_exit_2_before_loading(tmp_path):
    for argv, words in (
        (["--ckpt", str(tmp_path / "nope")], "--ckpt"),
        (["--ckpt", str(tmp_path), "--port", "70000"], "--port"),
        (["--ckpt", str(tmp_path), "--max-batch", "0"], "--max-batch"),
        (["--ckpt", str(tmp_path), "--bogus"], "--bogus"),
    ):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "glm4_jax.serve", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
        assert time.monotonic() - t0 < 20
    r = subprocess.run([sys.executable, "-m", "glm4_jax.serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--max-batch" in r.stdout and "127.0.0.1" in r.stdout


# ---- the endpoints --------------------------------------------------------------------------------------------


def test_health_is_503_until_ready_then_models(server):
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200, server.health_codes
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.name]


def test_completion_equals_generate_cli(server, demo_ckpt):
    ref = subprocess.run(
        [sys.executable, "-m", "glm4_jax.generate", "--ckpt", str(demo_ckpt), "--prompt", PROMPT]
        + ["--max-new-tokens", "12", "--temperature", "0", "--json", "--quiet", "--no-stream"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stderr
    record = json.loads(ref.stdout.strip().splitlines()[-1])
    out = server.client().completions.create(model=server.name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == record["text"]
    assert out.usage.prompt_tokens == record["prompt_tokens"]
    assert out.usage.completion_tokens == record["new_tokens"]
    streamed = server.client().completions.create(
        model=server.name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == record["text"]


def test_chat_streamed_equals_not_streamed(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=server.name, messages=messages, max_tokens=16, temperature=0)
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=server.name,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert whole.choices[0].message.content == "".join(pieces)
    assert whole.choices[0].finish_reason == finish
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_tools_render_the_preamble(server, tok):
    from glm4_jax.toolcalls import to_glm_messages, to_glm_tools

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = server.client().chat.completions.create(
        model=server.name, messages=messages, tools=tools, max_tokens=4, temperature=0
    )
    expected = tok.apply_chat_template(to_glm_messages(messages), tools=to_glm_tools(tools, None))
    plain = tok.apply_chat_template(to_glm_messages(messages))
    assert out.usage.prompt_tokens == len(expected) > len(plain) + 20
    # a conversation with a call and its result renders too (the tool message becomes an observation)
    history = messages + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = server.client().chat.completions.create(
        model=server.name, messages=history, tools=tools, max_tokens=4, temperature=0
    )
    expected = tok.apply_chat_template(to_glm_messages(history), tools=to_glm_tools(tools, None))
    assert out.usage.prompt_tokens == len(expected)


def test_stop_strings_cut_the_text_streamed_and_not(server):
    client = server.client()
    full = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:7]
    cut = full[: full.index(stop)]
    out = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_n_choices_and_seed(server):
    client = server.client()
    kw = dict(model=server.name, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice draws with its own seed
    assert 3 <= a.usage.completion_tokens <= 3 * 8


def test_logprobs_and_echo_scoring_agree(server, tok):
    """The engine's log-probability of a greedy token equals the scoring forward's for the same token (echo)."""
    client = server.client()
    out = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and value == pytest.approx(max(top.values()))  # greedy: the most probable
        assert top.get(token) == pytest.approx(value)
    # echo with max_tokens 0 scores the prompt (a separate forward): the best log-probability at each position
    # equals the engine's for a greedy token after the same prefix
    ids = tok.encode_prompt(PROMPT)
    scored = client.completions.create(
        model=server.name, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    ).choices[0]
    slp = scored.logprobs
    assert scored.text == tok.decode(ids) and len(slp.tokens) == len(ids) and slp.token_logprobs[0] is None
    for k in (len(ids) - 3, len(ids) - 1):
        engine = client.completions.create(model=server.name, prompt=ids[:k], max_tokens=1, temperature=0, logprobs=1)
        assert engine.choices[0].logprobs.token_logprobs[0] == pytest.approx(
            max(slp.top_logprobs[k].values()), abs=0.05
        )
        assert slp.token_logprobs[k] <= max(slp.top_logprobs[k].values()) + 1e-6
    # lm-evaluation-harness's request: echo, max_tokens 1, logprobs 1
    ev = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0
    ).choices[0]
    n_prompt = out.usage.prompt_tokens
    assert len(ev.logprobs.token_logprobs) == n_prompt + 1 and ev.logprobs.tokens[n_prompt] == lp.tokens[0]


def test_chat_logprobs(server):
    out = server.client().chat.completions.create(
        model=server.name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= out.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob == pytest.approx(item.top_logprobs[0].logprob)
    assert "".join(item.token for item in content) == out.choices[0].message.content


# ---- errors ---------------------------------------------------------------------------------------------------


def test_errors_have_openai_shape_and_name_the_field(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Hi"}]
    for kwargs, param in (
        (dict(temperature=5), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_logprobs=3), "top_logprobs"),
        (dict(stop=[1, 2]), "stop"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.name, messages=msgs, **kwargs)
        err = _error(e.value)
        assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.name, messages=[{"role": "wizard", "content": "x"}])
    assert _error(e.value)["param"].startswith("messages")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert _error(e.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.name, prompt="word " * (MAX_LEN + 10), max_tokens=4)
    assert _error(e.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.name, prompt=PROMPT, max_tokens=MAX_LEN)
    assert _error(e.value)["code"] == "context_length_exceeded" and _error(e.value)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.name, prompt=[10**9], max_tokens=4)
    assert _error(e.value)["param"] == "prompt"
    for body in (b"{not json", b"[1, 2]", b'{"model": 3}'):
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    assert server.health()["status"] == "ok"


def test_auth(server):
    for key in ("wrong", None):
        r = _post(server, "/v1/completions", json.dumps({"model": server.name, "prompt": "x"}).encode(), key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed


def _open_stream(server, max_tokens=400, first=True):
    """A streaming completion (with `first`, its first chunk read); returns the httpx stream context and its lines."""
    body = {"model": server.name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    ctx = httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    r = ctx.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    while first and not next(lines).startswith("data: "):
        pass
    return ctx, lines


def _wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if h["inflight"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"requests still in flight: {server.health()}")


def test_disconnect_cancels_and_frees_the_slot(server):
    before = _wait_idle(server)
    ctx, _ = _open_stream(server, max_tokens=MAX_LEN - 20)
    ctx.__exit__(None, None, None)  # the client goes away mid-stream
    after = _wait_idle(server, timeout=20)
    assert after["cancelled"] == before["cancelled"] + 1


def test_queue_full_is_429_and_others_are_undisturbed(server):
    _wait_idle(server)
    streams = [None] * 4  # 2 slots + 2 queued: full (opened at once: each runs for seconds only)
    threads = [
        threading.Thread(target=lambda i=i: streams.__setitem__(i, _open_stream(server, MAX_LEN - 20, first=False)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert server.health()["inflight"] == 4
        r = _post(server, "/v1/completions", json.dumps({"model": server.name, "prompt": "x"}).encode())
        assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for ctx, _ in streams:
            ctx.__exit__(None, None, None)
    _wait_idle(server)
    out = server.client().completions.create(model=server.name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_tokenizer_info_is_glm4s(server):
    """GLM-4's tokenizer (tokenizer_config.json): eos and pad <|endoftext|>, no BOS token (prompts start with the
    [gMASK]<sop> prefix that /tokenize adds)."""
    r = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200
    assert r.json() == {
        "eos_token": "<|endoftext|>",
        "bos_token": None,
        "pad_token": "<|endoftext|>",
        "model_max_length": MAX_LEN,
    }


def test_finish_reasons_are_openais(tok):
    """An engine request's end maps to OpenAI's values: a stop id to "stop", a budget, a full cache and a
    cancellation (a drain that timed out) to "length"."""
    import types

    from glm4_jax.serve import _Choice

    svc = types.SimpleNamespace(tok=tok)
    p = types.SimpleNamespace(stop=[])
    for reason, finish in (("stop_id", "stop"), ("max_new_tokens", "length"), ("cache_full", "length")):
        c = _Choice(svc, 0, p, chat=False, stop_ids=set())
        c.done(reason)
        assert c.finish == finish, reason
    c = _Choice(svc, 0, p, chat=False, stop_ids=set())
    c.done("cancelled")
    assert c.finish == "length"


def test_sigterm_drains_and_exits_0(server):
    """Runs last: SIGTERM ends the module's server. While it drains it still listens and answers a new request
    503 in OpenAI's shape; the open stream is finished or cancelled with an OpenAI finish_reason; the exit is 0."""
    _wait_idle(server)
    ctx, lines = _open_stream(server, max_tokens=MAX_LEN - 20)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while server.health()["status"] != "draining":
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.02)
    r = _post(server, "/v1/completions", json.dumps({"model": server.name, "prompt": "x"}).encode())
    assert r.status_code == 503
    assert r.json() == {
        "error": {"message": "the server is shutting down", "type": "service_unavailable", "param": None, "code": None}
    }
    tail = list(lines)
    ctx.__exit__(None, None, None)
    assert server.proc.wait(60) == 0, "".join(server.log)
    assert "data: [DONE]" in tail
    finish = [json.loads(t[6:])["choices"][0]["finish_reason"] for t in tail if t.startswith("data: {")]
    assert finish[-1] in ("length", "stop")

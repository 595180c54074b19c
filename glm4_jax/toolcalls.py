"""OpenAI tool calling on GLM-4's chat layout: requests in, tool calls out (whole or streamed). Pure Python.

Requests
--------
`to_glm_messages` turns OpenAI chat messages into the dicts `Tokenizer.apply_chat_template` takes, and
`to_glm_tools` turns OpenAI `tools` / `tool_choice` into its `tools=`. Bad shapes raise `ToolRequestError`, whose
`param` names the request field (`messages[2].tool_calls[0].function.arguments`), for a 400 in OpenAI's shape.

- Content is a string, None, or a list of `{"type": "text", "text": ...}` parts (joined); other part types are
  refused. A `tool` message (`tool_call_id` naming an earlier assistant call) becomes an `observation` turn.
- `tool_choice`: "auto" (or absent) renders every tool; "none" renders no preamble at all (the model then never
  sees a tool, so cannot call one); "required" renders every tool and a named function
  (`{"type": "function", "function": {"name": N}}`) renders only that tool. GLM-4 has no way to force a call (no
  constrained decoding here): with "required" or a named tool the model may still answer in text, and the reply is
  then plain content with `finish_reason` "stop", as it would be under "auto".

Replies
-------
GLM-4-9B-Chat calls a tool by writing, after `<|assistant|>`, the tool's name on the first line and its arguments
after it, then stopping on `<|observation|>`. An ordinary reply starts with a newline (an empty first line), so it is
decided at once. The chat template renders an assistant message with several calls as one `<|assistant|>{name}\\n
{arguments}` turn per call, so the model writes several calls the same way: segments joined by the
`<|assistant|>` token (its text, as `Tokenizer.decode` writes it). `parse_tool_calls` reads:

- a function tool: `{name}\\n{json object}`. `arguments` is the JSON text as the model wrote it (stripped), the way
  OpenAI returns it; it must parse to an object, nested at most `MAX_JSON_DEPTH` deep (deeper is content, checked
  before `json.loads`, so no RecursionError).
- the built-ins, whose bodies are not JSON: `python\\n{code}` (a ```` ```python ```` fence around it is removed)
  becomes arguments `{"code": code}`; `simple_browser\\n{command}` (e.g. `search("...")`) becomes `{"command":
  command}`; `cogview\\n{prompt}` becomes `{"prompt": prompt}`, each a JSON string. `to_glm_messages` maps these
  back when a past call is sent again.

Anything else is content (None), never an exception: a first line that is not one of the request's tools, a
function tool whose body does not start with `{` or is not a JSON object, an empty built-in body, or any one
segment of a multi-call reply that fails.

Streaming
---------
`ToolCallStream(tools)` is fed text deltas. While the first line could still become a known tool name it holds the
text back; once the reply is decided to be text it releases everything so far and then each delta at once as
`ContentDelta`. Once it is decided to be a call (a known name, then `{` for a function tool or any non-blank text for
a built-in) it holds the rest until `close()`, which emits each call as one `ToolCallDelta` carrying its index, id,
name and the whole arguments (one delta per call, which OpenAI clients accept), or, if the calls do not parse,
the whole text as one `ContentDelta`. The joined events equal `parse_tool_calls` of the joined text for every split.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

BUILTIN_TOOL_NAMES = ("python", "simple_browser", "cogview")
# The JSON key each built-in tool's text body is reported under.
BUILTIN_ARGUMENT_KEYS = {"python": "code", "simple_browser": "command", "cogview": "prompt"}
CALL_SEPARATOR = "<|assistant|>"
MAX_JSON_DEPTH = 64

TOOL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_FENCE_RE = re.compile(r"\A```[^\n]*\n(.*?)\n?```\s*\Z", re.DOTALL)


class ToolRequestError(ValueError):
    """A request field that cannot be used; `param` is its OpenAI path (`messages[2].tool_calls`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI returns it


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str
    name: str
    arguments: str


Event = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------------- requests


def _content_text(value: Any, param: str, *, allow_none: bool) -> str:
    if value is None:
        if not allow_none:
            raise ToolRequestError(param, "is required")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            where = f"{param}[{index}]"
            if not isinstance(part, Mapping):
                raise ToolRequestError(where, f"expected a content part object, got {type(part).__name__}")
            if part.get("type") != "text":
                raise ToolRequestError(
                    f"{where}.type", f"only 'text' content parts are supported, not {part.get('type')!r}"
                )
            if not isinstance(part.get("text"), str):
                raise ToolRequestError(f"{where}.text", "must be a string")
            texts.append(part["text"])
        return "".join(texts)
    raise ToolRequestError(param, f"must be a string, a list of text parts or null, not {type(value).__name__}")


def _builtin_body(name: str, arguments: str) -> str | None:
    """The text body a built-in tool's call is written as, from its JSON arguments; None if they do not fit."""
    try:
        parsed = json.loads(arguments) if _json_depth_ok(arguments) else None
    except json.JSONDecodeError:
        return None
    key = BUILTIN_ARGUMENT_KEYS[name]
    if not isinstance(parsed, dict) or set(parsed) != {key} or not isinstance(parsed[key], str):
        return None
    return f"```python\n{parsed[key]}\n```" if name == "python" else parsed[key]


def _glm_tool_call(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ToolRequestError(param, f"expected a tool call object, got {type(call).__name__}")
    if call.get("type", "function") != "function":
        raise ToolRequestError(f"{param}.type", f"must be 'function', not {call.get('type')!r}")
    function = call.get("function")
    if not isinstance(function, Mapping):
        raise ToolRequestError(f"{param}.function", "must be an object with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        raise ToolRequestError(f"{param}.function.name", f"must be a tool name (an identifier), got {name!r}")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise ToolRequestError(f"{param}.function.arguments", "must be a JSON string")
    if name in BUILTIN_ARGUMENT_KEYS:
        body = _builtin_body(name, arguments)
        if body is not None:
            return {"function": {"name": name, "arguments": body}}
    try:
        parsed = json.loads(arguments) if _json_depth_ok(arguments) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ToolRequestError(
            f"{param}.function.arguments", f"must be a JSON object (nested at most {MAX_JSON_DEPTH})"
        )
    return {"function": {"name": name, "arguments": arguments}}


def to_glm_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the messages `Tokenizer.apply_chat_template` takes (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ToolRequestError("messages", "must be a non-empty list of message objects")
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ToolRequestError(where, f"expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role in ("system", "developer", "user"):
            content = _content_text(message.get("content"), f"{where}.content", allow_none=False)
            out.append({"role": "system" if role == "developer" else role, "content": content})
        elif role == "assistant":
            content = _content_text(message.get("content"), f"{where}.content", allow_none=True)
            glm: dict[str, Any] = {"role": "assistant", "content": content}
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                if not isinstance(tool_calls, list):
                    raise ToolRequestError(f"{where}.tool_calls", "must be a list of tool calls")
                glm["tool_calls"] = [
                    _glm_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(tool_calls)
                ]
                call_ids.update(c["id"] for c in tool_calls if isinstance(c.get("id"), str))
            out.append(glm)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ToolRequestError(f"{where}.tool_call_id", "a tool message needs the id of the call it answers")
            if call_id not in call_ids:
                raise ToolRequestError(f"{where}.tool_call_id", f"{call_id!r} is not the id of an earlier tool call")
            content = _content_text(message.get("content"), f"{where}.content", allow_none=False)
            out.append({"role": "observation", "content": content})
        else:
            raise ToolRequestError(f"{where}.role", f"must be system, user, assistant or tool, not {role!r}")
    return out


def to_glm_tools(tools: Any, tool_choice: Any = None) -> list[dict[str, Any]] | None:
    """OpenAI `tools` and `tool_choice` -> `tools=` for `apply_chat_template` (None: no preamble)."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolRequestError("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list):
        raise ToolRequestError("tools", "must be a list of tool objects")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise ToolRequestError(where, f"expected a tool object, got {type(tool).__name__}")
        kind = tool.get("type")
        if kind in BUILTIN_TOOL_NAMES:
            name, glm = kind, {"type": kind}
        elif kind == "function":
            function = tool.get("function")
            if not isinstance(function, Mapping):
                raise ToolRequestError(f"{where}.function", "must be an object with a 'name'")
            name = function.get("name")
            if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
                raise ToolRequestError(f"{where}.function.name", f"must be an identifier, got {name!r}")
            body: dict[str, Any] = {"name": name}
            if function.get("description") is not None:
                if not isinstance(function["description"], str):
                    raise ToolRequestError(f"{where}.function.description", "must be a string")
                body["description"] = function["description"]
            if function.get("parameters") is not None:
                if not isinstance(function["parameters"], Mapping):
                    raise ToolRequestError(f"{where}.function.parameters", "must be a JSON Schema object")
                body["parameters"] = function["parameters"]
            glm = {"type": "function", "function": body}
        else:
            raise ToolRequestError(
                f"{where}.type", f"must be 'function' or one of {', '.join(BUILTIN_TOOL_NAMES)}, not {kind!r}"
            )
        if name in seen:
            raise ToolRequestError(where, f"a second tool named {name!r}")
        seen.add(name)
        out.append(glm)
    if tool_choice is None or tool_choice in ("auto", "required"):
        return out
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        chosen = [t for t in out if _glm_tool_name(t) == name]
        if not chosen:
            raise ToolRequestError("tool_choice.function.name", f"{name!r} is not one of the request's tools")
        return chosen
    raise ToolRequestError(
        "tool_choice", f"must be 'none', 'auto', 'required' or a named function, not {tool_choice!r}"
    )


def _glm_tool_name(tool: Any) -> str | None:
    if isinstance(tool, str):
        return tool
    if not isinstance(tool, Mapping):
        return None
    kind = tool.get("type")
    if kind in BUILTIN_TOOL_NAMES:
        return kind
    function = tool.get("function") if kind == "function" else (tool if "type" not in tool else None)
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else None


def tool_names(tools: Iterable[Any] | None) -> set[str]:
    """The names of tools given as OpenAI or GLM definitions (or as plain names); malformed entries are skipped."""
    return {n for n in (_glm_tool_name(t) for t in tools or ()) if n is not None}


# -------------------------------------------------------------------------------------------------------- replies


def _json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the brackets of JSON text nest at most `limit` deep (strings skipped), before any parsing."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return False
        elif char in "]}":
            depth -= 1
    return True


def json_object(text: str) -> dict[str, Any] | None:
    """`text` parsed as a JSON object, or None (not JSON, not an object, or nested deeper than MAX_JSON_DEPTH)."""
    if not _json_depth_ok(text):
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def split_call(segment: str) -> tuple[str, str] | None:
    """(name, body) of `{name}\\n{body}` with an identifier name, or None."""
    name, newline, body = segment.partition("\n")
    name = name.strip()
    if not newline or not TOOL_NAME_RE.fullmatch(name):
        return None
    return name, body


def _read_call(segment: str, names: set[str]) -> ToolCall | None:
    parts = split_call(segment)
    if parts is None or parts[0] not in names:
        return None
    name, body = parts
    if name in BUILTIN_ARGUMENT_KEYS:
        body = body.strip()
        fenced = _FENCE_RE.match(body) if name == "python" else None
        body = fenced.group(1) if fenced else body
        if not body.strip():
            return None
        return ToolCall(name, json.dumps({BUILTIN_ARGUMENT_KEYS[name]: body}, ensure_ascii=False))
    arguments = body.strip()
    if not arguments.startswith("{") or json_object(arguments) is None:
        return None
    return ToolCall(name, arguments)


def parse_tool_calls(text: str, tools: Iterable[Any] | None) -> list[ToolCall] | None:
    """The tool calls of a whole reply, or None when it is content (see the module docstring); never raises."""
    names = tool_names(tools)
    if not names or not isinstance(text, str):
        return None
    calls = []
    for segment in text.split(CALL_SEPARATOR):
        call = _read_call(segment, names)
        if call is None:
            return None
        calls.append(call)
    return calls


def _decide(text: str, names: set[str]) -> bool | None:
    """Whether a reply starting with `text` is a tool call attempt: True, False, or None (not decidable yet)."""
    first, newline, rest = text.partition("\n")
    head = first.strip()
    if not newline:
        return None if any(n.startswith(head) for n in names) else False
    if head not in names:
        return False
    body = rest.lstrip()
    if not body:
        return None
    return head in BUILTIN_ARGUMENT_KEYS or body.startswith("{")


class ToolCallStream:
    """Incremental `parse_tool_calls`: feed text deltas, get `ContentDelta` / `ToolCallDelta` events."""

    def __init__(self, tools: Iterable[Any] | None, make_id: Callable[[], str] = new_call_id) -> None:
        self._tools = list(tools or ())
        self._names = tool_names(self._tools)
        self._make_id = make_id
        self._held = ""
        self._state: bool | None = None if self._names else False  # False: content, True: a call, None: undecided
        self._closed = False

    def feed(self, text: str) -> list[Event]:
        if self._closed:
            raise RuntimeError("ToolCallStream.feed after close")
        if not text:
            return []
        if self._state is False:
            return [ContentDelta(text)]
        self._held += text
        if self._state is None:
            self._state = _decide(self._held, self._names)
            if self._state is False:
                held, self._held = self._held, ""
                return [ContentDelta(held)]
        return []

    def close(self) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        held, self._held = self._held, ""
        if not held:
            return []
        calls = parse_tool_calls(held, self._tools) if self._state is not False else None
        if calls is None:
            return [ContentDelta(held)]
        return [ToolCallDelta(i, self._make_id(), call.name, call.arguments) for i, call in enumerate(calls)]

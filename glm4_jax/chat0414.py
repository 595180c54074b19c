"""The chat layout of the GLM-4-0414 family: GLM-4-9B-0414 / GLM-4-32B-0414, and GLM-Z1-*-0414 (reasoning).

Layout (the jinja `chat_template` these checkpoints ship, as transformers renders it: trim_blocks, lstrip_blocks):

- `[gMASK]<sop>`, then, when `tools` are given, one `<|system|>` block: `\\n# 可用工具\\n`, then for each tool
  `\\n## {name}\\n\\n{json, indent 4}\\n{FUNCTION_TOOL_FOOTER}` (the tool's `function` dict, or the tool itself
  when it has none);
- every system message, hoisted before all others: `<|system|>\\n{content}`;
- the other messages in order: `<|user|>\\n{content}`, `<|assistant|>\\n{content}` (with metadata:
  `<|assistant|>{metadata}\\n{content}`), `<|observation|>\\n{content}`;
- the generation prompt: `<|assistant|>` (GLM-4-0414), `<|assistant|>\\n<think>` (GLM-Z1).

GLM-Z1 (`reasoning=True`) drops the reasoning of earlier assistant turns: an assistant message's content is what
follows its last `</think>`, stripped of surrounding whitespace.

Where we depart from the template, on purpose (as for GLM-4-9B in glm4_jax/tokenizer.py):

- **Content is text**: special-token text inside content is encoded as ordinary text, never as a control token.
- **`None` content or metadata** is empty (the template would write the text `None`).
- **`tool` role** is taken as `observation`; an unknown role is an error (the template drops it silently).
- **Assistant `tool_calls`** (`[{"function": {"name", "arguments"}}]` or `[{"name", "arguments"}]`) are written as
  the template writes an assistant message with metadata: `<|assistant|>{name}\\n{arguments as JSON}`, after the
  message's text content, if any.
- **A tool without a name** is an error (the template writes an empty heading).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from glm4_jax.tokenizer import (
    FUNCTION_TOOL_FOOTER,
    PROMPT_PREFIX,
    TOOLS_HEADING,
    _message_role,
    _optional_str,
    _Piece,
    _Pieces,
    _tool_call_parts,
)

FORMATS = ("glm-4-0414", "glm-z1-0414")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def chat_pieces(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    reasoning: bool = False,
) -> list[_Piece]:
    """The conversation as special-token and text pieces (see the module docstring); `reasoning` for GLM-Z1."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    out = _Pieces()
    for name in PROMPT_PREFIX:
        out.special(name)
    if tools:
        _tools_block(out, tools)
    roles = [_message_role(i, m) for i, m in enumerate(messages)]
    for index, message in enumerate(messages):
        if roles[index] == "system":
            out.special("<|system|>")
            out.text("\n" + _optional_str(index, message, "content"))
    for index, message in enumerate(messages):
        role = roles[index]
        if role != "system":
            _message(out, index, role, message, reasoning)
    if add_generation_prompt:
        out.special("<|assistant|>")
        if reasoning:
            out.text("\n" + THINK_OPEN)
    return out.pieces


def visible_answer(content: str) -> str:
    """What GLM-Z1 keeps of an earlier assistant turn: the text after its last `</think>`, stripped."""
    return content.split(THINK_CLOSE)[-1].strip()


def _message(out: _Pieces, index: int, role: str, message: Mapping[str, Any], reasoning: bool) -> None:
    content = _optional_str(index, message, "content")
    metadata = _optional_str(index, message, "metadata")
    tool_calls = message.get("tool_calls")
    if tool_calls and role != "assistant":
        raise ValueError(f"message {index}: only assistant messages carry tool_calls, not {role!r} ones")
    if role == "assistant" and reasoning:
        content = visible_answer(content)
    if not (tool_calls and not content and not metadata):  # a message of tool calls only writes just the calls
        out.special(f"<|{role}|>")
        out.text(f"{metadata}\n{content}" if role == "assistant" else f"\n{content}")
    for call_index, call in enumerate(tool_calls or ()):
        name, arguments = _tool_call_parts(index, call_index, call)
        out.special("<|assistant|>")
        out.text(f"{name}\n{arguments}")


def _tools_block(out: _Pieces, tools: Any) -> None:
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
    out.special("<|system|>")
    out.text(f"\n{TOOLS_HEADING}\n")
    for tool_index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tool {tool_index}: expected a dict, got {type(tool).__name__}")
        function = tool["function"] if tool.get("function") else tool
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tool {tool_index}: needs a name ({{'function': {{'name': ...}}}} or {{'name': ...}})")
        body = json.dumps(function, ensure_ascii=False, indent=4)
        out.text(f"\n## {function['name']}\n\n{body}\n{FUNCTION_TOOL_FOOTER}")

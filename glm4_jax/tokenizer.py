"""The GLM-4 tokenizer: tiktoken byte-level BPE, the special tokens, the chat layout, tool calls, streaming decode.

File format
-----------
`tokenizer.model` is a tiktoken rank file: one line per token, `<base64 of the token's bytes> <rank>`, ranks
0..N-1 (151,329 lines for GLM-4-9B, ranks in order). Every single byte has a rank (byte-level BPE, so any text
encodes). The 14 special tokens are not in the file: they take the ids right after the last rank, in the order of
`SPECIAL_TOKENS` (151329..151342 for GLM-4). `n_vocab` = ranks + specials; the embedding has more rows than that
(151552 for GLM-4): ids >= `n_vocab` are padding rows, never valid tokens and never to be sampled.

Text is split with the cl100k pattern `SPLIT_PATTERN` before BPE. `encode` encodes plain text only: special-token
text inside it (say a user typing `<|user|>`) is ordinary text and can never become a control token.

Chat layout
-----------
`[gMASK]<sop>`, then for each message `<|{role}|>{metadata}\\n{content}` (no end-of-turn token), then, for the
generation prompt, `<|assistant|>` with no newline (the model writes the newline). One user turn "你好" is
`[151331, 151333, 151336, 198, 109377, 151337]`. Roles: system, user, assistant, observation.

`apply_chat_template` gives the ids that transformers gives for the jinja `chat_template` in GLM-4-9B-chat's
`tokenizer_config.json` (tests/test_tokenizer.py renders that template and compares). Where it departs from the
template, on purpose:

- **Tools preamble: the transformers rendering.** transformers compiles the template with `trim_blocks=True`, which
  drops the first of the two newlines written after each `{% if tool['type'] == ... %}` tag, so the preamble reads
  `# 可用工具\\n## get_weather\\n\\n{json}` where the older Python code path of the THUDM tokenizer wrote
  `# 可用工具\\n\\n## get_weather`. We write the single newline: it is what rendering the template that ships
  with the checkpoint gives (transformers, and servers that render through it), so our prompts match those stacks
  token for token and the tests check them against that shipped template itself rather than against a
  recollection of older code. One constant, `TOOL_HEADING_SEPARATOR`, holds the choice.
- **Content is text.** Special-token text inside content, metadata or tool definitions is encoded as ordinary text
  (what transformers does with `sanitize_control_tokens=True`); rendering the template and encoding the result
  with specials allowed would turn it into control tokens (prompt injection).
- **`tools=`** puts the preamble first (as if the conversation began with `{"role": "system", "content": "",
  "tools": tools}`). The template itself reads tools only from a message's `tools` key (also honoured here, in
  place) and ignores the `tools` variable transformers passes it. A falsy `tools=` adds nothing.
- **Assistant tool calls.** An assistant message may carry `tool_calls` (`[{"function": {"name", "arguments"}}]` or
  `[{"name", "arguments"}]`); each call is encoded `<|assistant|>{name}\\n{arguments as JSON}`, i.e. the message
  `{"role": "assistant", "metadata": name, "content": arguments}` of the template (the template ignores
  `tool_calls`). Dict arguments are written `json.dumps(args, ensure_ascii=False)`; string arguments (OpenAI style,
  already JSON) verbatim. Text content of the same message, if any, comes first as its own assistant segment.
- **`tool` role** is taken as `observation` (the template would write the literal text `<|tool|>`, not a token).
- **`metadata: None`** is the same as no metadata (the template would write the text `None`).
- **A tool without `type`** but with a `name` is a function tool; an unknown `type` is an error (the template drops
  both silently).

As in the template, a message whose content is empty is skipped entirely (unless it carries tool calls), and a
message's `tools` key writes the preamble even when the message itself is skipped.

The model calls a tool by generating `{name}\\n{json arguments}` after `<|assistant|>` and then `<|observation|>`
(a stop id); `parse_tool_call` reads that text back.

A small deterministic rank file for the demo and tests is written by `glm4_jax.fixtures.write_synthetic_tokenizer`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tiktoken

from glm4_jax.toolcalls import TOOL_NAME_RE, json_object, split_call

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
PROMPT_PREFIX = ("[gMASK]", "<sop>")
CHAT_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation"}

# The separator before each tool's `## name` heading in the tools preamble: one newline, as transformers renders
# the shipped jinja template (trim_blocks); the older Python code path wrote two. See the module docstring.
TOOL_HEADING_SEPARATOR = "\n"

TOOLS_SYSTEM_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。"
    "你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
TOOLS_HEADING = "# 可用工具"
FUNCTION_TOOL_FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

_PYTHON_TOOL_TEXT = (
    "当你向 `python` 发送包含 Python 代码的消息时，"
    "该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n"
    "`/mnt/data` 将会持久化存储你的文件。"
    "在此会话中，`python` 无法访问互联网。"
    "不要使用 `python` 进行任何网络请求或者在线 API 调用，"
    "这些在线内容的访问将不会成功。"
)
_SIMPLE_BROWSER_TOOL_TEXT = (
    "你可以使用 `simple_browser` 工具。"
    "该工具支持以下函数：\n"
    "`search(query: str, recency_days: int)`："
    "使用搜索引擎进行查询并显示结果，可以使用 `recency_days` 参数控制搜索内容的时效性。\n"
    "`mclick(ids: list[int])`："
    "获取一系列指定 id 的页面内容。每次调用时，"
    "须选择3-10个页面。选择多个角度的页面，"
    "同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，"
    "你也可以多打开一些可能有用的页面而不用担心内容过多。\n"
    "`open_url(url: str)`：打开指定的 URL。\n"
    "\n"
    "使用 `【{引用 id}†{引用文本}】` 来引用内容。\n"
    "\n"
    "操作步骤：1. 使用 `search` 来获得信息列表; "
    "2. 使用 `mclick` 来获取指定 ID 页面的内容; "
    "3. 根据获得的内容进行回复。"
    "在回复中应当引用信息来源。\n"
    " 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
    "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
)
_COGVIEW_TOOL_TEXT = (
    "如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
    "你需要向 `cogview` 发送图像描述，规则：\n"
    "- 发送给 `cogview` 的消息必须使用英语。"
    "用户的中文描述必须完全翻译为英语。\n"
    "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n"
    "- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
    "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
)
BUILTIN_TOOLS = {
    "python": _PYTHON_TOOL_TEXT,
    "simple_browser": _SIMPLE_BROWSER_TOOL_TEXT,
    "cogview": _COGVIEW_TOOL_TEXT,
}

_TOOL_NAME_RE = TOOL_NAME_RE


TOKENIZER_FILE = "tokenizer.model"


class TokenizerError(ValueError):
    """A malformed tokenizer file."""


# ----------------------------------------------------------------------------------------------------------- files


def _file_error(path: os.PathLike | str, lineno: int, why: str) -> TokenizerError:
    return TokenizerError(f"{path}:{lineno}: {why}")


def _parse_rank_line(path: os.PathLike | str, lineno: int, line: bytes) -> tuple[bytes, int]:
    parts = line.split()
    if len(parts) != 2:
        shown = line[:60].decode("utf-8", errors="replace")
        raise _file_error(path, lineno, f"expected '<base64 bytes> <rank>', got {shown!r}")
    token_b64, rank_text = parts
    try:
        token = base64.b64decode(token_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _file_error(path, lineno, f"invalid base64 {token_b64[:40].decode('ascii', 'replace')!r}") from None
    if not token:
        raise _file_error(path, lineno, "empty token")
    if not rank_text.isdigit():
        raise _file_error(path, lineno, f"rank {rank_text[:20].decode('ascii', 'replace')!r} is not an integer >= 0")
    return token, int(rank_text)


def read_ranks(path: os.PathLike | str) -> dict[bytes, int]:
    """Read a tiktoken rank file (`<base64 bytes> <rank>` per line) into {token bytes: rank}.

    Blank lines are ignored. Raises `TokenizerError` (naming the file and line) on a malformed line, a repeated token
    or rank, ranks that are not exactly 0..N-1, or a single byte without a rank.
    """
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            token, rank = _parse_rank_line(path, lineno, line)
            if token in ranks:
                raise _file_error(path, lineno, f"token {token!r} already has rank {ranks[token]}")
            if rank in line_of_rank:
                raise _file_error(path, lineno, f"rank {rank} already used on line {line_of_rank[rank]}")
            ranks[token] = rank
            line_of_rank[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: no ranks in the file")
    if max(line_of_rank) != len(ranks) - 1:
        missing = min(set(range(len(ranks))) - set(line_of_rank))
        raise TokenizerError(f"{path}: ranks must be 0..{len(ranks) - 1} without gaps; rank {missing} is missing")
    for b in range(256):
        if bytes([b]) not in ranks:
            raise TokenizerError(f"{path}: byte 0x{b:02x} has no rank (a byte-level BPE file ranks all 256 bytes)")
    return ranks


# --------------------------------------------------------------------------------------------------- the tokenizer


class Tokenizer:
    """GLM-4 tokenizer over a tiktoken `Encoding`. Build it with `Tokenizer.from_file`."""

    def __init__(self, mergeable_ranks: Mapping[bytes, int], name: str = "glm4") -> None:
        self.n_ranks = len(mergeable_ranks)
        self.special_tokens = {tok: self.n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            name, pat_str=SPLIT_PATTERN, mergeable_ranks=dict(mergeable_ranks), special_tokens=self.special_tokens
        )
        self.n_vocab = self.n_ranks + len(SPECIAL_TOKENS)

    @classmethod
    def from_file(cls, path: os.PathLike | str) -> Tokenizer:
        """Read `tokenizer.model` (or the `tokenizer.model` inside a checkpoint directory)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(read_ranks(path), name=f"glm4:{path.name}")

    def __repr__(self) -> str:
        return f"Tokenizer(n_ranks={self.n_ranks}, n_vocab={self.n_vocab})"

    # -- ids

    def special_id(self, name: str) -> int:
        """The id of a special token given its text, e.g. `special_id("<|user|>")`."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def eos_id(self) -> int:
        """`<|endoftext|>` (also the padding id of the THUDM config)."""
        return self.special_tokens["<|endoftext|>"]

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: `<|endoftext|>`, `<|user|>`, `<|observation|>`."""
        return [self.special_tokens[t] for t in CHAT_STOP_TOKENS]

    @property
    def prefix_ids(self) -> list[int]:
        """The ids of `[gMASK]<sop>`, which start every prompt."""
        return [self.special_tokens[t] for t in PROMPT_PREFIX]

    # -- text

    def encode(self, text: str) -> list[int]:
        """Encode plain text (no prefix). Special-token text is ordinary text here."""
        return self._enc.encode_ordinary(text)

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: `[gMASK]<sop>` + `encode(text)`."""
        return self.prefix_ids + self.encode(text)

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.n_vocab}); ids >= n_vocab are embedding "
                "padding rows and never valid tokens"
            )
        return token_id

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token gives its text)."""
        return self._enc.decode_single_token_bytes(self._check_id(token_id))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ids (no UTF-8 decoding)."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; special ids give their text; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)

    # -- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Ids of a conversation in the GLM-4 chat layout (see the module docstring).

        Args:
          messages: dicts with `role` (system, user, assistant, observation; `tool` is read as observation),
            `content` (str or None), optional `metadata` (str), optional `tools` (a preamble written before this
            message, as the template does) and, on assistant messages, optional `tool_calls`.
          add_generation_prompt: end with `<|assistant|>` for the model to answer.
          tools: tool definitions (`{"type": "function", "function": {...}}`, or `{"type": "python"}`,
            `"simple_browser"`, `"cogview"`), written as a `<|system|>` preamble before the first message.

        Returns:
          the ids, starting with `[gMASK]<sop>`.
        """
        ids: list[int] = []
        for piece in _chat_pieces(messages, add_generation_prompt, tools):
            ids.extend([self.special_id(piece.text)] if piece.special else self.encode(piece.text))
        return ids

    @staticmethod
    def render_chat(
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The chat layout as text, for display. Encode with `apply_chat_template`, never by encoding this string."""
        return "".join(piece.text for piece in _chat_pieces(messages, add_generation_prompt, tools))

    @staticmethod
    def parse_tool_call(text: str, tools: Sequence[Mapping[str, Any] | str] | None = None) -> dict[str, Any] | None:
        """The tool call in a generated reply, or None for ordinary text (see the module function `parse_tool_call`).

        A GLM-4 chat model asked with `tools=` answers a call as the tool's name on the first line and its
        arguments as a JSON object after it (`get_weather\\n{"city": "Paris"}`), then stops on `<|observation|>`;
        this returns `{"name": "get_weather", "arguments": {"city": "Paris"}}`. With `tools`, a name that is not
        one of theirs gives None.
        """
        return parse_tool_call(text, tools)


# ------------------------------------------------------------------------------------------------------ chat layout


class _Piece:
    """A special token (its text) or a run of ordinary text."""

    __slots__ = ("special", "text")

    def __init__(self, text: str, special: bool) -> None:
        self.text = text
        self.special = special


class _Pieces:
    """Collects pieces, merging adjacent text so that each run between two special tokens is encoded at once."""

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []

    def special(self, name: str) -> None:
        self.pieces.append(_Piece(name, special=True))

    def text(self, text: str) -> None:
        if not text:
            return
        if self.pieces and not self.pieces[-1].special:
            self.pieces[-1] = _Piece(self.pieces[-1].text + text, special=False)
        else:
            self.pieces.append(_Piece(text, special=False))

    def turn(self, role: str, metadata: str, content: str) -> None:
        self.special(f"<|{role}|>")
        self.text(f"{metadata}\n{content}")


def _chat_pieces(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, tools: Sequence[Mapping[str, Any]] | None
) -> list[_Piece]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = _Pieces()
    for name in PROMPT_PREFIX:
        out.special(name)
    if tools:
        _tools_preamble(out, tools, where="tools=")
    for index, message in enumerate(messages):
        _message_pieces(out, index, message)
    if add_generation_prompt:
        out.special("<|assistant|>")
    return out.pieces


def _message_pieces(out: _Pieces, index: int, message: Mapping[str, Any]) -> None:
    if not isinstance(message, Mapping):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = _message_role(index, message)
    content = _optional_str(index, message, "content")
    metadata = _optional_str(index, message, "metadata")
    if message.get("tools") is not None:
        _tools_preamble(out, message["tools"], where=f"message {index}")
    if content:
        out.turn(role, metadata, content)
    tool_calls = message.get("tool_calls")
    if tool_calls:
        if role != "assistant":
            raise ValueError(f"message {index}: only assistant messages carry tool_calls, not {role!r} ones")
        for call_index, call in enumerate(tool_calls):
            name, arguments = _tool_call_parts(index, call_index, call)
            out.turn("assistant", name, arguments)


def _message_role(index: int, message: Mapping[str, Any]) -> str:
    if "role" not in message:
        raise ValueError(f"message {index} has no 'role'")
    role = message["role"]
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise ValueError(f"message {index}: unknown role {role!r}; expected one of {', '.join(ROLES)} (or 'tool')")
    return role


def _optional_str(index: int, message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"message {index} ({message['role']}): {key} must be a string or None, not {type(value).__name__}"
        )
    return value


def _tool_call_parts(index: int, call_index: int, call: Any) -> tuple[str, str]:
    where = f"message {index}, tool call {call_index}"
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}: 'function' must be a dict with 'name' and 'arguments'")
    name = function.get("name")
    if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
        raise ValueError(f"{where}: tool name must be an identifier, got {name!r}")
    if "arguments" not in function:
        raise ValueError(f"{where} ({name}): no 'arguments'")
    arguments = function["arguments"]
    if isinstance(arguments, str):
        return name, arguments
    if isinstance(arguments, Mapping):
        return name, json.dumps(arguments, ensure_ascii=False)
    raise ValueError(f"{where} ({name}): arguments must be a dict or a JSON string, not {type(arguments).__name__}")


def _tools_preamble(out: _Pieces, tools: Any, where: str) -> None:
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"{where}: tools must be a list of tool dicts, got {type(tools).__name__}")
    out.special("<|system|>")
    out.text(f"\n{TOOLS_SYSTEM_PROMPT}\n\n{TOOLS_HEADING}")
    for tool_index, tool in enumerate(tools):
        name, body = _tool_section(f"{where} tool {tool_index}", tool)
        out.text(f"{TOOL_HEADING_SEPARATOR}## {name}\n\n{body}")


def _tool_section(where: str, tool: Any) -> tuple[str, str]:
    """(name, text under the `## name` heading) for one tool definition."""
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(tool).__name__}")
    if "type" not in tool and "name" in tool:  # a bare function definition
        kind, function = "function", tool
    else:
        kind, function = tool.get("type"), tool.get("function")
    if kind == "function":
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"{where}: a function tool needs {{'function': {{'name': ...}}}}")
        return function["name"], f"{json.dumps(function, ensure_ascii=False, indent=4)}\n{FUNCTION_TOOL_FOOTER}"
    if kind in BUILTIN_TOOLS:
        return kind, BUILTIN_TOOLS[kind]
    raise ValueError(f"{where}: unknown tool type {kind!r}; expected function, {', '.join(BUILTIN_TOOLS)}")


def tool_names(tools: Iterable[Mapping[str, Any] | str]) -> set[str]:
    """Names of tools given as definitions (as for `apply_chat_template`) or as plain names."""
    names = set()
    for index, tool in enumerate(tools):
        names.add(tool if isinstance(tool, str) else _tool_section(f"tool {index}", tool)[0])
    return names


def parse_tool_call(text: str, tools: Iterable[Mapping[str, Any] | str] | None = None) -> dict[str, Any] | None:
    """Read a generated tool call `{name}\\n{json object}` into `{"name": ..., "arguments": {...}}`.

    Returns None for ordinary text: no newline, a first line that is not an identifier (or, with `tools`, not one of
    their names), or a rest that is not a JSON object. Only JSON arguments are read (the built-in `python` tool's
    code body comes back None). The reading is `glm4_jax.toolcalls`' (which also reads several calls, the
    built-ins and streams).
    """
    parts = split_call(text)
    if parts is None:
        return None
    name, body = parts
    if tools is not None and name not in tool_names(tools):
        return None
    arguments = json_object(body)  # None also for JSON nested deeper than toolcalls.MAX_JSON_DEPTH
    if arguments is None:
        return None
    return {"name": name, "arguments": arguments}


# ------------------------------------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Turns ids, fed one at a time, into text, holding back the bytes of a character split across tokens.

    `feed` returns only complete UTF-8 characters (possibly ""); `flush` returns what is left at the end (a dangling
    incomplete sequence becomes U+FFFD, as in `Tokenizer.decode`). The pieces joined equal `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(i) for i in ids)

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

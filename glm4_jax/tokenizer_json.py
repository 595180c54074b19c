"""The tokenizer of checkpoints that ship a Hugging Face `tokenizer.json` (GLM-4-0414) and no `tokenizer.model`.

`JsonTokenizer.from_dir(checkpoint)` reads `tokenizer.json` with the `tokenizers` library (its BPE, pre-tokenizer
and added tokens, as the file defines them) and gives the interface of `glm4_jax.tokenizer.Tokenizer`: `encode`,
`encode_prompt`, `decode`, `token_bytes`, `stream_decoder`, `special_id`, `stop_ids`, `prefix_ids`, `n_vocab`,
`apply_chat_template`, `render_chat`, `parse_tool_call`.

- Special tokens are the file's added tokens marked `special`, with their ids from the file.
- `encode` encodes plain text: special-token text inside it is ordinary text (`encode_special_tokens`), and no
  post-processor template is applied.
- Stop ids: `<|endoftext|>`, `<|user|>`, `<|observation|>` (those the file has), and the `eos_token` of
  `tokenizer_config.json` when there is one; the API adds the `eos_token_ids` of config.json.
- The chat layout comes from the checkpoint's chat template (`chat_template.jinja`, or `chat_template` in
  `tokenizer_config.json`), recognized, not rendered: a template with `</think>` is GLM-Z1's, one with GLM-4-9B's
  ChatGLM system prompt is GLM-4-9B's (glm4_jax/tokenizer.py), any other GLM-4-0414's (glm4_jax/chat0414.py).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from glm4_jax import chat0414
from glm4_jax.tokenizer import (
    CHAT_STOP_TOKENS,
    PROMPT_PREFIX,
    TOKENIZER_FILE,
    TOOLS_SYSTEM_PROMPT,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    _chat_pieces,
    parse_tool_call,
)

TOKENIZER_JSON = "tokenizer.json"
CHAT_FORMATS = ("glm-4-9b", *chat0414.FORMATS)


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's `bytes_to_unicode`, reversed): the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def chat_format_of(template: str | None) -> str:
    """The chat layout a checkpoint's jinja template writes (see the module docstring)."""
    if not template:
        return "glm-4-0414"
    if chat0414.THINK_CLOSE in template:
        return "glm-z1-0414"
    if TOOLS_SYSTEM_PROMPT[:12] in template:
        return "glm-4-9b"
    return "glm-4-0414"


class JsonTokenizer:
    """A GLM-4 tokenizer over a `tokenizers.Tokenizer`. Build it with `JsonTokenizer.from_dir`."""

    def __init__(self, tokenizer, *, chat_format: str = "glm-4-0414", eos_token: str | None = None) -> None:
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
        self._tok = tokenizer
        self._tok.encode_special_tokens = True  # special-token text in plain text stays text
        self.chat_format = chat_format
        self.special_tokens = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        missing = [t for t in PROMPT_PREFIX if t not in self.special_tokens]
        if missing:
            raise TokenizerError(f"{TOKENIZER_JSON}: no special token {missing[0]}: not a GLM-4 tokenizer")
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise TokenizerError(f"{TOKENIZER_JSON}: decoder {decoder.get('type')!r}, expected a byte-level BPE")
        self._bytes_of_char = _byte_decoder()
        stops = [t for t in CHAT_STOP_TOKENS if t in self.special_tokens]
        if eos_token in self.special_tokens and eos_token not in stops:
            stops.append(eos_token)
        self._stop_ids = [self.special_tokens[t] for t in stops]

    @classmethod
    def from_dir(cls, path: os.PathLike | str, chat_format: str | None = None) -> JsonTokenizer:
        """Read `tokenizer.json` of a checkpoint directory (and its tokenizer_config.json / chat_template.jinja)."""
        import tokenizers

        root = pathlib.Path(path)
        try:
            tok = tokenizers.Tokenizer.from_file(str(root / TOKENIZER_JSON))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            if isinstance(e, OSError):
                raise
            raise TokenizerError(f"{root / TOKENIZER_JSON}: {e}") from None
        config = {}
        if (root / "tokenizer_config.json").is_file():
            config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, Mapping) else eos
        return cls(tok, chat_format=chat_format or chat_format_of(template), eos_token=eos)

    def __repr__(self) -> str:
        return f"JsonTokenizer(n_vocab={self.n_vocab}, chat_format={self.chat_format!r})"

    # -- ids

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(self.special_tokens)}") from None

    @property
    def eos_id(self) -> int:
        return self.special_tokens.get("<|endoftext|>", self._stop_ids[0] if self._stop_ids else 0)

    @property
    def stop_ids(self) -> list[int]:
        return list(self._stop_ids)

    @property
    def prefix_ids(self) -> list[int]:
        return [self.special_tokens[t] for t in PROMPT_PREFIX]

    # -- text

    def encode(self, text: str) -> list[int]:
        """Encode plain text (no prefix, no post-processor). Special-token text is ordinary text here."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        return self.prefix_ids + self.encode(text)

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.n_vocab})")
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} has no token in {TOKENIZER_JSON}")
        return bytes(self._bytes_of_char[c] for c in token)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # -- chat

    def _pieces(self, messages, add_generation_prompt, tools):
        if self.chat_format == "glm-4-9b":
            return _chat_pieces(messages, add_generation_prompt, tools)
        reasoning = self.chat_format == "glm-z1-0414"
        return chat0414.chat_pieces(messages, add_generation_prompt, tools, reasoning=reasoning)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Ids of a conversation in the checkpoint's chat layout, starting with `[gMASK]<sop>`."""
        ids: list[int] = []
        for piece in self._pieces(messages, add_generation_prompt, tools):
            if piece.special:
                ids.append(self.special_id(piece.text))
            else:
                ids.extend(self.encode(piece.text))
        return ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The chat layout as text, for display. Encode with `apply_chat_template`, never by encoding this string."""
        return "".join(piece.text for piece in self._pieces(messages, add_generation_prompt, tools))

    @staticmethod
    def parse_tool_call(text: str, tools: Sequence[Mapping[str, Any] | str] | None = None) -> dict[str, Any] | None:
        return parse_tool_call(text, tools)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of the checkpoint directory `path`, or None when it has none: a `Tokenizer` of its
    tokenizer.model (GLM-4-9B), else a `JsonTokenizer` of its tokenizer.json (GLM-4-0414).

    Raises OSError or `TokenizerError` for a file that cannot be read.
    """
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        return Tokenizer.from_file(os.path.join(path, TOKENIZER_FILE))
    if os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
        return JsonTokenizer.from_dir(path)
    return None

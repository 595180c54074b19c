"""A small Python API for notebooks: a model, its tokenizer and a `Generator` in one object.

    from glm4_jax.api import GLM4Chat

    chat = GLM4Chat.from_checkpoint("out/glm-4-9b-chat")
    print(chat.chat("What is JAX?"))                       # one answer, sampled (temperature 0.8, top-p 0.8)
    for piece in chat.chat("Tell me a story", stream=True):  # text pieces as they are generated
        print(piece, end="", flush=True)
    result = chat.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=8)  # a batch, greedy
    result.texts, result.ids, result.stop_reasons
    chat.last_result.decode_tok_s                         # timings of the last call

Raw prompts (`generate`, `stream`) get the `[gMASK]<sop>` prefix and default to greedy; chat calls use the chat
template, stop on `<|endoftext|>`, `<|user|>`, `<|observation|>` and default to the official GLM-4-9B-chat demo
sampling (temperature 0.8, top-p 0.8). Token-id prompts (lists of ints) are used as given.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from glm4_jax.config import DEFAULT_GROUP_SIZE
from glm4_jax.engine import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PREFILL_CHUNK,
    GenerationError,
    GenerationResult,
    Generator,
)
from glm4_jax.model import GLM4
from glm4_jax.options import CHAT_DEFAULTS, SamplingParams
from glm4_jax.tokenizer_json import load_tokenizer  # noqa: F401  (re-exported)

Messages = str | Sequence[Mapping[str, Any]]


def _sampling(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)


class GLM4Chat:
    """GLM-4 with its tokenizer: raw completion, chat and streaming, for single prompts or batches."""

    def __init__(
        self,
        model: GLM4,
        tokenizer=None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_cache: str | None = None,
    ):
        """
        Args:
          model: a loaded GLM4 (e.g. `glm4_jax.checkpoint.load(path)`).
          tokenizer: a `glm4_jax.tokenizer.Tokenizer`, or None (then only token-id prompts work).
          mesh: the mesh the model is sharded over, if any.
          prefill_chunk: prompt tokens per prefill step.
          kv_cache: the KV cache dtype, e.g. "int8" (half the memory of bfloat16); default the model's dtype.
        """
        self.model = model
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        n_vocab = tokenizer.n_vocab if tokenizer is not None else None
        self.generator = Generator(model, n_vocab=n_vocab, prefill_chunk=prefill_chunk, mesh=mesh, kv_cache=kv_cache)
        self.last_result: GenerationResult | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        mesh: jax.sharding.Mesh | str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_cache: str | None = None,
    ) -> GLM4Chat:
        """Loads a converted checkpoint (and its tokenizer.model or tokenizer.json, when it has one).

        Args:
          path: a directory written by `python -m glm4_jax.convert`.
          mesh: a Mesh, or a spec such as "tensor=8" (see glm4_jax.sharding.make_mesh); None for one device.
          dtype: compute dtype ("bfloat16", "float32", "float16"); None keeps the checkpoint's.
          quantize: "int8" or "int4" to quantize an unquantized checkpoint while loading (`glm4_jax.load`).
          group_size: the int4 group size.
          kv_cache: the KV cache dtype, e.g. "int8"; default the model's dtype.
        """
        from glm4_jax import checkpoint

        if isinstance(mesh, str):
            from glm4_jax.sharding import make_mesh

            mesh = make_mesh(mesh)
        model = checkpoint.load(path, mesh=mesh, dtype=dtype, quantize=quantize, group_size=group_size)
        return cls(model, load_tokenizer(path), mesh=mesh, prefill_chunk=prefill_chunk, kv_cache=kv_cache)

    # ---- prompts

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise GenerationError(f"{what} needs a tokenizer; this checkpoint has none (pass token ids instead)")
        return self.tokenizer

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """A raw prompt: text gets `[gMASK]<sop>` + its tokens; a list of ids is used as given."""
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("empty prompt")
            return self._need_tokenizer("a text prompt").encode_prompt(prompt)
        return [int(t) for t in prompt]

    def encode_chat(
        self, messages: Messages, *, system: str | None = None, tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Chat-template ids ending with `<|assistant|>`. `messages` is a list of {"role", "content"} dicts or a
        single user message as a string; `system` prepends a system message."""
        tok = self._need_tokenizer("chat")
        if isinstance(messages, str):
            if not messages.strip():
                raise GenerationError("empty prompt")
            messages = [{"role": "user", "content": messages}]
        messages = list(messages)
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        if not messages:
            raise GenerationError("no messages")
        return tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)

    def chat_stop_ids(self) -> tuple[int, ...]:
        """The config's eos ids plus the tokenizer's chat stop ids."""
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.stop_ids)
        return tuple(sorted(ids))

    def decode(self, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
        """Text of generated ids, a trailing stop id left out."""
        ids = list(ids)
        if ids and ids[-1] in set(stop_ids):
            ids = ids[:-1]
        return self._need_tokenizer("decoding").decode(ids)

    # ---- generation

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_len: int | None = None,
    ) -> GenerationResult:
        """Raw completion of one prompt or a batch (text or token ids), with the compiled decode loop.

        Returns the GenerationResult: `.ids` (per prompt, a stop id included when hit), `.texts` (decoded, the
        stop id left out; None without a tokenizer), `.stop_reasons`, timings. Default greedy; stop ids default to
        the config's eos_token_ids.
        """
        if isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        ids = [self.encode_prompt(p) for p in prompts]
        sampling = _sampling(temperature, top_p, top_k, repetition_penalty)
        result = self.generator.generate(
            ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids, max_len=max_len
        )
        return self._finish(result, stop_ids)

    def _finish(self, result: GenerationResult, stop_ids) -> GenerationResult:
        if self.tokenizer is not None:
            stops = self.cfg.eos_token_ids if stop_ids is None else stop_ids
            result.texts = [self.decode(ids, stops) for ids in result.ids]
        self.last_result = result
        return result

    def stream_tokens(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sampling: SamplingParams | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_len: int | None = None,
    ) -> Iterator[int]:
        """Yields the generated ids of one token-id prompt as they come (a stop id included); afterwards
        `last_result` holds the GenerationResult."""
        it = self.generator.stream(
            [list(ids)], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids, max_len=max_len
        )
        while True:
            try:
                tok = int(next(it)[0])
            except StopIteration as stop:  # the generator stops by itself after a stop id
                self._finish(stop.value, stop_ids)
                return
            yield tok

    def stream_text(
        self, ids: Sequence[int], *, stop_ids: Sequence[int] | None = None, answer: bool = False, **kwargs
    ) -> Iterator[str]:
        """Text pieces of one token-id prompt's continuation as they come (never a broken UTF-8 character; stop ids
        left out). With `answer` (a chat reply), the newline the model writes after `<|assistant|>` is left out.
        `kwargs` are those of `stream_tokens`; afterwards `last_result` holds the GenerationResult."""
        tok = self._need_tokenizer("streaming text")
        decoder = tok.stream_decoder()
        stops = set(self.cfg.eos_token_ids if stop_ids is None else stop_ids)
        tokens = self.stream_tokens(ids, stop_ids=stop_ids, **kwargs)
        for t in tokens:
            piece = decoder.feed(t) if t not in stops else ""
            if answer and piece:
                piece, answer = piece.removeprefix("\n"), False
            if piece:
                yield piece
        rest = decoder.flush()
        if answer:
            rest = rest.removeprefix("\n")
        if rest:
            yield rest

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_len: int | None = None,
    ) -> Iterator[str]:
        """Raw completion of one prompt, yielding text pieces as they are generated (never a broken UTF-8
        character). Afterwards `last_result` holds the GenerationResult."""
        return self.stream_text(
            self.encode_prompt(prompt),
            stop_ids=stop_ids,
            sampling=_sampling(temperature, top_p, top_k, repetition_penalty),
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_len=max_len,
        )

    def chat(
        self,
        messages: Messages,
        *,
        stream: bool = False,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = CHAT_DEFAULTS.temperature,
        top_p: float = CHAT_DEFAULTS.top_p,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int = 0,
        max_len: int | None = None,
    ) -> str | Iterator[str]:
        """The assistant's answer to a conversation (a user message string, or a list of message dicts).

        Returns the answer text (the newline the model writes after `<|assistant|>` removed), or with
        `stream=True` an iterator of text pieces as they are generated (the same text, in pieces). Sampling
        defaults to the official chat settings (temperature 0.8, top-p 0.8); pass temperature=0 for greedy.
        """
        ids = self.encode_chat(messages, system=system, tools=tools)
        sampling = _sampling(temperature, top_p, top_k, repetition_penalty)
        kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, max_len=max_len)
        stop_ids = self.chat_stop_ids()
        if stream:
            return self.stream_text(ids, stop_ids=stop_ids, answer=True, **kwargs)
        return self.complete_ids(ids, stop_ids=stop_ids, answer=True, **kwargs)[1]

    def complete_ids(
        self, ids: Sequence[int], *, stop_ids: Sequence[int] | None = None, answer: bool = False, **kwargs
    ) -> tuple[GenerationResult, str]:
        """One token-id prompt's continuation with the compiled decode loop: (GenerationResult, text). The text
        leaves the stop id out, and with `answer` the newline after `<|assistant|>`. `kwargs` are those of
        `stream_tokens`."""
        result = self._finish(self.generator.generate([list(ids)], stop_ids=stop_ids, **kwargs), stop_ids)
        text = result.texts[0] if result.texts is not None else ""
        return result, text.removeprefix("\n") if answer else text

"""The tokenizer.json tokenizer (GLM-4-0414 checkpoints) against our tiktoken tokenizer.

The tokenizer.json is made from a tiktoken `tokenizer.model` by transformers' own converter (TikTokenConverter),
so both must give the same ids, bytes and special tokens: on the synthetic rank file always, and on the shipped
GLM-4 tokenizer.model from ../shared (skipped when absent).
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from helpers_hf import write_tokenizer_json  # noqa: E402

from glm4_jax.api import load_tokenizer  # noqa: E402
from glm4_jax.fixtures import write_synthetic_tokenizer  # noqa: E402
from glm4_jax.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError  # noqa: E402
from glm4_jax.tokenizer_json import JsonTokenizer, chat_format_of  # noqa: E402

CORPUS = [
    "",
    "Hello, world!",
    "你好，世界。今天天气怎么样？",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\r\nand blank lines\n\n\n",
    "def f(x):\n    return x ** 2  # squares\n\nprint(f(12345678))\n",
    "numbers 1 12 123 1234 12345 3.14159 -0.5e-10",
    "emoji 😀🎉👍🏽 and flags 🇨🇳🇫🇷, ZWJ 👩‍👩‍👧",
    "日本語のテキスト、한국어 텍스트, русский текст, العربية, עברית, हिन्दी",
    "mixed中英文text混合 with 标点符号！？。，、",
    "contractions: I'm, you're, it's, we've, they'll, I'd, DON'T",
    "special-token text stays text: <|user|> [gMASK] <sop> <|endoftext|> <|assistant|>\n",
    "<think>reasoning</think> answer",
    '{"json": [1, 2, {"nested": "值"}], "escape": "\\n\\t\\u00e9"}',
    "URL https://example.com/path?q=1&r=2#frag and e-mail a.b@c.de",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "combining: e\u0301 a\u0308 n\u0303; precomposed: é ä ñ",
    " " * 40 + "x" + "\n" * 7 + "y",
]


def _random_texts(n=40, seed=0):
    rng = random.Random(seed)
    alphabet = "abcXYZ 019 \n\t.,!?'\"-_/\\中文字符日本한국éüß😀🎉\u0301\u200b"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module", params=["synthetic", "glm-4"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "synthetic":
        rank_file = write_synthetic_tokenizer(root / "tokenizer.model")
    else:
        rank_file = request.getfixturevalue("glm4_tokenizer_dir") / "tokenizer.model"
    hf_dir = write_tokenizer_json(rank_file, root / "hf")
    return Tokenizer.from_file(rank_file), JsonTokenizer.from_dir(hf_dir), hf_dir


def test_same_ids_on_a_varied_corpus(pair):
    ours, js, _ = pair
    texts = CORPUS + _random_texts()
    for text in texts:
        ids = js.encode(text)
        assert ids == ours.encode(text), text
        assert js.decode(ids) == text
        assert js.encode_prompt(text) == ours.encode_prompt(text)
    print(f"{len(texts)} texts, {sum(len(ours.encode(t)) for t in texts)} ids equal")


def test_same_vocabulary_specials_and_stop_ids(pair):
    ours, js, _ = pair
    assert js.n_vocab == ours.n_vocab
    assert js.special_tokens == ours.special_tokens and list(js.special_tokens) == list(SPECIAL_TOKENS)
    assert js.stop_ids == ours.stop_ids and js.prefix_ids == ours.prefix_ids and js.eos_id == ours.eos_id
    assert all(js.token_bytes(i) == ours.token_bytes(i) for i in range(ours.n_vocab))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        js.token_bytes(ours.n_vocab)


def test_stream_decoder_never_breaks_a_character(pair):
    ours, js, _ = pair
    text = "流式解码 😀 é" * 3
    ids = ours.encode(text)
    dec = js.stream_decoder()
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_load_tokenizer_reads_tokenizer_json_when_there_is_no_tokenizer_model(pair, tmp_path):
    ours, _, hf_dir = pair
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, JsonTokenizer) and tok.encode("Hello 你好") == ours.encode("Hello 你好")
    assert load_tokenizer(tmp_path) is None


def test_stop_ids_come_from_the_files(tmp_path):
    """The eos_token of tokenizer_config.json is a stop id, also one that is not among the chat stop tokens."""
    import json

    hf_dir = write_tokenizer_json(write_synthetic_tokenizer(tmp_path / "tokenizer.model"), tmp_path / "hf")
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<eop>"}))
    tok = JsonTokenizer.from_dir(hf_dir)
    assert tok.stop_ids == [tok.special_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>", "<eop>")]


def test_a_tokenizer_json_without_the_glm_prefix_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE({"a": 0, "b": 1}, [], fuse_unk=False))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"\[gMASK\]"):
        JsonTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        JsonTokenizer.from_dir(tmp_path)


def test_chat_format_is_recognized_from_the_template():
    assert chat_format_of(None) == "glm-4-0414"
    assert chat_format_of("[gMASK]<sop>{{ content.split('</think>')[-1] }}") == "glm-z1-0414"
    assert chat_format_of("<|system|>\n你是一个名为 ChatGLM 的人工智能助手。") == "glm-4-9b"
    assert chat_format_of("[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具") == "glm-4-0414"


def test_a_glm_4_9b_tokenizer_json_keeps_the_glm_4_9b_chat_layout(glm4_tokenizer_dir, tmp_path):
    """A tokenizer.json checkpoint whose template is GLM-4-9B-chat's (shipped tokenizer_config.json): the same chat
    ids as the tiktoken tokenizer's GLM-4-9B layout."""
    import json

    template = json.loads((glm4_tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    hf_dir = write_tokenizer_json(glm4_tokenizer_dir / "tokenizer.model", tmp_path / "hf", chat_template=template)
    js, ours = JsonTokenizer.from_dir(hf_dir), Tokenizer.from_file(glm4_tokenizer_dir / "tokenizer.model")
    assert js.chat_format == "glm-4-9b"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
        {"role": "observation", "content": "晴, 23°C"},
    ]
    assert js.apply_chat_template(messages, tools=tools) == ours.apply_chat_template(messages, tools=tools)

"""Fuzzing the converter's inputs (hypothesis, bounded runs): wrongly typed or absurd safetensors header fields and
config.json values must give the CLI's one `error:` line and exit status 2 (or a clean conversion), never a
traceback or another exception."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import shutil
import struct
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from glm4_jax.convert.__main__ import main as convert_main  # noqa: E402
from glm4_jax.fixtures import thudm_config, write_thudm_checkpoint  # noqa: E402

DIMS = dict(hidden_size=32, ffn_hidden_size=48, kv_channels=8, num_attention_heads=4, multi_query_group_num=2)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# JSON values of every type, including the absurd: huge and negative integers, floats, strings, nulls, nesting.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 10**30, 2**63, 2**64 - 1, 2**31]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(["F32", "BF16", "F16", "I64", "bool", "32", ""]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


class Base:
    """The tiny valid THUDM source every example starts from (a plain object: hypothesis prints it short)."""

    def __repr__(self):
        return "Base()"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    config = thudm_config(128, eos_token_id=[2], pad_token_id=0, dtype="float32", num_layers=1, **DIMS)
    src = write_thudm_checkpoint(root / "src", config, shards=1)
    shard = next(src.glob("*.safetensors"))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    b = Base()
    b.src, b.header, b.body, b.config = src, json.loads(raw[8 : 8 + n]), raw[8 + n :], config
    return b


def convert_once(src: pathlib.Path) -> tuple[int, str]:
    """The CLI on SRC into a fresh DST; (exit status, stderr). Any exception but SystemExit fails the test."""
    err = io.StringIO()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(err):
        try:
            rc = convert_main([str(src), str(pathlib.Path(out) / "dst"), "-q", "--no-hash"])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def assert_clean(rc: int, err: str) -> None:
    lines = err.strip().splitlines()
    if rc == 0:
        assert lines and lines[-1].startswith("wrote "), err
    else:
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)


@contextlib.contextmanager
def copy_source(src: pathlib.Path):
    with tempfile.TemporaryDirectory() as tmp:
        yield shutil.copytree(src, pathlib.Path(tmp) / "src")


@SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_header(base, data):
    src, header, body = base.src, base.header, base.body
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names), label="tensor")
    how = data.draw(st.sampled_from(["field", "entry", "overlap", "huge", "drop"]), label="how")
    if how == "field":
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
        header[name][field] = data.draw(VALUES, label="value")
    elif how == "entry":
        header[name] = data.draw(VALUES, label="entry")
    elif how == "overlap":
        other = data.draw(st.sampled_from(names), label="other")
        shift = data.draw(st.integers(-64, 64), label="shift")
        begin, stop = header[other]["data_offsets"]
        size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        header[name]["data_offsets"] = [max(0, begin + shift), max(0, begin + shift) + size]
        del stop
    elif how == "huge":
        header[name]["shape"] = [10**30, *header[name]["shape"][1:]]
        header[name]["data_offsets"] = data.draw(st.sampled_from([[0, 10**30 * 4], [0, 2**64], [2**63, 2**64]]))
    else:
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="dropped")
        del header[name][field]
    with copy_source(src) as case:
        shard = next(case.glob("*.safetensors"))
        raw = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        assert_clean(*convert_once(case))


CONFIG_KEYS = [
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "kv_channels",
    "num_attention_heads",
    "multi_query_group_num",
    "padded_vocab_size",
    "seq_length",
    "rope_ratio",
    "layernorm_epsilon",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "model_type",
    "add_qkv_bias",
    "multi_query_attention",
    "rmsnorm",
    "post_layer_norm",
    "tie_word_embeddings",
]


@SETTINGS
@given(data=st.data())
def test_fuzz_config_json(base, data):
    src, config = base.src, base.config
    config = json.loads(json.dumps(config))
    how = data.draw(st.sampled_from(["value", "value", "missing", "whole", "bytes"]), label="how")
    text = None
    if how == "value":
        key = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
        config[key] = data.draw(VALUES | st.sampled_from([0, -1, None, "32", [32], 0.5]), label="value")
    elif how == "missing":
        del config[data.draw(st.sampled_from(CONFIG_KEYS), label="key")]
    elif how == "whole":
        config = data.draw(VALUES, label="config")
    else:
        text = data.draw(st.binary(max_size=40), label="bytes") + b"\xff\xfe{"
    with copy_source(src) as case:
        (case / "config.json").write_bytes(text if text is not None else json.dumps(config).encode())
        assert_clean(*convert_once(case))

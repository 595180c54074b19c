"""Integrity of converted checkpoints (checksummed chunks, the conversion id, strict array metadata) and the
converter's checks of the values (NaN, Inf, float16 overflow): each bad case gives one line naming the culprit."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import struct
import warnings

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from glm4_jax import checkpoint
from glm4_jax.check import main as check_main
from glm4_jax.convert.__main__ import main as convert_main
from glm4_jax.fixtures import thudm_config, write_thudm_checkpoint

DIMS = dict(hidden_size=32, ffn_hidden_size=48, kv_channels=8, num_attention_heads=4, multi_query_group_num=2)


def source(path: pathlib.Path, seed: int = 0, dtype: str = "float32") -> pathlib.Path:
    config = thudm_config(128, eos_token_id=[2], pad_token_id=0, dtype=dtype, num_layers=2, **DIMS)
    return write_thudm_checkpoint(path, config, seed=seed, shards=1)


def run(main, capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # (a failed Orbax restore of an earlier test may print late from its threads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy warning may leak
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def failing(main, capsys, *argv) -> str:
    rc, err = run(main, capsys, *argv)
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    src = source(root / "src")
    assert convert_main([str(src), str(root / "dst"), "-q", "--dtype", "float32"]) == 0
    return root / "dst"


@pytest.fixture
def ckpt(converted, tmp_path):
    shutil.copytree(converted, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def chunk_files(ckpt: pathlib.Path, name: str) -> list[pathlib.Path]:
    return sorted(p for p in (ckpt / "params" / name / "c").rglob("*") if p.is_file())


def test_written_arrays_carry_crc32c_and_the_conversion_id(converted, capsys):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and len(manifest["conversion_id"]) == 32
    for array in (converted / "params").iterdir():
        if array.is_dir():
            meta = json.loads((array / "zarr.json").read_text())
            assert meta["codecs"][-1] == {"name": "crc32c"}
            assert meta["attributes"]["glm4_jax_conversion_id"] == manifest["conversion_id"]
    rc, err = run(check_main, capsys, converted, "-q")
    assert rc == 0 and err.startswith(f"ok {converted}: ") and "bytes verified" in err
    rc, err = run(convert_main, capsys, "--verify", converted, "-q")
    assert rc == 0 and err.startswith("ok ")


def test_flipped_bit_is_caught_by_check_verify_and_load(ckpt, capsys):
    target = chunk_files(ckpt, "layers.o")[1]
    data = bytearray(target.read_bytes())
    data[5] ^= 0x10
    target.write_bytes(bytes(data))
    index = list(map(int, target.relative_to(ckpt / "params" / "layers.o" / "c").parts))
    for main, argv in ((check_main, (ckpt, "-q")), (convert_main, ("--verify", ckpt, "-q"))):
        line = failing(main, capsys, *argv)
        assert "layers/o" in line and f"chunk {index}" in line and "corrupt" in line, line
    where = rf"chunk \[{', '.join(map(str, index))}\] of layers/o is corrupt"
    with pytest.raises(checkpoint.CheckpointError, match=where):
        checkpoint.load(ckpt)
    assert target.read_bytes() == bytes(data)  # nothing touched the files


def test_truncated_and_missing_chunks(ckpt, capsys):
    first, second = chunk_files(ckpt, "layers.gate")[:2]
    intact = first.read_bytes()
    for data in (intact[:-7], intact + b"xx"):  # TensorStore alone reads the bytes it needs: appended ones pass it
        first.write_bytes(data)
        line = failing(check_main, capsys, ckpt, "-q")
        assert f"chunk [0, 0, 0] of layers/gate has {len(data)} bytes, expected {len(intact)}" in line, line
        with pytest.raises(checkpoint.CheckpointError, match=rf"of layers/gate has {len(data)} bytes, expected"):
            checkpoint.load(ckpt)
    first.unlink()
    line = failing(check_main, capsys, ckpt, "-q")
    assert "chunk [0, 0, 0] of layers/gate is unreadable" in line, line
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[0, 0, 0\] of layers/gate is unreadable"):
        checkpoint.load(ckpt)
    first.mkdir()  # a directory in its place
    line = failing(check_main, capsys, ckpt, "-q")
    assert "chunk [0, 0, 0] of layers/gate is unreadable (Is a directory)" in line, line
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[0, 0, 0\] of layers/gate is unreadable"):
        checkpoint.load(ckpt)
    assert second.exists() and first.is_dir()


def test_params_from_another_conversion_is_caught(ckpt, tmp_path, capsys):
    other = source(tmp_path / "other-src", seed=1)
    assert run(convert_main, capsys, other, tmp_path / "other", "-q", "--dtype", "float32")[0] == 0
    shutil.rmtree(ckpt / "params")
    shutil.copytree(tmp_path / "other" / "params", ckpt / "params")
    line = failing(check_main, capsys, ckpt, "-q")
    assert "belongs to conversion" in line and "copied from another checkpoint" in line
    with pytest.raises(checkpoint.CheckpointError, match="belongs to conversion"):
        checkpoint.load(ckpt)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["codecs"][0]["configuration"].update(endian="big"), "embed has codecs"),  # no silent byte swap
        (lambda m: m["codecs"].pop(), "embed has codecs"),
        (lambda m: m.update(data_type="float16"), "embed has data_type"),
        (lambda m: m.update(chunk_grid="regular"), "embed has chunk_grid"),
        (lambda m: m.update(attributes=None), "embed belongs to conversion None"),
    ],
)
def test_edited_zarr_json_is_refused(ckpt, capsys, edit, message):
    path = ckpt / "params" / "embed" / "zarr.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    line = failing(check_main, capsys, ckpt, "-q")
    assert message in line, line
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load(ckpt)


def test_edited_chunk_shape_is_caught_by_its_sizes(ckpt, capsys):
    path = ckpt / "params" / "embed" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [64, 32]  # was the whole [128, 32]
    path.write_text(json.dumps(meta))
    line = failing(check_main, capsys, ckpt, "-q")
    assert "chunk [0, 0] of embed has 16388 bytes, expected 8196" in line, line
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[0, 0\] of embed has 16388 bytes, expected 8196"):
        checkpoint.load(ckpt)  # the sizes are checked before TensorStore reads anything


def poison(src: pathlib.Path, name: str, index: tuple[int, ...], value) -> None:
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].copy()
    tensors[name][index] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})


NAME = "transformer.encoder.layers.1.self_attention.dense.weight"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_refused_unless_allowed(tmp_path, capsys, value):
    src = source(tmp_path / "src")
    poison(src, NAME, (3, 5), value)
    line = failing(convert_main, capsys, src, tmp_path / "dst", "-q")
    assert f"tensor {NAME} has a non-finite value" in line and "at index [3, 5]" in line, line
    assert "--allow-nonfinite" in line and not (tmp_path / "dst").exists()
    rc, err = run(convert_main, capsys, src, tmp_path / "dst", "-q", "--allow-nonfinite")
    assert rc == 0, err
    checkpoint.verify(tmp_path / "dst")


def test_nonfinite_in_bfloat16_source(tmp_path, capsys):
    src = source(tmp_path / "src", dtype="bfloat16")
    poison(src, "transformer.embedding.word_embeddings.weight", (7, 2), ml_dtypes.bfloat16(np.nan))
    line = failing(convert_main, capsys, src, tmp_path / "dst", "-q")
    assert "word_embeddings.weight has a non-finite value (nan) at index [7, 2]" in line, line


def test_float16_overflow_is_refused(tmp_path, capsys):
    src = source(tmp_path / "src")
    poison(src, NAME, (1, 2), 1e6)
    line = failing(convert_main, capsys, src, tmp_path / "dst", "-q", "--dtype", "float16")
    assert f"tensor {NAME} has a value beyond the float16 range" in line and "at index [1, 2]" in line, line
    assert "--dtype bfloat16" in line and not (tmp_path / "dst").exists()
    poison(src, NAME, (1, 2), 65504.0)  # the largest float16: no overflow
    rc, err = run(convert_main, capsys, src, tmp_path / "dst", "-q", "--dtype", "float16")
    assert rc == 0, err


def test_crc32c_and_its_tensorstore_fallback_agree():
    from glm4_jax.fileio import _crc32c_tensorstore, crc32c

    assert crc32c(b"123456789") == _crc32c_tensorstore(b"123456789") == 0xE3069283  # the standard check value
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    assert crc32c(memoryview(data)) == _crc32c_tensorstore(memoryview(data))
    assert crc32c(b"") == _crc32c_tensorstore(b"") == 0


def test_quantizing_load_checks_the_chunks_too(ckpt):
    target = chunk_files(ckpt, "layers.up")[0]
    data = bytearray(target.read_bytes())
    data[0] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[0, 0, 0\] of layers/up is corrupt"):
        checkpoint.load(ckpt, quantize="int8")


# ---- the bad-input table of issue 17: each class named, its one line checked for the culprit, the files after -----

TENSOR = "transformer.encoder.layers.0.self_attention.dense.weight"


def _entry(field, value):
    return lambda h: h[TENSOR].update({field: value})


def _overlap(h):
    begin = h["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"]["data_offsets"][0]
    size = h[TENSOR]["data_offsets"][1] - h[TENSOR]["data_offsets"][0]
    h[TENSOR]["data_offsets"] = [begin, begin + size]


HEADER_CASES = {  # name: (edit of the parsed header, or raw header bytes; what the line must say)
    "list-as-dtype": (_entry("dtype", ["F32"]), f"header entry for {TENSOR}"),
    "strings-as-offsets": (_entry("data_offsets", ["0", "4096"]), f"header entry for {TENSOR}"),
    "floats-as-offsets": (_entry("data_offsets", [0.0, 4096.0]), f"header entry for {TENSOR}"),
    "negative-offsets": (_entry("data_offsets", [-4096, 0]), f"{TENSOR} F32[32, 32] at [-4096, 0)"),
    "shape-10**30": (_entry("shape", [10**30, 32]), f"{TENSOR} F32[{10**30}, 32]"),
    "negative-dims": (_entry("shape", [-32, -32]), f"header entry for {TENSOR}"),
    "shape-a-string": (_entry("shape", "32,32"), f"header entry for {TENSOR}"),
    "unknown-dtype": (_entry("dtype", "X9"), f"tensor {TENSOR} has dtype X9"),
    "entry-a-list": (lambda h: h.update({TENSOR: [1, 2]}), f"header entry for {TENSOR}"),
    "overlapping-offsets": (_overlap, f"the data of {TENSOR} and"),
    "not-json": (b"{not json", "corrupt safetensors header (not valid JSON)"),
    "not-utf-8": (b'{"\xff": 1}', "corrupt safetensors header (not valid JSON)"),
    "a-list": (b"[1, 2]", "corrupt safetensors header"),
    "length-2**63": (None, f"header of {2**63} bytes"),
}


def _same_files(root: pathlib.Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_safetensors_header_is_one_line(tmp_path, capsys, case):
    edit, needle = HEADER_CASES[case]
    src = source(tmp_path / "src")
    shard = next(src.glob("*.safetensors"))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if edit is None:  # the length field itself
        shard.write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    else:
        header = json.loads(raw[8 : 8 + n])
        text = edit if isinstance(edit, bytes) else (edit(header), json.dumps(header).encode())[1]
        shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    files = _same_files(src)
    line = failing(convert_main, capsys, src, tmp_path / "dst", "-q")
    assert shard.name in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and _same_files(src) == files


CONFIG_CASES = {  # name: (the new config.json: a function of the old one, or raw bytes; what the line must say)
    "a-list": (lambda c: [c], "config.json holds a list, not a JSON object"),
    "no-multi_query_group_num": (lambda c: c.pop("multi_query_group_num") and c, "no 'multi_query_group_num'"),
    "zero-heads": (lambda c: {**c, "num_attention_heads": 0}, "num_attention_heads is 0; it must be a positive"),
    "zero-kv-groups": (lambda c: {**c, "multi_query_group_num": 0}, "multi_query_group_num is 0"),
    "heads-not-a-multiple": (lambda c: {**c, "multi_query_group_num": 3}, "must be a multiple of num_kv_heads (3)"),
    "string-size": (lambda c: {**c, "hidden_size": "32"}, "hidden_size is '32'; it must be a positive integer"),
    "float-size": (lambda c: {**c, "hidden_size": 32.5}, "hidden_size is 32.5"),
    "bool-size": (lambda c: {**c, "num_layers": True}, "num_layers is True"),
    "huge-size": (lambda c: {**c, "num_layers": 10**30}, f"num_layers is {10**30}"),
    "negative-size": (lambda c: {**c, "num_layers": -1}, "num_layers is -1"),
    "null-eos-ids": (lambda c: {**c, "eos_token_id": None}, "eos_token_id is null"),
    "string-eos-ids": (lambda c: {**c, "eos_token_id": ["a"]}, "eos_token_id is ['a']; it must be a token id"),
    "null-kv_channels": (lambda c: {**c, "kv_channels": None}, "kv_channels is null"),
    "string-rope_ratio": (lambda c: {**c, "rope_ratio": "x"}, "rope_ratio is 'x'; it must be a number > 0"),
    "nan-epsilon": (lambda c: {**c, "layernorm_epsilon": float("nan")}, "layernorm_epsilon is nan"),
    "inf-epsilon": (lambda c: {**c, "layernorm_epsilon": float("inf")}, "layernorm_epsilon is inf"),
    "not-utf-8": (b'{"model_type": "chatglm\xff"}', "not UTF-8 text (byte 23)"),
    "not-json": (b"{", "not valid JSON"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_json_is_one_line(tmp_path, capsys, case):
    edit, needle = CONFIG_CASES[case]
    src = source(tmp_path / "src")
    path = src / "config.json"
    path.write_bytes(edit if isinstance(edit, bytes) else json.dumps(edit(json.loads(path.read_text()))).encode())
    files = _same_files(src)
    line = failing(convert_main, capsys, src, tmp_path / "dst", "-q")
    assert f"{path}: " in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and _same_files(src) == files


def _edit_json(relative: str, edit):
    def apply(ckpt: pathlib.Path) -> pathlib.Path:
        path = ckpt / relative
        if isinstance(edit, bytes):
            path.write_bytes(edit)
        else:
            value = json.loads(path.read_text())
            path.write_text(json.dumps(edit(value)))
        return path

    return apply


def _set(key, value):
    return lambda m: {**m, key: value}


def _param(**fields):
    return lambda m: {**m, "params": {**m["params"], "embed": {**m["params"]["embed"], **fields}}}


CHECKPOINT_CASES = {  # name: (the damage, returning the file to name; what the line must say)
    "manifest-params-a-list": (_edit_json("manifest.json", _set("params", [1])), "params is not a map"),
    "manifest-version-a-string": (_edit_json("manifest.json", _set("format_version", "2")), "format version '2'"),
    "manifest-version-99": (_edit_json("manifest.json", _set("format_version", 99)), "format version 99"),
    "manifest-id-a-number": (_edit_json("manifest.json", _set("conversion_id", 5)), "conversion_id 5 is not a string"),
    "manifest-shape-a-string": (_edit_json("manifest.json", _param(shape="x")), "['embed'] do not match config.json"),
    "manifest-dtype-unknown": (_edit_json("manifest.json", _param(dtype="float99")), "embed"),
    "manifest-a-list": (_edit_json("manifest.json", b"[1]"), "manifest.json"),
    "manifest-not-json": (_edit_json("manifest.json", b"{"), "manifest.json"),
    "manifest-not-utf-8": (_edit_json("manifest.json", b'{"\xff": 1}'), "manifest.json"),
    "config-zero-heads": (_edit_json("config.json", _set("num_heads", 0)), "config.json"),
    "config-a-list": (_edit_json("config.json", b"[1]"), "config.json"),
    "zarr-json-not-json": (_edit_json("params/layers.q/zarr.json", b"{"), "unreadable array metadata of layers/q"),
    "zarr-json-a-list": (_edit_json("params/layers.q/zarr.json", b"[1]"), "metadata of layers/q is not a JSON object"),
    "zarr-json-retyped": (
        _edit_json("params/layers.q/zarr.json", _set("data_type", "float64")),
        "layers/q has data_type 'float64'",
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint_files_are_one_line(ckpt, capsys, case):
    from glm4_jax.generate import main as generate_main

    damage, needle = CHECKPOINT_CASES[case]
    path = damage(ckpt)
    files = _same_files(ckpt)
    for main, argv in ((check_main, (ckpt, "-q")), (generate_main, ("--ckpt", ckpt, "--prompt-ids", "5", "-q"))):
        line = failing(main, capsys, *argv)
        assert path.name in line and needle in line, line
    with pytest.raises((checkpoint.CheckpointError, ValueError), match=re.escape(needle)):
        checkpoint.load(ckpt)
    assert _same_files(ckpt) == files

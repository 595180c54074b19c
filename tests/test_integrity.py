"""Integrity of converted checkpoints (checksummed chunks, the conversion id, strict array metadata) and the
converter's checks of the values (NaN, Inf, float16 overflow): each bad case gives one line naming the culprit."""

from __future__ import annotations

import json
import pathlib
import shutil
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
    first.write_bytes(first.read_bytes()[:-7])
    line = failing(check_main, capsys, ckpt, "-q")
    assert "chunk [0, 0, 0] of layers/gate has" in line and "bytes, expected" in line, line
    first.unlink()
    line = failing(check_main, capsys, ckpt, "-q")
    assert "chunk [0, 0, 0] of layers/gate is unreadable" in line, line
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[0, 0, 0\] of layers/gate is unreadable"):
        checkpoint.load(ckpt)
    assert second.exists()


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
    # (which chunk TensorStore reports first varies: it reads them at once)
    with pytest.raises(checkpoint.CheckpointError, match=r"chunk \[[01], 0\] of embed is (corrupt|unreadable)"):
        checkpoint.load(ckpt)


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

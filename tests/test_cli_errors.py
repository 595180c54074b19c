"""Bad input through the real command lines, each a subprocess as a user runs it (`python -m glm4_jax.convert`,
`python -m glm4_jax.check`): every error class the converter can raise (ConvertError from its readers and pipeline,
ConfigError, CheckpointError, OSError, argparse's) ends in exit status 2 and one `error:` line naming the culprit,
and nothing is left on disk. Run as `python -m`, a module is imported a second time if anything imports it by name;
an `except` clause would then name the other copy of an error class and let it through as a traceback. These
tests see that (a traceback, exit 1), where the in-process tests of tests/test_convert.py cannot."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import pytest

from glm4_jax.fixtures import thudm_config, write_thudm_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
DIMS = dict(hidden_size=32, ffn_hidden_size=48, kv_channels=8, num_attention_heads=4, multi_query_group_num=2)
TENSOR = "transformer.encoder.layers.0.self_attention.dense.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    config = thudm_config(128, eos_token_id=[2], pad_token_id=0, dtype="float32", num_layers=1, **DIMS)
    src = write_thudm_checkpoint(root / "src", config, shards=1)
    assert cli("glm4_jax.convert", src, root / "good", "-q", "--no-hash").returncode == 0
    return src, root / "good"


def cli(module: str, *argv, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", module, *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def edit_header(src: pathlib.Path, edit) -> None:
    shard = next(src.glob("*.safetensors"))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def edit_config(src: pathlib.Path, **fields) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    (src / "config.json").write_text(json.dumps(config))


def _not_a_directory(src, tmp):
    (tmp / "file").write_text("x")
    return [tmp / "file", tmp / "dst"], ["file: not a directory"]


def _corrupt_header(src, tmp):  # readers.py
    edit_header(src, lambda h: h[TENSOR].update(dtype=["F32"]))
    return [src, tmp / "dst"], [TENSOR, "corrupt safetensors header entry"]


def _config_field(src, tmp):  # config.py, through the readers
    edit_config(src, num_attention_heads=0)
    return [src, tmp / "dst"], ["config.json: num_attention_heads is 0"]


def _config_error(src, tmp):  # config.py's ConfigError as it is (Config.replace)
    return [src, tmp / "dst", "--quantize", "int4", "--group-size", "7"], ["int4 group size", "got 7"]


def _force_on_a_foreign_directory(src, tmp):  # checkpoint.py's CheckpointError, turned into a ConvertError
    (tmp / "dst").mkdir()
    (tmp / "dst" / "notes.txt").write_text("mine")
    return [src, tmp / "dst", "--force"], ["is not a glm4-jax checkpoint", "not replacing it"]


def _name_too_long(src, tmp):  # an OSError
    return [src, tmp / ("x" * 300)], ["File name too long"]


def _argparse(src, tmp):
    return [src, tmp / "dst", "--dtype", "int3"], ["--dtype", "invalid choice"]


CASES = {
    "ConvertError-pipeline": _not_a_directory,
    "ConvertError-readers": _corrupt_header,
    "ConfigError-field": _config_field,
    "ConfigError": _config_error,
    "CheckpointError-force": _force_on_a_foreign_directory,
    "OSError": _name_too_long,
    "usage": _argparse,
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_as_main_module_catches_every_error_class(base, tmp_path, case):
    src = shutil.copytree(base[0], tmp_path / "src")
    argv, needles = CASES[case](src, tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())  # what the case itself put there
    line = one_error_line(cli("glm4_jax.convert", *argv, "-q"))
    for needle in needles:
        assert needle in line, (needle, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == made, "the converter left files behind"
    if case == "CheckpointError-force":
        assert (tmp_path / "dst" / "notes.txt").read_text() == "mine"


def _flip_a_bit(ckpt):
    chunk = _chunk(ckpt)
    data = bytearray(chunk.read_bytes())
    data[3] ^= 8
    chunk.write_bytes(bytes(data))
    return [f"chunk {_index(ckpt, chunk)} of layers/o is corrupt"]


def _zero_heads(ckpt):
    edit_config(ckpt, num_heads=0)
    return ["config.json"]


def _manifest_a_list(ckpt):
    (ckpt / "manifest.json").write_text("[1]")
    return ["manifest.json"]


@pytest.mark.parametrize("broken", [_flip_a_bit, _zero_heads, _manifest_a_list], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("module", ["glm4_jax.check", "glm4_jax.convert --verify"])
def test_verify_as_main_module_catches_checkpoint_and_config_errors(base, tmp_path, broken, module):
    ckpt = shutil.copytree(base[1], tmp_path / "ckpt")
    needles = broken(ckpt)
    files = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    line = one_error_line(cli(*module.split(), ckpt, "-q"))
    for needle in needles:
        assert needle in line, (needle, line)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == files  # verifying writes nothing


def _chunk(ckpt, array="layers.o"):
    return min(p for p in (ckpt / "params" / array / "c").rglob("*") if p.is_file())


def _index(ckpt, chunk) -> str:
    return str(list(map(int, chunk.relative_to(ckpt / "params" / "layers.o" / "c").parts)))


def _missing_chunk(ckpt):
    chunk = _chunk(ckpt)
    chunk.unlink()
    return [f"chunk {_index(ckpt, chunk)} of layers/o is unreadable"]


def _truncated_chunk(ckpt):
    chunk = _chunk(ckpt)
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[:-9])
    return [f"chunk {_index(ckpt, chunk)} of layers/o has {size - 9} bytes, expected {size}"]


def _retyped_zarr_json(ckpt):
    path = ckpt / "params" / "layers.o" / "zarr.json"
    meta = json.loads(path.read_text())
    meta["data_type"] = "float16"
    path.write_text(json.dumps(meta))
    return ["layers/o has data_type 'float16'"]


@pytest.mark.parametrize(
    "broken", [_flip_a_bit, _missing_chunk, _truncated_chunk, _retyped_zarr_json], ids=lambda f: f.__name__[1:]
)
def test_generate_as_main_module_on_a_damaged_checkpoint_is_one_line(base, tmp_path, broken):
    """The weights are read by TensorStore under Orbax, whose errors and logs once filled 100 to 700 lines."""
    ckpt = shutil.copytree(base[1], tmp_path / "ckpt")
    needles = broken(ckpt)
    files = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    line = one_error_line(
        cli("glm4_jax.generate", "--ckpt", ckpt, "--prompt-ids", "5,6", "--max-new-tokens", "2", "-q")
    )
    for needle in [f"--ckpt {ckpt}: ", *needles]:
        assert needle in line, (needle, line)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == files


def test_generate_distributed_without_its_flags_is_one_line(base):
    """--distributed on one machine with no coordinator: JAX's own error, as one line naming the flag."""
    proc = cli("glm4_jax.generate", "--ckpt", base[1], "--prompt-ids", "5", "--distributed", "-q")
    line = one_error_line(proc)
    assert line.startswith("error: --distributed: ") and "coordinator_address" in line, line

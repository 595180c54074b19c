"""The checkpoint writer: chunk shapes, padded edge chunks, the files Orbax reads back, and the blocked transpose
the converter feeds it with."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from glm4_jax import checkpoint
from glm4_jax.config import Config, np_dtype
from glm4_jax.convert.table import transpose2d
from glm4_jax.fileio import ArraySource
from glm4_jax.model import abstract_model, init_model, param_axes
from glm4_jax.paths import flatten, map_with_path

MiB = 1 << 20


@pytest.mark.parametrize(
    "shape, axes, want",
    [
        # GLM-4-9B in bf16, 30 MiB chunks: one layer each, cut along vocab / ffn / heads into equal pieces
        ((151552, 4096), ("vocab", "embed"), (2368, 4096)),
        ((4096, 151552), ("embed", "vocab"), (4096, 2368)),
        ((40, 4096, 13696), ("layers", "embed", "ffn"), (1, 4096, 3424)),
        ((40, 13696, 4096), ("layers", "ffn", "embed"), (1, 3424, 4096)),
        ((40, 4096, 32, 128), ("layers", "embed", "q_heads", "head_dim"), (1, 4096, 16, 128)),
        ((40, 32, 128, 4096), ("layers", "q_heads", "head_dim", "embed"), (1, 16, 128, 4096)),
        ((40, 4096, 2, 128), ("layers", "embed", "kv_heads", "head_dim"), (1, 4096, 2, 128)),
        ((40, 4096), ("layers", "norm"), (1, 4096)),
        ((4096,), ("norm",), (4096,)),
        # one head is still too big: the embed axis is cut next
        ((2, 4096, 4, 4096), ("layers", "embed", "q_heads", "head_dim"), (1, 2048, 1, 4096)),
        # a prime dim has no divisor near the largest piece that fits: a padded edge chunk instead
        ((7919, 4096), ("vocab", "embed"), (3840, 4096)),
    ],
)
def test_chunk_shape(shape, axes, want):
    got = checkpoint.chunk_shape(shape, axes, 2, 30 * MiB)
    assert got == want
    assert math.prod(got) * 2 <= 30 * MiB


def test_param_layout_is_the_models():
    """Config.model_layout is the model's own tree (q/k/v and gate/up fused), and Config.param_layout, which the
    writer and the converter read without JAX, the tree that checkpoint.expected_params gives (the stored parts)."""
    cfg = Config.glm_4_9b_chat()
    model = abstract_model(cfg)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = {name: (tuple(a.shape), axes) for (name, a), (_, axes) in zip(
        flatten(shapes), flatten(param_axes(model)), strict=True
    )}  # fmt: skip
    assert got == {name: (shape, axes) for name, (shape, axes, _) in cfg.model_layout().items()}
    assert {"layers/qkv", "layers/gate_up"} <= set(got) and not {"layers/q", "layers/gate"} & set(got)
    assert {n: a.shape for n, a in flatten(checkpoint.expected_params(cfg))} == {
        n: s for n, (s, _) in cfg.param_layout().items()
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_padded_edge_chunks_roundtrip(dtype, tmp_path, monkeypatch):
    """Arrays cut into many chunks, some of them padded at the edge (a prime vocabulary), restore exactly."""
    cfg = Config(
        vocab_size=67, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, max_seq_len=128, eos_token_ids=(1,), pad_token_id=0, dtype=dtype,
    )  # fmt: skip
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)
    model = init_model(cfg, seed=5)
    checkpoint.save(tmp_path / "ck", model, cfg)

    params = tmp_path / "ck" / checkpoint.PARAMS_DIR
    embed = json.loads((params / "embed" / "zarr.json").read_text())
    rows = embed["chunk_grid"]["configuration"]["chunk_shape"][0]
    assert 67 % rows != 0  # the last chunk of the embedding is padded
    isz = np.dtype(np_dtype(dtype)).itemsize
    chunk_files = sorted((params / "embed" / "c").rglob("*"))
    chunk_files = [p for p in chunk_files if p.is_file()]
    assert len(chunk_files) == math.ceil(67 / rows)
    # zarr keeps edge chunks whole; each ends with its crc32c
    assert all(p.stat().st_size == rows * 32 * isz + checkpoint.CRC_BYTES for p in chunk_files)
    gate = json.loads((params / "layers.gate" / "zarr.json").read_text())
    assert gate["chunk_grid"]["configuration"]["chunk_shape"] == [1, 32, 6 if isz == 4 else 12]  # 48 = 8 x 6

    back = checkpoint.load(tmp_path / "ck")
    a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (model, back))
    for (name, x), (_, y) in zip(flatten(a), flatten(b), strict=True):
        assert y.dtype == x.dtype, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_write_error_propagates_and_stops(tmp_path):
    """An error while filling a chunk reaches the caller as it is, and no writer runs on afterwards."""
    cfg = Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, max_seq_len=128, eos_token_ids=(1,), pad_token_id=0, dtype="float32",
    )  # fmt: skip
    calls = []

    class Failing(ArraySource):
        def __init__(self, shape):
            self.shape, self.dtype = shape, np.dtype(np.float32)

        def read_into(self, region, out):
            calls.append(region)
            if len(calls) == 3:
                raise RuntimeError("bad block")
            out[...] = 1.0

    sources = map_with_path(lambda _, s: Failing(s.shape), checkpoint.expected_params(cfg))
    with pytest.raises(RuntimeError, match="bad block"):
        checkpoint.write_params(tmp_path / "params", sources, cfg, chunk_bytes=256, threads=2)
    n = len(calls)
    assert 3 <= n <= 5  # the other thread finishes the chunk it has under way (and may start one); hundreds are left
    assert not (tmp_path / "params" / "_METADATA").exists()


@pytest.mark.parametrize(
    "m, n, src, dst",
    [
        (34, 17, ml_dtypes.bfloat16, ml_dtypes.bfloat16),  # even rows: two rows per 4-byte word
        (33, 5, ml_dtypes.bfloat16, ml_dtypes.bfloat16),  # odd rows
        (40, 7, np.float32, np.float32),
        (64, 96, np.float16, np.float16),
        (6, 9, ml_dtypes.bfloat16, np.float32),  # casting
        (1, 3, ml_dtypes.bfloat16, ml_dtypes.bfloat16),
    ],
)
def test_transpose2d(m, n, src, dst):
    x = np.random.default_rng(m * n).standard_normal((m, n)).astype(src)
    out = np.empty((n, m), dst)
    transpose2d(x, out)
    np.testing.assert_array_equal(out, x.T.astype(dst))

"""`random_model`: random weights made in their stored dtype, block by block, in their shards, with a peak memory of
about the weight bytes (the full-size benchmarks' models)."""

import math
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from glm4_jax.config import np_dtype, preset
from glm4_jax.fixtures import SHARDABLE, TINY
from glm4_jax.paths import flatten
from glm4_jax.placement import _block_plan, param_shardings, param_tree, random_model, random_model_memory
from glm4_jax.sharding import make_mesh


def layer_bytes(cfg) -> int:
    """Bytes of one decoder layer (the stacked layers' arrays divided by L)."""
    layout = cfg.model_layout()
    total = sum(math.prod(s) * np_dtype(d).itemsize for p, (s, _, d) in layout.items() if p.startswith("layers/"))
    return total // cfg.num_layers


def test_block_plan_covers_the_array_in_blocks_under_the_limit():
    for shape, limit in [((40, 4096, 13696), 64 << 20), ((151552, 4096), 64 << 20), ((7, 6, 10), 96), ((5,), 400)]:
        j, block = _block_plan(shape, limit)
        assert len(block) == len(shape) and 4 * math.prod(block) <= max(limit, 4 * math.prod(shape[j:]))
        assert all(n % b == 0 for n, b in zip(shape, block, strict=True))
        assert block[j:] == shape[j:] and all(b == 1 for b in block[: max(j - 1, 0)])
    assert _block_plan((5,), 400) == (0, (5,))  # fits: one block


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_random_model_has_the_model_layout_and_distributions(quant):
    cfg = TINY.replace(quant=quant, group_size=32)
    # blocks of 16 KiB, so every matrix is made by the loop
    tree = dict(flatten(param_tree(random_model(cfg, seed=3, block_bytes=16 << 10))))
    for path, (shape, _, dtype) in cfg.model_layout().items():
        x = tree[path]
        assert x.shape == shape and x.dtype == np_dtype(dtype), path
        v = np.asarray(x.astype(jnp.float32) if dtype not in ("int8", "uint8") else x, np.float64)
        if path.endswith("norm"):
            assert (v == 1).all(), path
        elif dtype == "int8":
            assert v.min() >= -127 and v.max() <= 127 and abs(v.std() - 73.6) < 2, path
        elif dtype == "uint8":
            assert abs(v.std() - 73.9) < 2, path
        elif not path.endswith("_scale"):
            tol = max(1e-3, 5 * 0.02 / math.sqrt(v.size))  # five standard errors
            assert abs(v.std() - 0.02) < tol and abs(v.mean()) < tol, path
    # blocks differ (each is drawn from its own key), and another seed gives other values
    q = np.asarray(tree["layers/qkv"])
    assert not np.array_equal(q[0], q[1])
    again = dict(flatten(param_tree(random_model(cfg, seed=4, block_bytes=16 << 10))))
    assert not np.array_equal(np.asarray(again["embed"]), np.asarray(tree["embed"]))


def test_random_model_is_made_in_its_shards():
    mesh = make_mesh("tensor=4,fsdp=2")
    model = random_model(SHARDABLE, mesh)
    want = dict(flatten(param_shardings(model, mesh)))
    for path, x in flatten(param_tree(model)):
        assert x.sharding.is_equivalent_to(want[path], x.ndim), path


@pytest.mark.parametrize("quant", [None, "int4"])
def test_full_size_random_weights_peak_at_the_weight_bytes(quant):
    """From the compiled programs of glm-4-9b-chat: at most 1.1x the weight bytes plus one layer at any time."""
    cfg = preset("glm-4-9b-chat").replace(dtype="bfloat16", quant=quant)
    mem = random_model_memory(cfg)
    weights = sum(math.prod(s) * np_dtype(d).itemsize for s, _, d in cfg.stored_layout().values())
    assert mem["weights"] == weights
    assert mem["peak"] <= 1.1 * weights + layer_bytes(cfg), mem


def test_two_full_width_layers_peak_rss():
    """A real run at full width (hidden 4096, ffn 13696, 32 heads; 2 layers, vocab 16,384 for time): the process
    grows by at most 1.1x the weight bytes plus one layer while making them."""
    script = textwrap.dedent(
        """
        import json, psutil, jax
        from glm4_jax.config import preset
        from glm4_jax.placement import random_model
        cfg = preset("glm-4-9b-chat").replace(num_layers=2, vocab_size=16384, pad_token_id=0, eos_token_ids=(1,),
                                              dtype="bfloat16")
        before = psutil.Process().memory_info().rss
        model = random_model(cfg)
        # VmHWM: this process's own peak. ru_maxrss would not do: Linux carries the parent's peak across the exec
        # (a pytest process hours into the suite holds several GB).
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        peak = int(status.split()[0]) * 1024
        live = sum(x.nbytes for x in jax.live_arrays())
        print(json.dumps({"growth": peak - before, "live": live}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    cfg = preset("glm-4-9b-chat").replace(num_layers=2, vocab_size=16384, pad_token_id=0, eos_token_ids=(1,))
    weights = sum(math.prod(s) * np_dtype(d).itemsize for s, _, d in cfg.stored_layout().values())
    assert got["live"] == weights
    assert got["growth"] <= 1.1 * weights + layer_bytes(cfg), got

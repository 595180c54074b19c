"""The converter and the checkpoint format: logits equal to transformers for every input layout, and every bad
input refused with one line, exit status 2, no DST and no temporary left behind."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402
from flax import nnx  # noqa: E402
from helpers_hf import (  # noqa: E402
    hf_logits,
    save_hf,
    save_thudm,
    thudm_config,
    thudm_state_dict,
    tiny_hf_model,
    write_shards,
)

from glm4_jax import checkpoint  # noqa: E402
from glm4_jax.convert import table  # noqa: E402
from glm4_jax.convert.__main__ import main  # noqa: E402
from glm4_jax.model import split_params  # noqa: E402
from glm4_jax.paths import flatten, unflatten  # noqa: E402

T = 320  # prompt length: long enough that a partial-RoPE mistake shows


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 300, size=(1, T))


@pytest.fixture(scope="module")
def ref_logits(hf_model, tokens):
    return hf_logits(hf_model, tokens)


def our_logits(dst, tokens, **kw) -> np.ndarray:
    model = checkpoint.load(dst, **kw)
    positions = jnp.arange(tokens.shape[1])[None].repeat(tokens.shape[0], 0)
    logits, _ = model(jnp.asarray(tokens), positions)
    return np.asarray(logits)


def convert(src, dst, *args):
    main([str(src), str(dst), "--quiet", *args])
    assert (pathlib.Path(dst) / "manifest.json").is_file()


def leftovers(parent: pathlib.Path) -> list[str]:
    """Temporaries of the converter (hidden siblings) left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


SOURCES = {
    "hf-single": lambda m, d: save_hf(m, d),
    "hf-sharded": lambda m, d: save_hf(m, d, max_shard_size="60KB"),
    "hf-bin": lambda m, d: save_hf(m, d, fmt="bin"),
    "thudm-sharded": lambda m, d: save_thudm(m, d, shards=3),
    "thudm-bin-sharded": lambda m, d: save_thudm(m, d, shards=2, fmt="bin"),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_logits_match_transformers(kind, hf_model, tokens, ref_logits, tmp_path):
    src = SOURCES[kind](hf_model, tmp_path / "src")
    shards = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert len(shards) > 1 if "sharded" in kind else len(shards) == 1
    convert(src, tmp_path / "dst", "--dtype", "float32")
    got = our_logits(tmp_path / "dst", tokens)
    print(f"{kind}: max |logits - transformers| = {np.abs(got - ref_logits).max():.2e}")
    np.testing.assert_allclose(got, ref_logits, atol=1e-4, rtol=0)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kv_heads", [1, 4], ids=["mqa", "mha"])
def test_head_layouts(kv_heads, tmp_path):
    model = tiny_hf_model(seed=1, num_key_value_heads=kv_heads, num_hidden_layers=2)
    toks = np.random.default_rng(1).integers(0, 300, size=(2, T))
    save_thudm(model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", "--dtype", "float32")
    got, want = our_logits(tmp_path / "dst", toks), hf_logits(model, toks)
    print(f"kv heads {kv_heads}: max |logits - transformers| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_parameter_layout(hf_model, tmp_path):
    """The tree contract of docs/DESIGN.md, tensor by tensor, against the transformers weights."""
    save_thudm(hf_model, tmp_path / "src", shards=2)
    convert(tmp_path / "src", tmp_path / "dst", "--dtype", "float32")
    model = checkpoint.load(tmp_path / "dst")
    # the stored tree: the loaded model's fused q/k/v and gate/up split back into their parts
    p = unflatten(split_params(model.cfg, dict(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))).items())
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    c = hf_model.config
    D, N, K, H = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    layer = 1
    w = f"model.layers.{layer}."
    expect = {
        "embed": sd["model.embed_tokens.weight"],
        "lm_head": sd["lm_head.weight"].T,
        "q": sd[w + "self_attn.q_proj.weight"].T.reshape(D, N, H),
        "k": sd[w + "self_attn.k_proj.weight"].T.reshape(D, K, H),
        "v": sd[w + "self_attn.v_proj.weight"].T.reshape(D, K, H),
        "q_bias": sd[w + "self_attn.q_proj.bias"].reshape(N, H),
        "v_bias": sd[w + "self_attn.v_proj.bias"].reshape(K, H),
        "o": sd[w + "self_attn.o_proj.weight"].T.reshape(N, H, D),
        "gate": sd[w + "mlp.gate_up_proj.weight"][: c.intermediate_size].T,
        "up": sd[w + "mlp.gate_up_proj.weight"][c.intermediate_size :].T,
        "down": sd[w + "mlp.down_proj.weight"].T,
        "attn_norm": sd[w + "input_layernorm.weight"],
    }
    for name, want in expect.items():
        got = p[name] if name in ("embed", "lm_head") else p["layers"][name][layer]
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


@pytest.mark.parametrize("seed", range(3))
def test_transforms_fill_any_region(seed):
    """Every transform builds any region of its destination (as a storage chunk would ask for it) exactly."""
    rng = np.random.default_rng(seed)
    D, N, K, H, F = 12, 4, 2, 6, 10
    cases = [
        (table.Same(), rng.standard_normal((7, D))),
        (table.Same(), rng.standard_normal((D,))),
        (table.Transpose(F, F), rng.standard_normal((2 * F, D))),
        (table.SplitHeads(N * H, K, H), rng.standard_normal(((N + 2 * K) * H, D))),
        (table.SplitHeadsBias((N + K) * H, K, H), rng.standard_normal(((N + 2 * K) * H,))),
        (table.MergeHeadsOut(N, H), rng.standard_normal((D, N * H))),
    ]
    for transform, src in cases:
        src = src.astype(np.float32)
        full = {
            table.Same: lambda t, x: x,
            table.Transpose: lambda t, x: x[t.first : t.first + t.n].T,
            table.SplitHeads: lambda t, x: x[t.first : t.first + t.heads * H].T.reshape(D, t.heads, H),
            table.SplitHeadsBias: lambda t, x: x[t.first : t.first + t.heads * H].reshape(t.heads, H),
            table.MergeHeadsOut: lambda t, x: x.T.reshape(t.heads, H, D),
        }[type(transform)](transform, src)
        assert transform.shape(src.shape) == full.shape

        def read(rows, cols, into=None, src=src):
            block = src[rows] if cols is None else src[rows, cols]
            if into is not None:
                into[...] = block
            return np.ascontiguousarray(block)

        read.dtype = src.dtype
        for _ in range(10):
            region = []
            for n in full.shape:
                a = int(rng.integers(0, n))
                region.append(slice(a, int(rng.integers(a + 1, n + 1))))
            region = tuple(region)
            out = np.empty(tuple(r.stop - r.start for r in region), np.float32)
            transform.fill(read, region, out)
            np.testing.assert_array_equal(out, full[region], err_msg=f"{transform} {region}")


def test_bfloat16_default(hf_model, tmp_path):
    save_hf(hf_model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst")  # no --dtype: bfloat16
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["params"]["layers/gate"]["dtype"] == "bfloat16"
    model = checkpoint.load(tmp_path / "dst")
    assert model.cfg.dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    want = torch.tensor(hf_model.state_dict()["lm_head.weight"].numpy()).bfloat16().float().numpy().T
    widened = checkpoint.load(tmp_path / "dst", dtype="float32")
    assert widened.cfg.dtype == "float32"
    np.testing.assert_array_equal(np.asarray(widened.lm_head[...]), want)


def test_kernel_copy_and_its_fallback_write_the_same_files(hf_model, tmp_path, monkeypatch):
    """Tensors stored as they are (embedding, norms) go by copy_file_range when their values need no check
    (--allow-nonfinite); where the kernel refuses it (EXDEV:
    across filesystems on older kernels) they go through memory instead, to the same bytes."""
    import errno

    save_thudm(hf_model, tmp_path / "src", shards=2)
    real, copied = os.copy_file_range, []

    def spy(*args):
        copied.append(args[2])
        return real(*args)

    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", spy)
    convert(tmp_path / "src", tmp_path / "a", "--dtype", "float32", "--allow-nonfinite")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    convert(tmp_path / "src", tmp_path / "b", "--dtype", "float32", "--allow-nonfinite")
    embed = hf_model.state_dict()["model.embed_tokens.weight"]
    assert sum(copied) >= embed.numel() * 4  # the embedding at least went by the kernel copy

    def files(root):
        params = root / checkpoint.PARAMS_DIR

        def content(p):
            if p.name != "zarr.json":
                return p.read_bytes()
            meta = json.loads(p.read_text())
            del meta["attributes"]  # the conversion id, new each time
            return meta

        return {
            str(p.relative_to(params)): content(p)
            for p in sorted(params.rglob("*"))
            if p.is_file() and p.name != "_CHECKPOINT_METADATA"  # holds timestamps
        }

    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 30
    assert [k for k in a if a[k] != b[k]] == []


def test_manifest_config_and_tokenizer(hf_model, tmp_path):
    src = save_thudm(hf_model, tmp_path / "src", shards=2)
    (src / "tokenizer.model").write_bytes(b"IQ== 0\n")
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "ChatGLM4Tokenizer"}')
    convert(src, tmp_path / "dst", "--dtype", "float32")
    dst = tmp_path / "dst"
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "glm4_jax" and cfg["rope_theta"] == pytest.approx(50000.0)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["format"] == checkpoint.FORMAT and manifest["converter_version"]
    assert manifest["source"]["layout"] == "thudm" and manifest["source"]["format"] == "safetensors"
    listed = {f["name"]: f for f in manifest["source"]["files"]}
    expected = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"}
    assert expected <= set(listed)
    for name, entry in listed.items():
        data = (src / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(manifest["params"]) == {n for n, _ in flatten(checkpoint.expected_params(checkpoint.check(dst)[0]))}


def test_save_load_roundtrip(tmp_path):
    from glm4_jax.config import Config
    from glm4_jax.model import init_model

    cfg = Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, max_seq_len=128, eos_token_ids=(1,), pad_token_id=0, dtype="float32",
    )  # fmt: skip
    model = init_model(cfg, seed=3)
    checkpoint.save(tmp_path / "ck", model, cfg)
    back = checkpoint.load(tmp_path / "ck")
    assert back.cfg == cfg
    a, b = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (model, back))
    for (name, x), (_, y) in zip(flatten(a), flatten(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path / "ck", model, cfg)
    assert leftovers(tmp_path) == []


def test_load_refuses_foreign_and_incomplete(tmp_path):
    from glm4_jax.config import Config
    from glm4_jax.model import init_model

    cfg = Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, max_seq_len=128, eos_token_ids=(1,), pad_token_id=0, dtype="float32",
    )  # fmt: skip
    good = tmp_path / "good"
    checkpoint.save(good, init_model(cfg), cfg)

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="not a glm4-jax checkpoint"):
        checkpoint.load(tmp_path / "foreign")

    def broken(name, edit):
        d = tmp_path / name
        subprocess.run(["cp", "-r", str(good), str(d)], check=True)
        edit(d)
        return d

    d = broken("other-format", lambda d: (d / "manifest.json").write_text('{"format": "something-else"}'))
    with pytest.raises(checkpoint.CheckpointError, match="not a glm4-jax checkpoint"):
        checkpoint.load(d)
    d = broken("no-manifest", lambda d: (d / "manifest.json").unlink())
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load(d)
    d = broken("no-params", lambda d: subprocess.run(["rm", "-r", str(d / "params")], check=True))
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load(d)
    d = broken("no-orbax-metadata", lambda d: [p.unlink() for p in (d / "params").glob("_*METADATA")])
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.load(d)

    def more_layers(d):
        c = json.loads((d / "config.json").read_text())
        c["num_layers"] = 3
        (d / "config.json").write_text(json.dumps(c))

    d = broken("wrong-config", more_layers)
    with pytest.raises(checkpoint.CheckpointError, match="do not match config.json"):
        checkpoint.load(d)


def test_load_onto_mesh(hf_model, tokens, ref_logits, tmp_path):
    from glm4_jax.sharding import make_mesh

    save_hf(hf_model, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", "--dtype", "float32")
    mesh = make_mesh("data=1,fsdp=2,tensor=2,sequence=2")
    model = checkpoint.load(tmp_path / "dst", mesh=mesh)
    q = model.layers.qkv[...]
    assert len(q.sharding.device_set) > 1
    got = our_logits(tmp_path / "dst", tokens, mesh=mesh)
    print(f"mesh: max |logits - transformers| = {np.abs(got - ref_logits).max():.2e}")
    np.testing.assert_allclose(got, ref_logits, atol=1e-4, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture
def thudm_src(hf_model, tmp_path):
    """A fresh 3-shard THUDM source to break."""
    return save_thudm(hf_model, tmp_path / "src", shards=3)


def fails(capsys, src, dst, *args, needles=()):
    """Runs the CLI expecting bad input: exit 2, one `error:` line naming what is wrong, DST absent, no temp."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(src), str(dst), "--quiet", *args])
    err = capsys.readouterr().err
    print(err)
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    dst = pathlib.Path(dst)
    assert leftovers(dst.parent) == []
    return lines[0]


def shard(src, n):
    return sorted(src.glob("model-*.safetensors"))[n]


def test_truncated_shard(thudm_src, tmp_path, capsys):
    f = shard(thudm_src, 1)
    os.truncate(f, f.stat().st_size - 100)
    fails(capsys, thudm_src, tmp_path / "dst", needles=[f.name, "truncated"])
    assert not (tmp_path / "dst").exists()


def test_shard_missing(thudm_src, tmp_path, capsys):
    f = shard(thudm_src, 2)
    f.unlink()
    fails(capsys, thudm_src, tmp_path / "dst", needles=[f.name, "missing"])
    assert not (tmp_path / "dst").exists()


def test_lfs_pointer(thudm_src, tmp_path, capsys):
    f = shard(thudm_src, 0)
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    fails(capsys, thudm_src, tmp_path / "dst", needles=[f.name, "git-LFS"])
    assert not (tmp_path / "dst").exists()


def test_malformed_index(thudm_src, tmp_path, capsys):
    (thudm_src / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    fails(capsys, thudm_src, tmp_path / "dst", needles=["model.safetensors.index.json", "JSON"])
    assert not (tmp_path / "dst").exists()


def test_missing_config(thudm_src, tmp_path, capsys):
    (thudm_src / "config.json").unlink()
    fails(capsys, thudm_src, tmp_path / "dst", needles=["config.json"])
    assert not (tmp_path / "dst").exists()


def test_config_disagrees_with_shapes(thudm_src, tmp_path, capsys):
    c = json.loads((thudm_src / "config.json").read_text())
    c["ffn_hidden_size"] += 16
    (thudm_src / "config.json").write_text(json.dumps(c))
    fails(capsys, thudm_src, tmp_path / "dst", needles=["layers.0.mlp.dense_", "has shape", "config.json implies"])
    assert not (tmp_path / "dst").exists()


def test_glm4_moe_refused(thudm_src, tmp_path, capsys):
    (thudm_src / "config.json").write_text(
        json.dumps({"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "hidden_size": 80})
    )
    fails(capsys, thudm_src, tmp_path / "dst", needles=["glm4_moe", "not supported"])


def test_unmapped_and_missing_tensors(hf_model, tmp_path, capsys):
    sd = thudm_state_dict(hf_model)
    cfg = json.dumps(thudm_config(hf_model.config))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text(cfg)
    write_shards({**sd, "transformer.encoder.layers.0.mlp.extra.weight": torch.zeros(3)}, extra)
    fails(
        capsys, extra, tmp_path / "dst", needles=["transformer.encoder.layers.0.mlp.extra.weight", "model.safetensors"]
    )

    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text(cfg)
    del sd["transformer.encoder.layers.2.self_attention.dense.weight"]
    write_shards(sd, missing)
    fails(capsys, missing, tmp_path / "dst", needles=["transformer.encoder.layers.2.self_attention.dense.weight"])

    beyond = tmp_path / "beyond"
    beyond.mkdir()
    c = thudm_config(hf_model.config)
    c["num_layers"] = 2
    (beyond / "config.json").write_text(json.dumps(c))
    write_shards(thudm_state_dict(hf_model), beyond)
    fails(capsys, beyond, tmp_path / "dst", needles=["transformer.encoder.layers.2."])
    assert not (tmp_path / "dst").exists()


def test_truncated_bin(hf_model, tmp_path, capsys):
    src = save_thudm(hf_model, tmp_path / "src", shards=2, fmt="bin")
    f = sorted(src.glob("*.bin"))[1]
    os.truncate(f, f.stat().st_size // 2)
    fails(capsys, src, tmp_path / "dst", needles=[f.name])
    assert not (tmp_path / "dst").exists()


def test_bin_without_torch(hf_model, tmp_path, capsys, monkeypatch):
    src = save_hf(hf_model, tmp_path / "src", fmt="bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    fails(capsys, src, tmp_path / "dst", needles=["pytorch_model.bin", "needs torch"])


def test_src_not_a_directory(tmp_path, capsys):
    fails(capsys, tmp_path / "nowhere", tmp_path / "dst", needles=["nowhere", "no such directory"])
    (tmp_path / "file").write_text("x")
    fails(capsys, tmp_path / "file", tmp_path / "dst", needles=["file", "not a directory"])


def test_existing_dst_and_force(thudm_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    convert(thudm_src, dst)  # an existing glm4-jax checkpoint: what --force may replace
    (dst / "keep.txt").write_text("old")
    fails(capsys, thudm_src, dst, needles=[str(dst), "--force"])
    assert (dst / "keep.txt").read_text() == "old"

    # --force with a broken source: the old DST stays as it was.
    os.truncate(shard(thudm_src, 0), 50)
    fails(capsys, thudm_src, dst, "--force", needles=["truncated"])
    assert (dst / "keep.txt").read_text() == "old"

    # --force with a good source replaces it, once the new one is complete.
    good = save_hf(tiny_hf_model(seed=2), tmp_path / "good")
    convert(good, dst, "--force")
    assert not (dst / "keep.txt").exists() and (dst / "manifest.json").is_file()
    assert leftovers(tmp_path) == []


def test_force_replaces_only_our_checkpoints(thudm_src, tmp_path, capsys, monkeypatch):
    """--force never deletes what is not a glm4-jax checkpoint (or an empty directory), nor the current or home
    directory, nor SRC or what holds it; and --force is suggested only where it would work."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    msg = fails(capsys, thudm_src, notes, needles=[str(notes), "not a glm4-jax checkpoint", "choose another DST"])
    assert "use --force" not in msg
    fails(capsys, thudm_src, notes, "--force", needles=[str(notes), "not a glm4-jax checkpoint"])
    assert (notes / "notes.txt").read_text() == "mine"

    # SRC SRC and an ancestor of SRC: the overlap is named, --force is not suggested.
    outer = tmp_path / "outer"
    src = outer / "src"
    shutil.copytree(thudm_src, src)
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, outer):
        for extra in ((), ("--force",)):
            msg = fails(capsys, src, dst, *extra, needles=[str(dst), "outside SRC"])
            assert "use --force" not in msg
    assert sorted(p.name for p in src.iterdir()) == before

    # The current directory (also as '' or '.') and the home directory.
    work = tmp_path / "work"
    work.mkdir()
    (work / "code.py").write_text("x = 1")
    monkeypatch.chdir(work)
    for dst in (".", "", str(work)):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(thudm_src), dst, "--quiet", "--force"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and "current directory" in err, err
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([str(thudm_src), str(work), "--quiet", "--force"])
    assert "home directory" in capsys.readouterr().err
    assert (work / "code.py").read_text() == "x = 1"

    # An empty directory is replaced with --force.
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(thudm_src, empty, "--force")
    assert leftovers(tmp_path) == []


def test_dst_claimed_at_the_start(thudm_src, tmp_path, capsys, monkeypatch):
    """A new DST is created at once, so a second conversion into it fails from the start; what a user puts into it
    during the conversion is never replaced."""
    dst = tmp_path / "dst"
    real = table.read_block
    seen = []
    once = threading.Lock()  # the writer reads from several threads

    def read_and_meddle(*args, **kw):
        with once:
            if not seen:
                seen.append(dst.is_dir() and not any(dst.iterdir()))  # claimed: an empty directory
                cmd = [sys.executable, "-m", "glm4_jax.convert", str(thudm_src), str(dst), "-q"]
                second = subprocess.run(cmd, capture_output=True, text=True)
                seen.append((second.returncode, second.stderr))
                (dst / "notes.txt").write_text("mine")
        return real(*args, **kw)

    monkeypatch.setattr(table, "read_block", read_and_meddle)
    fails(capsys, thudm_src, dst, needles=[str(dst), "something was put there"])
    assert seen[0] is True
    rc, err = seen[1]
    assert rc == 2 and err.startswith("error: ") and "already exists" in err, err
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    assert (dst / "notes.txt").read_text() == "mine"


def test_stale_temporaries_are_named_and_removed(thudm_src, tmp_path, capsys):
    dst = tmp_path / "dst"
    convert(thudm_src, dst)
    stale = tmp_path / ".dst.tmp-0badf00d"
    (stale / "params").mkdir(parents=True)
    moved = tmp_path / ".dst.old-0badf00d"
    moved.mkdir()
    (moved / "manifest.json").write_text("{}")
    capsys.readouterr()
    main([str(thudm_src), str(dst), "--quiet", "--force"])
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and f"removed {moved}" in err, err
    assert leftovers(tmp_path) == [] and (dst / "manifest.json").is_file()
    # With DST missing, an old copy moved aside is the only one left: named, kept, and how to put it back.
    moved.mkdir()
    main([str(thudm_src), str(tmp_path / "other"), "--quiet"])
    assert capsys.readouterr().err.count("note:") == 0  # another DST's temporaries are not its business
    out = tmp_path / "gone"
    old = tmp_path / ".gone.old-12345678"
    old.mkdir()
    main([str(thudm_src), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert f"{old} holds the checkpoint" in err and "mv" in err and old.is_dir(), err


def test_disk_full_midway_names_the_path(thudm_src, tmp_path, capsys, monkeypatch):
    import errno

    real = checkpoint.write_all
    calls = []

    def fill_up(fd, data, path):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")  # os.write names no file
        return real(fd, data, path)

    monkeypatch.setattr(checkpoint, "write_all", fill_up)
    monkeypatch.setattr(table, "copy_range", lambda *a, **k: False)  # every chunk through write_all
    dst = tmp_path / "dst"
    fails(capsys, thudm_src, dst, needles=[str(dst), "no space left", str(tmp_path)])
    assert not dst.exists() and len(calls) >= 3


def test_tokenizer_links_out_of_src_refused_and_modes_kept(thudm_src, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for DST")
    (thudm_src / "tokenizer_config.json").unlink(missing_ok=True)
    (thudm_src / "tokenizer_config.json").symlink_to(secret)
    fails(capsys, thudm_src, tmp_path / "dst", needles=["tokenizer_config.json", "outside SRC", str(secret)])
    assert not (tmp_path / "dst").exists()
    (thudm_src / "tokenizer_config.json").unlink()
    (thudm_src / "tokenizer_config.json").write_text("{}")
    os.chmod(thudm_src / "tokenizer_config.json", 0o600)
    convert(thudm_src, tmp_path / "dst")
    assert (os.stat(tmp_path / "dst" / "tokenizer_config.json").st_mode & 0o777) & ~0o600 == 0


def test_not_enough_disk_space(thudm_src, tmp_path, capsys, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    fails(capsys, thudm_src, tmp_path / "dst", needles=["not enough disk space", "GiB"])
    assert not (tmp_path / "dst").exists()


def test_interrupt_midway_leaves_nothing(thudm_src, tmp_path, capsys, monkeypatch):
    """Ctrl-C (a real SIGINT) while the arrays are being written: exit 2, no DST, no temporary."""
    real = table.read_block
    calls = []

    def read_then_interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(table, "read_block", read_then_interrupt)
    fails(capsys, thudm_src, tmp_path / "dst", needles=["interrupted"])
    assert len(calls) >= 5 and not (tmp_path / "dst").exists()


def test_read_error_midway(thudm_src, tmp_path, capsys, monkeypatch):
    """A file that goes bad after the checks (here: a read that fails) stops the conversion with its message."""
    from glm4_jax.convert import ConvertError

    real = table.read_block
    calls = []

    def read_then_fail(info, *args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise ConvertError(f"{info.origin}: unexpected end of file while reading {info.name}")
        return real(info, *args, **kw)

    monkeypatch.setattr(table, "read_block", read_then_fail)
    fails(capsys, thudm_src, tmp_path / "dst", needles=["unexpected end of file", ".safetensors"])
    assert not (tmp_path / "dst").exists()


def test_cli_subprocess(hf_model, tmp_path):
    """`python -m glm4_jax.convert`: --help, a failure (one line, status 2), a success."""
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "glm4_jax.convert", *map(str, a)], capture_output=True, text=True, timeout=300
    )
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--dtype", "--force", "--no-hash", "--quiet", "SRC", "DST"):
        assert flag in r.stdout
    r = run(tmp_path / "missing", tmp_path / "dst")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    src = save_thudm(hf_model, tmp_path / "src", shards=2)
    r = run(src, tmp_path / "dst", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dst" / "manifest.json").is_file() and leftovers(tmp_path) == []


# A conversion killed with SIGKILL at a moment of its --force publish: a wrapper runs the real CLI in a subprocess
# and kills itself at that moment (before the swap, right after it, or while the old copy is being removed).
_KILL_AT = """
import os, signal, sys
from glm4_jax import fileio
from glm4_jax.convert.__main__ import main

moment = sys.argv[1]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if moment == "before_swap":
    fileio._exchange = die
else:
    def remove(path):
        if moment == "while_removing_old":
            (path / "manifest.json").unlink()  # a part of the old copy is gone already
        die()
    fileio.remove_tree = remove
main(sys.argv[2:])
"""


@pytest.mark.parametrize("moment", ["before_swap", "after_swap", "while_removing_old"])
def test_sigkill_during_the_force_swap_leaves_one_checkpoint(thudm_src, tmp_path, moment):
    """SIGKILL at the publish of a --force conversion: DST is afterwards exactly the old checkpoint or exactly the
    new one (never a mix, never missing), and the next conversion names the leftover temporary and removes it."""
    dst = tmp_path / "dst"
    convert(thudm_src, dst)
    (dst / "marker").write_text("old")  # tells the old checkpoint from the new one
    before = {p.relative_to(dst) for p in dst.rglob("*")}
    cmd = [sys.executable, "-c", _KILL_AT, moment, str(thudm_src), str(dst), "--force", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (dst / "manifest.json").is_file()
    after = {p.relative_to(dst) for p in dst.rglob("*")}
    if moment == "before_swap":
        assert after == before  # the old one, whole
    else:
        assert after == before - {pathlib.Path("marker")}  # the new one, whole
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".dst.tmp-"), stale
    rerun = subprocess.run(
        [sys.executable, "-m", "glm4_jax.convert", str(thudm_src), str(dst), "--force", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {tmp_path / stale[0]}" in rerun.stderr, rerun.stderr
    assert leftovers(tmp_path) == [] and (dst / "manifest.json").is_file()

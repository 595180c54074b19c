"""`python -m glm4_jax.demo` runs end to end: THUDM-layout random checkpoint -> converter -> generation."""

import os
import re
import subprocess
import sys

from conftest import REPO


def _demo(*args, tmpdir=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device, as a user would run it
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(
        [sys.executable, "-m", "glm4_jax.demo", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_demo_runs_and_cleans_up(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _demo(tmpdir=tmpdir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("[1/3]", "[2/3]", "[3/3]", "assistant> ", "raw prompt", "python -m glm4_jax.convert", "--ckpt"):
        assert needle in out
    assert "Traceback" not in proc.stderr
    assert "a temporary directory (removed at the end" in out
    assert list(tmpdir.iterdir()) == []  # the temporary directory is removed
    assert str(tmpdir) not in out + proc.stderr  # and no path that no longer exists is printed
    assert not re.search(r"glm4-jax-demo-", out)


def test_demo_out_keeps_a_loadable_checkpoint(tmp_path, capsys):
    from glm4_jax import demo
    from glm4_jax.api import GLM4Chat

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--max-new-tokens", "4"]) == 0
    assert "The checkpoints are in" in capsys.readouterr().out
    assert (out / "thudm" / "model.safetensors.index.json").is_file()
    assert (out / "converted" / "manifest.json").is_file()
    chat = GLM4Chat.from_checkpoint(out / "converted")
    assert chat.tokenizer is not None
    assert chat.cfg.eos_token_ids == tuple(chat.tokenizer.stop_ids)
    assert chat.cfg.vocab_size > chat.tokenizer.n_vocab  # padded rows exist, and are masked
    res = chat.generate("The quick brown fox", max_new_tokens=4)
    assert len(res.ids[0]) <= 4 and max(res.ids[0]) < chat.tokenizer.n_vocab

"""Two JAX processes (4 fake CPU devices each, joined by jax.distributed over localhost) load a converted
checkpoint onto one 8-device mesh through `python -m glm4_jax.generate --distributed` and generate the same ids as a
single process on one device."""

import json
import os
import socket
import subprocess
import sys

import pytest

from glm4_jax.fixtures import build_demo_checkpoint

GENERATE = [sys.executable, "-m", "glm4_jax.generate", "--prompt-ids", "5,6,7,8,9,10,11", "--max-new-tokens", "12"]
GENERATE += ["--temperature", "0", "--json"]


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=2,tensor=4", "data=1,sequence=4,tensor=2"])
def test_two_processes_generate_the_single_process_ids(tmp_path, mesh):
    ckpt = build_demo_checkpoint(tmp_path / "demo", dtype="float32")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cluster = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [*GENERATE, "--ckpt", str(ckpt), "--mesh", mesh, *cluster, "--process-id", str(i)],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    pod = json.loads(outs[0][0].strip().splitlines()[-1])
    assert not any(line.startswith("{") for line in outs[1][0].splitlines())  # only process 0 prints the result

    single = subprocess.run(
        [*GENERATE, "--ckpt", str(ckpt)], env=_env(1), capture_output=True, text=True, timeout=300, check=True
    )
    ref = json.loads(single.stdout.strip().splitlines()[-1])
    print("two processes:", pod["ids"], "one process:", ref["ids"])
    assert pod["ids"] == ref["ids"] and len(ref["ids"]) >= 1

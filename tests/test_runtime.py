"""XLA flags set at import: added when absent, never overriding the user's choice."""

import os

from glm4_jax import runtime


def test_gpu_gemm_flag_added_when_absent(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    runtime.configure_xla_flags()

    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8",
        "--xla_gpu_enable_triton_gemm=false",
    ]


def test_users_choice_is_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    runtime.configure_xla_flags()

    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"


def test_flag_named_by_its_whole_name(monkeypatch):
    # a user flag whose name only starts with ours is another flag: ours is still added; a bare flag is a choice
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm_any=true")
    runtime.configure_xla_flags()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_gpu_enable_triton_gemm_any=true", *runtime.GPU_FLAGS]

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm")
    runtime.configure_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm"


def test_gpu_flag_is_harmless_on_cpu():
    """A fresh process: importing glm4_jax adds the GPU flag before JAX starts, and a CPU computation (a jitted
    matmul, the path the flag is about on GPUs) runs with it; XLA would abort on an unknown flag."""
    import subprocess
    import sys

    code = (
        "import os, glm4_jax, jax, jax.numpy as jnp; "
        "print(os.environ['XLA_FLAGS']); "
        "x = jnp.ones((4, 8)); print(jax.default_backend(), float(jax.jit(lambda a: (a @ a.T).sum())(x)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["--xla_gpu_enable_triton_gemm=false", "cpu 128.0"]

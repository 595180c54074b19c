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

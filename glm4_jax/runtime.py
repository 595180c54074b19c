"""Process-wide XLA settings, applied when `glm4_jax` is imported (before JAX starts its backends).

On GPUs, XLA's default (Triton) GEMM path is reported to run the skinny batch-1 matrix-vector products of decoding
well below the memory bandwidth that cuBLAS reaches, so the cuBLAS path is chosen unless the user's XLA_FLAGS
already decide. No script here has measured the difference yet (`python -m glm4_jax.bench` on a GPU, with and
without the flag, would). The flag is ignored on CPU and TPU.
"""

from __future__ import annotations

import os

GPU_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def configure_xla_flags() -> None:
    """Appends GPU_FLAGS to XLA_FLAGS, leaving alone any flag the user set (by name)."""
    flags = os.environ.get("XLA_FLAGS", "")
    named = {f.split("=", 1)[0] for f in flags.split()}
    for flag in GPU_FLAGS:
        if flag.split("=", 1)[0] not in named:  # by whole name: a longer flag that starts with it is another one
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags

"""Test-wide setup: 8 fake CPU devices (set before JAX starts) and the shared GLM-4 tokenizer files."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TOKENIZER_DIR = REPO.parent / "shared" / "data" / "glm-4-9b-chat"


@pytest.fixture(scope="session")
def glm4_tokenizer_dir() -> pathlib.Path:
    """The real GLM-4 tokenizer files from ../shared; tests that need them skip when they are absent."""
    if not (SHARED_TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.skip(f"the real GLM-4 tokenizer is not at {SHARED_TOKENIZER_DIR} (../shared is absent)")
    return SHARED_TOKENIZER_DIR

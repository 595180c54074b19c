"""The tree stays ruff-clean (lint rules and formatting from pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def _ruff():
    exe = shutil.which("ruff") or (sys.prefix + "/bin/ruff")
    if not os.path.exists(exe):
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    return exe


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    result = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

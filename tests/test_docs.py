"""The examples of README.md and docs/*.md: each is marked, and those marked as running on the demo checkpoint run.

The convention: the line before a ```bash, ```sh or ```python block is an HTML comment, either
`<!-- runs on the demo checkpoint -->` (the block runs as shown, from a directory that holds `demo/` as
`python3 -m glm4_jax.demo --out demo` leaves it) or `<!-- needs: WHAT -->` (real weights, a GPU, network, ...).
A block without one fails `test_every_example_is_marked`, so a new example cannot slip in unchecked; the
runnable ones run in `test_runnable_example`, so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

RUNS = "<!-- runs on the demo checkpoint -->"
NEEDS = re.compile(r"<!-- needs: [^>]+ -->")
FENCE = re.compile(r"^```(\w+)\s*$")
LANGUAGES = {"bash": "bash", "sh": "bash", "python": "python"}


def _blocks() -> list[tuple[str, int, str, str, str]]:
    """(file, line, language, marker line, code) of every bash/sh/python block of README.md and docs/*.md."""
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m and m.group(1) in LANGUAGES:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
                out.append(
                    (
                        path.relative_to(REPO).as_posix(),
                        i + 1,
                        LANGUAGES[m.group(1)],
                        before,
                        "\n".join(lines[i + 1 : end]),
                    )
                )
                i = end
            i += 1
    return out


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[3] == RUNS]


def test_every_example_is_marked():
    unmarked = [f"{f}:{line}" for f, line, _, marker, _ in BLOCKS if marker != RUNS and not NEEDS.fullmatch(marker)]
    assert not unmarked, f"examples with neither {RUNS!r} nor '<!-- needs: ... -->' before them: {unmarked}"
    assert len(RUNNABLE) >= 8, len(RUNNABLE)  # the test below is not vacuous


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding demo/ (as `python3 -m glm4_jax.demo --out demo` leaves it) and a bin/ whose `python3`
    and `python` are this interpreter."""
    from glm4_jax.fixtures import build_demo_checkpoint

    work = tmp_path_factory.mktemp("docs")
    build_demo_checkpoint(work / "demo")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):  # a script, not a link: a link would lose the virtualenv
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{f}:{line}" for f, line, *_ in RUNNABLE])
def test_runnable_example(block, workdir):
    file, line, language, _, code = block
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{workdir / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)  # one device, as a user would run it
    cmd = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, f"{file}:{line} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{file}:{line}:\n{proc.stderr[-3000:]}"

"""benchmarks/serve_load.py end to end, small: a real server on loopback, concurrent streams, the checks pass."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
from tiny import load_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("openai", reason="the load test drives the server with the openai client")
pytest.importorskip("fastapi", reason="the server needs fastapi")


def _load_module():
    return load_benchmark("serve_load")


def test_workload_is_seeded_and_bounded():
    m = _load_module()
    a = m.make_jobs(32, 3, (2, 5), (4, 9), 0.5)
    assert a == m.make_jobs(32, 3, (2, 5), (4, 9), 0.5)
    assert a != m.make_jobs(32, 4, (2, 5), (4, 9), 0.5)
    assert all(4 <= j.max_tokens <= 9 and 2 <= len(j.prompt.split()) - 1 <= 5 for j in a)
    assert 0 < sum(j.disconnect_after is not None for j in a) < 32
    assert len({j.prompt for j in a}) == 32  # each prompt is its own (a mixed-up stream cannot match another)
    assert m.percentiles([0.001, 0.002, 0.003]) == "p50     2.0 ms  p90     3.0 ms  p99     3.0 ms"


@pytest.mark.slow
def test_serve_load_small(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--requests", "12", "--max-batch", "4",
         "--max-len", "64", "--prompt-words", "2..12", "--new-tokens", "2..10", "--disconnect", "0.25",
         "--no-warmup", "--timeout", "120"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert re.search(r"^12 streaming requests, \d+ disconnected early", out.stdout, re.M)
    assert re.search(r"concurrent :\s+\d+ tokens in\s+[\d.]+ s =\s+[\d.]+ tok/s", out.stdout)
    assert "'engine_idle': True" in out.stdout and "'inflight': 0" in out.stdout

"""`python -m glm4_jax.bench` runs end to end on a tiny random model and reports every column."""

import json
import subprocess
import sys

import pytest

from glm4_jax.bench import BenchError, parse_workloads


def test_workload_parsing():
    assert parse_workloads("1x128, 64x1024", "8192") == [("decode", 1, 128), ("decode", 64, 1024), ("prefill", 1, 8192)]
    for decode, prefill in [("1x", ""), ("0x5", ""), ("", "abc"), ("", "")]:
        with pytest.raises(BenchError):
            parse_workloads(decode, prefill)


def test_bench_cli_json():
    cmd = [sys.executable, "-m", "glm4_jax.bench", "--random", "tiny", "--decode", "2x64", "--prefill", "256"]
    out = subprocess.run(
        [*cmd, "--new-tokens", "8", "--repeats", "1", "--json"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    decode, prefill = record["rows"]
    assert decode["workload"] == "decode 2x64" and decode["new_tokens"] == 8
    assert decode["decode_tok_s"] > 0 and decode["ms_per_step"] > 0 and decode["gb_per_s"] > 0
    assert prefill["workload"] == "prefill 1x256" and prefill["prefill_tok_s"] > 0 and prefill["decode_tok_s"] is None
    assert record["parameters"] > 0 and record["device"].endswith("cpu")


def test_bench_refuses_a_workload_longer_than_the_context():
    out = subprocess.run(
        [sys.executable, "-m", "glm4_jax.bench", "--random", "tiny", "--prefill", "100000", "--decode", ""],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr

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


def test_bench_runs_with_its_own_defaults():
    """`bench --random tiny` and nothing else: the default prefill shrinks to what the tiny context holds."""
    cmd = [sys.executable, "-m", "glm4_jax.bench", "--random", "tiny", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    assert [r["workload"] for r in rows] == ["decode 1x128", "prefill 1x2048"]
    assert rows[0]["decode_tok_s"] > 0 and rows[1]["prefill_tok_s"] > 0


def test_bench_refuses_before_building_in_one_line():
    """A full-size workload beyond the context is refused before JAX builds anything (well under a second of
    work), in one line naming the workload."""
    cmd = [sys.executable, "-m", "glm4_jax.bench", "--random", "glm-4-9b-chat", "--decode", "1x131072"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: decode 1x131072 needs 131200 tokens of context, more than the model's 131072"
    ]


def test_check_fit_refuses_what_the_device_cannot_hold():
    from glm4_jax.bench import check_fit, memory_needed
    from glm4_jax.config import preset

    cfg = preset("glm-4-9b-chat").replace(dtype="bfloat16")
    work = [("decode", 64, 1024)]
    need = memory_needed(cfg, work, 128)
    # bf16 weights (18.8 GB) plus the 64 x 1152-slot cache: 40 layers x 2 (k, v) x 2 kv heads x 128 x 2 bytes a slot
    assert need == 18_799_902_720 + 64 * 1152 * 40 * 2 * 2 * 128 * 2 + 64 * 1152 * 4 + 4
    check_fit(cfg, work, 128, None, need)  # fits exactly
    with pytest.raises(BenchError, match="more than the 79.6 GiB of device memory"):
        check_fit(cfg, [("decode", 64, 32768)], 128, None, int(79.6 * 2**30))
    int8 = cfg.replace(quant="int8")  # quantized weights count as stored: about half
    assert memory_needed(int8, work, 128) < 0.6 * need


def test_vs_transformers_tiny_runs_with_its_own_defaults():
    pytest.importorskip("transformers")
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vs_transformers.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--repeats", "1"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = [ln for ln in out.stdout.splitlines() if ln.startswith("| decode") or ln.startswith("| prefill")]
    assert [ln.split(" | ")[0] for ln in ratios[-3:]] == ["| decode 1x32", "| decode 4x64", "| prefill 1x256"]
    assert all(ln.rstrip(" |").endswith("x") for ln in ratios[-3:])

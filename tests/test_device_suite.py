"""`benchmarks/device_suite.py --tiny`: every part end to end on the CPU, results written part by part, and a part
that fails or runs out of time costs only itself."""

import json
import pathlib
import subprocess
import sys

import pytest

SUITE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "device_suite.py"
RUNNER = SUITE.parent / "run_device_suite.sh"


def run(out, *args, timeout=1500):
    return subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), *args], capture_output=True, text=True, timeout=timeout
    )


def test_tiny_suite_runs_every_part(tmp_path):
    pytest.importorskip("transformers")
    proc = run(tmp_path, "--tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + (tmp_path / "suite.log").read_text()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    parts = results["parts"]
    assert list(parts) == ["floor", "jax_bf16", "jax_int8", "jax_int4", "qmatmul", "jax_long", "hf", "parity"]
    assert all(p["status"] == "ok" for p in parts.values())
    floor = {r["what"]: r for r in parts["floor"]["rows"]}
    assert floor["copy"]["gb_s"] > 0 and floor["bf16 matmul 256^3"]["tflop_s"] > 0
    bf16 = {r["workload"]: r for r in parts["jax_bf16"]["rows"]}
    assert list(bf16) == ["decode 1x32", "decode 4x64", "prefill 1x256"]
    for r in (bf16["decode 1x32"], parts["jax_int8"]["rows"][0], parts["jax_int4"]["rows"][0]):
        assert r["decode_tok_s"] > 0 and r["gb_per_s"] > 0 and r["floor_share"] > 0 and r["compile_s"] > 0
    assert [r["quant"] for r in (parts["jax_int8"]["rows"][0], parts["jax_int4"]["rows"][0])] == ["int8", "int4"]
    qm = parts["qmatmul"]["rows"]
    assert [r["what"] for r in qm] == [
        f"x [1, {k}] @ W [{k}, {o}] {q}" for k, o in ((256, 512), (512, 256)) for q in ("int8", "int4")
    ]
    for r in qm:  # on the CPU the kernel runs in interpret mode, and qmatmul.linear never takes it
        assert r["xla_ms"] > 0 and r["kernel_ms"] > 0 and r["linear_takes_kernel"] is False
        assert r["max_diff"] < 0.05  # bf16 outputs of about unit size, two roundings
    long = parts["jax_long"]["rows"][0]
    assert long["prompt"] + long["new_tokens"] == 1024 and long["decode_tok_s"] > 0
    assert [r["workload"] for r in parts["hf"]["rows"]] == list(bf16)
    assert [r["workload"] for r in results["ratios"]] == list(bf16) and all(r["ratio"] > 0 for r in results["ratios"])
    logits, greedy = parts["parity"]["rows"]
    # the same bf16 weights in both models: distributions all but equal (random weights make near-ties, so top-1
    # is not asserted at 100%), and greedy ids the same
    assert logits["max_kl"] < 1e-3 and logits["top1"] > 0.8
    assert greedy["of"] == 16 and greedy["same_ids"] >= 8
    md = (tmp_path / "results.md").read_text()
    assert "## glm4-jax / transformers" in md and "## parity: ok" in md


def test_a_failing_or_slow_part_costs_only_itself(tmp_path):
    """A part over its budget is stopped and recorded; the parts after it still run and results are written."""
    proc = run(tmp_path, "--tiny", "--parts", "jax_long,floor", "--budget-scale", "0.005")  # 1.5 s each
    assert proc.returncode == 1
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["jax_long"]["status"] == "timed out" and parts["floor"]["status"] == "timed out"
    assert "## jax_long: timed out" in (tmp_path / "results.md").read_text()
    bad = run(tmp_path, "--parts", "floor,nope")
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown parts ['nope']")

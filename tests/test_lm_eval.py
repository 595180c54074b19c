"""lm-evaluation-harness against the real server on the demo checkpoint: local task files, nothing downloaded.

`local-completions` scores a multiple-choice (loglikelihood) task through /v1/completions with echo and logprobs,
tokenizing through the server (`tokenizer_backend=remote`: /tokenizer_info, /tokenize, /detokenize), and runs a
generate_until task; `local-chat-completions` runs the generation task through /v1/chat/completions with no
tokenizer. Random weights: the scores mean nothing, only that a third-party client runs end to end.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest
from tiny import load_benchmark

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra (tenacity)")
pytest.importorskip("fastapi", reason="the server needs fastapi")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_url():
    serve_load = load_benchmark("serve_load")
    args = types.SimpleNamespace(url=None, ckpt=None, max_batch=4, requests=16, max_len=256, start_timeout=300)
    with serve_load.server(args) as url:
        yield url


def _lm_eval(tmp_path, model: str, model_args: str, tasks: str, *extra: str) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
         "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, cwd=TASKS, env=env, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    return json.loads(results.read_text())


def test_lm_eval_local_completions(server_url, tmp_path):
    args = f"base_url={server_url}/v1/completions,model=converted,tokenizer_backend=remote,max_retries=1,max_length=256"
    res = _lm_eval(tmp_path, "local-completions", args, "glm4_local_mc,glm4_local_gen")
    mc, gen = res["results"]["glm4_local_mc"], res["results"]["glm4_local_gen"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= gen["exact_match,none"] <= 1.0
    assert res["n-samples"]["glm4_local_mc"]["effective"] == 6
    assert res["n-samples"]["glm4_local_gen"]["effective"] == 4


def test_lm_eval_local_chat_completions(server_url, tmp_path):
    args = f"base_url={server_url}/v1/chat/completions,model=converted,tokenizer_backend=None,tokenized_requests=False"
    res = _lm_eval(
        tmp_path, "local-chat-completions", args + ",max_retries=1", "glm4_local_gen", "--apply_chat_template"
    )
    assert 0.0 <= res["results"]["glm4_local_gen"]["exact_match,none"] <= 1.0
    assert res["n-samples"]["glm4_local_gen"]["effective"] == 4


def test_remote_tokenizer_endpoints(server_url):
    import httpx

    plain = httpx.post(f"{server_url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    full = httpx.post(f"{server_url}/tokenize", json={"prompt": "hello world"}).json()
    assert plain["tokens"] and full["tokens"][2:] == plain["tokens"] and len(full["tokens"]) == len(plain["tokens"]) + 2
    assert httpx.post(f"{server_url}/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": "hello world"}
    info = httpx.get(f"{server_url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    for body, param in (({"tokens": [10**9]}, "tokens"), ({"tokens": "x"}, "tokens")):
        r = httpx.post(f"{server_url}/detokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = httpx.post(f"{server_url}/tokenize", json={"prompt": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    health = httpx.get(f"{server_url}/health").json()
    assert health["engine_idle"] is True and health["inflight"] == 0

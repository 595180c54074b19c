"""Load test of `python -m glm4_jax.serve` over loopback: N concurrent streaming clients, then one at a time.

N requests (default 64) with seeded prompt lengths (words of a fixed vocabulary) and output lengths (uniform in
--new-tokens) go to `/v1/completions` with `stream=True`, greedy, through the official `openai` async client.
A seeded fraction (--disconnect) of them closes its stream after a few chunks. The run is bounded: every request
has --timeout seconds, and the whole concurrent phase too.

Checks (any failure is printed and the exit code is 1):
- every request that was not disconnected completed: its stream ended with a finish reason and its usage says
  `completion_tokens` tokens, exactly its `max_tokens` when the reason is "length" (at most that for "stop");
- no stream got another's tokens: each one's text and token count equal those of the same request run alone
  afterwards (greedy, so the solo run is the reference);
- the engine is empty at the end: `/health` reports no request in flight and an idle engine.

Figures: throughput (completion tokens over wall time) and time to first token (first streamed chunk; p50, p90,
p99) for the concurrent run against the same requests one at a time (disconnected ones excluded from both). The
whole workload first runs once untimed (--no-warmup skips it), so no compilation lands in the figures.

    python benchmarks/serve_load.py                       # the demo checkpoint, a server on a free loopback port
    python benchmarks/serve_load.py --ckpt DIR --max-batch 16
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

WORDS = [
    "the",
    "a",
    "of",
    "model",
    "token",
    "batch",
    "stream",
    "slot",
    "cache",
    "prefill",
    "decode",
    "server",
    "request",
    "reply",
    "tool",
    "call",
    "json",
    "text",
]
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Job:
    index: int
    prompt: str
    max_tokens: int
    disconnect_after: int | None  # chunks read before closing the stream; None: read to the end


@dataclasses.dataclass
class Result:
    text: str = ""
    finish: str | None = None
    completion_tokens: int | None = None
    ttft: float | None = None
    seconds: float | None = None
    disconnected: bool = False
    error: str | None = None


def make_jobs(n: int, seed: int, prompt_words: tuple[int, int], new_tokens: tuple[int, int], disconnect: float):
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words)))
        cut = rng.randint(1, 3) if rng.random() < disconnect else None
        jobs.append(Job(i, f"{i}: {prompt}", rng.randint(*new_tokens), cut))
    return jobs


async def run_one(client, model: str, job: Job, timeout: float) -> Result:
    res = Result()
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            stream = await client.completions.create(
                model=model,
                prompt=job.prompt,
                max_tokens=job.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = 0
            async for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if res.ttft is None and (choice.text or choice.finish_reason):
                        res.ttft = time.perf_counter() - t0
                    res.text += choice.text or ""
                    res.finish = choice.finish_reason or res.finish
                    chunks += 1
                if chunk.usage is not None:
                    res.completion_tokens = chunk.usage.completion_tokens
                if job.disconnect_after is not None and chunks >= job.disconnect_after:
                    await stream.close()  # drops the connection: the server cancels the request
                    res.disconnected = True
                    break
    except Exception as e:  # a failed request is a finding, reported below
        res.error = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    return res


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    s = sorted(values)

    def q(p):
        return s[min(len(s) - 1, round(p * (len(s) - 1)))] * 1000

    return f"p50 {q(0.5):7.1f} ms  p90 {q(0.9):7.1f} ms  p99 {q(0.99):7.1f} ms"


def get_health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args):
    """A server on a free loopback port (or the one at --url); yields its base URL."""
    if args.url:
        yield args.url.rstrip("/")
        return
    with contextlib.ExitStack() as stack:
        ckpt = args.ckpt
        if ckpt is None:
            from glm4_jax.fixtures import build_demo_checkpoint

            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-load-"))
            ckpt = str(build_demo_checkpoint(tmp))
        port = free_port()
        cmd = [sys.executable, "-m", "glm4_jax.serve", "--ckpt", ckpt, "--port", str(port)]
        cmd += ["--max-batch", str(args.max_batch), "--max-queue", str(args.requests), "--log-level", "warning"]
        if args.max_len:
            cmd += ["--max-len", str(args.max_len)]
        log = stack.enter_context(tempfile.TemporaryFile("w+"))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + args.start_timeout
            while get_health(url)[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"error: the server did not become healthy:\n{log.read()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def main_async(args) -> int:
    from openai import AsyncOpenAI

    jobs = make_jobs(args.requests, args.seed, args.prompt_words, args.new_tokens, args.disconnect)
    with server(args) as url:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key=args.api_key or "none", max_retries=0, timeout=args.timeout)
        model = (await client.models.list()).data[0].id
        if args.warmup:  # the same workload once, untimed, so that no compilation lands in the figures
            await asyncio.gather(*(run_one(client, model, j, args.timeout) for j in jobs))

        t0 = time.perf_counter()
        try:
            together = await asyncio.wait_for(
                asyncio.gather(*(run_one(client, model, j, args.timeout) for j in jobs)), args.timeout * 2
            )
        except TimeoutError:
            print(f"FAIL: the concurrent phase took more than {args.timeout * 2:.0f} s")
            return 1
        wall_together = time.perf_counter() - t0

        # The engine must be empty once every stream has ended (a cancelled row is freed at the next step).
        deadline, health = time.monotonic() + 10, {}
        while time.monotonic() < deadline:
            status, health = get_health(url)
            if status == 200 and health.get("inflight") == 0 and health.get("engine_idle", True):
                break
            await asyncio.sleep(0.1)

        kept = [j for j, r in zip(jobs, together, strict=True) if not r.disconnected]
        t0 = time.perf_counter()
        alone = [await run_one(client, model, j, args.timeout) for j in kept]
        wall_alone = time.perf_counter() - t0
        await client.close()

    failures = []
    if not (health.get("inflight") == 0 and health.get("engine_idle") is True):
        failures.append(f"the engine is not empty after the run: /health says {health}")
    by_index = dict(zip((j.index for j in kept), alone, strict=True))
    n_disc = 0
    for job, r in zip(jobs, together, strict=True):
        if r.disconnected:
            n_disc += 1
            continue
        solo = by_index[job.index]
        if r.error or solo.error:
            failures.append(f"request {job.index}: {r.error or solo.error}")
        elif r.finish not in ("length", "stop") or r.completion_tokens is None:
            failures.append(f"request {job.index}: did not complete (finish {r.finish}, usage {r.completion_tokens})")
        elif r.finish == "length" and r.completion_tokens != job.max_tokens:
            failures.append(f"request {job.index}: {r.completion_tokens} tokens, asked for {job.max_tokens}")
        elif r.completion_tokens > job.max_tokens:
            failures.append(f"request {job.index}: {r.completion_tokens} tokens > max_tokens {job.max_tokens}")
        elif (r.text, r.completion_tokens, r.finish) != (solo.text, solo.completion_tokens, solo.finish):
            failures.append(
                f"request {job.index}: concurrent stream {r.text!r} ({r.completion_tokens}, {r.finish}) != "
                f"alone {solo.text!r} ({solo.completion_tokens}, {solo.finish})"
            )

    ok_together = [r for r in together if not r.disconnected and not r.error]
    tokens = sum(r.completion_tokens or 0 for r in ok_together)
    tokens_alone = sum(r.completion_tokens or 0 for r in alone if not r.error)
    print(
        f"{len(jobs)} streaming requests, {n_disc} disconnected early, max batch {args.max_batch}, "
        f"output {args.new_tokens[0]}..{args.new_tokens[1]} tokens, prompt {args.prompt_words[0]}.."
        f"{args.prompt_words[1]} words"
    )
    print(f"concurrent : {tokens:6d} tokens in {wall_together:7.2f} s = {tokens / wall_together:8.1f} tok/s")
    print(f"             TTFT {percentiles([r.ttft for r in ok_together if r.ttft is not None])}")
    print(f"one by one : {tokens_alone:6d} tokens in {wall_alone:7.2f} s = {tokens_alone / wall_alone:8.1f} tok/s")
    print(f"             TTFT {percentiles([r.ttft for r in alone if r.ttft is not None])}")
    print(f"end: /health {health}")
    for f in failures:
        print(f"FAIL: {f}")
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO..HI, got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--ckpt", help="checkpoint for the started server (default the demo checkpoint)")
    p.add_argument("--api-key", help="the --url server's key")
    p.add_argument("--requests", type=int, default=64, help="concurrent streaming clients (default 64)")
    p.add_argument("--max-batch", type=int, default=8, help="the started server's decode slots (default 8)")
    p.add_argument("--max-len", type=int, default=256, help="the started server's cache per request (default 256)")
    p.add_argument("--prompt-words", type=_range, default=(2, 40), metavar="LO..HI", help="default 2..40")
    p.add_argument("--new-tokens", type=_range, default=(4, 48), metavar="LO..HI", help="default 4..48")
    p.add_argument("--disconnect", type=float, default=0.15, help="fraction that closes its stream early")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first pass")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (and twice that in all)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the server to become healthy")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error(f"--requests must be >= 1, got {args.requests}")
    if not 0 <= args.disconnect <= 1:
        p.error(f"--disconnect must be in [0, 1], got {args.disconnect}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

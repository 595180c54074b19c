"""Continuous batching against one request at a time and static batches: throughput, TTFT, inter-token latency.

N requests with seeded arrival times (Poisson, --rate per second), prompt lengths and output lengths (uniform in
--prompt-len and --new-tokens) go through three schedulers on the same model, greedy, no stop ids (every request
generates exactly its own output length):

  engine   glm4_jax.batching.Engine with --slots slots: requests join and leave the running batch;
  single   one request at a time, in arrival order, with Generator.stream;
  static   batches of --slots requests in arrival order, each started when its last request has arrived and the
           previous batch is done, with Generator.stream and max_new_tokens = the longest output of the batch
           (the tokens a row makes past its own length are thrown away).

Time to first token (TTFT) counts from a request's arrival; inter-token latency (ITL) is the gap between two
tokens of one request, as the host reads them. Throughput is the requests' tokens over the time from the first
arrival to the last token. Every scheduler first runs the whole workload once untimed, so nothing is compiled in
the timed runs; then --repeats timed runs, round robin, and the median of each figure is printed.

Then --pause: one stream decodes while a --pause-prompt-token prompt is prefilled; the longest gap between two of
its tokens, against its median gap, in chunks of 256 and --prefill-chunk, and with the whole prompt in one chunk.
The demo model's context is 1024, so this part runs the demo weights with max_seq_len set to the prompt plus 512
(a config change only; RoPE does not depend on it).

    python benchmarks/engine_bench.py                  # the demo model (glm4_jax.fixtures.build_demo_checkpoint)
    python benchmarks/engine_bench.py --ckpt DIR --requests 64 --slots 16
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np

from glm4_jax import checkpoint
from glm4_jax.batching import Engine
from glm4_jax.engine import Generator
from glm4_jax.fixtures import build_demo_checkpoint


@dataclasses.dataclass
class Job:
    arrival: float  # seconds after the start
    prompt: list[int]
    new_tokens: int
    times: list[float] = dataclasses.field(default_factory=list)  # seconds after the start, per token


def workload(args, vocab: int) -> list[Job]:
    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    lo, hi = args.prompt_len
    nlo, nhi = args.new_tokens
    return [
        Job(float(a), rng.integers(3, vocab, int(rng.integers(lo, hi + 1))).tolist(), int(rng.integers(nlo, nhi + 1)))
        for a in arrivals
    ]


def fresh(jobs):
    return [Job(j.arrival, j.prompt, j.new_tokens) for j in jobs]


def _wait_until(t0, t):
    d = t0 + t - time.perf_counter()
    if d > 0:
        time.sleep(d)


def run_engine(engine: Engine, jobs: list[Job], timed: bool = True) -> float:
    t0 = time.perf_counter()
    pending = list(jobs)
    while pending or not engine.idle:
        now = time.perf_counter() - t0
        while pending and (not timed or pending[0].arrival <= now):
            job = pending.pop(0)
            engine.submit(
                job.prompt,
                max_new_tokens=job.new_tokens,
                stop_ids=(),
                on_token=lambda r, t, job=job: job.times.append(time.perf_counter() - t0),
            )
        if engine.idle and pending:
            _wait_until(t0, pending[0].arrival)
            continue
        engine.step()
    return t0


def run_single(gen: Generator, jobs: list[Job], timed: bool = True) -> float:
    t0 = time.perf_counter()
    for job in jobs:
        if timed:
            _wait_until(t0, job.arrival)
        for _ in gen.stream([job.prompt], max_new_tokens=job.new_tokens, stop_ids=()):
            job.times.append(time.perf_counter() - t0)
    return t0


def run_static(gen: Generator, jobs: list[Job], batch: int, timed: bool = True) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        if timed:
            _wait_until(t0, group[-1].arrival)
        longest = max(j.new_tokens for j in group)
        for step, _ in enumerate(gen.stream([j.prompt for j in group], max_new_tokens=longest, stop_ids=())):
            now = time.perf_counter() - t0
            for j in group:
                if step < j.new_tokens:
                    j.times.append(now)
    return t0


def figures(jobs: list[Job]) -> dict:
    tokens = sum(len(j.times) for j in jobs)
    assert all(len(j.times) == j.new_tokens for j in jobs)
    span = max(j.times[-1] for j in jobs) - min(j.arrival for j in jobs)
    ttft = np.array([j.times[0] - j.arrival for j in jobs]) * 1e3
    itl = np.concatenate([np.diff(j.times) for j in jobs if len(j.times) > 1]) * 1e3
    p = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    return dict(
        tok_s=tokens / span,
        ttft_p50=p(ttft, 50),
        ttft_p90=p(ttft, 90),
        ttft_p99=p(ttft, 99),
        itl_p50=p(itl, 50),
        itl_p90=p(itl, 90),
        itl_p99=p(itl, 99),
        itl_max=float(itl.max()),
    )


def report(name: str, runs: list[dict]) -> None:
    """Prints the median of each figure over the timed runs."""
    row = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    print(
        f"{name:18s} {row['tok_s']:9.1f} tok/s | TTFT ms p50 {row['ttft_p50']:8.1f} p90 {row['ttft_p90']:8.1f} "
        f"p99 {row['ttft_p99']:8.1f} | ITL ms p50 {row['itl_p50']:6.2f} p90 {row['itl_p90']:6.2f} "
        f"p99 {row['itl_p99']:6.2f} max {row['itl_max']:7.2f}",
        flush=True,
    )


def pause(model, args) -> None:
    """The longest gap of a running stream while a long prompt is prefilled."""
    n = args.pause_prompt
    model.cfg = model.cfg.replace(max_seq_len=n + 512)  # the demo context is 1024: a config change only
    model.attention_impl = args.attention
    rng = np.random.default_rng(1)
    long_prompt = rng.integers(3, model.cfg.vocab_size, n).tolist()
    for chunk in sorted({256, args.prefill_chunk, n}):
        engine = Engine(model, slots=2, max_len=n + 512, prefill_chunk=chunk)
        for _round in range(2):  # the first round compiles
            times = []
            stream = engine.submit(
                [5, 6, 7],
                max_new_tokens=400,
                stop_ids=(),
                on_token=lambda r, t, times=times: times.append(time.perf_counter()),
            )
            while len(times) < 20:
                engine.step()
            big = engine.submit(long_prompt, max_new_tokens=2, stop_ids=())
            marks = len(times)
            t = time.perf_counter()
            while not big.ids:
                engine.step()
            prefill_s = time.perf_counter() - t
            during = np.diff(times[marks - 1 :]) * 1e3
            engine.cancel(stream)
            engine.run_until_idle()
        before = np.median(np.diff(times[:marks])) * 1e3
        print(
            f"pause    attention {args.attention}, prompt {n} in chunks of {chunk}: prefill + insert "
            f"{prefill_s * 1e3:8.1f} ms | running stream: median gap {before:6.2f} ms before, "
            f"longest {during.max():8.1f} ms during, {len(during)} tokens during",
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a converted checkpoint (default: build the demo model in a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=40.0, help="arrivals per second (Poisson)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(8, 200), metavar=("LO", "HI"))
    ap.add_argument("--new-tokens", type=int, nargs=2, default=(8, 96), metavar=("LO", "HI"))
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument(
        "--max-len",
        type=int,
        help="the engine's cache slots per row (default: what the longest prompt and output need, as the "
        "Generator sizes its cache; decode attention runs over all of them)",
    )
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each scheduler (medians are printed)")
    ap.add_argument("--pause-prompt", type=int, default=4096)
    ap.add_argument("--no-pause", action="store_true")
    ap.add_argument("--only-pause", action="store_true")
    ap.add_argument("--attention", default="auto", help="the model's attention_impl for the pause (default auto)")
    args = ap.parse_args(argv)

    ckpt = args.ckpt or build_demo_checkpoint(tempfile.mkdtemp(prefix="engine-bench-"))
    model = checkpoint.load(ckpt)
    if args.only_pause:
        return pause(model, args)
    jobs = workload(args, model.cfg.vocab_size)
    total = sum(j.new_tokens for j in jobs)
    print(
        f"{len(jobs)} requests over {jobs[-1].arrival:.2f} s, prompts {args.prompt_len}, outputs {args.new_tokens} "
        f"({total} tokens), slots {args.slots}, dtype {model.cfg.dtype}",
        flush=True,
    )
    gen = Generator(model, prefill_chunk=args.prefill_chunk)
    max_len = args.max_len or gen.prefill_sizes([args.prompt_len[1]], args.new_tokens[1])[1]
    engine = Engine(model, slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk)
    unpiped = Engine(model, slots=args.slots, max_len=max_len, prefill_chunk=args.prefill_chunk, pipeline=False)
    schedulers = {
        "engine": lambda js, timed: run_engine(engine, js, timed),
        "engine-unpipelined": lambda js, timed: run_engine(unpiped, js, timed),
        "single": lambda js, timed: run_single(gen, js, timed),
        "static": lambda js, timed: run_static(gen, js, args.slots, timed),
    }
    for run in schedulers.values():
        run(fresh(jobs), False)  # compiles every shape
    runs = {name: [] for name in schedulers}
    for _ in range(args.repeats):  # round robin, so that a noisy neighbour hurts every scheduler alike
        for name, run in schedulers.items():
            timed = fresh(jobs)
            run(timed, True)
            runs[name].append(figures(timed))
    print(f"medians of {args.repeats} timed runs; engine cache: {args.slots} rows x {max_len} slots", flush=True)
    for name in schedulers:
        report(name, runs[name])
    if not args.no_pause:
        pause(model, args)


if __name__ == "__main__":
    main()

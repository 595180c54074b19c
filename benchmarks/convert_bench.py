"""Converter memory and speed on a synthetic GLM-4 checkpoint, against `cp -r` of the same files.

    python benchmarks/convert_bench.py                 # real GLM-4-9B widths, 2 layers, bf16, 4 shards: 3.3 GB
    python benchmarks/convert_bench.py --layers 4 --vocab 65536 --shards 6 --keep

Builds a THUDM-layout checkpoint (safetensors numpy API, random bf16 values) in a temporary directory under
--workdir, then times, each in its own subprocess on the same disk and interleaved --repeat times: `cp -r SRC`,
the converter with sha256 of the source (the default), with --no-hash, and with --no-hash --allow-nonfinite (the
tensors stored as they are then go by copy_file_range, unchecked for NaN/Inf). It prints the peak resident memory
and the CPU seconds (user + system) of each child (`os.wait4` rusage) and the throughput in MB/s of source bytes,
without and with the `sync` after it (the converter fsyncs its output before the final rename; cp does not), and
checks the targets: peak RSS <= 1.5 GB + 1.5 x the largest tensor, and throughput >= half of cp's, against `cp`
alone and against `cp` then `sync`, for the best run of each and for the median of each (on a shared disk the
spread between runs can be 2x).
The page cache is warm for every timed run (the build and an untimed `cp` read everything once) unless --cold.
The converter's time includes starting Python and its imports (about 0.15 s: the converter does not import JAX).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np


def build(root: str, *, layers: int, vocab: int, shards: int, seed: int = 0) -> tuple[int, int]:
    """Writes a THUDM-layout bf16 checkpoint with GLM-4-9B widths. Returns (total bytes, largest tensor bytes)."""
    import json

    from safetensors.numpy import save_file

    from glm4_jax.fixtures import thudm_config

    D, F, N, K, H = 4096, 13696, 32, 2, 128
    shapes = {"transformer.embedding.word_embeddings.weight": (vocab, D)}
    for i in range(layers):
        t = f"transformer.encoder.layers.{i}."
        shapes[t + "input_layernorm.weight"] = (D,)
        shapes[t + "self_attention.query_key_value.weight"] = ((N + 2 * K) * H, D)
        shapes[t + "self_attention.query_key_value.bias"] = ((N + 2 * K) * H,)
        shapes[t + "self_attention.dense.weight"] = (D, N * H)
        shapes[t + "post_attention_layernorm.weight"] = (D,)
        shapes[t + "mlp.dense_h_to_4h.weight"] = (2 * F, D)
        shapes[t + "mlp.dense_4h_to_h.weight"] = (D, F)
    shapes["transformer.encoder.final_layernorm.weight"] = (D,)
    shapes["transformer.output_layer.weight"] = (vocab, D)
    shapes["transformer.rotary_pos_emb.inv_freq"] = (H // 4,)

    bf16 = np.dtype(ml_dtypes.bfloat16)
    sizes = {k: int(np.prod(s)) * (4 if k.endswith("inv_freq") else 2) for k, s in shapes.items()}
    total, per_shard = sum(sizes.values()), sum(sizes.values()) / shards
    base = (0.02 * np.random.default_rng(seed).standard_normal(1 << 23, dtype=np.float32)).astype(bf16)
    groups, current, acc = [], [], 0
    for name in shapes:  # consecutive tensors, a new shard whenever one is about total / shards bytes
        if current and acc + sizes[name] / 2 > per_shard and len(groups) < shards - 1:
            groups.append(current)
            current, acc = [], 0
        current.append(name)
        acc += sizes[name]
    groups.append(current)
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        arrays = {}
        for k, name in enumerate(group):
            shape = shapes[name]
            if name.endswith("inv_freq"):
                arrays[name] = np.linspace(1, 0, shape[0], dtype=np.float32)
            else:
                arrays[name] = np.resize(np.roll(base, 7919 * (n + k)), shape)
            weight_map[name] = fname
        save_file(arrays, os.path.join(root, fname), metadata={"format": "pt"})
        del arrays
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = thudm_config(
        vocab,
        eos_token_id=[vocab - 3, vocab - 2, vocab - 1],
        pad_token_id=vocab - 3,
        num_layers=layers,
        hidden_size=D,
        num_attention_heads=N,
        multi_query_group_num=K,
        kv_channels=H,
        ffn_hidden_size=F,
        seq_length=131072,
    )
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total, max(sizes.values())


def run(cmd: list[str]) -> dict:
    """Runs `cmd`; returns wall seconds (alone and with the `sync` after it) and the child's peak RSS in bytes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    t1 = time.perf_counter()
    os.sync()
    t2 = time.perf_counter()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode(errors='replace')[-2000:]}")
    return {"s": t1 - t0, "s_sync": t2 - t0, "rss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime}


def _ratio(x: float) -> str:
    return f"{x:.2f} ({'ok' if x >= 0.5 else 'MISSED'})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151552)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="runs of each command, interleaved; the best is reported")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where the temporary files go (same disk)")
    p.add_argument(
        "--cold", action="store_true", help="drop the page cache before each timed run (needs root): disk-bound figures"
    )
    p.add_argument("--keep", action="store_true", help="keep the files (printed) instead of deleting them")
    p.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_only:  # in a child process, so that the parent stays small (children inherit its peak RSS)
        total, largest = build(args.build_only, layers=args.layers, vocab=args.vocab, shards=args.shards)
        print(total, largest)
        return

    work = tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir)
    src, copy, dst = (os.path.join(work, name) for name in ("src", "cp", "dst"))
    os.mkdir(src)
    try:
        t = time.perf_counter()
        sizes = [str(a) for a in ("--layers", args.layers, "--vocab", args.vocab, "--shards", args.shards)]
        out = subprocess.run([sys.executable, __file__, *sizes, "--build-only", src], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        total, largest = map(int, out.stdout.split())
        nfiles = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
        print(
            f"source: {total / 1e9:.2f} GB in {nfiles} shards, {args.layers} layers, vocab {args.vocab}, largest "
            f"tensor {largest / 1e9:.3f} GB (built in {time.perf_counter() - t:.1f} s); disk: {work}"
        )
        commands = {
            "cp -r": ["cp", "-r", src, copy],
            "convert": [sys.executable, "-m", "glm4_jax.convert", src, dst, "--quiet"],
            "convert --no-hash": [sys.executable, "-m", "glm4_jax.convert", src, dst, "--quiet", "--no-hash"],
            # The kernel copy (copy_file_range) of the tensors stored as they are: without the NaN/Inf check
            "convert --no-hash --allow-nonfinite": [
                sys.executable,
                "-m",
                "glm4_jax.convert",
                src,
                dst,
                "--quiet",
                "--no-hash",
                "--allow-nonfinite",
            ],
        }
        run(commands["cp -r"])  # warm-up: the page cache holds the source for every timed run
        results = {label: [] for label in commands}
        for _ in range(args.repeat):
            for label, cmd in commands.items():
                shutil.rmtree(copy, ignore_errors=True)
                shutil.rmtree(dst, ignore_errors=True)
                os.sync()
                if args.cold:
                    with open("/proc/sys/vm/drop_caches", "w") as f:
                        f.write("3\n")
                results[label].append(run(cmd))
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)

        best = {label: min(rs, key=lambda r: r["s"]) for label, rs in results.items()}
        cache = "cold (dropped before each run)" if args.cold else "warm"
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"best of {args.repeat} (interleaved), page cache {cache}; MB/s = source bytes / wall s; load {load}")
        print(f"{'':36} {'wall s':>7} {'MB/s':>6} {'+sync s':>8} {'MB/s':>6} {'peak RSS':>9}  all wall s; all CPU s")
        for label, r in best.items():
            runs = " ".join(f"{x['s']:.2f}" for x in results[label])
            cpu = " ".join(f"{x['cpu']:.2f}" for x in results[label])  # user + sys: steadier than wall on a busy host
            print(
                f"{label:36} {r['s']:7.2f} {total / r['s'] / 1e6:6.0f} {r['s_sync']:8.2f} "
                f"{total / r['s_sync'] / 1e6:6.0f} {r['rss'] / 1e9:6.2f} GB  {runs}; {cpu}"
            )
        print(f"converted checkpoint: {out_bytes / 1e9:.2f} GB")
        budget = 1.5e9 + 1.5 * largest
        cp_s, cp_sync_s = best["cp -r"]["s"], min(r["s_sync"] for r in results["cp -r"])
        med = {label: statistics.median(r["s"] for r in rs) for label, rs in results.items()}
        med_sync = statistics.median(r["s_sync"] for r in results["cp -r"])
        print("throughput as a fraction of cp's (target >= 0.5), best of each and median of each:")
        for label in ("convert", "convert --no-hash", "convert --no-hash --allow-nonfinite"):
            rss = max(r["rss"] for r in results[label])
            s = best[label]["s"]
            print(
                f"  {label}: peak RSS {rss / 1e9:.2f} GB (target <= {budget / 1e9:.2f} GB: "
                f"{'ok' if rss <= budget else 'MISSED'}); {total / s / 1e6:.0f} MB/s; "
                f"vs cp {_ratio(cp_s / s)} best, {_ratio(med['cp -r'] / med[label])} median; "
                f"vs cp + sync {_ratio(cp_sync_s / s)} best, {_ratio(med_sync / med[label])} median"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One process of a multi-process CPU run: `jax.distributed` over localhost, a tiny GLM-4 sharded over the devices
of every process, its logits and greedy tokens checked against this process's own single-device run.

    python tests/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12345 --mesh fsdp=2,tensor=4 &
    python tests/multiprocess_worker.py --process-id 1 --num-processes 2 --port 12345 --mesh fsdp=2,tensor=4

Each process gets `--local-devices` fake CPU devices (4 by default); the mesh spans all of them. Exit status 0 and
a last line "OK ..." when the sharded run matches. A test launches two of these as subprocesses.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mesh", default="fsdp=2,tensor=4")
    p.add_argument("--local-devices", type=int, default=4)
    args = p.parse_args(argv)

    # Before JAX starts: fake CPU devices for this process, and cross-process CPU collectives.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from glm4_jax.fixtures import SHARDABLE
    from glm4_jax.model import KVCache, init_model
    from glm4_jax.placement import init_cache, init_sharded_model, jit_forward, param_tree
    from glm4_jax.sharding import initialize_distributed, make_mesh

    initialize_distributed(
        True,
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    assert jax.process_count() == args.num_processes
    assert jax.device_count() == args.num_processes * args.local_devices

    cfg = SHARDABLE
    batch, length, max_len, steps = 2, 8, 16, 3
    # Every process builds the same inputs; jit_forward turns them into global arrays.
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (batch, length), 2, cfg.vocab_size, dtype=jnp.int32))
    positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))

    def greedy(step, cache, gather):
        logits, cache = step(tokens, positions, cache)
        out, ids, pos = [gather(logits)], [], positions[:, -1:]
        for _ in range(steps):
            nxt = np.argmax(out[-1][:, -1], axis=-1).astype(np.int32)[:, None]
            ids.append(nxt)
            pos = pos + 1
            logits, cache = step(nxt, pos, cache)
            out.append(gather(logits))
        return out, np.concatenate(ids, axis=1)

    # This process alone, on its first device.
    ref = init_model(cfg, seed=0)
    ref.attention_impl = "dense"
    want_plain = np.asarray(ref(jnp.asarray(tokens), jnp.asarray(positions))[0])
    ref_step = jax.jit(lambda t, p, c: ref(t, p, c, logits="last"))
    want, want_ids = greedy(ref_step, KVCache.init(cfg, batch, max_len), np.asarray)

    # All processes together.
    mesh = make_mesh(args.mesh)
    model = init_sharded_model(cfg, mesh, seed=0)
    model.attention_impl = "dense"
    params = param_tree(model)

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    plain = gather(jit_forward(model, mesh, batch=batch)(params, tokens, positions))
    sharded_step = jit_forward(model, mesh, batch=batch, max_len=max_len, logits="last")
    got, got_ids = greedy(lambda t, p, c: sharded_step(params, t, p, c), init_cache(cfg, mesh, batch, max_len), gather)

    np.testing.assert_allclose(plain, want_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_ids, want_ids)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    print(f"OK process {jax.process_index()}/{jax.process_count()} mesh {args.mesh} ids {got_ids.tolist()}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One batch-1 matmul by a quantized matrix: glm4_jax.qmatmul.linear against dequantizing the whole matrix first.

    python benchmarks/qmatmul_speed.py [--rows 4096 --cols 13696] [--scheme int8|int4] [--repeat 10]

Prints, for each way, the median milliseconds per call and the compiled temp memory (XLA's memory analysis):
`blocked` is the matmul the model uses; `dequantize-first` converts the matrix to the activations' dtype and
then multiplies (a full float copy of the matrix per call); `float32` is the same product with a float32 matrix.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from glm4_jax import qmatmul, quant


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="input dimension (default 4096)")
    p.add_argument("--cols", type=int, default=13696, help="output dimension (default 13696, gate/up)")
    p.add_argument("--scheme", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="activations (default bfloat16)")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), np.float32) * 0.02
    values, scale = quant.quantize(w, (0,), args.scheme, args.group_size)
    dense = quant.dequantize(values, scale, (0,), args.scheme, args.group_size)
    x = jnp.asarray(rng.standard_normal((1, 1, args.rows)), args.dtype)
    v, s = jnp.asarray(values), jnp.asarray(scale)

    def blocked(x, v, s):
        return qmatmul.linear(x, v, s, n_in=1, quant=args.scheme, group=args.group_size)

    def dequantize_first(x, v, s):
        if args.scheme == "int4":
            vals = qmatmul.unpack_int4(v).reshape(args.rows, args.cols)
            full = vals.astype(jnp.float32) * jnp.repeat(s, args.group_size, axis=0)
        else:
            full = v.astype(jnp.float32) * s
        return jnp.einsum("BTD,DF->BTF", x, full.astype(x.dtype))

    def float32(x, w):
        return jnp.einsum("BTD,DF->BTF", x.astype(jnp.float32), w)

    print(f"x [1, 1, {args.rows}] {args.dtype} @ W [{args.rows}, {args.cols}] {args.scheme}, {jax.default_backend()}")
    itemsize = jnp.dtype(args.dtype).itemsize
    if args.scheme == "int8":
        print(f"blocks: {qmatmul.num_blocks(args.rows, args.cols * itemsize)} of rows")
    else:
        groups = args.rows // args.group_size
        print(f"blocks: {qmatmul.num_blocks(groups, args.group_size * args.cols * itemsize)} of groups")
    for name, fn, operands in (
        ("blocked", blocked, (x, v, s)),
        ("dequantize-first", dequantize_first, (x, v, s)),
        ("float32", float32, (x, jnp.asarray(dense))),
    ):
        compiled = jax.jit(fn).lower(*operands).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        compiled(*operands).block_until_ready()
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            compiled(*operands).block_until_ready()
            times.append(time.perf_counter() - t)
        print(f"{name:>17}: {statistics.median(times) * 1e3:8.2f} ms   temp {temp / 2**20:8.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

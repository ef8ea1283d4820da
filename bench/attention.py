"""Attention alone, forward + backward: torch's fused CPU kernel vs xtx's backends.

Times ``grad(sum(attention(q, k, v) * w))`` with respect to q, k and v for causal
attention, in one process, and prints milliseconds per call and the ratio to
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``. The blockwise
kernel is timed at several block sizes so that the default can be chosen by measurement.

    python -m bench.attention --lengths 256,1024,4096 --blocks 64x64,128x128,256x128
    python -m bench.attention --devices 2    # heads split over one host device per core
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _shard_heads(*arrays):
    """Puts ``[B, T, N, H]`` arrays on a mesh of every device, split along heads."""
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    if jax.device_count() == 1:
        return arrays
    mesh = jax.make_mesh((jax.device_count(),), ("heads",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec(None, None, "heads", None))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def time_torch(q, k, v, w, repeats):
    import torch

    tq, tk, tv = (
        torch.tensor(np.asarray(a).transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v)
    )
    tw = torch.tensor(np.asarray(w).transpose(0, 2, 1, 3))

    def step():
        for t in (tq, tk, tv):
            t.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        (out * tw).sum().backward()

    return _median_ms(step, repeats)


def time_xtx(q, k, v, w, repeats, implementation, **kwargs):
    import jax
    import jax.numpy as jnp

    from xtx.ops import AttentionMask, attention
    from xtx.ops.blockwise import blockwise_attention

    mask = AttentionMask(causal=True)

    def loss(q, k, v):
        if kwargs:
            out = blockwise_attention(q, k, v, mask=mask, **kwargs)
        else:
            out = attention(q, k, v, mask=mask, implementation=implementation)
        return jnp.sum(out * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return _median_ms(lambda: jax.block_until_ready(grad(q, k, v)), repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--blocks", default="64x64,128x128,256x256", help="block_q x block_k")
    parser.add_argument("--reference", action="store_true", help="also time the einsum reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--devices", type=int, default=1, help="host devices for xtx, heads split across them"
    )
    args = parser.parse_args(argv)
    if args.devices > 1:  # before jax starts
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(max(args.devices, torch.get_num_threads()))
    blocks = [tuple(int(n) for n in b.split("x")) for b in args.blocks.split(",") if b]
    cols = ["torch sdpa"] + [f"blockwise {bq}x{bk}" for bq, bk in blocks]
    if args.reference:
        cols.append("reference")
    print(
        f"causal attention fwd+bwd, B={args.batch} N={args.heads} H={args.dim_head}, "
        f"xtx on {jax.device_count()} device(s), torch {torch.get_num_threads()} threads, "
        f"ms per call (ratio = torch / xtx, > 1 means xtx is faster)"
    )
    print(f"{'length':>7} " + " ".join(f"{c:>22}" for c in cols))
    for length in (int(n) for n in args.lengths.split(",")):
        shape = (args.batch, length, args.heads, args.dim_head)
        keys = jax.random.split(jax.random.key(0), 4)
        q, k, v, w = (jax.random.normal(key, shape, jnp.float32) for key in keys)
        t_torch = time_torch(q, k, v, w, args.repeats)
        q, k, v, w = _shard_heads(q, k, v, w)
        row = [f"{t_torch:22.1f}"]
        for bq, bk in blocks:
            t = time_xtx(q, k, v, w, args.repeats, "blockwise", block_q=bq, block_k=bk)
            row.append(f"{t:15.1f} ({t_torch / t:4.2f})")
        if args.reference:
            t = time_xtx(q, k, v, w, args.repeats, "reference")
            row.append(f"{t:15.1f} ({t_torch / t:4.2f})")
        print(f"{length:>7} " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()

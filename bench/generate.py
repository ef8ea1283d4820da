"""Generation speed: xtx vs x-transformers with a KV cache, side by side in one process.

Builds a decoder in x-transformers (PyTorch CPU, rotary, the issue's 6 x 512, 8 heads,
vocabulary 256), converts it with ``xtx.interop.from_x_transformers`` so both hold the
same weights, and times ``generate`` for a prompt of 64 tokens and 256 new tokens at
batch 1 and 8: x-transformers' ``AutoregressiveWrapper.generate(cache_kv=True)`` against
xtx's ``AutoregressiveWrapper.generate`` (one compiled ``lax.while_loop``).

Printed per batch size: tokens/s of each (new tokens x batch / seconds), their ratio,
xtx's first call (compile included), and the fraction of the memory-bandwidth bound
xtx reaches: each decode step must read every weight once, so tokens/s can be at most
``batch * bandwidth / weight_bytes``. The bandwidth is measured here, with a large
array copy, so the bound describes this machine at this moment. Both models sample
greedily (temperature 0) so they do the same work; the tokens are compared as a check.

Shared machines change speed from hour to hour: only the ratios of one run mean
anything.

    python -m bench.generate
    python -m bench.generate --dim 128 --depth 2 --new 32 --batches 1 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def measure_bandwidth_gbs(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Read + write bandwidth of a large numpy copy, GB/s (counts the bytes read)."""
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    # A copy reads and writes every byte; count both so the figure is comparable with a
    # pure read stream.
    return 2 * n_bytes / best / 1e9


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls; the best counts")
    parser.add_argument("--no-torch", action="store_true", help="time xtx only")
    parser.add_argument(
        "--num-mem-kv", type=int, default=0, help="memory key/values per layer (attn_num_mem_kv)"
    )
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import x_transformers as xt

    from xtx import AutoregressiveWrapper
    from xtx.interop import from_x_transformers

    torch.manual_seed(0)
    max_len = args.prompt + args.new
    net = xt.TransformerWrapper(
        num_tokens=args.vocab,
        max_seq_len=max_len,
        attn_layers=xt.Decoder(
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            rotary_pos_emb=True,
            attn_num_mem_kv=args.num_mem_kv,
        ),
    ).eval()
    torch_wrapper = xt.AutoregressiveWrapper(net)
    model, variables = from_x_transformers(net)
    wrapper = AutoregressiveWrapper(model)
    weight_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(variables))
    bandwidth = measure_bandwidth_gbs()
    print(
        f"decoder {args.depth} x {args.dim}, {args.heads} heads, vocab {args.vocab}: "
        f"{weight_bytes / 1e6:.1f} MB of float32 weights; prompt {args.prompt}, "
        f"{args.new} new tokens; copy bandwidth {bandwidth:.1f} GB/s; "
        f"torch threads {torch.get_num_threads()}, jax devices {jax.device_count()}"
    )
    header = (
        f"{'batch':>5} {'xtx tok/s':>10} {'x-t tok/s':>10} {'ratio':>6} "
        f"{'xtx 1st call s':>14} {'bound tok/s':>11} {'of bound':>8} {'same tokens':>11}"
    )
    print(header)
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(0, args.vocab, (batch, args.prompt))
        jprompts = jnp.asarray(prompts, jnp.int32)

        def run_xtx(jprompts=jprompts):
            return jax.block_until_ready(
                wrapper.generate(variables, jprompts, args.new, temperature=0.0)
            )

        start = time.perf_counter()
        ours = np.asarray(run_xtx())
        first = time.perf_counter() - start
        xtx_s = _time(run_xtx, args.repeats)
        xtx_rate = batch * args.new / xtx_s
        bound = batch * bandwidth * 1e9 / weight_bytes
        theirs_rate, same = float("nan"), "-"
        if not args.no_torch:
            tprompts = torch.from_numpy(prompts)

            def run_torch(tprompts=tprompts):
                with torch.no_grad():
                    return torch_wrapper.generate(
                        tprompts, args.new, temperature=0.0, cache_kv=True
                    )

            theirs = run_torch().numpy()
            theirs_rate = batch * args.new / _time(run_torch, args.repeats)
            same = "yes" if np.array_equal(ours, theirs) else "NO"
        print(
            f"{batch:>5} {xtx_rate:>10.1f} {theirs_rate:>10.1f} {xtx_rate / theirs_rate:>6.2f} "
            f"{first:>14.2f} {bound:>11.0f} {xtx_rate / bound:>8.1%} {same:>11}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""``python -m xtx``: a short tour that builds, runs and (if PyTorch is present) converts.

Prints the shapes the README promises, the parameter count, the forward time after
compilation, and, when x-transformers is installed, the largest difference between a
converted x-transformers model and its xtx twin.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from xtx import Decoder, TransformerWrapper


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xtx", description=__doc__)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)

    model = TransformerWrapper(
        num_tokens=256,
        max_seq_len=args.seq_len,
        attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True),
    )
    print(model.config)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, args.seq_len), 0, 256)
    variables = model.init(key, tokens)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))
    print(f"parameters: {n_params:,}")

    forward = jax.jit(model.apply)
    start = time.perf_counter()
    logits = forward(variables, tokens).block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = forward(variables, tokens).block_until_ready()
    run_s = time.perf_counter() - start
    print(f"tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")
    print(f"first call (with compile) {compile_s:.2f} s, next call {run_s * 1e3:.1f} ms")
    assert bool(jnp.all(jnp.isfinite(logits)))

    try:
        import torch
        import x_transformers as xt
    except ImportError:
        print("x-transformers not installed: skipping the conversion demo")
        return
    from xtx import interop

    torch.manual_seed(0)
    torch_model = xt.TransformerWrapper(
        num_tokens=256,
        max_seq_len=args.seq_len,
        attn_layers=xt.Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True),
    ).eval()
    converted, converted_vars = interop.from_x_transformers(torch_model)
    x = np.random.default_rng(0).integers(0, 256, (1, 32))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(converted.apply(converted_vars, jnp.asarray(x)))
    diff = np.abs(got - expected).max()
    print(f"x-transformers -> xtx conversion: max |logit difference| = {diff:.2e}")


if __name__ == "__main__":
    main()

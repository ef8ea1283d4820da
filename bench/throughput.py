"""Training throughput: xtx vs x-transformers, side by side in one process.

Builds the same decoder in x-transformers (PyTorch CPU, ``attn_flash=True``, rotary)
and in xtx (through ``xtx.interop.from_x_transformers``, so both start from the same
weights), times full training steps (forward, backward, Adam update) and prints the
tokens/s of each and their ratio, plus xtx's compile time (lowering + XLA compile), its
first step (compile included) and the process's peak memory.
Machines like ours are shared and their speed moves 2-3x from hour to hour: only the
ratios measured in one run mean anything.

    python -m bench.throughput                       # the issue's sizes
    python -m bench.throughput --sizes 2x128 --depth 2 --dim 128 --steps 2   # a smoke run

Cores. XLA's CPU backend runs the small operations of a blockwise attention loop on one
thread, so xtx uses the cores the JAX way: one host-platform device per core
(``--devices``, default all cores) and a mesh over them, data parallel when the batch
splits evenly, otherwise (batch 1) sequence parallel: every token-wise layer on a share
of the tokens, attention on a share of the heads (``--parallel tensor`` splits heads and
feedforward width Megatron-style instead). torch gets the same cores as intra-op
threads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

import numpy as np


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        batch, length = part.lower().split("x")
        sizes.append((int(batch), int(length)))
    return sizes


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_torch(model, batch, length, steps, vocab):
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch, length + 1))
    model.train()

    def step():
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _set_cpu_devices(count: int) -> None:
    """Asks XLA for ``count`` host-platform devices; must run before jax starts."""
    flag = f"--xla_force_host_platform_device_count={count}"
    if "jax" in sys.modules:
        import jax

        if jax.device_count() != count:
            raise RuntimeError(f"jax already started with {jax.device_count()} devices")
        return
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _parallelism(batch: int, length: int, heads: int, devices: int, choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    if devices == 1:
        return "single"
    if batch % devices == 0:
        return "data"
    if heads % devices == 0 and length % devices == 0:
        return "sequence"
    if heads % devices == 0:
        return "tensor"
    raise ValueError(f"batch {batch} and heads {heads} do not split over {devices} devices")


# Logical axis -> mesh axis. Data parallel replicates parameters; tensor parallel
# splits heads and the feedforward width (Megatron), leaving the rest replicated.
_RULES = {
    "data": (("batch", "data"),),
    "tensor": (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model")),
    # Sequence parallel (Ulysses, 2309.14509): replicated parameters, every token-wise
    # layer on its device's share of the tokens, attention on its share of the heads
    # (q/k/v and the output move between the two with all-to-alls).
    "sequence": (("length", "model"), ("act_heads", "model"), ("act_kv_heads", "model")),
    # Tensor parallel plus sequence parallel between layers (Megatron-SP): norms and
    # residual adds run on half the tokens per device.
    "tensor_seq": (
        ("heads", "model"),
        ("kv_heads", "model"),
        ("mlp", "model"),
        ("vocab", "model"),
        ("length", "model"),
    ),
}


def time_xtx(
    module, params, batch, length, steps, vocab, implementation, parallel, profile_dir=None
):
    import flax.linen as nn
    import jax
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from xtx.ops import cross_entropy

    cfg = module.config
    stack = cfg.attn_layers.replace(
        attn=cfg.attn_layers.attn.replace(implementation=implementation)
    )
    module = type(module)(config=cfg.replace(attn_layers=stack))
    x = jax.random.randint(jax.random.key(0), (batch, length + 1), 0, vocab)
    if parallel != "single":
        axis = "data" if parallel == "data" else "model"
        mesh = jax.make_mesh((jax.device_count(),), (axis,), axis_types=(AxisType.Auto,))
        boxed = jax.eval_shape(module.init, jax.random.key(0), x[:1, :8])["params"]
        specs = nn.get_partition_spec(boxed)
        params = jax.device_put(params, nn.logical_to_mesh_sharding(specs, mesh, _RULES[parallel]))
        batch_spec = PartitionSpec("data") if parallel == "data" else PartitionSpec()
        x = jax.device_put(x, NamedSharding(mesh, batch_spec))
    opt = optax.adam(1e-4)
    opt_state = jax.jit(opt.init)(params)
    if parallel != "single":  # scalars (Adam's step count) land on one device: replicate
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_state = jax.tree.map(
            lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
            opt_state,
        )

    def loss_fn(p, x):
        with nn.logical_axis_rules(_RULES.get(parallel, ())):
            return cross_entropy(module.apply({"params": p}, x[:, :-1]), x[:, 1:])

    def step(p, s, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    # Pin the state's shardings: otherwise the second call would see new ones and compile.
    shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
    step = jax.jit(
        step,
        in_shardings=(*shardings, x.sharding),
        out_shardings=(*shardings, None),
        donate_argnums=(0, 1),
    )

    params = jax.tree.map(lambda a: a.copy(), params)  # the caller's copy survives donation
    start = time.perf_counter()
    # The mesh in context makes the layers' activation sharding constraints take effect.
    with jax.set_mesh(mesh) if parallel != "single" else contextlib.nullcontext():
        step = step.lower(params, opt_state, x).compile()
    compile_s = time.perf_counter() - start
    params, opt_state, loss = step(params, opt_state, x)
    loss.block_until_ready()
    first_step_s = time.perf_counter() - start  # trace + compile + the first step
    profiling = (
        jax.profiler.trace(profile_dir, create_perfetto_trace=True)
        if profile_dir
        else contextlib.nullcontext()
    )
    with profiling:
        start = time.perf_counter()
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, x)
        loss.block_until_ready()
    return (time.perf_counter() - start) / steps, compile_s, first_step_s


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="16x256,4x1024,1x4096")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--implementations", default="auto,reference", help="xtx attention backends to time"
    )
    parser.add_argument(
        "--scan-layers", action="store_true", help="run xtx's stack as one nn.scan over layers"
    )
    parser.add_argument(
        "--remat-policy", default="none", help="xtx remat policy: none, full, dots, dots_no_batch"
    )
    parser.add_argument("--no-torch", action="store_true", help="time xtx only (no ratio)")
    parser.add_argument(
        "--devices",
        type=int,
        default=os.cpu_count() or 1,
        help="host-platform devices for xtx, one per core by default (torch gets as many threads)",
    )
    parser.add_argument(
        "--parallel",
        default="auto",
        choices=("auto", "single", "data", "tensor", "tensor_seq", "sequence"),
        help="xtx layout over the devices; auto: data when the batch splits, else sequence",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="write a profiler trace (TensorBoard / Perfetto) of xtx's timed steps under DIR",
    )
    args = parser.parse_args(argv)
    _set_cpu_devices(args.devices)
    import jax
    import torch
    import x_transformers as xt

    from xtx import interop

    torch.set_num_threads(args.devices)
    torch.manual_seed(0)
    sizes = _parse_sizes(args.sizes)
    max_len = max(length for _, length in sizes)
    torch_model = xt.TransformerWrapper(
        num_tokens=args.vocab,
        max_seq_len=max_len,
        attn_layers=xt.Decoder(
            dim=args.dim, depth=args.depth, heads=args.heads, rotary_pos_emb=True, attn_flash=True
        ),
    )
    module, variables = interop.from_x_transformers(
        torch_model, scan_layers=args.scan_layers, remat_policy=args.remat_policy
    )
    params = variables["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    print(
        f"decoder dim={args.dim} depth={args.depth} heads={args.heads} vocab={args.vocab} "
        f"({n_params / 1e6:.1f}M params), {args.steps} timed steps, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}, "
        f"scan_layers={args.scan_layers} remat_policy={args.remat_policy}, "
        f"xtx on {jax.device_count()} {jax.default_backend()} device(s)"
    )
    header = f"{'batch x len':>12} {'torch tok/s':>12}"
    impls = [i for i in args.implementations.split(",") if i]
    for impl in impls:
        header += (
            f" {'xtx[' + impl + '] tok/s':>22} {'ratio':>6} {'compile s':>9} {'1st step s':>10}"
        )
    print(header + f" {'peak RSS GiB':>12} {'xtx mesh':>9}")
    for batch, length in sizes:
        tokens = batch * length
        t_torch = (
            float("nan")
            if args.no_torch
            else time_torch(torch_model, batch, length, args.steps, args.vocab)
        )
        row = f"{f'{batch} x {length}':>12} {tokens / t_torch:12.0f}"
        parallel = _parallelism(batch, length, args.heads, jax.device_count(), args.parallel)
        for impl in impls:
            t_xtx, compile_s, first_s = time_xtx(
                module,
                params,
                batch,
                length,
                args.steps,
                args.vocab,
                impl,
                parallel,
                profile_dir=(
                    os.path.join(args.profile, f"{batch}x{length}_{impl}") if args.profile else None
                ),
            )
            row += (
                f" {tokens / t_xtx:22.0f} {t_torch / t_xtx:6.2f} {compile_s:9.1f} {first_s:10.1f}"
            )
        print(row + f" {_peak_rss_gib():12.2f} {parallel:>9}", flush=True)


if __name__ == "__main__":
    main()

"""``python -m train``: train an xtx model.

With no arguments: a byte-level decoder on the Python standard library's own sources
(no download), a few minutes on two CPU cores. ``--config NAME`` picks a preset and any
field can be overridden with a dotted path (``--model.depth=12 --optim.lr=3e-4``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.config import PRESETS, ConfigError, RunConfig, apply_overrides, field_paths, parse_value

# Fields that may change when a run is resumed; anything else would make the saved
# checkpoint describe a different run.
RESUMABLE = {
    "steps",
    "log_every",
    "eval_every",
    "save_every",
    "eval_batches",
    "samples",
    "sample_len",
    "keep",
    "async_checkpoints",
}


def _help_epilog() -> str:
    lines = ["presets (--config NAME):"]
    for name, preset in PRESETS.items():
        m = preset.model
        lines.append(
            f"  {name:18s} {m.family}, dim {m.dim}, depth {m.depth}, heads {m.heads}, "
            f"seq_len {m.seq_len}, data {preset.data.source}"
        )
    lines.append("")
    lines.append("fields (override with --path=value; defaults of the 'default' preset):")
    for path, value in field_paths(PRESETS["default"]):
        lines.append(f"  --{path}={value!r}")
    lines.append("  --model.<keyword>=value  any keyword of the model family (see model.options)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        choices=sorted(PRESETS),
        metavar="NAME",
        help="preset (default: 'default')",
    )
    parser.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() before anything else",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="with --distributed: process 0's address (default: detected on TPU/SLURM, "
        "or $JAX_COORDINATOR_ADDRESS)",
    )
    parser.add_argument(
        "--num-processes", type=int, default=None, help="with --distributed ($JAX_NUM_PROCESSES)"
    )
    parser.add_argument(
        "--process-id", type=int, default=None, help="with --distributed ($JAX_PROCESS_ID)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or samples")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--"):
            parser.error(f"unexpected argument {item!r} (overrides look like --model.depth=6)")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                parser.error(f"{item} needs a value: {item}=VALUE")
            value, i = rest[i + 1], i + 1
        overrides[key.replace("-", "_")] = parse_value(value)
        i += 1
    return args, overrides


def resolve(args: argparse.Namespace, overrides: dict) -> tuple[RunConfig, Path, bool]:
    """The run config, the run directory and whether to resume."""
    from train.loop import load_run_config
    from train.tasks import family_keywords

    if args.resume is not None:
        out = Path(args.resume)
        config = load_run_config(out)
        fixed = {k: v for k, v in overrides.items() if k not in RESUMABLE}
        if fixed or args.config is not None:
            names = sorted(fixed) + (["--config"] if args.config is not None else [])
            raise ConfigError(
                f"--resume {out}: cannot change {', '.join(names)} of a saved run "
                f"(only {', '.join(sorted(RESUMABLE))} may change); start a new run instead"
            )
        return apply_overrides(config, overrides), out, True
    name = args.config or "default"
    config = PRESETS[name]
    family = overrides.get("model.family", config.model.family)
    config = apply_overrides(config, overrides, family_keywords(str(family)))
    if args.out is not None:
        out = Path(args.out)
        if (out / "checkpoints").exists() or (out / "config.json").exists():
            raise ConfigError(
                f"--out {out} already holds a run; continue it with --resume {out} or choose "
                "another directory"
            )
    else:
        out, n = Path("runs") / name, 1
        while out.exists():
            n += 1
            out = Path("runs") / f"{name}-{n}"
    return config, out, False


def _initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` from the flags, else the environment, else JAX's
    own cluster detection (Cloud TPU, SLURM, ...)."""
    import os

    import jax

    def env_int(name: str) -> int | None:
        value = os.environ.get(name)
        return int(value) if value else None

    num_processes = args.num_processes or env_int("JAX_NUM_PROCESSES")
    process_id = args.process_id if args.process_id is not None else env_int("JAX_PROCESS_ID")
    # CPU hosts talk through gloo; the setting only concerns the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=num_processes,
        process_id=process_id,
    )


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed:
        _initialize_distributed(args)
    from train.loop import train

    try:
        config, out, resume = resolve(args, overrides)
        print(f"run directory: {out}", flush=True)
        train(config, out, resume=resume, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench.longcontext``: the long-context gallery benchmark.

    python -m bench.longcontext --quick                  # every family, < 10 min on 2 cores
    python -m bench.longcontext --preset full            # the full grid (hours on a CPU)
    python -m bench.longcontext --quick --families full,rmt --tasks mqar --steps 400
    python -m bench.longcontext --report-only bench_out/longcontext   # redraw a report

Writes ``results.json``, ``results.md`` and the plots into ``--out``. See
``bench/longcontext/README.md`` for what every task and column means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

from bench.longcontext import models as M
from bench.longcontext import report
from bench.longcontext import tasks as T
from bench.longcontext.presets import PRESETS, Preset
from bench.longcontext.runner import run_cell
from bench.longcontext.speed import measure


def _csv(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(
            f"--{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
            f"choose from {', '.join(allowed)}"
        )
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.longcontext",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--families", default=None, help=f"comma list of {', '.join(M.FAMILIES)}")
    p.add_argument("--tasks", default=None, help=f"comma list of {', '.join(T.TASKS)}")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="stream (phase-2) steps per cell, language modelling included",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="single-segment (phase-1) steps per cell"
    )
    p.add_argument("--stream-batch", type=int, default=None, help="rows per stream (phase-2) step")
    p.add_argument(
        "--recipe",
        choices=("rotary", "paper"),
        default=None,
        help="gallery models' block: the decoder's (rotary, default) or the papers'",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/longcontext")
    p.add_argument("--no-speed", action="store_true", help="skip the speed sweep")
    p.add_argument(
        "--report-only",
        metavar="DIR",
        default=None,
        help="redraw results.md and the plots from DIR/results.json",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    if args.stream_batch is not None and args.stream_batch < 1:
        p.error(f"--stream-batch must be >= 1, got {args.stream_batch}")
    for name in ("steps", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    return args


def configure(args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides applied."""
    preset = PRESETS[args.preset]
    changes = {}
    if args.families:
        changes["families"] = _csv(args.families, M.FAMILIES, "families")
    if args.tasks:
        changes["tasks"] = _csv(args.tasks, T.TASKS, "tasks")
    sched = {}
    if args.steps is not None:
        sched["steps"] = args.steps
    if args.warmup_steps is not None:
        sched["warmup_steps"] = args.warmup_steps
    if args.stream_batch is not None:
        sched["stream_batch"] = args.stream_batch
    if sched:
        changes["schedule"] = dataclasses.replace(preset.schedule, **sched)
    if args.steps is not None:  # language modelling has only the stream phase
        changes["lm_schedule"] = dataclasses.replace(preset.lm_schedule, steps=args.steps)
    if args.recipe is not None:
        changes["budget"] = dataclasses.replace(preset.budget, position=args.recipe)
    if args.no_speed:
        changes["speed"] = None
    return dataclasses.replace(preset, **changes)


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    cores = len(__import__("os").sched_getaffinity(0))
    return f"{platform.machine()} {kind}, {cores} cores, jax {jax.__version__}"


def families(preset: Preset, log) -> dict[str, M.Family]:
    """Every family under the budget, its parameters matched to the plain model's."""
    target = M.parameter_count(M.build("plain", preset.budget))
    built = {}
    for name in preset.families:
        fam = M.match_budget(name, preset.budget, target)
        count = M.parameter_count(fam)
        log(
            f"{M.LABELS[name]:<36} {count:>9,} parameters ({count / target - 1:+.1%}), "
            f"ff_mult {fam.ff_mult}"
        )
        built[name] = fam
    return built


def run(preset: Preset, seed: int, out: str, log=print) -> dict:
    """Trains and scores every cell, times the speed sweep, writes the report."""
    start = time.perf_counter()
    log(f"preset {preset.name}: {len(preset.families)} families x {len(preset.tasks)} tasks")
    built = families(preset, log)
    counts = {n: M.parameter_count(f) for n, f in built.items()}
    corpus = None
    if "lm" in preset.tasks:
        name, train_docs, val_docs = T.lm_corpus(preset.sizes.length + 1)
        log(f"lm corpus: {name}, {len(train_docs)} training / {len(val_docs)} held-out documents")
        corpus = (train_docs, val_docs)
    cells = []
    for task in preset.tasks:
        sizes = preset.lm_sizes if task == "lm" else preset.sizes
        schedule = preset.lm_schedule if task == "lm" else preset.schedule
        for name, fam in built.items():
            cells.append(run_cell(fam, task, sizes, schedule, seed, counts[name], corpus))
    speed = None
    if preset.speed is not None:
        speed = measure(preset.families, preset.budget, preset.speed, preset.full_lengths, log)
    results = {
        "preset": preset.name,
        "machine": machine(),
        "seed": seed,
        "wall_s": time.perf_counter() - start,
        "budget": preset.budget.to_dict(),
        "sizes": dataclasses.asdict(preset.sizes),
        "schedule": dataclasses.asdict(preset.schedule),
        "speed_config": None if preset.speed is None else dataclasses.asdict(preset.speed),
        "families": {
            n: {
                "label": f.label,
                "params": counts[n],
                "ff_mult": f.ff_mult,
                "reach": f.reach,
                "config": f.config,
            }
            for n, f in built.items()
        },
        "cells": [c.to_dict() for c in cells],
        "speed": speed,
    }
    paths = report.write(results, out)
    log(f"done in {results['wall_s']:.0f} s; wrote {', '.join(paths)}")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        from pathlib import Path

        path = Path(args.report_only) / "results.json"
        if not path.is_file():
            raise SystemExit(f"--report-only: no results.json in {args.report_only}")
        paths = report.write(json.loads(path.read_text()), args.report_only)
        print("wrote", ", ".join(paths))
        return 0
    run(configure(args), args.seed, args.out, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

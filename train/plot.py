"""Loss curves of one or more runs, side by side, from their ``metrics.jsonl``.

    python -m train.plot RUN_DIR [RUN_DIR ...] [--out PNG] [--metrics train/loss val/bpb]

One subplot per metric, one line per run labelled by the run directory's name. The PNG goes to
``loss_curves.png`` in the first run directory unless ``--out`` says otherwise. `plot_runs` is the
same as a function; the training loop calls it when a run ends.

Uses matplotlib's Agg backend, so it works on machines without a display.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from train.metrics import read_metrics  # noqa: E402

DEFAULT_METRICS = ("train/loss", "val/bpb")
DEFAULT_OUT = "loss_curves.png"


def _labels(run_dirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    # Two runs called "run" under different parents would be indistinguishable by name.
    return names if len(set(names)) == len(names) else [os.path.normpath(d) for d in run_dirs]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    metrics: Sequence[str] | None = None,
) -> str:
    """Draws the chosen metrics of every run, one subplot per metric, and saves a PNG.

    Args:
        run_dirs: run directories holding ``metrics.jsonl``.
        out_path: the PNG to write; its directory is created if needed.
        metrics: which metrics to draw. Each must appear in at least one run. By default
            `DEFAULT_METRICS`, skipping those no run logged.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: a run directory has no metrics.jsonl.
        ValueError: no run dirs, or a metric that no run has.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("run_dirs is empty; give at least one run directory")
    runs = [read_metrics(d) for d in run_dirs]
    logged = {name for records in runs for record in records for name in record}
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if m in logged]
        if not metrics:
            raise ValueError(
                f"none of the default metrics {list(DEFAULT_METRICS)} is in any run; "
                f"logged metrics: {sorted(logged - {'step', 'time'})}"
            )
    else:
        metrics = list(metrics)
        if not metrics:
            raise ValueError("metrics is empty; give at least one metric name")
        missing = [m for m in metrics if m not in logged]
        if missing:
            raise ValueError(
                f"metrics {missing} not found in any of {run_dirs}; "
                f"logged metrics: {sorted(logged - {'step', 'time'})}"
            )

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, records in zip(_labels(run_dirs), runs, strict=True):
            points = [(r["step"], r[metric]) for r in records if metric in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=label, marker="." if len(points) < 50 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m train.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--out", help=f"PNG path (default: FIRST_RUN_DIR/{DEFAULT_OUT})")
    parser.add_argument(
        "--metrics",
        nargs="+",
        help=f"metrics to draw (default: those of {' '.join(DEFAULT_METRICS)} that were logged)",
    )
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], DEFAULT_OUT)
    try:
        written = plot_runs(args.run_dirs, out, metrics=args.metrics)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(written)


if __name__ == "__main__":
    main()

"""The benchmark's outputs: results.json, results.md and the PNG plots.

``write(results, out_dir)`` takes the dict the runner assembles::

    {"preset": str, "machine": str, "seed": int, "wall_s": float,
     "budget": {...}, "sizes": {...}, "schedule": {...},
     "families": {name: {"label", "params", "ff_mult", "reach", "config"}},
     "cells": [CellResult.to_dict(), ...],
     "speed": {name: {"points": [{"length", "tokens_per_s", "step_s", "compile_s",
                                  "peak_bytes"}, ...], "exponent": float | None}}}

and writes every file from it alone, so a report can be redrawn from a saved
results.json (``python -m bench.longcontext --report-only OUT``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from bench.longcontext.models import LABELS  # noqa: E402

MARKERS = "osD^vP*X"

TASK_TITLES = {
    "mqar": "Multi-query associative recall",
    "copy": "Selective copy across a delay",
    "multihop": "Multi-hop pointer chasing",
    "lm": "Language modelling: bits per byte of the last segment",
}


def _cells(results: dict, task: str) -> list[dict]:
    return [c for c in results["cells"] if c["task"] == task]


def _tasks(results: dict) -> list[str]:
    seen = []
    for c in results["cells"]:
        if c["task"] not in seen:
            seen.append(c["task"])
    return seen


def _row(values: Sequence[float], reset: Sequence[float] | None = None, digits: int = 2):
    if not reset:
        return [f"{v:.{digits}f}" for v in values]
    return [f"{v:.{digits}f} ({r:.{digits}f})" for v, r in zip(values, reset, strict=True)]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def task_table(results: dict, task: str) -> list[str]:
    """Markdown lines: one row per family, one column per group."""
    cells = _cells(results, task)
    if not cells:
        return []
    header = ["family", *cells[0]["groups"]]
    rows = [
        [LABELS.get(c["family"], c["family"]), *_row(c["accuracy"], c["reset_accuracy"])]
        for c in cells
    ]
    return _table(header, rows)


def _family_table(results: dict) -> list[str]:
    rows = [
        [LABELS.get(n, n), f"{f['params']:,}", str(f["ff_mult"]), f["reach"]]
        for n, f in results["families"].items()
    ]
    return _table(["family", "parameters", "ff_mult", "what it can see"], rows)


def _cell_table(results: dict) -> list[str]:
    rows = [
        [
            LABELS.get(c["family"], c["family"]),
            c["task"],
            str(c["steps"]),
            f"{c['tokens']:,}",
            f"{c['final_loss']:.3f}",
            f"{c['wall_s']:.0f}",
        ]
        for c in results["cells"]
    ]
    return _table(["family", "task", "steps", "tokens", "final loss", "wall s"], rows)


def speed_table(results: dict) -> list[str]:
    speed = results.get("speed") or {}
    if not speed:
        return []
    lengths = sorted({p["length"] for s in speed.values() for p in s["points"]})
    header = ["family", *[f"{n} tok/s (MiB)" for n in lengths], "exponent"]
    rows = []
    for name, s in speed.items():
        by_len = {p["length"]: p for p in s["points"]}
        row = [LABELS.get(name, name)]
        for n in lengths:
            p = by_len.get(n)
            if p is None:
                row.append("-")
                continue
            mem = p["peak_bytes"]
            mem_text = "?" if mem is None else f"{mem / 2**20:.0f}"
            row.append(f"{p['tokens_per_s']:.0f} ({mem_text})")
        exp = s.get("exponent")
        row.append("-" if exp is None else f"{exp:.2f}")
        rows.append(row)
    return _table(header, rows)


def markdown(results: dict) -> str:
    """The whole results.md."""
    b, sched = results["budget"], results["schedule"]
    lines = [
        f"# Long-context benchmark: preset `{results['preset']}`",
        "",
        f"Machine: {results['machine']}. Seed {results['seed']}. "
        f"Total wall time {results['wall_s']:.0f} s.",
        "",
        f"Every model: dim {b['dim']}, depth {b['depth']}, heads {b['heads']}; streams of "
        f"{b['segments']} segments x {b['segment_len']} tokens; "
        f"{sched['warmup_steps']} single-segment steps (batch {sched['batch']}) then "
        f"{sched['steps']} stream steps (batch {sched.get('stream_batch') or sched['batch']}), "
        f"AdamW lr {sched['lr']}. Reset column at d=0: a recurrent model meeting a fresh "
        f"state where training never showed one, not a leak.",
        "",
        *_family_table(results),
        "",
    ]
    for task in _tasks(results):
        lines += [f"## {TASK_TITLES.get(task, task)}", ""]
        if task == "lm":
            lines.append(
                "Bits per byte of the last segment given 0 .. n-1 segments of history "
                "(the state reset before them); lower is better."
            )
        else:
            chance = _cells(results, task)[0]["chance"]
            lines.append(
                f"Accuracy on the answers by distance (in parentheses: with the state reset "
                f"before the question segment). Chance {chance:.3f}."
            )
        lines += ["", *task_table(results, task), ""]
    if results.get("speed"):
        lines += [
            "## Training speed",
            "",
            "Tokens per second of a training step (batch "
            f"{results.get('speed_config', {}).get('batch', 1)}) and XLA's planned peak "
            "memory; exponent: slope of log(step time) on log(length).",
            "",
            *speed_table(results),
            "",
        ]
    lines += ["## Cells", "", *_cell_table(results), ""]
    return "\n".join(lines)


def _accuracy_plot(results: dict, task: str, path: Path) -> None:
    cells = _cells(results, task)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(len(cells[0]["groups"]))
    for i, c in enumerate(cells):
        # Markers, dashes and a small horizontal offset keep overlapping curves visible.
        ax.plot(
            x + (i - len(cells) / 2) * 0.015,
            c["accuracy"],
            marker=MARKERS[i % 8],
            linestyle=("-", "--", ":", "-.")[i % 4],
            label=LABELS.get(c["family"], c["family"]),
        )
    ax.axhline(cells[0]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(list(x), cells[0]["groups"], rotation=30 if task == "multihop" else 0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("segments between evidence and question")
    ax.set_ylabel("answer accuracy")
    ax.set_title(TASK_TITLES.get(task, task))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lm_plot(results: dict, path: Path) -> None:
    cells = _cells(results, "lm")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in cells:
        ax.plot(
            range(len(c["accuracy"])),
            c["accuracy"],
            marker="o",
            label=LABELS.get(c["family"], c["family"]),
        )
    ax.set_xlabel("segments of history before the scored segment")
    ax.set_ylabel("bits per byte")
    ax.set_title(TASK_TITLES["lm"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed_plot(results: dict, path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, s in results["speed"].items():
        n = [p["length"] for p in s["points"]]
        label = LABELS.get(name, name)
        a1.plot(n, [p["tokens_per_s"] for p in s["points"]], marker="o", label=label)
        mem = [p["peak_bytes"] for p in s["points"]]
        if all(m is not None for m in mem):
            a2.plot(n, [m / 2**20 for m in mem], marker="o", label=label)
    for ax, ylabel in ((a1, "training tokens / s"), (a2, "planned peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
    a1.legend(fontsize=7)
    fig.suptitle(f"Training step, {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(results: dict, out_dir: str | os.PathLike) -> list[str]:
    """Writes the PNGs; returns their paths."""
    out = Path(out_dir)
    paths = []
    for task in _tasks(results):
        path = out / ("lm_history.png" if task == "lm" else f"accuracy_{task}.png")
        (_lm_plot(results, path) if task == "lm" else _accuracy_plot(results, task, path))
        paths.append(str(path))
    if results.get("speed"):
        path = out / "speed.png"
        _speed_plot(results, path)
        paths.append(str(path))
    return paths


def write(results: dict, out_dir: str | os.PathLike) -> list[str]:
    """results.json, results.md and the plots into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    return [str(out / "results.json"), str(out / "results.md"), *plots(results, out)]

"""Metrics for the training program: a JSON-lines log, TensorBoard scalars and a progress line.

A run directory gets ``metrics.jsonl`` (one ``{"step", "time", **metrics}`` object a line,
flushed after each write so a crash loses at most the line being written) and ``tb/`` with
TensorBoard event files. `read_metrics` reads the JSON lines back for plots and tests, skipping a
last line cut short by a crash. Tags are slash-separated, ``"train/loss"``, ``"val/bpb"``, which
TensorBoard groups by prefix.

NaN and infinity are written as the bare words ``NaN`` / ``Infinity`` (Python's json default), so
a diverged loss is logged rather than raising; Python's json reads them back.

Multi-host: only process 0 should create a `MetricsWriter` or `ProgressBar`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Appends scalar metrics to ``out_dir/metrics.jsonl`` and to TensorBoard in ``out_dir/tb``.

    A resumed run appends to the same file; a partial last line left by a crash is cut off first
    so the file stays one JSON object a line.
    """

    def __init__(self, out_dir: str | os.PathLike):
        """Opens (creating if needed) the run directory's metric files.

        Args:
            out_dir: the run directory.
        """
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, METRICS_FILE)
        _drop_partial_last_line(path)
        self._file = open(path, "a", encoding="utf-8")
        # Imported here: tensorboardX imports torch whenever it is installed (seconds of start-up),
        # which `read_metrics`, the progress bar and `python -m train.plot` do not need.
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=os.path.join(self.out_dir, "tb"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs scalar `metrics` at `step`.

        Args:
            step: the training step.
            metrics: name -> number (python, numpy or 0-d jax scalars), e.g. ``{"train/loss": x}``.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        values = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or name in ("step", "time"):
                raise ValueError(f"metric names must be strings other than step/time, got {name!r}")
            try:
                values[name] = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"metric {name!r} must be a scalar number, got {type(value).__name__}"
                ) from err
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=step, walltime=record["time"])

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (the JSON file is flushed on each write)."""
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both outputs."""
        self._file.close()
        self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _drop_partial_last_line(path: str) -> None:
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads ``run_dir/metrics.jsonl`` in the order written.

    Args:
        run_dir: a run directory written by `MetricsWriter`.

    Returns:
        One dict per logged step: ``{"step": int, "time": float, name: float, ...}``.

    Raises:
        FileNotFoundError: there is no metrics.jsonl in `run_dir`.
        ValueError: a line other than the last is not JSON (a crash only cuts the last one).
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run_dir {os.fspath(run_dir)!r} has no {METRICS_FILE}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: a write cut short by a crash
                break
            raise ValueError(f"{path} line {number} is not JSON: {err}") from err
    return records


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_rate(rate: float) -> str:
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= threshold:
            return f"{rate / threshold:.1f}{suffix}"
    return f"{rate:.1f}"


def _format_value(value: Any) -> str:
    if isinstance(value, int | str):
        return str(value)
    return f"{float(value):.4g}"


class ProgressBar:
    """One status line: ``step 120/600 | loss 1.234 | 51.2k tok/s | ETA 2m31s``.

    On a terminal the line is rewritten in place (``\\r``) at each update; otherwise (a log file)
    a plain line is printed at most every `interval` seconds, and always for the last step.
    Speed is an exponential moving average of steps per second between updates, so the slow
    first step (compilation) and one-off pauses (evaluation, checkpoints) fade out.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        tokens_per_step: int | None = None,
        stream: TextIO | None = None,
        interval: float = 30.0,
        smoothing: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        """Sets up the bar; nothing is printed until `update`.

        Args:
            total_steps: the step at which training ends.
            start_step: the step training (re)starts from.
            tokens_per_step: tokens in one global batch; shows tokens/s when given.
            stream: where to print; ``sys.stderr`` by default.
            interval: seconds between lines when `stream` is not a terminal.
            smoothing: weight of the newest speed sample in the moving average, in (0, 1].
            clock: seconds as a float; replaceable for tests.
        """
        if total_steps < 1 or not 0 <= start_step <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= start_step <= total_steps, got "
                f"total_steps={total_steps}, start_step={start_step}"
            )
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.smoothing = smoothing
        self._clock = clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_step = start_step
        self._last_time: float | None = None
        self._last_print = -math.inf
        self._steps_per_sec: float | None = None
        self._width = 0

    def update(self, step: int, **shown: Any) -> None:
        """Records that `step` is done and shows `shown` (name -> number or text) after it."""
        now = self._clock()
        if self._last_time is not None and step > self._last_step and now > self._last_time:
            rate = (step - self._last_step) / (now - self._last_time)
            if self._steps_per_sec is None:
                self._steps_per_sec = rate
            else:
                self._steps_per_sec += self.smoothing * (rate - self._steps_per_sec)
        self._last_step, self._last_time = step, now
        if not self._tty and step < self.total_steps and now - self._last_print < self.interval:
            return
        self._last_print = now
        line = self.format(step, **shown)
        if self._tty:
            # Pad with spaces so a shorter line fully covers the previous one.
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def format(self, step: int, **shown: Any) -> str:
        """The status line for `step`, using the current speed estimate."""
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{name} {_format_value(value)}" for name, value in shown.items()]
        if self._steps_per_sec is not None:
            if self.tokens_per_step:
                parts.append(f"{_format_rate(self._steps_per_sec * self.tokens_per_step)} tok/s")
            else:
                parts.append(f"{_format_rate(self._steps_per_sec)} steps/s")
            remaining = (self.total_steps - step) / self._steps_per_sec
            parts.append(f"ETA {_format_duration(remaining)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Ends the rewritten line on a terminal."""
        if self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0

"""Training and scoring one benchmark cell: a family on a task, under a preset.

A cell trains a fresh model with AdamW (``train.optim``: warmup + cosine, clipping, the
project's decay mask) on the task's answers only (language modelling: every byte), in two
phases that every family shares:

1. **single segment**: ``warmup_steps`` steps on one-segment streams with the evidence
   and the question in the same segment, where every family is an ordinary transformer
   and learns the skill itself (recall, copying, following a pointer) cheaply;
2. **streams**: ``steps`` steps on the full ``n``-segment streams, every distance mixed,
   where the family must carry the evidence across segments the way its design lets it.

Without phase 1 the small models of the quick preset spend their budget failing to find
the skill through the long, mostly-noise streams (full attention on MQAR stayed at chance
for 1500 steps; with 500 single-segment steps first it reached 1.0 at every distance
100 steps into phase 2).

Scoring reads held-out batches (their own seed stream) twice: as they are, and with
every row's state reset before the last segment (the reset baseline). A family that
answers from what it carried over must fall to chance under the reset for every distance
beyond the last segment; one that does not is reading the answer from somewhere else.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.longcontext import tasks as T
from bench.longcontext.models import Budget, Family
from train.config import OptimConfig
from train.optim import make_optimizer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """How a cell trains and is scored.

    Attributes:
      batch: rows per single-segment (phase-1) step.
      stream_batch: rows per stream (phase-2) step (None: ``batch``).
      warmup_steps: phase-1 steps on single-segment streams (0: none).
      steps: phase-2 steps on full streams.
      lr: peak learning rate of each phase's warmup + cosine schedule.
      eval_batches: held-out batches scored per cell.
      eval_batch: rows per held-out batch.
    """

    batch: int = 32
    stream_batch: int | None = None
    warmup_steps: int = 500
    steps: int = 300
    lr: float = 1e-3
    eval_batches: int = 4
    eval_batch: int = 64

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.steps


@dataclasses.dataclass
class CellResult:
    """What one cell measured (``to_dict`` is its results.json entry)."""

    family: str
    task: str
    groups: list[str]
    accuracy: list[float]  # per group; LM: bits per byte per amount of history
    reset_accuracy: list[float]
    chance: float
    final_loss: float
    steps: int
    tokens: int
    wall_s: float
    losses: list[float]
    params: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def masked_loss(logits: Array, targets: Array, weight: Array) -> Array:
    """Mean cross entropy over the targets with nonzero ``weight``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def make_train_step(family: Family, tx: optax.GradientTransformation) -> Callable:
    """A jitted ``(params, opt_state, tokens, score) -> (params, opt_state, loss)``."""

    def loss_fn(params, tokens, score):
        logits = family.logits(params, tokens[:, :-1], None)
        return masked_loss(logits, tokens[:, 1:], score.astype(jnp.float32))

    @jax.jit
    def step(params, opt_state, tokens, score):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, score)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_eval(family: Family) -> Callable:
    """A jitted ``(params, tokens, resets) -> (correct [B, L], nll [B, L])``."""

    @jax.jit
    def evaluate(params, tokens, resets):
        logits = family.logits(params, tokens[:, :-1], resets).astype(jnp.float32)
        targets = tokens[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.argmax(logits, -1) == targets, nll

    return evaluate


class Progress:
    """One status line on stderr per cell: rewritten in place on a terminal, a new line
    every ``log_every`` seconds when stderr is a file or a pipe (CI logs stay readable)."""

    def __init__(
        self, label: str, total: int, stream=None, every: float = 0.5, log_every: float = 15.0
    ):
        import sys

        self.label, self.total = label, total
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if self.tty else log_every
        self.start = self.last = time.perf_counter()

    def update(self, done: int, loss: float | None = None, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        width = 24
        filled = int(width * done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        extra = "" if loss is None else f" loss {loss:.3f}"
        line = (
            f"{self.label:<40} [{bar}] {done}/{self.total}{extra} "
            f"{now - self.start:5.0f}s eta {eta:4.0f}s"
        )
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()

    def close(self, text: str = "") -> None:
        self.stream.write(f"{chr(13) if self.tty else ''}{self.label:<40} {text}\n")
        self.stream.flush()


def _single_segment(sizes: T.TaskSizes) -> T.TaskSizes:
    return dataclasses.replace(sizes, segments=1, distances=(0,), hops=(1,))


def stream_stages(family: Family, sizes: T.TaskSizes, steps: int):
    """``[(steps, sizes)]`` of the stream phase: the family's curriculum stages (shorter
    streams, only the distances and hops they hold), then the full streams."""
    stages = [n for n in family.curriculum if n < sizes.segments]
    share = steps // (len(stages) + 1)
    out = []
    for n in stages:
        short = dataclasses.replace(
            sizes,
            segments=n,
            distances=tuple(d for d in sizes.distances if d < n),
            hops=tuple(h for h in sizes.hops if h <= n),
        )
        out.append((share, short))
    out.append((steps - share * len(stages), sizes))
    return out


def _batches(task: str, sizes: T.TaskSizes, seed: int, batch: int, corpus=None):
    """An endless iterator of ``Batch`` for ``task`` (numpy, seeded)."""
    index = 0
    while True:
        if task == "lm":
            yield T.lm_batch(corpus, sizes, seed, index, batch)
        else:
            yield T.GENERATORS[task](sizes, seed, index, batch)
        index += 1


def train_phase(
    step: Callable,
    params,
    opt_state,
    batches,
    steps: int,
    progress: Progress,
    done: int,
    losses: list[float],
):
    """``steps`` updates from ``batches``; returns the new params and opt state."""
    for _ in range(steps):
        b = next(batches)
        params, opt_state, loss = step(params, opt_state, b.tokens, b.score)
        done += 1
        if done % 10 == 0 or done == progress.total:
            losses.append(float(loss))
            progress.update(done, losses[-1])
    return params, opt_state, done


def train_cell(
    family: Family,
    task: str,
    sizes: T.TaskSizes,
    schedule: Schedule,
    seed: int,
    corpus=None,
    label: str | None = None,
) -> tuple[Any, list[float], float, int]:
    """Trains ``family`` on ``task``; returns ``(params, losses, wall seconds, training
    tokens)``.

    Language modelling skips the single-segment phase (there is no skill to isolate).
    """
    start = time.perf_counter()
    params = family.init(jax.random.key(seed), schedule.batch)
    warm = 0 if task == "lm" else schedule.warmup_steps
    losses: list[float] = []
    progress = Progress(label or f"{family.name}/{task}", warm + schedule.steps)
    done = tokens = 0
    phases = [(warm, _single_segment(sizes)), *stream_stages(family, sizes, schedule.steps)]
    for number, (steps, phase_sizes) in enumerate(phases):
        if not steps:
            continue
        # Each phase gets its own warmup + cosine schedule (and a fresh optimiser state:
        # Adam's moments from one-segment streams are a poor start for the long ones).
        tx = make_optimizer(OptimConfig(lr=schedule.lr, warmup_steps=min(50, steps)), steps)
        opt_state = tx.init(params)
        rows = schedule.batch if number == 0 else schedule.stream_batch or schedule.batch
        tokens += steps * rows * phase_sizes.length
        batches = _batches(task, phase_sizes, seed * 7919 + number, rows, corpus)
        params, opt_state, done = train_phase(
            make_train_step(family, tx),
            params,
            opt_state,
            batches,
            steps,
            progress,
            done,
            losses,
        )
    wall = time.perf_counter() - start
    return params, losses, wall, tokens


def _last_segment_resets(sizes: T.TaskSizes, B: int) -> np.ndarray:
    resets = np.zeros((sizes.segments, B), bool)
    resets[-1] = True
    return resets


def score_synthetic(
    family: Family, params, task: str, sizes: T.TaskSizes, schedule: Schedule, seed: int
) -> tuple[list[float], list[float]]:
    """Accuracy per group, as read and with the state reset before the last segment."""
    evaluate = make_eval(family)
    groups = _group_count(task, sizes)
    hits = np.zeros((2, groups))
    counts = np.zeros(groups)
    for i in range(schedule.eval_batches):
        b = T.GENERATORS[task](sizes, seed + 10_000, i, schedule.eval_batch)
        # Both readings pass a resets array (all False: as read), so one compile serves.
        resets = _last_segment_resets(sizes, b.tokens.shape[0])
        plain = np.asarray(evaluate(params, b.tokens, np.zeros_like(resets))[0])
        reset = np.asarray(evaluate(params, b.tokens, resets)[0])
        for g in range(groups):
            mask = b.score & (b.group == g)
            counts[g] += mask.sum()
            hits[0, g] += plain[mask].sum()
            hits[1, g] += reset[mask].sum()
    acc = hits / np.maximum(counts, 1)
    return acc[0].tolist(), acc[1].tolist()


def score_lm(family: Family, params, sizes: T.TaskSizes, schedule: Schedule, corpus) -> list[float]:
    """Bits per byte of the last segment given ``h = 0 .. n-1`` segments of history (the
    state reset before segment ``n-1-h``), on ``corpus`` (the held-out documents)."""
    evaluate = make_eval(family)
    n, S = sizes.segments, sizes.segment_len
    totals = np.zeros(n)
    count = 0
    for i in range(schedule.eval_batches):
        b = T.lm_batch(corpus, sizes, 10_000, i, schedule.eval_batch)
        B = b.tokens.shape[0]
        for h in range(n):
            resets = np.zeros((n, B), bool)
            resets[n - 1 - h] = True
            _, nll = evaluate(params, b.tokens, resets)
            totals[h] += float(np.asarray(nll)[:, -S:].sum())
        count += B * S
    return (totals / count / math.log(2)).tolist()


def _group_count(task: str, sizes: T.TaskSizes) -> int:
    return len(sizes.multihop_cells()) if task == "multihop" else len(sizes.distances)


def group_names(task: str, sizes: T.TaskSizes) -> list[str]:
    """Column names of a task's report row."""
    if task == "multihop":
        return [f"h{h} d{d}" for h, d in sizes.multihop_cells()]
    if task == "lm":
        return [f"history {h}" for h in range(sizes.segments)]
    return [f"d={d}" for d in sizes.distances]


def run_cell(
    family: Family,
    task: str,
    sizes: T.TaskSizes,
    schedule: Schedule,
    seed: int,
    params_count: int,
    corpus=None,
) -> CellResult:
    """Trains and scores one cell; ``corpus`` (language modelling only) is the pair
    ``(training documents, held-out documents)``."""
    label = f"{family.name}/{task}"
    train_docs, held_out = (None, None) if corpus is None else corpus
    params, losses, wall, tokens = train_cell(
        family, task, sizes, schedule, seed, train_docs, label
    )
    if task == "lm":
        acc = score_lm(family, params, sizes, schedule, held_out)
        reset, chance = [], 8.0
    else:
        acc, reset = score_synthetic(family, params, task, sizes, schedule, seed)
        chance = sizes.chance(task)
    steps = (0 if task == "lm" else schedule.warmup_steps) + schedule.steps
    result = CellResult(
        family=family.name,
        task=task,
        groups=group_names(task, sizes),
        accuracy=acc,
        reset_accuracy=reset,
        chance=chance,
        final_loss=float(np.mean(losses[-3:])) if losses else float("nan"),
        steps=steps,
        tokens=tokens,
        wall_s=wall,
        losses=losses,
        params=params_count,
    )
    shown = " ".join(f"{a:.2f}" for a in acc)
    Progress(label, 1).close(f"{wall:5.0f}s  loss {result.final_loss:.3f}  [{shown}]")
    return result


def budget_sizes(budget: Budget, **task_kw) -> T.TaskSizes:
    """The task shapes matching a budget's segments."""
    return T.TaskSizes(segments=budget.segments, segment_len=budget.segment_len, **task_kw)

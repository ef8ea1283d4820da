"""Training speed and peak memory of every family against sequence length.

One training step (forward, backward, AdamW update) on a batch of ``batch`` rows of
``length`` tokens, read the way each family reads a stream (``Family.logits``: the
recurrent ones scan over segments of ``segment_len``). Reported per length: tokens per
second (median of ``repeats`` timed steps after a compiling one), the compile time, and
the step's peak memory as XLA plans it (``Compiled.memory_analysis()``: arguments +
outputs + temporaries - aliased buffers), which is the number that decides whether a
length fits an accelerator and does not depend on what else the host process holds.

The fitted exponent is the least-squares slope of log(seconds per step) against
log(length): about 1 for the families whose cost per segment is fixed, about 2 for full
attention once the quadratic term dominates.

The Memorizing kNN memory gets a fixed capacity here (``knn_tokens``), as in the paper
(a memory of fixed size over a corpus, not the whole of every sequence); with the whole
stream in memory its exact search would make it quadratic too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.longcontext import models as M
from bench.longcontext.runner import make_train_step
from train.config import OptimConfig
from train.optim import make_optimizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """Attributes:
    lengths: sequence lengths timed (multiples of ``segment_len``).
    segment_len: the segment (window, memory) length of the recurrent families.
    batch: rows per step.
    repeats: timed steps per length (the median is reported).
    knn_tokens: Memorizing kNN memory capacity.
    """

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    segment_len: int = 256
    batch: int = 1
    repeats: int = 3
    knn_tokens: int = 2048


def _step_fn(family: M.Family):
    tx = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), 10)
    return tx, make_train_step(family, tx)


def peak_bytes(compiled) -> int | None:
    """Peak memory XLA plans for a compiled step, or None where the backend does not say."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - m.alias_size_in_bytes)


def time_family(name: str, budget: M.Budget, cfg: SpeedConfig, length: int) -> dict:
    """One length of one family: tokens/s, seconds per step, compile seconds, peak bytes."""
    S = cfg.segment_len
    if length % S:
        raise ValueError(f"speed length {length} must be a multiple of segment_len={S}")
    knn_segments = max(1, min(length, cfg.knn_tokens) // S)
    b = dataclasses.replace(budget, segment_len=S, segments=length // S, knn_segments=knn_segments)
    family = M.build(name, b)
    tx, step = _step_fn(family)
    params = family.init(jax.random.key(0), cfg.batch)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, b.vocab, (cfg.batch, length + 1)), jnp.int32)
    start = time.perf_counter()
    score = jnp.ones((cfg.batch, length), bool)
    compiled = step.lower(params, opt_state, tokens, score).compile()
    compile_s = time.perf_counter() - start
    params, opt_state, loss = compiled(params, opt_state, tokens, score)
    jax.block_until_ready(loss)
    times = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens, score)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {
        "length": length,
        "tokens_per_s": cfg.batch * length / seconds,
        "step_s": seconds,
        "compile_s": compile_s,
        "peak_bytes": peak_bytes(compiled),
    }


def fitted_exponent(lengths: Sequence[int], seconds: Sequence[float]) -> float | None:
    """Slope of log(seconds) on log(length) (None with fewer than two lengths)."""
    if len(lengths) < 2:
        return None
    x, y = np.log(np.asarray(lengths, float)), np.log(np.asarray(seconds, float))
    slope = np.polyfit(x, y, 1)[0]
    return float(slope) if math.isfinite(slope) else None


def measure(
    names: Sequence[str], budget: M.Budget, cfg: SpeedConfig, full_lengths=None, log=print
) -> dict[str, dict]:
    """``{family: {"points": [...], "exponent": float}}`` over ``cfg.lengths``
    (``full_lengths`` overrides the lengths for full attention, whose quadratic memory may
    not fit the longest ones)."""
    out = {}
    for name in names:
        lengths = cfg.lengths if name != "full" or full_lengths is None else full_lengths
        points = []
        for length in lengths:
            p = time_family(name, budget, cfg, length)
            points.append(p)
            mem = p["peak_bytes"]
            mem_text = "n/a" if mem is None else f"{mem / 2**20:.0f} MiB"
            log(
                f"speed {name:<16} {length:>6} tokens: {p['tokens_per_s']:9.0f} tok/s, "
                f"peak {mem_text}, compile {p['compile_s']:.1f}s"
            )
        exponent = fitted_exponent([p["length"] for p in points], [p["step_s"] for p in points])
        out[name] = {"points": points, "exponent": exponent}
    return out

"""The benchmark's presets: ``tiny`` (tests), ``quick`` (minutes on a laptop), ``full``.

A preset fixes everything a run compares under: the families, the tasks, the shared model
budget, the task shapes, the training schedule, and the speed sweep.
"""

from __future__ import annotations

import dataclasses

from bench.longcontext.models import FAMILIES, Budget
from bench.longcontext.runner import Schedule
from bench.longcontext.speed import SpeedConfig
from bench.longcontext.tasks import TaskSizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """Attributes:
    name: the preset's name.
    families, tasks: what runs.
    budget: the model every family shares.
    sizes: synthetic task shapes (``segments``/``segment_len`` equal the budget's).
    schedule: synthetic cells' training.
    lm_sizes, lm_schedule: the language-modelling cell's stream shape and training.
    speed: the speed sweep (None: skipped).
    full_lengths: lengths for full attention in the sweep (None: ``speed.lengths``).
    """

    name: str
    families: tuple[str, ...]
    tasks: tuple[str, ...]
    budget: Budget
    sizes: TaskSizes
    schedule: Schedule
    lm_sizes: TaskSizes
    lm_schedule: Schedule
    speed: SpeedConfig | None
    full_lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        for sizes in (self.sizes, self.lm_sizes):
            if (sizes.segments, sizes.segment_len) != (
                self.budget.segments,
                self.budget.segment_len,
            ):
                raise ValueError(
                    f"preset {self.name}: task shape {sizes.segments} x {sizes.segment_len} "
                    f"differs from the budget's {self.budget.segments} x "
                    f"{self.budget.segment_len}"
                )


def _preset(
    name, budget, families, tasks, schedule, lm_schedule, speed, full_lengths=None, **task_kw
):
    sizes = TaskSizes(segments=budget.segments, segment_len=budget.segment_len, **task_kw)
    lm_sizes = dataclasses.replace(sizes)  # lm reads only the stream shape
    return Preset(
        name=name,
        families=families,
        tasks=tasks,
        budget=budget,
        sizes=sizes,
        schedule=schedule,
        lm_sizes=lm_sizes,
        lm_schedule=lm_schedule,
        speed=speed,
        full_lengths=full_lengths,
    )


TINY = _preset(
    "tiny",
    Budget(
        dim=16, depth=2, heads=2, segment_len=16, segments=3, num_state=4, num_memory=4, knn_top_k=4
    ),
    FAMILIES,
    ("mqar", "copy", "multihop", "lm"),
    Schedule(batch=4, warmup_steps=3, steps=3, eval_batches=1, eval_batch=8),
    Schedule(batch=4, warmup_steps=0, steps=3, eval_batches=1, eval_batch=4),
    SpeedConfig(lengths=(32, 64), segment_len=16, repeats=1, knn_tokens=32),
    pairs=4,
    copy_len=2,
    chains=2,
    num_entities=16,
    distances=(0, 1, 2),
    hops=(1, 2),
)

QUICK = _preset(
    "quick",
    Budget(dim=64, depth=2, heads=4, segment_len=32, segments=5, num_memory=4, rmt_curriculum=True),
    FAMILIES,
    ("mqar",),
    Schedule(
        batch=32,
        stream_batch=16,
        warmup_steps=1200,
        steps=1200,
        lr=1e-3,
        eval_batches=2,
        eval_batch=64,
    ),
    Schedule(batch=16, warmup_steps=0, steps=200, lr=1e-3, eval_batches=2, eval_batch=16),
    SpeedConfig(lengths=(1024, 4096), segment_len=256, repeats=2, knn_tokens=2048),
    pairs=8,
    distances=(0, 1, 2, 4),
)

FULL = _preset(
    "full",
    Budget(
        dim=128, depth=4, heads=4, segment_len=64, segments=9, num_memory=8, rmt_curriculum=True
    ),
    FAMILIES,
    ("mqar", "copy", "multihop", "lm"),
    Schedule(batch=32, warmup_steps=2000, steps=2000, lr=1e-3, eval_batches=8, eval_batch=64),
    Schedule(batch=16, warmup_steps=0, steps=4000, lr=1e-3, eval_batches=8, eval_batch=16),
    SpeedConfig(lengths=(1024, 2048, 4096, 8192), segment_len=256, repeats=3, knn_tokens=4096),
    full_lengths=(1024, 2048, 4096, 8192, 16384),
    pairs=8,
    chains=6,
    distances=(0, 1, 2, 4, 8),
)

PRESETS = {p.name: p for p in (TINY, QUICK, FULL)}

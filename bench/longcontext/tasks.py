"""The benchmark's tasks: seeded generators of segmented token streams, with answer masks.

Every task yields a ``Batch`` of ``B`` rows, each a stream of ``n`` segments of ``S``
tokens read left to right (inputs ``tokens[:, :-1]``, next-token targets
``tokens[:, 1:]``). ``score`` marks the targets that are answers (the only positions
trained on and scored, except in language modelling where every target counts), and
``group`` says which column of the report an answer belongs to (a distance, a number of
hops, an amount of history). The answer always lies in the last segment, so "reset the
state before the query segment" is one operation for every model.

Token ids (a 256-id vocabulary shared with the byte-level corpus, so one compiled model
serves every task):

* ``1 .. 63``: filler (noise the memory must ignore),
* ``64 .. 71``: markers (``QUERY``, ``COPY``),
* ``72 ..``: keys, then values / entities (sizes from ``TaskSizes``).

Tasks (``d`` counts segments between the evidence and the question; ``d = 0`` puts both
in the last segment, evidence in its first half):

* ``mqar``: multi-query associative recall (Arora et al., Zoology, arXiv 2312.04927).
  ``P`` key-value pairs ``k v`` shown in segment ``n-1-d``; in the last segment the keys
  come back in another order, each followed by its value: the target after every query
  key is scored. Chance ``1 / num_values``.
* ``copy``: selective copy with a delay (Gu & Dao, Mamba, arXiv 2312.00752, made to span
  segments). ``C`` content tokens scattered among filler in segment ``n-1-d``; in the
  last segment ``COPY`` is followed by the content in order (teacher forced), every
  content target scored. Chance ``1 / num_values``.
* ``multihop``: pointer chasing. ``m`` disjoint chains ``x0 -> x1 -> ... -> xh`` over
  entities; binding ``i`` of every chain (``x_i x_{i+1}``) is shown in its own segment,
  the last one ``d`` segments before the end; the last segment asks ``QUERY x0`` and the
  target after ``x0`` is the chain's end ``xh``. Chance ``1 / num_entities``; a model that
  only knows which entities end a chain gets ``1 / m``.
* ``lm``: byte-level text (``lm_corpus``): windows of long documents, every target
  scored; the report reads the last segment's bits per byte against the history the
  model is given (``group`` is unused).

Each generator is a pure function of ``(seed, batch index)``: the same seed gives the same
batches on every machine, and evaluation uses its own seed stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

VOCAB = 256
FILLER = (1, 64)  # [low, high)
QUERY, COPY = 64, 65
FIRST_SYMBOL = 72
SYNTHETIC = ("mqar", "copy", "multihop")
TASKS = (*SYNTHETIC, "lm")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of streams (numpy).

    Attributes:
      tokens: int32 ``[B, n * S + 1]``.
      score: bool ``[B, n * S]``: targets that are answers.
      group: int32 ``[B, n * S]``: the report column of each answer (-1 elsewhere).
    """

    tokens: np.ndarray
    score: np.ndarray
    group: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSizes:
    """Shapes of the synthetic tasks.

    Attributes:
      segments, segment_len: ``n`` segments of ``S`` tokens per stream.
      pairs: MQAR key-value pairs per row.
      num_keys, num_values: MQAR key and value vocabularies (values double as copy content).
      copy_len: content tokens to copy.
      chains: multi-hop chains per row.
      num_entities: multi-hop entity vocabulary.
      distances: the ``d`` values drawn from (one per row) and reported.
      hops: the multi-hop chain lengths drawn from and reported.
    """

    segments: int
    segment_len: int
    pairs: int = 4
    num_keys: int = 32
    num_values: int = 32
    copy_len: int = 4
    chains: int = 3
    num_entities: int = 64
    distances: tuple[int, ...] = (0, 1, 2, 4)
    hops: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self):
        for name in ("segments", "segment_len", "pairs", "num_keys", "num_values", "copy_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TaskSizes.{name} must be a positive int, got {value!r}")
        if FIRST_SYMBOL + self.num_keys + max(self.num_values, self.num_entities) > VOCAB:
            raise ValueError(
                f"TaskSizes: keys ({self.num_keys}) + values/entities "
                f"({max(self.num_values, self.num_entities)}) do not fit the {VOCAB}-id "
                f"vocabulary after the first {FIRST_SYMBOL} ids"
            )
        if self.pairs > self.num_keys or self.pairs > self.num_values:
            raise ValueError(
                f"TaskSizes.pairs ({self.pairs}) needs as many distinct keys and values"
            )
        if self.chains * (max(self.hops) + 1) > self.num_entities:
            raise ValueError(
                f"TaskSizes: {self.chains} chains of {max(self.hops)} hops need "
                f"{self.chains * (max(self.hops) + 1)} distinct entities, num_entities is "
                f"{self.num_entities}"
            )
        if max(self.distances) >= self.segments or min(self.distances) < 0:
            raise ValueError(
                f"TaskSizes.distances {self.distances} must lie in [0, segments={self.segments})"
            )
        if not self.multihop_cells():
            raise ValueError(
                f"TaskSizes: no multihop chain of hops {self.hops} fits {self.segments} "
                f"segments at distances {self.distances}"
            )
        half = self.segment_len // 2
        need = {
            "mqar": 2 * self.pairs,
            "copy": self.copy_len + 1,
            "multihop": 3 * self.chains,
        }
        for task, n in need.items():
            if n > half:
                raise ValueError(
                    f"TaskSizes: {task} needs {n} positions in half a segment, "
                    f"segment_len={self.segment_len} gives {half}"
                )

    @property
    def length(self) -> int:
        """Tokens per stream (inputs)."""
        return self.segments * self.segment_len

    @property
    def keys(self) -> np.ndarray:
        return FIRST_SYMBOL + np.arange(self.num_keys)

    @property
    def values(self) -> np.ndarray:
        return FIRST_SYMBOL + self.num_keys + np.arange(self.num_values)

    @property
    def entities(self) -> np.ndarray:
        return FIRST_SYMBOL + self.num_keys + np.arange(self.num_entities)

    def multihop_cells(self) -> list[tuple[int, int]]:
        """The ``(hops, distance)`` pairs that fit the stream (the first binding of an
        ``h``-hop chain answered at distance ``d`` sits ``d + h - 1`` segments back)."""
        return [(h, d) for h in self.hops for d in self.distances if d + h <= self.segments]

    def chance(self, task: str) -> float:
        """Accuracy of a uniform guess over the answer vocabulary."""
        if task == "multihop":
            return 1.0 / self.num_entities
        return 1.0 / self.num_values


def _rows(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _place(rng, span: tuple[int, int], lengths: Sequence[int]) -> list[int]:
    """Start offsets for items of the given lengths inside ``[lo, hi)``, in order, not
    overlapping and at least one position apart."""
    lo, hi = span
    room = hi - lo - sum(lengths) - (len(lengths) - 1)
    if room < 0:
        raise ValueError(f"items of lengths {list(lengths)} do not fit in [{lo}, {hi})")
    # Distribute the free positions among the len + 1 gaps uniformly at random.
    cuts = np.sort(rng.integers(0, room + 1, len(lengths)))
    starts, pos = [], lo
    for i, n in enumerate(lengths):
        start = pos + cuts[i] - (cuts[i - 1] if i else 0)
        starts.append(int(start))
        pos = start + n + 1
    return starts


def _evidence_span(sizes: TaskSizes, d: int) -> tuple[int, int]:
    """Positions of the evidence: segment ``n-1-d``, or the first half of the last one."""
    S, n = sizes.segment_len, sizes.segments
    start = (n - 1 - d) * S
    return (start, start + (S // 2 if d == 0 else S))


def _question_span(sizes: TaskSizes, d: int) -> tuple[int, int]:
    S, n = sizes.segment_len, sizes.segments
    start = (n - 1) * S
    return (start + S // 2, start + S) if d == 0 else (start, start + S)


def _empty(rng, B: int, sizes: TaskSizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = rng.integers(*FILLER, (B, sizes.length + 1)).astype(np.int32)
    return tokens, np.zeros((B, sizes.length), bool), np.full((B, sizes.length), -1, np.int32)


def _distance(rng, sizes: TaskSizes) -> tuple[int, int]:
    """A row's report group and its distance ``d``, uniform over ``sizes.distances``."""
    g = int(rng.integers(len(sizes.distances)))
    return g, sizes.distances[g]


def mqar(sizes: TaskSizes, seed: int, index: int, batch: int) -> Batch:
    """Multi-query associative recall; ``group`` = index of ``d`` in ``sizes.distances``."""
    rng = _rows(seed, index)
    tokens, score, group = _empty(rng, batch, sizes)
    P = sizes.pairs
    for b in range(batch):
        g, d = _distance(rng, sizes)
        keys = rng.choice(sizes.keys, P, replace=False)
        values = rng.choice(sizes.values, P, replace=False)
        (start,) = _place(rng, _evidence_span(sizes, d), [2 * P])
        tokens[b, start : start + 2 * P : 2] = keys
        tokens[b, start + 1 : start + 2 * P : 2] = values
        order = rng.permutation(P)
        (start,) = _place(rng, _question_span(sizes, d), [2 * P])
        tokens[b, start : start + 2 * P : 2] = keys[order]
        tokens[b, start + 1 : start + 2 * P : 2] = values[order]
        # Target t is tokens[t + 1]: score the positions that hold a query key.
        score[b, start : start + 2 * P : 2] = True
        group[b, start : start + 2 * P : 2] = g
    return Batch(tokens, score, group)


def selective_copy(sizes: TaskSizes, seed: int, index: int, batch: int) -> Batch:
    """Selective copy across a delay; ``group`` = index of ``d``."""
    rng = _rows(seed, index)
    tokens, score, group = _empty(rng, batch, sizes)
    C = sizes.copy_len
    for b in range(batch):
        g, d = _distance(rng, sizes)
        content = rng.choice(sizes.values, C, replace=True)
        starts = _place(rng, _evidence_span(sizes, d), [1] * C)
        tokens[b, starts] = content
        (start,) = _place(rng, _question_span(sizes, d), [C + 1])
        tokens[b, start] = COPY
        tokens[b, start + 1 : start + 1 + C] = content
        score[b, start : start + C] = True
        group[b, start : start + C] = g
    return Batch(tokens, score, group)


def multihop(sizes: TaskSizes, seed: int, index: int, batch: int) -> Batch:
    """Pointer chasing; ``group`` = index of ``(hops, d)`` in ``sizes.multihop_cells()``."""
    rng = _rows(seed, index)
    tokens, score, group = _empty(rng, batch, sizes)
    cells = sizes.multihop_cells()
    S, n, m = sizes.segment_len, sizes.segments, sizes.chains
    for b in range(batch):
        g = int(rng.integers(len(cells)))
        h, d = cells[g]
        chains = rng.choice(sizes.entities, (m, h + 1), replace=False)
        for i in range(h):
            seg = n - 1 - d - (h - 1 - i)
            span = _evidence_span(sizes, 0) if seg == n - 1 else (seg * S, (seg + 1) * S)
            for c, start in zip(rng.permutation(m), _place(rng, span, [2] * m), strict=True):
                tokens[b, start : start + 2] = chains[c, i : i + 2]
        span = _question_span(sizes, d)
        for c, start in zip(rng.permutation(m), _place(rng, span, [3] * m), strict=True):
            tokens[b, start : start + 3] = (QUERY, chains[c, 0], chains[c, h])
            score[b, start + 1] = True
            group[b, start + 1] = g
    return Batch(tokens, score, group)


GENERATORS = {"mqar": mqar, "copy": selective_copy, "multihop": multihop}


def lm_batch(docs: Sequence[np.ndarray], sizes: TaskSizes, seed: int, index: int, batch: int):
    """Windows of ``sizes.length + 1`` bytes from documents at least that long; every
    target scored (``group`` 0)."""
    rng = _rows(seed, index)
    need = sizes.length + 1
    tokens = np.empty((batch, need), np.int32)
    for b in range(batch):
        doc = docs[int(rng.integers(len(docs)))]
        start = int(rng.integers(len(doc) - need + 1))
        tokens[b] = doc[start : start + need]
    return Batch(
        tokens, np.ones((batch, sizes.length), bool), np.zeros((batch, sizes.length), np.int32)
    )


def lm_corpus(min_len: int, enwik8: str = "data/enwik8") -> tuple[str, list, list]:
    """``(name, train docs, val docs)`` of documents with at least ``min_len`` bytes:
    enwik8 (its standard split, cut into 1 MB documents) when ``enwik8`` exists, else the
    Python standard library's sources (``train.data``'s default corpus)."""
    from pathlib import Path

    from train.data import DataConfig, load_corpus

    if Path(enwik8).is_file():
        corpus = load_corpus(DataConfig(source=enwik8, split="enwik8"))
        cut = lambda docs: [d[i : i + 2**20] for d in docs for i in range(0, len(d), 2**20)]  # noqa: E731
        train, val, name = cut(corpus.train), cut(corpus.val), "enwik8"
    else:
        corpus = load_corpus(DataConfig())
        train, val, name = corpus.train, corpus.val, "stdlib"
    train = [d for d in train if len(d) >= min_len]
    val = [d for d in val if len(d) >= min_len]
    if not train or not val:
        raise ValueError(f"lm: the {name} corpus has no documents of {min_len} bytes in a split")
    return name, train, val

"""Relative-position attention biases as a table over distances, expanded block by block.

T5 (arXiv 1910.10683), ALiBi (2108.12409) and dynamic position biases (2111.09883) depend
only on the distance ``key position - query position``; Transformer-XL's content term
(1901.02860) depends on the query row and the distance. ``RelativeBias`` stores that
function as a table of R columns, column ``center`` for distance 0. Distances past either
end of the table read the end column, so a saturating table (T5's buckets) is stored in
``2 * max_distance + 1`` columns at any sequence length. A backend that works on blocks
gathers one block of the bias from the table (``block``) and scatter-adds the block's logit
gradient back into a table-shaped gradient (``block_grad``), so the ``[T, S]`` bias never
exists; the einsum reference asks for ``dense``.

Positions follow ``AttentionMask``: query i sits at key position ``q_offset + i``. The first
``prefix`` keys (persistent memory key/values, 1907.01470) have no position and get bias 0;
key ``j >= prefix`` sits at position ``j - prefix``. ``q_offset=None`` right-aligns the
queries with the positioned keys: ``q_offset = (S - prefix) - T``. So::

    bias[b, n, i, j] = 0                                              if j < prefix
    bias[b, n, i, j] = table[b, n, (i,) clip(j - prefix - (q_offset + i) + center, 0, R - 1)]

Shapes: B batch, N heads, T queries, S keys (prefix included), R table columns. ``table``
is ``[N, R]``, ``[B, N, R]`` or ``[B, N, T, R]`` (one row per query); B and N may be 1 to
broadcast. ``q_offset`` is a Python int or an int array ``[]`` or ``[B]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from xtx.ops.positional import t5_relative_position_bucket

Array = jax.Array


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class RelativeBias:
    """An additive attention bias that depends on the key-query distance.

    Attributes:
      table: float ``[N, R]``, ``[B, N, R]`` or ``[B, N, T, R]``.
      center: the table column of distance 0 (static).
      prefix: leading keys without a position and with bias 0 (static).
      q_offset: key position of query 0 among the positioned keys; None right-aligns.
    """

    table: Array
    center: int
    prefix: int = 0
    q_offset: Array | int | None = None

    def __post_init__(self):
        if not _is_int(self.center) or self.center < 0:
            raise ValueError(f"RelativeBias center must be an int >= 0, got {self.center!r}")
        if not _is_int(self.prefix) or self.prefix < 0:
            raise ValueError(f"RelativeBias prefix must be an int >= 0, got {self.prefix!r}")
        # JAX rebuilds pytrees with placeholder leaves (None, sentinels), so only a real
        # array-like table is checked here; shapes against T and S are checked by `check`.
        shape = getattr(self.table, "shape", None)
        if shape is not None:
            if len(shape) not in (2, 3, 4):
                raise ValueError(
                    "RelativeBias table must be [N, R], [B, N, R] or [B, N, T, R], "
                    f"got shape {tuple(shape)}"
                )
            if self.center >= shape[-1]:
                raise ValueError(
                    f"RelativeBias center must be a table column (< R = {shape[-1]}), "
                    f"got {self.center}"
                )

    @property
    def num_columns(self) -> int:
        """R, the number of distances the table stores."""
        return self.table.shape[-1]

    def check(self, B: int, N: int, T: int, S: int) -> None:
        """Raises ValueError unless the bias fits logits ``[B, N, T, S]``."""
        table = self.table
        if not jnp.issubdtype(table.dtype, jnp.floating):
            raise ValueError(f"RelativeBias table must be a float array, got {table.dtype}")
        rank = table.ndim
        heads = table.shape[0] if rank == 2 else table.shape[1]
        if heads not in (1, N):
            raise ValueError(
                f"RelativeBias table must have 1 or N = {N} heads, got shape {table.shape}"
            )
        if rank > 2 and table.shape[0] not in (1, B):
            raise ValueError(
                f"RelativeBias table must have batch 1 or B = {B}, got shape {table.shape}"
            )
        if rank == 4 and table.shape[2] != T:
            raise ValueError(
                f"a per-query RelativeBias table [B, N, T, R] needs T = {T} rows, "
                f"got shape {table.shape}"
            )
        if self.prefix > S:
            raise ValueError(f"RelativeBias prefix must be <= S = {S} keys, got {self.prefix}")
        if self.q_offset is not None and not _is_int(self.q_offset):
            offset = jnp.asarray(self.q_offset)
            if not jnp.issubdtype(offset.dtype, jnp.integer) or offset.shape not in ((), (B,)):
                raise ValueError(
                    f"RelativeBias q_offset must be an int or an int array [] or [B] = [{B}], "
                    f"got {offset.dtype} {offset.shape}"
                )

    def _query_positions(self, q_start, block_q: int, T: int, S: int) -> Array:
        """Positions of queries ``q_start + [0, block_q)``: ``[bq]`` or ``[B, bq]`` int32."""
        offset = (S - self.prefix) - T if self.q_offset is None else self.q_offset
        offset = jnp.asarray(offset, jnp.int32)
        pos = q_start + jnp.arange(block_q, dtype=jnp.int32)
        return pos + offset[..., None] if offset.ndim else pos + offset

    def _block_index(self, q_start, k_start, block_q: int, block_k: int, T: int, S: int):
        """Index into ``table`` for one block, the ``[bk]`` keys that have a position, and
        whether the queries have per-row offsets."""
        keys = k_start + jnp.arange(block_k, dtype=jnp.int32)
        q_pos = self._query_positions(q_start, block_q, T, S)
        col = (keys - self.prefix) - q_pos[..., :, None] + self.center  # [(B,) bq, bk]
        col = jnp.clip(col, 0, self.num_columns - 1)
        rank = self.table.ndim
        # Rows past T belong to padded queries (masked); clipping keeps the index valid.
        rows = jnp.clip(q_start + jnp.arange(block_q, dtype=jnp.int32), 0, T - 1)
        per_row = col.ndim == 3
        if not per_row:  # one offset for the batch: a gather over the last axes only
            index = {
                2: (slice(None), col),
                3: (slice(None), slice(None), col),
                4: (slice(None), slice(None), rows[:, None], col),
            }[rank]
        else:  # per-row offsets: the batch axis joins the gather
            col = col[:, None]  # [B, 1, bq, bk]
            heads = jnp.arange(self.table.shape[-2 if rank == 2 else 1])[:, None, None]
            batch = jnp.arange(self.table.shape[0])[:, None, None, None]
            index = {
                2: (heads, col),
                3: (batch, heads, col),
                4: (batch, heads, rows[:, None], col),
            }[rank]
        return index, keys >= self.prefix, per_row

    def block(self, q_start, k_start, block_q: int, block_k: int, T: int, S: int) -> Array:
        """Bias of queries ``q_start + [0, bq)`` against keys ``k_start + [0, bk)``.

        Args:
          q_start, k_start: first query / key of the block (ints or traced int scalars).
          block_q, block_k: block sizes; rows and keys past T / S get arbitrary values
            (the caller masks them).
          T, S: query and key lengths of the whole attention.

        Returns:
          float32 ``[B|1, N|1, block_q, block_k]``.
        """
        index, positioned, _ = self._block_index(q_start, k_start, block_q, block_k, T, S)
        values = jnp.where(positioned, self.table[index].astype(jnp.float32), 0.0)
        while values.ndim < 4:
            values = values[None]
        return values

    def block_grad(self, dtable: Array, dlogits: Array, q_start, k_start, T: int, S: int):
        """Adds one block's logit gradient into a gradient shaped like ``table``.

        The transpose of ``block``: ``dlogits`` ``[B, N, bq, bk]`` is summed over the axes
        the table broadcasts over and scatter-added into the columns ``block`` read.

        Returns:
          ``dtable`` plus the block's contribution.
        """
        bq, bk = dlogits.shape[-2:]
        index, positioned, per_row = self._block_index(q_start, k_start, bq, bk, T, S)
        grad = jnp.where(positioned, dlogits, 0.0)
        rank = self.table.ndim
        if self.table.shape[-2 if rank == 2 else 1] == 1:
            grad = grad.sum(1, keepdims=True)
        if not per_row:  # one offset for the batch: reduce over it as the table does
            if rank == 2:
                grad = grad.sum(0)
            elif self.table.shape[0] == 1:
                grad = grad.sum(0, keepdims=True)
        # Per-row offsets with a batch-free table scatter every row into the same entries:
        # the scatter-add sums the duplicates.
        return dtable.at[index].add(grad.astype(dtable.dtype))

    def dense(self, T: int, S: int) -> Array:
        """The bias as float32 ``[B|1, N, T, S]`` (N is the table's head count)."""
        return self.block(0, 0, T, S, T, S)

    @classmethod
    def t5(
        cls,
        embedding: Array,
        *,
        causal: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        scale: float = 1.0,
        prefix: int = 0,
        q_offset: Array | int | None = None,
    ) -> RelativeBias:
        """T5's bucketed bias ``embedding[bucket(k - q)] * scale`` (1910.10683).

        Equals ``xtx.ops.t5_position_bias`` at every distance: buckets stop changing at
        ``|k - q| >= max_distance``, so the table spans ``[-max_distance, max_distance]``
        and clipping covers the rest, whatever the sequence length.

        Args:
          embedding: ``[num_buckets, N]`` learned bucket table.
          causal, num_buckets, max_distance: see ``t5_relative_position_bucket``.
          scale: multiplier of the bias (x-transformers: ``dim_head ** 0.5``).
          prefix, q_offset: see ``RelativeBias``.

        Returns:
          A ``RelativeBias`` with table ``[N, 2 * max_distance + 1]``.
        """
        embedding = jnp.asarray(embedding)
        if embedding.ndim != 2 or embedding.shape[0] != num_buckets:
            raise ValueError(
                f"embedding must be [num_buckets, N] = [{num_buckets}, N], "
                f"got shape {embedding.shape}"
            )
        if isinstance(max_distance, bool) or not isinstance(max_distance, int | float):
            raise ValueError(f"max_distance must be a number, got {max_distance!r}")
        span = max(math.ceil(max_distance), 0)
        distances = jnp.arange(-span, span + 1, dtype=jnp.int32)  # k - q
        buckets = t5_relative_position_bucket(
            distances, causal=causal, num_buckets=num_buckets, max_distance=max_distance
        )
        table = jnp.take(embedding, buckets, axis=0).T * scale  # [N, 2 span + 1]
        return cls(table, center=span, prefix=prefix, q_offset=q_offset)

    @classmethod
    def alibi(
        cls,
        slopes: Array,
        num_keys: int,
        *,
        prefix: int = 0,
        q_offset: Array | int | None = None,
    ) -> RelativeBias:
        """ALiBi's ``-slope_n * |k - q|`` (2108.12409), as ``xtx.ops.alibi_bias``.

        Args:
          slopes: ``[N]`` from ``alibi_slopes``.
          num_keys: positioned keys ``S - prefix``; the table holds distances up to
            ``num_keys - 1``, every distance when the queries sit among the keys.
          prefix, q_offset: see ``RelativeBias``.

        Returns:
          A ``RelativeBias`` with table ``[N, 2 * num_keys - 1]``.
        """
        slopes = jnp.asarray(slopes)
        if slopes.ndim != 1:
            raise ValueError(f"slopes must be 1-D [N], got shape {slopes.shape}")
        if not _is_int(num_keys) or num_keys < 1:
            raise ValueError(f"num_keys must be an int >= 1, got {num_keys!r}")
        distance = jnp.abs(jnp.arange(-(num_keys - 1), num_keys))  # [2 num_keys - 1]
        table = -distance[None, :].astype(slopes.dtype) * slopes[:, None]
        return cls(table, center=num_keys - 1, prefix=prefix, q_offset=q_offset)

    @classmethod
    def centered(
        cls,
        table: Array,
        *,
        prefix: int = 0,
        q_offset: Array | int | None = None,
    ) -> RelativeBias:
        """A table over distances ``k - q = -(R-1)/2 .. (R-1)/2`` (odd R), e.g. the
        ``[N, 2S - 1]`` output of a dynamic position bias MLP."""
        table = jnp.asarray(table)
        if table.shape[-1:] == () or table.shape[-1] % 2 != 1:
            raise ValueError(
                f"a centered distance table needs an odd number of columns, got {table.shape}"
            )
        return cls(table, center=table.shape[-1] // 2, prefix=prefix, q_offset=q_offset)


jax.tree_util.register_dataclass(
    RelativeBias, data_fields=["table", "q_offset"], meta_fields=["center", "prefix"]
)

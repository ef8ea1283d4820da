"""Attention masks as a small description that each attention backend interprets.

A backend that works on blocks (a flash-style kernel, splash attention) wants to know
*why* an entry is masked (causal, outside a window, padding) so that it can skip whole
blocks; the einsum reference wants a dense boolean array. ``AttentionMask`` carries the
description; ``AttentionMask.dense`` builds the array.

Positions. Query ``i`` sits at key position ``q_offset + i``. With ``q_offset=None`` the
queries are right-aligned with the keys (``q_offset = S - T``), which is what XL
memories, memory key/values and KV caches need: the last query is the last key. Never
use a top-left ``is_causal`` when keys are longer than queries.

Prefix keys. The first ``prefix`` keys (global tokens, memory key/values) have no
position: every query sees them, whatever ``causal`` and ``window`` say (padding and
segment ids still apply), and key ``j >= prefix`` sits at position ``j - prefix``.

Shapes: B batch, N heads, T queries, S keys. ``True`` means "may attend".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to.

    Attributes:
      causal: query at position p sees keys at positions <= p.
      window: ``(left, right)``: query at p sees keys in ``[p - left, p + right]``;
        ``None`` on a side means unbounded. Combined with ``causal`` the right side is
        capped at 0.
      q_offset: key position of query 0, a Python int or an int array of shape ``[]`` or
        ``[B]``; ``None`` aligns the last query with the last key.
      key_padding: ``[B, S]`` bool, False for padding keys.
      q_segment_ids, kv_segment_ids: ``[B, T]`` / ``[B, S]`` ints; a query only sees keys
        of its own segment (packed sequences).
      explicit: any bool array broadcastable to ``[B, N, T, S]``.
      prefix: leading keys without a position that every query sees (static int).
    """

    causal: bool = False
    window: tuple[int | None, int | None] = (None, None)
    q_offset: Array | int | None = None
    key_padding: Array | None = None
    q_segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    explicit: Array | None = None
    prefix: int = 0

    def __post_init__(self):
        if not isinstance(self.prefix, int) or isinstance(self.prefix, bool) or self.prefix < 0:
            raise ValueError(f"prefix must be an int >= 0, got {self.prefix!r}")
        if len(self.window) != 2:
            raise ValueError(f"window must be a (left, right) pair, got {self.window!r}")
        for side, w in zip(("left", "right"), self.window, strict=True):
            if w is not None and (not isinstance(w, int) or w < 0):
                raise ValueError(f"window {side} must be None or an int >= 0, got {w!r}")
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")

    @property
    def is_trivial(self) -> bool:
        """True when nothing is masked."""
        return (
            not self.causal
            and self.window == (None, None)
            and self.key_padding is None
            and self.q_segment_ids is None
            and self.explicit is None
        )

    def query_positions(self, T: int, S: int) -> Array:
        """Positions of the queries among the positioned keys: ``[T]`` or ``[B, T]`` int32."""
        offset = S - self.prefix - T if self.q_offset is None else self.q_offset
        offset = jnp.asarray(offset, jnp.int32)
        pos = jnp.arange(T, dtype=jnp.int32)
        return pos + offset[..., None] if offset.ndim else pos + offset

    def dense(self, T: int, S: int) -> Array | None:
        """The mask as a bool array broadcastable to ``[B, N, T, S]``, or None if trivial."""
        parts = []
        if self.causal or self.window != (None, None):
            q_pos = self.query_positions(T, S)[..., :, None]  # [T, 1] or [B, T, 1]
            k_pos = jnp.arange(S, dtype=jnp.int32) - self.prefix
            rel = k_pos - q_pos  # key position minus query position
            keep = jnp.ones(rel.shape, bool)
            left, right = self.window
            if self.causal:
                right = 0 if right is None else min(right, 0)
            if right is not None:
                keep &= rel <= right
            if left is not None:
                keep &= rel >= -left
            keep |= k_pos < 0  # prefix keys: seen by every query
            parts.append(keep[None, None] if keep.ndim == 2 else keep[:, None])
        if self.key_padding is not None:
            parts.append(self.key_padding[:, None, None, :].astype(bool))
        if self.q_segment_ids is not None:
            same = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
            parts.append(same[:, None])
        if self.explicit is not None:
            parts.append(jnp.asarray(self.explicit, bool))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        while out.ndim < 4:
            out = out[None]
        return out


jax.tree_util.register_dataclass(
    AttentionMask,
    data_fields=["q_offset", "key_padding", "q_segment_ids", "kv_segment_ids", "explicit"],
    meta_fields=["causal", "window", "prefix"],
)


def pad_keys(key_padding: Array, num: int, *, batch: int | None = None) -> Array:
    """Prepends ``num`` always-visible keys to a ``[B, S]`` key mask."""
    if num == 0:
        return key_padding
    b = key_padding.shape[0] if batch is None else batch
    return jnp.concatenate([jnp.ones((b, num), bool), key_padding.astype(bool)], axis=-1)

"""Token shifting: move feature chunks along the sequence axis before a sublayer.

Papers: RWKV's token shift (Peng et al., github.com/BlinkDL/RWKV-LM) and "Shifted
chunk transformer" (arXiv:2106.07477), as in x-transformers 2.31 ``ShiftTokens``.

The last axis is cut into ``len(shifts)`` chunks of ``D // len(shifts)`` features;
chunk ``c`` moves ``shifts[c]`` positions along the sequence (positive: towards later
positions, so position t sees position t - shift) with zeros filling the gap. Features
left over by the integer division are not moved.

Shapes: ``x`` is ``[B, T, D]``, ``mask`` is ``[B, T]`` (True = keep).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def _shift(t: Array, amount: int, mask: Array | None) -> Array:
    """Moves ``t`` ``[B, T, F]`` by ``amount`` positions along T, filling with zeros."""
    if amount == 0:
        # x-transformers returns an unshifted chunk as it is, padding positions included.
        return t
    if mask is not None:
        # Padding positions must not leak into real ones.
        t = jnp.where(mask[..., None], t, jnp.zeros((), t.dtype))
    length = t.shape[-2]
    steps = min(abs(amount), length)
    zeros = jnp.zeros((*t.shape[:-2], steps, t.shape[-1]), t.dtype)
    if amount > 0:
        return jnp.concatenate([zeros, t[..., : length - steps, :]], axis=-2)
    return jnp.concatenate([t[..., steps:, :], zeros], axis=-2)


def shift_tokens(x: Array, shifts: Sequence[int], mask: Array | None = None) -> Array:
    """Shifts chunks of the features of ``x`` along the sequence.

    Args:
      x: ``[B, T, D]``.
      shifts: one shift per chunk, e.g. ``(0, 1)`` (causal) or ``(-1, 0, 1)``.
      mask: optional ``[B, T]`` bool; positions where it is False are zeroed in every
        chunk that moves, before it moves.

    Returns:
      ``[B, T, D]``.
    """
    shifts = tuple(int(s) for s in shifts)
    if not shifts:
        raise ValueError("shifts must hold at least one shift, got ()")
    size = x.shape[-1] // len(shifts)
    if size == 0:
        raise ValueError(
            f"shift_tokens needs at least one feature per shift: {len(shifts)} shifts for "
            f"D={x.shape[-1]} features"
        )
    if mask is not None and mask.shape != x.shape[:-1]:
        raise ValueError(f"mask must have shape {x.shape[:-1]}, got {mask.shape}")
    moved = [
        _shift(x[..., c * size : (c + 1) * size], amount, mask) for c, amount in enumerate(shifts)
    ]
    rest = x[..., len(shifts) * size :]
    return jnp.concatenate([*moved, rest], axis=-1)

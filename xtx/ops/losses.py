"""Losses as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, *, ignore_index: int | None = -100) -> Array:
    """Mean token cross-entropy, skipping targets equal to ``ignore_index``.

    Args:
      logits: ``[..., V]`` unnormalised scores (computed in float32).
      targets: ``[...]`` int ids.
      ignore_index: targets with this value do not count (PyTorch's convention).

    Returns:
      scalar mean over the counted targets (0 when none count).
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    valid = jnp.ones(targets.shape, bool) if ignore_index is None else targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    return nll.sum() / jnp.maximum(valid.sum(), 1)


def autoregressive_loss(logits: Array, tokens: Array, *, ignore_index: int | None = -100) -> Array:
    """Next-token loss: ``logits[:, :-1]`` predict ``tokens[:, 1:]``."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:], ignore_index=ignore_index)

"""Exact 1.5-entmax: a sparse alternative to softmax (arXiv 1905.05702, 1909.00015).

``entmax15(z)`` is the probability vector ``p = max(z/2 - tau, 0) ** 2`` whose threshold
``tau`` makes ``sum(p) = 1``; entries well below the maximum get exactly zero. The
forward pass finds ``tau`` with the sort-based algorithm of Peters et al. (the one the
``entmax`` package implements); the backward pass is the closed form

    dz = s * (g - sum(s * g) / sum(s)),    s = sqrt(p),

wrapped in ``jax.custom_vjp`` so that no gradient flows through the sort.

x-transformers 0.12 used it as the attention normaliser (``attn_use_entmax15``), applied
to the masked logits: masked entries (``-finfo.max``) get probability 0, and a row with
every entry masked is uniform (the attention output zeroes such rows anyway).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _entmax15_forward(z: Array, axis: int) -> Array:
    z = jnp.moveaxis(z, axis, -1)
    z = (z - jnp.max(z, axis=-1, keepdims=True)) / 2
    # The threshold always lies in [-1, 0) once the maximum is 0 (the top entry alone has
    # (0 - tau)^2 <= 1), so entries below -1 never enter the support. Clipping them to -2
    # changes nothing, keeps the squares below finite (a masked -finfo.max would overflow
    # to inf, and inf - inf gives NaN in the cumulative sums) and leaves a margin of 1
    # below any threshold, so rounding cannot pull a clipped entry into the support.
    z = jnp.maximum(z, -2.0)
    z_sorted = -jnp.sort(-z, axis=-1)  # descending
    n = z.shape[-1]
    rho = jnp.arange(1, n + 1, dtype=z.dtype)
    mean = jnp.cumsum(z_sorted, axis=-1) / rho
    mean_sq = jnp.cumsum(z_sorted**2, axis=-1) / rho
    ss = rho * (mean_sq - mean**2)
    delta = jnp.maximum((1 - ss) / rho, 0.0)
    tau = mean - jnp.sqrt(delta)  # the threshold if the support were the top k entries
    support = jnp.sum(tau <= z_sorted, axis=-1, keepdims=True)  # >= 1
    tau_star = jnp.take_along_axis(tau, support - 1, axis=-1)
    p = jnp.maximum(z - tau_star, 0.0) ** 2
    return jnp.moveaxis(p, -1, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _entmax15(z: Array, axis: int) -> Array:
    return _entmax15_forward(z, axis)


def _entmax15_fwd(z: Array, axis: int) -> tuple[Array, Array]:
    p = _entmax15_forward(z, axis)
    return p, p


def _entmax15_bwd(axis: int, p: Array, g: Array) -> tuple[Array]:
    s = jnp.sqrt(p)
    sg = s * g
    q = jnp.sum(sg, axis=axis, keepdims=True) / jnp.sum(s, axis=axis, keepdims=True)
    return (sg - q * s,)


_entmax15.defvjp(_entmax15_fwd, _entmax15_bwd)


def entmax15(z: Array, axis: int = -1) -> Array:
    """1.5-entmax of ``z`` along ``axis``: non-negative, sums to 1, often exactly sparse.

    Args:
      z: scores, any float dtype (computed in that dtype; use float32 or wider).
      axis: the axis to normalise over.

    Returns:
      Probabilities with the shape and dtype of ``z``.
    """
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"entmax15 needs floating-point scores, got dtype {z.dtype}")
    return _entmax15(z, axis % z.ndim)

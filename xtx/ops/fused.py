"""Backends over ``jax.nn.dot_product_attention``: XLA everywhere, cuDNN on NVIDIA GPUs.

``jax.nn.dot_product_attention`` groups query heads consecutively (query head n reads
kv head ``n // G``), while xtx follows x-transformers and tiles them (query head n
reads kv head ``n mod K``). The adapter permutes the query heads (and any per-head bias
or mask) into the consecutive order and permutes the output back, so results equal
``reference_attention``. Queries with no visible key get zeros, as in the reference.

Shapes: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, bias/mask broadcastable to
``[B, N, T, S]``; a ``RelativeBias`` is expanded to its dense ``[B|1, N, T, S]`` form
(these kernels take only dense biases).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xtx.ops.masks import AttentionMask
from xtx.ops.relative_bias import RelativeBias

Array = jax.Array


def _tiled_to_grouped(x: Array, K: int, axis: int) -> Array:
    """Reorders a head axis from tiled (n = g*K + k) to grouped (n = k*G + g)."""
    N = x.shape[axis]
    if N == 1 or K == N:
        return x
    shape = x.shape[:axis] + (N // K, K) + x.shape[axis + 1 :]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def _grouped_to_tiled(x: Array, K: int, axis: int) -> Array:
    N = x.shape[axis]
    if N == 1 or K == N:
        return x
    shape = x.shape[:axis] + (K, N // K) + x.shape[axis + 1 :]
    return jnp.swapaxes(x.reshape(shape), axis, axis + 1).reshape(x.shape)


def _heads_first(x: Array | None, B: int, T: int, S: int) -> Array | None:
    if x is None:
        return None
    x = jnp.asarray(x)
    while x.ndim < 4:
        x = x[None]
    return jnp.broadcast_to(x, (x.shape[0], x.shape[1], T, S))


def fused_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str = "xla",
) -> Array:
    """``jax.nn.dot_product_attention`` with xtx's head tiling and empty-row zeros.

    Args:
      q, k, v, mask, bias, scale: as ``xtx.ops.attention``.
      dropout_rate, dropout_rng: not supported by the fused kernels; must be 0.
      implementation: ``"xla"`` or ``"cudnn"`` (NVIDIA GPUs, float16/bfloat16).

    Returns:
      ``[B, T, N, H]``.
    """
    if dropout_rate > 0.0:
        raise ValueError("jax.nn.dot_product_attention has no dropout; use 'blockwise'")
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H**-0.5 if scale is None else scale
    allowed = None if mask is None else _heads_first(mask.dense(T, S), B, T, S)
    if isinstance(bias, RelativeBias):
        bias = bias.dense(T, S)
    bias = _heads_first(bias, B, T, S)
    qg = _tiled_to_grouped(q, K, axis=2)
    if allowed is not None:
        allowed = _tiled_to_grouped(allowed, K, axis=1)
    if bias is not None:
        bias = _tiled_to_grouped(bias.astype(q.dtype), K, axis=1)
    out = jax.nn.dot_product_attention(
        qg, k, v, bias=bias, mask=allowed, scale=scale, implementation=implementation
    )
    out = _grouped_to_tiled(out, K, axis=2)
    if allowed is not None:
        has_key = jnp.any(_grouped_to_tiled(allowed, K, axis=1), axis=-1)  # [B|1, N|1, T]
        out = jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], out, jnp.zeros((), out.dtype))
    return out


def xla_attention(q: Array, k: Array, v: Array, **kwargs) -> Array:
    return fused_attention(q, k, v, implementation="xla", **kwargs)


def cudnn_attention(q: Array, k: Array, v: Array, **kwargs) -> Array:
    return fused_attention(q, k, v, implementation="cudnn", **kwargs)

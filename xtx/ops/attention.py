"""Scaled dot-product attention behind one door (arXiv 1706.03762).

``attention(q, k, v, mask=..., bias=..., implementation="auto")`` is the only way xtx
layers compute attention. The ``"reference"`` backend below is a plain einsum
implementation and the oracle that every faster backend is tested against; faster
backends register themselves with ``register_backend`` and are chosen by
``implementation``.

Numerics follow x-transformers 2.x so that converted weights give the same numbers:
logits and softmax in float32, masked logits filled with the finite ``-finfo.max``
(not -inf), and a query whose keys are *all* masked gets a zero output instead of
uniform attention.

Grouped-query attention: with K key/value heads and N = G * K query heads, query head
``i`` reads key/value head ``i mod K`` (x-transformers tiles the kv heads; this is not
the Llama-style consecutive grouping).

Shapes: q ``[B, T, N, H]``, k and v ``[B, S, K, H]``, output ``[B, T, N, H]``.
``bias`` broadcasts to ``[B, N, T, S]`` and is added to the scaled logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xtx.ops.masks import AttentionMask

Array = jax.Array

_BACKENDS: dict[str, Callable[..., Array]] = {}


def register_backend(name: str, fn: Callable[..., Array]) -> None:
    """Makes ``fn`` selectable with ``attention(..., implementation=name)``.

    ``fn`` takes the same arguments as ``reference_attention``.
    """
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    return ("auto", *sorted(_BACKENDS))


def mask_value(dtype: Any) -> Array:
    """The finite fill value for masked logits (x-transformers' ``-finfo.max``)."""
    return jnp.asarray(-jnp.finfo(dtype).max, dtype)


def _check_shapes(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q [B, T, N, H], k [B, S, K, H], v [B, S, K, H]; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on [B, S, K]; got k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must agree on batch and head dim; got q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )


def attention_logits(
    q: Array,
    k: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
) -> tuple[Array, Array | None]:
    """Masked, biased, scaled logits in float32: ``[B, N, T, S]`` and the dense mask."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H**-0.5 if scale is None else scale
    # Query head i = g * K + kh reads kv head kh (tiling), so split N as (G, K).
    qg = q.reshape(B, T, N // K, K, H)
    logits = jnp.einsum("btgkh,bskh->bgkts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(B, N, T, S) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    dense = None if mask is None else mask.dense(T, S)
    if dense is not None:
        logits = jnp.where(dense, logits, mask_value(jnp.float32))
    return logits, dense


def attention_output(probs: Array, v: Array, dense_mask: Array | None) -> Array:
    """``probs [B, N, T, S] @ v [B, S, K, H] -> [B, T, N, H]``, zeroing rows with no key."""
    B, N, T, S = probs.shape
    K, H = v.shape[2], v.shape[3]
    pg = probs.astype(v.dtype).reshape(B, N // K, K, T, S)
    out = jnp.einsum("bgkts,bskh->btgkh", pg, v).reshape(B, T, N, H)
    if dense_mask is not None:
        has_key = jnp.any(dense_mask, axis=-1)  # [B|1, N|1, T]
        out = jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], out, jnp.zeros((), out.dtype))
    return out


def dropout_probs(probs: Array, rate: float, rng: Array | None) -> Array:
    if rate <= 0.0:
        return probs
    if rng is None:
        raise ValueError("attention dropout_rate > 0 needs dropout_rng (or deterministic=True)")
    keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
    return jnp.where(keep, probs / (1.0 - rate), jnp.zeros((), probs.dtype))


def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Einsum attention that materialises the ``[B, N, T, S]`` score matrix."""
    logits, dense = attention_logits(q, k, mask=mask, bias=bias, scale=scale)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout_probs(probs, dropout_rate, dropout_rng)
    return attention_output(probs, v, dense)


register_backend("reference", reference_attention)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str = "auto",
) -> Array:
    """Scaled dot-product attention.

    Args:
      q: queries ``[B, T, N, H]``.
      k: keys ``[B, S, K, H]`` with ``N % K == 0``.
      v: values ``[B, S, K, H]``.
      mask: an ``AttentionMask``; None attends everywhere.
      bias: additive logits bias broadcastable to ``[B, N, T, S]`` (T5, ALiBi, ...).
      scale: logits scale; default ``H ** -0.5``.
      dropout_rate: dropout on the attention probabilities.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      implementation: ``"auto"`` or a registered backend name (``available_backends()``).

    Returns:
      ``[B, T, N, H]`` in the dtype of ``v``.
    """
    _check_shapes(q, k, v)
    if mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an xtx.ops.AttentionMask, got {type(mask).__name__}")
    name = "reference" if implementation == "auto" else implementation
    if name not in _BACKENDS:
        raise ValueError(
            f"implementation must be one of {available_backends()}, got {implementation!r}"
        )
    return _BACKENDS[name](
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )

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
``bias`` broadcasts to ``[B, N, T, S]`` and is added to the scaled logits; a
``RelativeBias`` (a table over key-query distances) is expanded with ``.dense`` by the
reference and fused backends and block by block by the blockwise kernel.

Logit and probability extras (reference backend only), in x-transformers 2.31 order:
scaled logits ``+ prev_logits`` (residual attention, RealFormer 2012.11747), ``S + W·S``
(pre-softmax talking heads, 2003.02436), ``+ bias``, ``tanh(S/c)·c`` (logit softclamp),
masks; these are the ``logits`` that ``return_logits`` hands back. Then the normaliser:
softmax, 1.5-entmax (1909.00015) or hard one-hot attention with a straight-through
softmax gradient, optionally restricted to the ``sparse_topk`` largest logits of each row
(explicit sparse attention, 1912.11637); then dropout, then ``W·A`` (post-softmax
talking heads), then ``A·V``.

KV caches: ``cached_attention`` attends T new tokens over a fixed-size heads-major cache
``[B, K, L, H]`` that they extend, reading the old cache first and writing the new
tokens last, so that a decoding step reads the cache once without copying it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xtx.ops.blockwise import blockwise_attention, blockwise_supported
from xtx.ops.entmax import entmax15
from xtx.ops.fused import cudnn_attention, xla_attention
from xtx.ops.masks import AttentionMask
from xtx.ops.relative_bias import RelativeBias
from xtx.ops.splash import splash_attention, splash_unsupported_reason

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


def _check_mask(mask: Any) -> None:
    if mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an xtx.ops.AttentionMask, got {type(mask).__name__}")


def softclamp(x: Array, value: float) -> Array:
    """``tanh(x / value) * value``: a smooth clamp of ``x`` to ``(-value, value)``."""
    return jnp.tanh(x / value) * value


def mix_heads(scores: Array, weight: Array) -> Array:
    """Talking heads: ``out[:, g] = sum_h weight[h, g] * scores[:, h]`` over ``[B, N, T, S]``.

    ``weight`` is ``[N_in, N_out]`` (x-transformers' 1x1 ``Conv2d`` weight, transposed).
    """
    return jnp.einsum("bhts,hg->bgts", scores, weight.astype(scores.dtype))


def attention_logits(
    q: Array,
    k: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    prev_logits: Array | None = None,
    pre_talking_heads: Array | None = None,
    logit_softclamp: float | None = None,
) -> tuple[Array, Array | None]:
    """Masked, biased, scaled logits in float32: ``[B, N, T, S]`` and the dense mask.

    ``prev_logits``, ``pre_talking_heads`` and ``logit_softclamp`` are the extras of
    ``attention`` (see there); they are applied in x-transformers 2.31 order.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    # Query head i = g * K + kh reads kv head kh (tiling), so split N as (G, K).
    qg = q.reshape(B, T, N // K, K, H)
    raw = jnp.einsum("btgkh,bskh->bgkts", qg, k, preferred_element_type=jnp.float32)
    return _finish_logits(
        raw.reshape(B, N, T, S),
        mask=mask,
        bias=bias,
        scale=H**-0.5 if scale is None else scale,
        prev_logits=prev_logits,
        pre_talking_heads=pre_talking_heads,
        logit_softclamp=logit_softclamp,
    )


def _finish_logits(
    logits: Array,
    *,
    mask: AttentionMask | None,
    bias: Array | RelativeBias | None,
    scale: float,
    prev_logits: Array | None,
    pre_talking_heads: Array | None,
    logit_softclamp: float | None,
) -> tuple[Array, Array | None]:
    """``attention_logits`` from the raw float32 dot products ``q . k`` ``[B, N, T, S]``."""
    T, S = logits.shape[-2:]
    logits = logits * scale
    if prev_logits is not None:
        logits = logits + prev_logits.astype(jnp.float32)
    if pre_talking_heads is not None:
        # Residual form: identity-initialised weights double the logits at init.
        logits = logits + mix_heads(logits, pre_talking_heads)
    if isinstance(bias, RelativeBias):
        bias = bias.dense(T, S)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if logit_softclamp is not None:
        logits = softclamp(logits, logit_softclamp)
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
    return _zero_keyless_rows(out, dense_mask)


def _zero_keyless_rows(out: Array, dense_mask: Array | None) -> Array:
    """Zeroes the outputs ``[B, T, N, H]`` of queries that see no key at all."""
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


NORMALIZERS = ("softmax", "entmax15", "hard")


def keep_top_k(logits: Array, k: int) -> Array:
    """Masks every logit below the k-th largest of its row (ties are kept).

    Masked entries (``-finfo.max``) stay masked even when fewer than k keys are visible.
    With ``k >= S`` every key is kept (x-transformers 2.31 raises there; the seed skipped
    the top-k step, which is the same thing).
    """
    if k >= logits.shape[-1]:
        return logits
    fill = mask_value(logits.dtype)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where((logits >= kth) & (logits > fill), logits, fill)


def normalize_logits(
    logits: Array,
    normalizer: str = "softmax",
    *,
    sparse_topk: int | None = None,
    sparse_topk_straight_through: bool = False,
) -> Array:
    """Attention probabilities from masked logits ``[..., S]`` along the last axis.

    Args:
      logits: masked logits (masked entries hold ``-finfo.max``).
      normalizer: ``"softmax"``, ``"entmax15"`` (sparse, 1909.00015) or ``"hard"``
        (one-hot at the row's argmax forward, softmax gradient backward).
      sparse_topk: normalise over the k largest logits of each row only.
      sparse_topk_straight_through: forward as ``sparse_topk``, gradient of the dense
        normaliser (2505.22074); ignored without ``sparse_topk``.

    Returns:
      Probabilities with the shape and dtype of ``logits``.
    """

    def dense(x: Array) -> Array:
        if normalizer == "softmax":
            return jax.nn.softmax(x, axis=-1)
        if normalizer == "entmax15":
            return entmax15(x, axis=-1)
        soft = jax.nn.softmax(x, axis=-1)
        one_hot = jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=x.dtype)
        return one_hot + soft - jax.lax.stop_gradient(soft)

    if sparse_topk is None:
        return dense(logits)
    probs = dense(keep_top_k(logits, sparse_topk))
    if not sparse_topk_straight_through:
        return probs
    full = dense(logits)
    return jax.lax.stop_gradient(probs) + full - jax.lax.stop_gradient(full)


def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    prev_logits: Array | None = None,
    pre_talking_heads: Array | None = None,
    post_talking_heads: Array | None = None,
    logit_softclamp: float | None = None,
    sparse_topk: int | None = None,
    sparse_topk_straight_through: bool = False,
    normalizer: str = "softmax",
    return_logits: bool = False,
) -> Array | tuple[Array, Array]:
    """Einsum attention that materialises the ``[B, N, T, S]`` score matrix.

    Takes every argument of ``attention`` but ``implementation``; returns
    ``(out, logits)`` when ``return_logits``.
    """
    logits, dense = attention_logits(
        q,
        k,
        mask=mask,
        bias=bias,
        scale=scale,
        prev_logits=prev_logits,
        pre_talking_heads=pre_talking_heads,
        logit_softclamp=logit_softclamp,
    )
    probs = _probabilities(
        logits,
        normalizer=normalizer,
        sparse_topk=sparse_topk,
        sparse_topk_straight_through=sparse_topk_straight_through,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        post_talking_heads=post_talking_heads,
    )
    out = attention_output(probs, v, dense)
    return (out, logits) if return_logits else out


def _probabilities(
    logits: Array,
    *,
    normalizer: str,
    sparse_topk: int | None,
    sparse_topk_straight_through: bool,
    dropout_rate: float,
    dropout_rng: Array | None,
    post_talking_heads: Array | None,
) -> Array:
    """Masked logits -> the probabilities that multiply the values: the normaliser,
    dropout, then post-softmax talking heads."""
    probs = normalize_logits(
        logits,
        normalizer,
        sparse_topk=sparse_topk,
        sparse_topk_straight_through=sparse_topk_straight_through,
    )
    probs = dropout_probs(probs, dropout_rate, dropout_rng)
    if post_talking_heads is not None:
        probs = mix_heads(probs, post_talking_heads)
    return probs


register_backend("reference", reference_attention)
register_backend("blockwise", blockwise_attention)
register_backend("xla", xla_attention)
register_backend("cudnn", cudnn_attention)
register_backend("splash", splash_attention)


def _check_extras(
    q: Array,
    k: Array,
    *,
    prev_logits: Array | None,
    pre_talking_heads: Array | None,
    post_talking_heads: Array | None,
    logit_softclamp: float | None,
    sparse_topk: int | None,
    sparse_topk_straight_through: bool,
    normalizer: str,
    return_logits: bool,
) -> bool:
    """Validates the extras of ``attention``; True when any of them is in use."""
    B, T, N, _ = q.shape
    S = k.shape[1]
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if sparse_topk is not None:
        if isinstance(sparse_topk, bool) or not isinstance(sparse_topk, int) or sparse_topk < 1:
            raise ValueError(f"sparse_topk must be a positive int or None, got {sparse_topk!r}")
        if normalizer == "hard":
            raise ValueError("sparse_topk and normalizer='hard' exclude each other; pick one")
    elif sparse_topk_straight_through:
        raise ValueError("sparse_topk_straight_through=True needs sparse_topk")
    if logit_softclamp is not None and not logit_softclamp > 0:
        raise ValueError(f"logit_softclamp must be > 0, got {logit_softclamp!r}")
    heads = {"pre_talking_heads": pre_talking_heads, "post_talking_heads": post_talking_heads}
    for name, w in heads.items():
        if w is not None and tuple(w.shape) != (N, N):
            raise ValueError(f"{name} must have shape [N, N] = {(N, N)}, got {tuple(w.shape)}")
    if prev_logits is not None:
        try:
            jnp.broadcast_shapes(prev_logits.shape, (B, N, T, S))
        except ValueError:
            raise ValueError(
                f"prev_logits must broadcast to [B, N, T, S] = {(B, N, T, S)}, "
                f"got {prev_logits.shape}"
            ) from None
    return (
        prev_logits is not None
        or pre_talking_heads is not None
        or post_talking_heads is not None
        or logit_softclamp is not None
        or sparse_topk is not None
        or normalizer != "softmax"
        or return_logits
    )


# Key lengths from which the blockwise kernel beats the dense reference on CPU
# (fwd + bwd, causal, B=4, N=8, H=64 on the project's 2-core machine: 1.6x at 256,
# 2.5x at 1024; bench/throughput.py measures whole training steps).
BLOCKWISE_MIN_LENGTH = 256
_logged_fallbacks: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_fallbacks:
        _logged_fallbacks.add(reason)
        logging.getLogger("xtx").info("xtx attention fallback: %s", reason)


def _auto_backend(
    q: Array, k: Array, mask: AttentionMask | None, bias: Any, dropout_rate: float
) -> str:
    """The backend ``implementation="auto"`` picks for this platform and call.

    CPU: the blockwise kernel once sequences are long enough for its blocks to pay off;
    the einsum reference otherwise. NVIDIA GPU: cuDNN through
    ``jax.nn.dot_product_attention`` for half-precision inputs without dropout. TPU:
    Pallas splash attention when it handles the call (no bias, no dropout, static
    masks), else the blockwise kernel. Every fallback says why in a one-time log line.
    """
    platform = jax.default_backend()
    if platform == "gpu":
        if q.dtype in (jnp.bfloat16, jnp.float16) and dropout_rate == 0.0:
            return "cudnn"
        _log_fallback_once("cuDNN attention needs float16/bfloat16 inputs and no dropout")
        return "reference"
    if platform == "tpu":
        reason = splash_unsupported_reason(q, k, mask, bias, dropout_rate)
        if reason is None:
            return "splash"
        if blockwise_supported(mask):
            _log_fallback_once(f"splash attention unusable ({reason}); using the blockwise kernel")
            return "blockwise"
        _log_fallback_once(reason)
        return "reference"
    if platform != "cpu":
        _log_fallback_once(f"no fused attention kernel is wired for platform {platform!r} yet")
        return "reference"
    # Blocks pay off when the score matrix is large: a handful of queries (incremental
    # decoding) over a few thousand cached keys is faster in one dense pass than in a
    # loop over key blocks.
    if q.shape[1] * k.shape[1] < BLOCKWISE_MIN_LENGTH**2:
        return "reference"
    if not blockwise_supported(mask):
        _log_fallback_once("the blockwise kernel takes no dense explicit mask")
        return "reference"
    return "blockwise"


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str = "auto",
    prev_logits: Array | None = None,
    pre_talking_heads: Array | None = None,
    post_talking_heads: Array | None = None,
    logit_softclamp: float | None = None,
    sparse_topk: int | None = None,
    sparse_topk_straight_through: bool = False,
    normalizer: str = "softmax",
    return_logits: bool = False,
) -> Array | tuple[Array, Array]:
    """Scaled dot-product attention.

    Args:
      q: queries ``[B, T, N, H]``.
      k: keys ``[B, S, K, H]`` with ``N % K == 0``.
      v: values ``[B, S, K, H]``.
      mask: an ``AttentionMask``; None attends everywhere.
      bias: additive logits bias broadcastable to ``[B, N, T, S]``, or a
        ``RelativeBias`` (T5, ALiBi, dynamic: never materialised by the blockwise backend).
      scale: logits scale; default ``H ** -0.5``.
      dropout_rate: dropout on the attention probabilities.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      implementation: ``"auto"`` or a registered backend name (``available_backends()``).
      prev_logits: ``[B, N, T, S]`` logits of the previous layer, added right after
        scaling (residual attention, 2012.11747).
      pre_talking_heads: ``[N, N]`` head-mixing weight (``[in, out]``) applied to the
        logits in residual form ``S + W·S``, before ``bias`` (2003.02436).
      post_talking_heads: ``[N, N]`` head-mixing weight applied to the probabilities
        after dropout: ``A <- W·A``.
      logit_softclamp: clamp the biased logits to ``(-c, c)`` with ``tanh(S/c)·c``
        before masking.
      sparse_topk: attend to the k largest logits of each row only (1912.11637); every
        key when ``k >= S``.
      sparse_topk_straight_through: with ``sparse_topk``: the gradient of the dense
        normaliser.
      normalizer: ``"softmax"``, ``"entmax15"`` or ``"hard"`` (see ``normalize_logits``).
      return_logits: also return the final pre-normaliser logits ``[B, N, T, S]``
        (float32, masked), the ``prev_logits`` of the next layer.

    The extras (every argument after ``implementation``) run on the reference backend.

    Returns:
      ``[B, T, N, H]`` in the dtype of ``v``, and the logits when ``return_logits``.
    """
    _check_shapes(q, k, v)
    _check_mask(mask)
    if isinstance(bias, RelativeBias):
        bias.check(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    extras = dict(
        prev_logits=prev_logits,
        pre_talking_heads=pre_talking_heads,
        post_talking_heads=post_talking_heads,
        logit_softclamp=logit_softclamp,
        sparse_topk=sparse_topk,
        sparse_topk_straight_through=sparse_topk_straight_through,
        normalizer=normalizer,
        return_logits=return_logits,
    )
    if _check_extras(q, k, **extras):
        if implementation not in ("auto", "reference"):
            raise ValueError(
                f"implementation={implementation!r} does not support the logit/probability "
                "extras (prev_logits, talking heads, logit_softclamp, sparse_topk, "
                "normalizer, return_logits); use 'auto' or 'reference'"
            )
        return reference_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            scale=scale,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
            **extras,
        )
    name = (
        _auto_backend(q, k, mask, bias, dropout_rate)
        if implementation == "auto"
        else implementation
    )
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


# The logit/probability extras of ``attention`` and their defaults.
_EXTRA_DEFAULTS: dict[str, Any] = dict(
    prev_logits=None,
    pre_talking_heads=None,
    post_talking_heads=None,
    logit_softclamp=None,
    sparse_topk=None,
    sparse_topk_straight_through=False,
    normalizer="softmax",
    return_logits=False,
)


def _after(x: Array, y: Array) -> Array:
    """``x`` unchanged, but computed from ``y``: adds a negative zero (``x + -0.0 == x``
    bit for bit, signed zeros included) derived from one element of ``y``.

    XLA orders work by data dependencies only. A cache write that depends on nothing
    the attention reads may be scheduled before those reads, so XLA keeps the old cache
    alive with a full copy per layer and step. Making the write depend on the attention
    output removes that copy (2-3x faster attention per decoding step on CPU).
    """
    probe = jax.lax.stop_gradient(y.reshape(-1)[0]).astype(jnp.float32)
    neg_zero = -jnp.abs(jnp.where(jnp.isfinite(probe), probe, 0.0) * 0.0)
    return x + neg_zero.astype(x.dtype)


def cached_attention(
    q: Array,
    k_new: Array,
    v_new: Array,
    keys: Array,
    values: Array,
    index: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | RelativeBias | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str = "auto",
    prefix: tuple[Array, Array] | None = None,
    **extras: Any,
) -> tuple[Array | tuple[Array, Array], Array, Array]:
    """Attention of T new tokens over a fixed-size key/value cache they extend.

    The keys and values attended to are the cache with slots ``[index, index + T)``
    replaced by the new tokens'; the result equals writing them and calling
    ``attention`` on the whole cache. When the dense reference does the work (the
    ``"auto"`` choice while ``T * L`` is small: incremental decoding), the cache is not
    written before it is read: the scores and the weighted sum read the old cache, the
    new tokens' own scores and values are patched in on the small ``[B, N, T, L]``
    side, and the cache is written last. Every byte of the cache is then read once per
    step, with no copy of it. Other backends get the written cache.

    Args:
      q: queries ``[B, T, N, H]``.
      k_new: the new tokens' keys ``[B, T, K, H]``.
      v_new: the new tokens' values ``[B, T, K, H]``.
      keys: the key cache, heads-major ``[B, K, L, H]``.
      values: the value cache ``[B, K, L, H]``.
      index: int32 ``[]``: the slot of the first new token.
      mask, bias, scale, dropout_rate, dropout_rng, implementation, and the extras
        (``prev_logits`` ... ``return_logits``): as for ``attention``, over the L slots
        (over M + L keys, memory first, with ``prefix``).
      prefix: optional memory key/values ``(k, v)``, each ``[B|1, M, K, H]``, attended
        before the cache (persistent memory, 1907.01470). The dense path scores them
        apart and never concatenates them with the cache.

    Returns:
      ``(attention's result, keys, values)`` with the updated caches.
    """
    unknown = sorted(set(extras) - set(_EXTRA_DEFAULTS))
    if unknown:
        raise TypeError(f"cached_attention got unexpected keyword arguments {unknown}")
    extras = {**_EXTRA_DEFAULTS, **extras}
    B, T, N, H = q.shape
    K, L = keys.shape[1], keys.shape[2]
    if k_new.shape != (B, T, K, H) or v_new.shape != (B, T, K, H):
        raise ValueError(
            f"k_new and v_new must have shape [B, T, K, H] = {(B, T, K, H)}, "
            f"got {k_new.shape} and {v_new.shape}"
        )
    if keys.shape != values.shape or keys.shape != (B, K, L, H):
        raise ValueError(
            f"keys and values must have shape [B, K, L, H] = {(B, K, L, H)}, "
            f"got {keys.shape} and {values.shape}"
        )
    M, mem_k, mem_v = 0, None, None
    if prefix is not None:
        mem_k, mem_v = prefix
        M = mem_k.shape[1] if mem_k.ndim == 4 else -1
        for name, m in (("k", mem_k), ("v", mem_v)):
            if m.ndim != 4 or m.shape[0] not in (1, B) or m.shape[1:] != (M, K, H):
                raise ValueError(
                    f"prefix {name} must have shape [B|1, M, K, H] with B={B}, K={K}, H={H} "
                    f"(and k, v alike), got {tuple(m.shape)}"
                )
        mem_k, mem_v = (jnp.broadcast_to(m, (B, M, K, H)).astype(q.dtype) for m in prefix)
    k_new, v_new = k_new.astype(keys.dtype), v_new.astype(values.dtype)
    start = (0, 0, index, 0)

    def write(k_new, v_new):
        return (
            jax.lax.dynamic_update_slice(keys, jnp.swapaxes(k_new, 1, 2), start),
            jax.lax.dynamic_update_slice(values, jnp.swapaxes(v_new, 1, 2), start),
        )

    def as_bskh(cache, memory=None):  # [B, K, L, H] -> [B, (M +) L, K, H]
        cache = jnp.swapaxes(cache, 1, 2).astype(q.dtype)
        return cache if memory is None else jnp.concatenate([memory, cache], axis=1)

    kwargs = dict(
        mask=mask,
        bias=bias,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        implementation=implementation,
        **extras,
    )
    _check_mask(mask)
    all_keys = jax.ShapeDtypeStruct((B, M + L, K, H), q.dtype)  # what attention would see
    extras_used = _check_extras(q, all_keys, **extras)
    auto_dense = implementation == "auto" and (
        extras_used or _auto_backend(q, all_keys, mask, bias, dropout_rate) == "reference"
    )
    dense = implementation == "reference" or auto_dense
    if not dense:
        keys, values = write(k_new, v_new)
        k_all, v_all = as_bskh(keys, mem_k), as_bskh(values, mem_v)
        return attention(q, k_all, v_all, **kwargs), keys, values

    if isinstance(bias, RelativeBias):
        bias.check(B, N, T, M + L)
    # Explicit dot_generals with the cache as the first operand of the scores and the
    # second of the weighted sum, each contracting its natural axis: XLA's CPU dots then
    # read the [B, K, L, H] cache in place (einsum let it pick orders that transpose it).
    G = N // K
    batch_kv = ((0, 1), (0, 1))
    qk = q.reshape(B, T, G, K, H).transpose(0, 3, 1, 2, 4).reshape(B, K, T * G, H)
    f32 = jnp.float32
    cached_k, fresh_k = keys.astype(q.dtype), jnp.swapaxes(k_new, 1, 2).astype(q.dtype)
    raw = jax.lax.dot_general(cached_k, qk, (((3,), (3,)), batch_kv), preferred_element_type=f32)
    fresh = jax.lax.dot_general(fresh_k, qk, (((3,), (3,)), batch_kv), preferred_element_type=f32)
    raw = jax.lax.dynamic_update_slice(raw, fresh, (0, 0, index, 0))  # [B, K, L, T * G]
    if prefix is not None:  # memory keys first, scored apart: [B, K, M + L, T * G]
        mk = jnp.swapaxes(mem_k, 1, 2)
        mem = jax.lax.dot_general(mk, qk, (((3,), (3,)), batch_kv), preferred_element_type=f32)
        raw = jnp.concatenate([mem, raw], axis=2)
    S = M + L
    raw = raw.reshape(B, K, S, T, G).transpose(0, 4, 1, 3, 2)  # [B, G, K, T, S]
    logits, dense_mask = _finish_logits(
        raw.reshape(B, N, T, S),
        mask=mask,
        bias=bias,
        scale=H**-0.5 if scale is None else scale,
        prev_logits=extras["prev_logits"],
        pre_talking_heads=extras["pre_talking_heads"],
        logit_softclamp=extras["logit_softclamp"],
    )
    probs = _probabilities(
        logits,
        normalizer=extras["normalizer"],
        sparse_topk=extras["sparse_topk"],
        sparse_topk_straight_through=extras["sparse_topk_straight_through"],
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        post_talking_heads=extras["post_talking_heads"],
    )
    cached_v, fresh_v = values.astype(q.dtype), jnp.swapaxes(v_new, 1, 2).astype(q.dtype)
    pg = probs.astype(q.dtype).reshape(B, G, K, T, S).transpose(0, 2, 3, 1, 4)
    pg = pg.reshape(B, K, T * G, S)
    if prefix is not None:
        p_mem, pg = pg[..., :M], pg[..., M:]
    p_new = jax.lax.dynamic_slice_in_dim(pg, index, T, axis=-1)  # [B, K, T * G, T]
    p_old = jax.lax.dynamic_update_slice(pg, jnp.zeros_like(p_new), (0, 0, 0, index))
    out = jax.lax.dot_general(p_old, cached_v, (((3,), (2,)), batch_kv))
    out = out + jax.lax.dot_general(p_new, fresh_v, (((3,), (2,)), batch_kv))  # [B, K, TG, H]
    if prefix is not None:
        mv = jnp.swapaxes(mem_v, 1, 2)  # [B, K, M, H]
        out = out + jax.lax.dot_general(p_mem, mv, (((3,), (2,)), batch_kv))
    out = out.reshape(B, K, T, G, H).transpose(0, 2, 3, 1, 4)  # [B, T, G, K, H]
    out = _zero_keyless_rows(out.reshape(B, T, N, H), dense_mask)
    # Written last, and made to depend on the output so that XLA orders it so.
    keys, values = write(_after(k_new, out), _after(v_new, out))
    result = (out, logits) if extras["return_logits"] else out
    return result, keys, values

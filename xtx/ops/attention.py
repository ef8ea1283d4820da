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
    scale = H**-0.5 if scale is None else scale
    # Query head i = g * K + kh reads kv head kh (tiling), so split N as (G, K).
    qg = q.reshape(B, T, N // K, K, H)
    logits = jnp.einsum("btgkh,bskh->bgkts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(B, N, T, S) * scale
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
    probs = normalize_logits(
        logits,
        normalizer,
        sparse_topk=sparse_topk,
        sparse_topk_straight_through=sparse_topk_straight_through,
    )
    probs = dropout_probs(probs, dropout_rate, dropout_rng)
    if post_talking_heads is not None:
        probs = mix_heads(probs, post_talking_heads)
    out = attention_output(probs, v, dense)
    return (out, logits) if return_logits else out


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
    if mask is not None and not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an xtx.ops.AttentionMask, got {type(mask).__name__}")
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

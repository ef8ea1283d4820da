"""Splash attention (Pallas, TPU) behind xtx's attention signature.

Splash is the sparse flash-attention kernel that ships with JAX
(``jax.experimental.pallas.ops.tpu.splash_attention``): FlashAttention (arXiv 2205.14135)
with a block-sparse schedule built ahead of time from a static mask, so key blocks that
a causal or sliding-window mask hides are never loaded. Off TPU it runs in Pallas
interpret mode, which is how the tests check it on CPU.

This adapter turns xtx's call into the kernel's:

- Layout: the kernel takes ``[N, T, H]`` per batch element and does not scale ``q``; we
  fold ``scale`` into ``q``, go heads-major once and ``vmap`` over the batch.
- Grouped-query heads: splash's MHA kernel groups consecutively (query head n reads kv
  head ``n // G``), xtx tiles (query head n reads kv head ``n mod K``). Query heads are
  permuted into the consecutive order and back, as in ``xtx.ops.fused``; the kernel
  then sums the dk/dv of a group itself.
- Static masks: ``causal`` and ``window`` become a ``CausalMask`` or ``LocalMask`` whose
  ``offset`` is our ``q_offset`` unchanged (both mean "key position of query 0";
  ``None`` is ``S - T``). These must be Python ints: the schedule is numpy built once per
  configuration and cached.
- Lengths: every block size must be a multiple of 128 (TPU lanes; segment ids need it on
  both axes). T and S are padded up to the blocks and the output cut back.
- Dynamic masks: segment ids go to the kernel as they are. Key padding, and the keys
  added by padding S, get a segment id that no query has (one below the smallest query
  id of the batch element), so they combine with real segment ids by the same rule.
- Empty rows: the kernel averages masked keys (or divides by zero) for a query that
  sees no key; those rows are set to zero after the kernel, as in the reference. The
  ``where`` also stops their cotangent, so the backward stays finite.

Not supported (see ``splash_unsupported_reason``): an additive bias, dropout, an explicit
dense mask, and a per-row or traced ``q_offset``.

The kernel is written for one device. Under a multi-device mesh call it inside
``jax.shard_map`` over batch (and heads); pallas calls are not partitioned automatically.

Shapes: q ``[B, T, N, H]``, k/v ``[B, S, K, H]``, output ``[B, T, N, H]``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from xtx.ops.masks import AttentionMask

Array = jax.Array

BlockSizes = splash.BlockSizes

_LANES = 128  # the kernel's block sizes must be multiples of the TPU lane count
_MAX_BLOCK = 512  # largest default block, MaxText's default splash block size
_BLOCK_FIELDS = (
    "block_q",
    "block_kv",
    "block_kv_compute",
    "block_q_dkv",
    "block_kv_dkv",
    "block_kv_dkv_compute",
    "block_q_dq",
    "block_kv_dq",
)


def _static_q_offset(mask: AttentionMask, T: int, S: int) -> int | None:
    """``q_offset`` as a Python int, or None when it is an array or traced."""
    offset = mask.q_offset
    if offset is None:
        return S - T
    if isinstance(offset, bool):
        return None
    if isinstance(offset, int | np.integer):
        return int(offset)
    if isinstance(offset, jax.core.Tracer) or np.ndim(offset) != 0:
        return None
    return int(offset)


def splash_unsupported_reason(
    q: Array,
    k: Array,
    mask: AttentionMask | None,
    bias: Array | None,
    dropout_rate: float,
) -> str | None:
    """Why the splash backend cannot take this call, or None when it can.

    Args:
      q: queries ``[B, T, N, H]``.
      k: keys ``[B, S, K, H]``.
      mask, bias, dropout_rate: as ``xtx.ops.attention``.

    Returns:
      None, or a short reason naming what is unsupported.
    """
    if bias is not None:
        return "splash attention takes no additive bias (T5, ALiBi, ...)"
    if dropout_rate > 0.0:
        return "splash attention has no dropout"
    if mask is None:
        return None
    if mask.prefix:
        return "prefix keys (seen by every query) are not a splash mask"
    if mask.explicit is not None:
        return "splash attention takes no explicit dense mask"
    if (mask.causal or mask.window != (None, None)) and _static_q_offset(
        mask, q.shape[1], k.shape[1]
    ) is None:
        return (
            "splash attention needs q_offset as a Python int (its block schedule is built "
            f"ahead of time), got {type(mask.q_offset).__name__} of shape "
            f"{tuple(np.shape(mask.q_offset))}"
        )
    return None


def _default_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` rounded up to 128."""
    padded = -(-length // _LANES) * _LANES
    block = _MAX_BLOCK
    while padded % block:
        block //= 2
    return block


def _resolve_block_sizes(block_sizes: BlockSizes | None, T: int, S: int) -> BlockSizes:
    """The given block sizes, checked, or per-length defaults with backward blocks."""
    if block_sizes is None:
        bq, bkv = _default_block(T), _default_block(S)
        return BlockSizes(
            block_q=bq,
            block_kv=bkv,
            block_kv_compute=bkv,
            block_q_dkv=bq,
            block_kv_dkv=bkv,
            block_kv_dkv_compute=bkv,
            block_q_dq=bq,
            block_kv_dq=bkv,
        )
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            "block_sizes must be a splash_attention.BlockSizes or None, got "
            f"{type(block_sizes).__name__}"
        )
    if not block_sizes.has_backward_blocks:
        raise ValueError("block_sizes must set the backward blocks (block_q_dkv, ...) as well")
    for name in _BLOCK_FIELDS:
        size = getattr(block_sizes, name)
        if size is not None and size % _LANES:
            raise ValueError(f"block_sizes.{name} must be a multiple of {_LANES}, got {size}")
    return block_sizes


def _padded_lengths(block_sizes: BlockSizes, T: int, S: int) -> tuple[int, int]:
    """T and S rounded up so that every forward and backward block divides them."""
    b = block_sizes
    q_blocks = [b.block_q, b.block_q_dkv, b.block_q_dq]
    kv_blocks = [b.block_kv, b.block_kv_dkv, b.block_kv_dq]
    q_unit = math.lcm(*(x for x in q_blocks if x is not None))
    kv_unit = math.lcm(*(x for x in kv_blocks if x is not None))
    return -(-T // q_unit) * q_unit, -(-S // kv_unit) * kv_unit


@functools.lru_cache(maxsize=64)
def _splash_kernel(
    num_heads: int,
    q_len: int,
    kv_len: int,
    window: tuple[int | None, int | None] | None,
    offset: int,
    block_sizes: BlockSizes,
    interpret: bool,
):
    """The kernel for one static configuration; building it scans the mask in numpy."""
    shape = (q_len, kv_len)
    if window is None:
        head_mask = splash.FullMask(shape)
    elif window == (None, 0):
        head_mask = splash.CausalMask(shape, offset=offset)
    else:
        head_mask = splash.LocalMask(shape, window_size=window, offset=offset)
    # The kernel holds its schedule as jax arrays; made under a trace they would be
    # tracers, and the cache would leak them into the next trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            splash.MultiHeadMask([head_mask] * num_heads),
            block_sizes=block_sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _static_window(mask: AttentionMask | None) -> tuple[int | None, int | None] | None:
    """``(left, right)`` of the causal/window mask with causal folded in; None if absent."""
    if mask is None or (not mask.causal and mask.window == (None, None)):
        return None
    left, right = mask.window
    if mask.causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _static_rows_with_key(
    T: int, S: int, offset: int, window: tuple[int | None, int | None] | None
) -> np.ndarray:
    """``[T]`` bool: whether the causal/window mask leaves query i any key in ``[0, S)``."""
    if window is None:
        return np.full(T, S > 0)
    left, right = window
    pos = offset + np.arange(T)
    lo = np.zeros(T, np.int64) if left is None else np.maximum(pos - left, 0)
    hi = np.full(T, S - 1) if right is None else np.minimum(pos + right, S - 1)
    return lo <= hi


def _check_inputs(q: Array, k: Array, v: Array, mask: AttentionMask | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "splash_attention expects q [B, T, N, H], k [B, S, K, H], v [B, S, K, H]; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if v.shape != k.shape or k.shape[0] != B or k.shape[3] != H or N % K:
        raise ValueError(
            "splash_attention expects k and v [B, S, K, H] with q's B and H and N % K == 0; "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if mask is None:
        return
    expected = {
        "key_padding": (mask.key_padding, (B, S)),
        "q_segment_ids": (mask.q_segment_ids, (B, T)),
        "kv_segment_ids": (mask.kv_segment_ids, (B, S)),
    }
    for name, (x, shape) in expected.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"mask.{name} must have shape {shape}, got {tuple(x.shape)}")


def _kernel_segment_ids(
    mask: AttentionMask | None, B: int, T: int, S: int, T_pad: int, S_pad: int
) -> tuple[Array, Array] | None:
    """``[B, T_pad]`` and ``[B, S_pad]`` int32 ids, or None when nothing needs them."""
    has_segments = mask is not None and mask.q_segment_ids is not None
    key_padding = None if mask is None else mask.key_padding
    if not has_segments and key_padding is None and S_pad == S:
        return None
    if has_segments:
        q_ids = mask.q_segment_ids.astype(jnp.int32)  # [B, T]
        kv_ids = mask.kv_segment_ids.astype(jnp.int32)  # [B, S]
    else:
        q_ids = jnp.zeros((B, T), jnp.int32)
        kv_ids = jnp.zeros((B, S), jnp.int32)
    # One below every query id of the batch element: no query can match it (ids must
    # stay above int32's minimum).
    hidden = jnp.min(q_ids, axis=1, keepdims=True) - 1  # [B, 1]
    if key_padding is not None:
        kv_ids = jnp.where(key_padding.astype(bool), kv_ids, hidden)
    kv_ids = jnp.concatenate([kv_ids, jnp.broadcast_to(hidden, (B, S_pad - S))], axis=1)
    # Padded queries are cut from the output; any id will do.
    q_ids = jnp.pad(q_ids, ((0, 0), (0, T_pad - T)), mode="edge")
    return q_ids, kv_ids


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: AttentionMask | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
) -> Array:
    """Attention through the Pallas splash kernel, equal to ``reference_attention``.

    Args:
      q: queries ``[B, T, N, H]``.
      k: keys ``[B, S, K, H]`` with ``N % K == 0`` (query head i reads kv head i mod K).
      v: values ``[B, S, K, H]``.
      mask: an ``AttentionMask`` without ``explicit``; a causal or window mask needs a
        Python-int ``q_offset`` (or None).
      bias: must be None.
      scale: logits scale; default ``H ** -0.5``.
      dropout_rate: must be 0.
      dropout_rng: unused (no dropout).
      interpret: run the kernel in Pallas interpret mode; default: unless on TPU.
      block_sizes: ``splash_attention.BlockSizes`` with forward and backward blocks, all
        multiples of 128; default: the largest of 512/256/128 that divides T (and S)
        rounded up to 128.

    Returns:
      ``[B, T, N, H]`` in the dtype of ``v``; zeros for a query that sees no key.

    Raises:
      ValueError: for shapes that do not fit and for calls the kernel cannot take (the
        message is ``splash_unsupported_reason``).
    """
    del dropout_rng
    _check_inputs(q, k, v, mask)
    reason = splash_unsupported_reason(q, k, mask, bias, dropout_rate)
    if reason is not None:
        raise ValueError(f"{reason}; use another implementation, e.g. 'reference'")
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = H**-0.5 if scale is None else scale
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    block_sizes = _resolve_block_sizes(block_sizes, T, S)
    T_pad, S_pad = _padded_lengths(block_sizes, T, S)
    window = _static_window(mask)
    offset = 0 if window is None else _static_q_offset(mask, T, S)
    kernel = _splash_kernel(N, T_pad, S_pad, window, offset, block_sizes, interpret)

    # Tiled head n = g * K + j moves to grouped slot j * G + g, which reads kv head j.
    to_grouped = np.arange(N).reshape(G, K).T.reshape(N)
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)[:, to_grouped]  # [B, N, T, H]
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, T_pad - T), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, S_pad - S), (0, 0)))  # [B, K, S, H]
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, S_pad - S), (0, 0)))

    segment_ids = _kernel_segment_ids(mask, B, T, S, T_pad, S_pad)
    if segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)  # [B, N, T_pad, H]
    else:
        out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, splash.SegmentIds(qs, ks)))(
            qh, kh, vh, *segment_ids
        )
    out = out[:, np.argsort(to_grouped), :T].transpose(0, 2, 1, 3).astype(v.dtype)  # [B, T, N, H]

    if mask is None:
        return out
    if mask.key_padding is not None or mask.q_segment_ids is not None:
        # A fused compare-and-reduce: XLA does not materialise the [B, T, S] mask.
        has_key = jnp.any(mask.dense(T, S), axis=-1)[:, 0]  # [B|1, T]
    else:
        has_key = _static_rows_with_key(T, S, offset, window)[None]  # [1, T]
        if has_key.all():
            return out
    return jnp.where(has_key[:, :, None, None], out, jnp.zeros((), out.dtype))

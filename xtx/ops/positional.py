"""Positional schemes as pure functions: sinusoids, rotary (RoPE, xPos), T5 buckets, ALiBi.

Every function here is a pure, jittable JAX function with no parameters of its
own; learned tables (the T5 bucket embedding) come in as arguments. The math
follows x-transformers 2.31 (``x_transformers/x_transformers.py``) to float32
round-off, and the half-split rotary layout of x-transformers 0.12 is offered
next to the interleaved one of 2.x.

Papers:
  * sinusoidal embedding: Vaswani et al., arXiv:1706.03762; the scaled variant
    (learned scalar, kept outside this module): Hua et al., arXiv:2202.10447.
  * rotary embedding (RoPE): Su et al., arXiv:2104.09864; partial rotary dims as
    in GPT-J; position interpolation: Chen et al., arXiv:2306.15595; the base
    rescale is the "NTK-aware" trick, see Peng et al. (YaRN), arXiv:2309.00071.
  * xPos: Sun et al., arXiv:2212.10554.
  * T5 relative position bias: Raffel et al., arXiv:1910.10683.
  * ALiBi: Press et al., arXiv:2108.12409.

Shapes: ``[B, T, N, H]`` = batch, time (queries), heads, head dim; S is the key
length. Positions are ``[T]`` (shared by the batch) or ``[B, T]``. Attention
biases come out heads-first, ``[N, T, S]`` (``[B, N, T, S]`` for batched
positions), ready to add to ``[B, N, T, S]`` logits.

Positions are passed explicitly, so right alignment of queries against keys
(kv-cache, Transformer-XL memories at negative positions) is the caller's job:
x-transformers uses query positions ``S - T .. S - 1`` against keys ``0 .. S - 1``.

Rotary math is done in at least float32 (float64 stays float64), as
x-transformers does under ``disable_autocast``, and the result is cast back to
the input dtype. Static arguments (dims, bucket counts, flags) must be Python
values; mark them static when you ``jax.jit`` a caller.
"""

import math

import jax.numpy as jnp
import numpy as np


def _require_positive_even(name, value):
    if not isinstance(value, int) or value <= 0 or value % 2:
        raise ValueError(f"{name} must be a positive even int, got {value!r}")


def _require_integer_dtype(name, array):
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {array.dtype}")


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def sinusoidal_embedding(positions, dim, *, theta=10000.0):
    """Fixed sinusoidal position embedding, halves ``[sin, cos]`` concatenated.

    This is x-transformers' ``ScaledSinusoidalEmbedding`` without its learned
    scalar (initialised to ``dim ** -0.5``): with ``k = dim // 2``,
    ``inv_freq[i] = theta ** (-i / k)`` and ``emb = [sin(p * inv_freq), cos(p * inv_freq)]``.

    Args:
      positions: int or float array of any shape ``[...]``.
      dim: embedding width, a positive even int.
      theta: frequency base.

    Returns:
      float32 array ``[..., dim]``.
    """
    _require_positive_even("dim", dim)
    if theta <= 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    positions = jnp.asarray(positions)
    half_dim = dim // 2
    freq_seq = jnp.arange(half_dim, dtype=jnp.float32) / half_dim
    inv_freq = jnp.float32(theta) ** -freq_seq  # [dim / 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., dim / 2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rotary_inv_freq(rot_dim, *, base=10000.0, base_rescale_factor=1.0):
    """Rotary inverse frequencies ``base' ** (-2i / rot_dim)``, i = 0 .. rot_dim/2 - 1.

    As x-transformers 2.31 ``RotaryEmbedding.inv_freq`` (bit for bit on CPU):
    ``base' = base * base_rescale_factor ** (rot_dim / (rot_dim - 2))``, then
    ``1 / base' ** (arange(0, rot_dim, 2) / rot_dim)`` in float32.

    Args:
      rot_dim: number of rotated dims per head, a positive even int. With
        ``base_rescale_factor != 1`` it must be at least 4 (the rescale exponent
        divides by ``rot_dim - 2``).
      base: frequency base (Python float).
      base_rescale_factor: NTK-aware rescale of the base (Python float).

    Returns:
      float32 array ``[rot_dim // 2]``.
    """
    _require_positive_even("rot_dim", rot_dim)
    if base <= 0:
        raise ValueError(f"base must be > 0, got {base!r}")
    if base_rescale_factor <= 0:
        raise ValueError(f"base_rescale_factor must be > 0, got {base_rescale_factor!r}")
    if base_rescale_factor != 1.0:
        if rot_dim == 2:
            raise ValueError(
                f"rot_dim must be >= 4 when base_rescale_factor != 1, got {rot_dim} "
                f"(base_rescale_factor={base_rescale_factor!r})"
            )
        base = base * base_rescale_factor ** (rot_dim / (rot_dim - 2))
    exponents = jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / jnp.float32(rot_dim)
    return 1.0 / (jnp.float32(base) ** exponents)


def rotary_angles(positions, inv_freq, *, interpolation_factor=1.0):
    """Rotation angles ``positions * inv_freq / interpolation_factor`` in float32.

    Args:
      positions: int or float array ``[..., T]``.
      inv_freq: ``[rot_dim // 2]`` from :func:`rotary_inv_freq`.
      interpolation_factor: position interpolation factor, >= 1 as upstream.

    Returns:
      float32 array ``[..., T, rot_dim // 2]``.
    """
    inv_freq = jnp.asarray(inv_freq)
    if inv_freq.ndim != 1:
        raise ValueError(f"inv_freq must be 1-D [rot_dim // 2], got shape {inv_freq.shape}")
    if interpolation_factor < 1.0:
        raise ValueError(f"interpolation_factor must be >= 1, got {interpolation_factor!r}")
    positions = jnp.asarray(positions)
    # Same order as upstream: outer product in float32, then the division.
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return angles / interpolation_factor


def _full_layout(half, interleaved):
    """[..., r/2] -> [..., r]: pairs (2k, 2k+1) if interleaved, else halves (k, k + r/2)."""
    if interleaved:
        return jnp.repeat(half, 2, axis=-1)
    return jnp.concatenate([half, half], axis=-1)


def _rotate_half(x, interleaved):
    """The 90-degree rotation of every pair: (a, b) -> (-b, a)."""
    if interleaved:
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1)
        return rotated.reshape(x.shape)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def xpos_scale(positions, rot_dim, *, scale_base=512, max_position=None, interleaved=True):
    """Per-dim xPos scale for queries; keys use its reciprocal.

    As x-transformers 2.31 ``RotaryEmbedding`` with ``use_xpos=True``:
    ``zeta_k = (2k + 0.4 r) / (1.4 r)``, ``power = (t - max_pos // 2) / scale_base``,
    ``scale = zeta ** power``, where ``max_pos = max(positions) + 1`` over all
    positions (the whole batch, XL memories and cache included).

    Args:
      positions: int or float array ``[..., T]``.
      rot_dim: number of rotated dims, a positive even int.
      scale_base: the xPos temperature (512 upstream).
      max_position: what x-transformers calls ``max_pos``: one past the largest
        position. Defaults to ``max(positions) + 1``; pass it when ``positions``
        is only a slice of the sequence (a cached decoding step) so the centre
        stays where the full sequence puts it.
      interleaved: lay the ``rot_dim // 2`` scales out as pairs ``(2k, 2k+1)``
        (x-transformers 2.x) or as halves ``(k, k + rot_dim/2)``, matching
        :func:`apply_rotary`.

    Returns:
      float32 array ``[..., T, rot_dim]``.
    """
    _require_positive_even("rot_dim", rot_dim)
    if scale_base <= 0:
        raise ValueError(f"scale_base must be > 0, got {scale_base!r}")
    positions = jnp.asarray(positions)
    if positions.ndim < 1:
        raise ValueError(f"positions must be at least 1-D [..., T], got shape {positions.shape}")
    if max_position is None:
        max_position = jnp.max(positions) + 1
    power = (positions - max_position // 2).astype(jnp.float32) / scale_base  # [..., T]
    zeta = (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) + 0.4 * rot_dim) / (1.4 * rot_dim)
    scale = zeta ** power[..., None]  # [..., T, rot_dim / 2]
    return _full_layout(scale, interleaved)


def apply_rotary(
    x,
    positions,
    *,
    rot_dim=None,
    base=10000.0,
    interleaved=True,
    interpolation_factor=1.0,
    base_rescale_factor=1.0,
    scale=None,
    inv_freq=None,
):
    """Rotate the first ``rot_dim`` dims of every head by position (RoPE).

    ``out = x * cos(phi) * s + rotate_half(x) * sin(phi) * s`` on the rotated
    dims, exactly x-transformers' ``apply_rotary_pos_emb``; dims past
    ``rot_dim`` pass through unchanged.

    Args:
      x: ``[..., T, N, H]`` queries or keys.
      positions: int or float ``[T]``, or ``[B, T]`` matching x's batch axis.
      rot_dim: rotated dims per head, even, at most H; defaults to H (or to
        ``2 * len(inv_freq)`` when ``inv_freq`` is given).
      base: frequency base; ignored when ``inv_freq`` is given.
      interleaved: True pairs dims ``(2k, 2k+1)`` (x-transformers >= 1.30,
        2.x); False pairs ``(k, k + rot_dim/2)`` (x-transformers 0.12). Weights
        trained with one layout do not transfer to the other.
      interpolation_factor: positions are divided by this (>= 1).
      base_rescale_factor: NTK-aware base rescale; ignored with ``inv_freq``.
      scale: optional ``[T, rot_dim]`` or ``[B, T, rot_dim]`` multiplier of the
        rotated dims: :func:`xpos_scale` for queries, its reciprocal for keys.
        Its layout must match ``interleaved``.
      inv_freq: optional precomputed ``[rot_dim // 2]`` (e.g. the persistent
        ``rotary_pos_emb.inv_freq`` buffer of a PyTorch checkpoint).

    Returns:
      Array with the shape and dtype of ``x``.
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim < 3:
        raise ValueError(f"x must be [..., T, N, H] (at least 3-D), got shape {x.shape}")
    seq_len, head_dim = x.shape[-3], x.shape[-1]
    if positions.ndim not in (1, 2):
        raise ValueError(f"positions must be [T] or [B, T], got shape {positions.shape}")
    if positions.shape[-1] != seq_len:
        raise ValueError(
            f"positions must have length T={seq_len} on its last axis, got shape {positions.shape}"
        )
    if positions.ndim == 2 and (x.ndim < 4 or positions.shape[0] not in (1, x.shape[-4])):
        raise ValueError(
            f"positions [B, T] must match the batch axis of x {x.shape}, got shape "
            f"{positions.shape}"
        )
    if inv_freq is not None:
        inv_freq = jnp.asarray(inv_freq)
        if inv_freq.ndim != 1:
            raise ValueError(f"inv_freq must be 1-D [rot_dim // 2], got shape {inv_freq.shape}")
        if rot_dim is None:
            rot_dim = 2 * inv_freq.shape[0]
        elif inv_freq.shape[0] * 2 != rot_dim:
            raise ValueError(
                f"inv_freq must have rot_dim // 2 = {rot_dim // 2} entries, got shape "
                f"{inv_freq.shape}"
            )
    rot_dim = head_dim if rot_dim is None else rot_dim
    _require_positive_even("rot_dim", rot_dim)
    if rot_dim > head_dim:
        raise ValueError(f"rot_dim must be <= head dim H={head_dim}, got {rot_dim}")
    if scale is not None:
        scale = jnp.asarray(scale)
        if scale.ndim not in (2, 3) or scale.shape[-2:] != (seq_len, rot_dim):
            raise ValueError(
                f"scale must be [T, rot_dim] or [B, T, rot_dim] = [..., {seq_len}, {rot_dim}], "
                f"got shape {scale.shape}"
            )
    if inv_freq is None:
        inv_freq = rotary_inv_freq(rot_dim, base=base, base_rescale_factor=base_rescale_factor)

    angles = rotary_angles(positions, inv_freq, interpolation_factor=interpolation_factor)
    angles = _full_layout(angles, interleaved)[..., None, :]  # [(B,) T, 1, rot_dim]
    compute_dtype = _compute_dtype(x.dtype)
    x_rot = x[..., :rot_dim].astype(compute_dtype)  # [..., T, N, rot_dim]
    rotated = (
        x_rot * jnp.cos(angles).astype(compute_dtype),
        _rotate_half(x_rot, interleaved) * jnp.sin(angles).astype(compute_dtype),
    )
    if scale is not None:
        scale = scale[..., None, :].astype(compute_dtype)  # [(B,) T, 1, rot_dim]
        rotated = tuple(part * scale for part in rotated)
    out = (rotated[0] + rotated[1]).astype(x.dtype)
    return jnp.concatenate([out, x[..., rot_dim:]], axis=-1)


def t5_relative_position_bucket(relative_position, *, causal, num_buckets=32, max_distance=128):
    """T5 bucket of each relative position, as x-transformers 2.31 (bit for bit).

    With ``n = -relative_position = q - k``: bidirectional attention halves the
    buckets to ``B = num_buckets // 2`` and adds ``B`` when the key is in the
    future (``n < 0``), then uses ``|n|``; causal attention clamps ``n`` at 0 and
    keeps ``B = num_buckets``. With ``e = B // 2``, distances below ``e`` get
    their own bucket, larger ones ``e + trunc(log(n / e) / log(max_distance / e)
    * (B - e))`` computed in float32, capped at ``B - 1``.

    Args:
      relative_position: integer array ``k_pos - q_pos`` of any shape.
      causal: whether attention is causal (keys in the future share bucket 0).
      num_buckets: total number of buckets, >= 2 (>= 4 and even if not causal).
      max_distance: distance where the log buckets saturate; must exceed the
        exact range ``e``.

    Returns:
      int32 array of bucket ids with the shape of ``relative_position``.
    """
    relative_position = jnp.asarray(relative_position)
    _require_integer_dtype("relative_position", relative_position)
    min_buckets = 2 if causal else 4
    if not isinstance(num_buckets, int) or num_buckets < min_buckets:
        raise ValueError(
            f"num_buckets must be an int >= {min_buckets} (causal={causal}), got {num_buckets!r}"
        )
    if not causal and num_buckets % 2:
        raise ValueError(f"num_buckets must be even when causal=False, got {num_buckets}")
    n = -relative_position.astype(jnp.int32)
    if causal:
        offset = jnp.zeros_like(n)
        n = jnp.maximum(n, 0)
    else:
        num_buckets //= 2
        offset = (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    max_exact = num_buckets // 2
    if max_distance <= max_exact:
        raise ValueError(
            f"max_distance must be > {max_exact} (half the buckets per direction), "
            f"got {max_distance!r}"
        )
    is_small = n < max_exact
    # Keep the log away from 0; those entries take the `is_small` branch anyway.
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    log_ratio = jnp.log(n_large / max_exact) / math.log(max_distance / max_exact)
    # float -> int conversion truncates toward zero, as torch's .long() does.
    val_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return offset + jnp.where(is_small, n, val_if_large)


def t5_position_bias(
    embedding,
    q_positions,
    k_positions,
    *,
    causal,
    num_buckets=32,
    max_distance=128,
    scale=1.0,
):
    """T5 relative position bias ``embedding[bucket(k - q)] * scale``, heads first.

    x-transformers 2.31 ``RelativePositionBias`` uses ``q_positions = S-T .. S-1``,
    ``k_positions = 0 .. S-1`` and ``scale = dim_head ** 0.5``.

    Args:
      embedding: ``[num_buckets, N]`` learned bucket table.
      q_positions: integer ``[T]`` or ``[B, T]``.
      k_positions: integer ``[S]`` or ``[B, S]``.
      causal: see :func:`t5_relative_position_bucket`.
      num_buckets: must equal ``embedding.shape[0]``.
      max_distance: see :func:`t5_relative_position_bucket`.
      scale: multiplier of the bias.

    Returns:
      ``[N, T, S]`` (``[B, N, T, S]`` for batched positions), embedding's dtype.
    """
    embedding = jnp.asarray(embedding)
    q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
    if embedding.ndim != 2 or embedding.shape[0] != num_buckets:
        raise ValueError(
            f"embedding must be [num_buckets, N] = [{num_buckets}, N], got shape {embedding.shape}"
        )
    _require_integer_dtype("q_positions", q_positions)
    _require_integer_dtype("k_positions", k_positions)
    if q_positions.ndim < 1 or k_positions.ndim < 1:
        raise ValueError(
            f"q_positions and k_positions must be at least 1-D, got shapes "
            f"{q_positions.shape} and {k_positions.shape}"
        )
    relative_position = k_positions[..., None, :] - q_positions[..., :, None]  # [..., T, S]
    buckets = t5_relative_position_bucket(
        relative_position, causal=causal, num_buckets=num_buckets, max_distance=max_distance
    )
    values = jnp.take(embedding, buckets, axis=0)  # [..., T, S, N]
    return jnp.moveaxis(values, -1, -3) * scale


def _alibi_slopes_list(heads):
    def power_of_2_slopes(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2_slopes(heads)
    closest_power_of_2 = 2 ** math.floor(math.log2(heads))
    extra = power_of_2_slopes(2 * closest_power_of_2)[0::2][: heads - closest_power_of_2]
    return power_of_2_slopes(closest_power_of_2) + extra


def alibi_slopes(heads, total_heads=None):
    """ALiBi head slopes, as x-transformers ``AlibiPositionalBias._get_slopes``.

    For a power of two ``H``: ``s_h = 2 ** (-8 (h + 1) / H)``. Otherwise, with
    ``P`` the largest power of two below ``H``: the ``P`` slopes followed by
    every other slope of ``2P``, taken until there are ``H`` (so the list is not
    monotone). Heads ``heads .. total_heads - 1`` get slope 0 (no ALiBi), as
    x-transformers' ``alibi_num_heads``.

    Args:
      heads: number of ALiBi heads, >= 1.
      total_heads: total number of heads, >= heads; defaults to ``heads``.

    Returns:
      float32 array ``[total_heads]``.
    """
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")
    total_heads = heads if total_heads is None else total_heads
    if not isinstance(total_heads, int) or total_heads < heads:
        raise ValueError(f"total_heads must be an int >= heads={heads}, got {total_heads!r}")
    slopes = _alibi_slopes_list(heads) + [0.0] * (total_heads - heads)
    return jnp.asarray(np.asarray(slopes, dtype=np.float32))


def alibi_bias(slopes, q_positions, k_positions):
    """ALiBi bias ``-slope_h * |q - k|``, heads first.

    Args:
      slopes: ``[N]`` from :func:`alibi_slopes`.
      q_positions: int or float ``[T]`` or ``[B, T]``.
      k_positions: int or float ``[S]`` or ``[B, S]``.

    Returns:
      ``[N, T, S]`` (``[B, N, T, S]`` for batched positions) in slopes' dtype.
    """
    slopes = jnp.asarray(slopes)
    q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
    if slopes.ndim != 1:
        raise ValueError(f"slopes must be 1-D [N], got shape {slopes.shape}")
    if q_positions.ndim < 1 or k_positions.ndim < 1:
        raise ValueError(
            f"q_positions and k_positions must be at least 1-D, got shapes "
            f"{q_positions.shape} and {k_positions.shape}"
        )
    distance = jnp.abs(k_positions[..., None, :] - q_positions[..., :, None])  # [..., T, S]
    return -distance[..., None, :, :].astype(slopes.dtype) * slopes[:, None, None]

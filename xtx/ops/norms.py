"""Normalisations over the last axis as pure functions: LayerNorm, RMSNorm, ScaleNorm, l2.

The math follows x-transformers 2.31 (``x_transformers/x_transformers.py``):
bias-free LayerNorm with eps 1e-5 (Flax defaults to 1e-6), and RMSNorm /
ScaleNorm / qk-norm built on ``F.normalize``, i.e. ``x / max(||x||, 1e-12)``
rather than ``x * rsqrt(mean(x^2) + eps)``. With ``unit_offset=True`` the stored
gain is the offset from one (``effective = scale + 1``), which is how 2.31
stores its gains by default (``norm_add_unit_offset=True``, gains init 0).

Papers: LayerNorm, Ba et al., arXiv:1607.06450; RMSNorm, Zhang & Sennrich,
arXiv:1910.07467; ScaleNorm, Nguyen & Salazar, arXiv:1910.05895; query-key
normalisation, Henry et al., arXiv:2010.04245.

Shapes: ``x`` is ``[..., D]``; gains and biases are ``[D]`` (any shape ending in
D that broadcasts against x, e.g. ``[N, H]`` for per-head gains on
``[B, T, N, H]``). Every function computes in at least float32 and returns
x's dtype.
"""

import jax
import jax.numpy as jnp


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _check_last_axis(name, param, dim):
    param = jnp.asarray(param)
    if param.ndim < 1 or param.shape[-1] != dim:
        raise ValueError(
            f"{name} must end in the feature size D={dim} (shape [..., {dim}]), "
            f"got shape {param.shape}"
        )
    return param


def _gain(scale, unit_offset, dtype):
    return scale.astype(dtype) + float(unit_offset)


def _normalize(x, eps):
    """``x / max(||x||_2, eps)`` over the last axis, as torch ``F.normalize``.

    Written as ``x * rsqrt(max(sum x^2, eps^2))``: the same value (sqrt is
    monotone), and the gradient stays finite at x = 0.
    """
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def layer_norm(x, scale=None, bias=None, *, eps=1e-5, unit_offset=False):
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + eps) * gain + bias``.

    x-transformers 2.31 ``LayerNorm`` is ``bias=None`` with its stored
    ``gamma`` as ``scale`` (``unit_offset`` as configured); 0.12 and
    ``torch.nn.LayerNorm`` weights use ``scale=weight, bias=bias``.

    Args:
      x: ``[..., D]``.
      scale: optional gain ``[D]``; None means a gain of one.
      bias: optional bias ``[D]``, added after the gain.
      eps: added to the (biased) variance.
      unit_offset: the effective gain is ``scale + 1``; no effect when
        ``scale`` is None.

    Returns:
      ``[..., D]`` in x's dtype.
    """
    x = jnp.asarray(x)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    dim = x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    x32 = x.astype(dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centered = x32 - mean
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    out = centered * jax.lax.rsqrt(variance + eps)
    if scale is not None:
        out = out * _gain(_check_last_axis("scale", scale, dim), unit_offset, dtype)
    if bias is not None:
        out = out + _check_last_axis("bias", bias, dim).astype(dtype)
    return out.astype(x.dtype)


def rms_norm(x, scale=None, *, unit_offset=False):
    """RMSNorm as x-transformers 2.31: ``sqrt(D) * x / max(||x||, 1e-12) * gain``.

    Args:
      x: ``[..., D]``.
      scale: gain ``[D]`` (``RMSNorm.g``); None gives ``SimpleRMSNorm``.
      unit_offset: the effective gain is ``scale + 1``; no effect when
        ``scale`` is None.

    Returns:
      ``[..., D]`` in x's dtype.
    """
    x = jnp.asarray(x)
    dim = x.shape[-1]
    dtype = _compute_dtype(x.dtype)
    out = _normalize(x.astype(dtype), 1e-12) * (dim**0.5)
    if scale is not None:
        out = out * _gain(_check_last_axis("scale", scale, dim), unit_offset, dtype)
    return out.astype(x.dtype)


def scale_norm(x, scale, *, unit_offset=False):
    """ScaleNorm as x-transformers 2.31: ``sqrt(D) * x / max(||x||, 1e-12) * g``.

    Args:
      x: ``[..., D]``.
      scale: the scalar gain ``g``, shape ``(1,)`` as stored upstream (or ``()``).
      unit_offset: the effective gain is ``scale + 1``.

    Returns:
      ``[..., D]`` in x's dtype.
    """
    x = jnp.asarray(x)
    scale = jnp.asarray(scale)
    if scale.shape not in ((), (1,)):
        raise ValueError(f"scale must be a scalar gain of shape (1,) or (), got {scale.shape}")
    dtype = _compute_dtype(x.dtype)
    out = _normalize(x.astype(dtype), 1e-12) * (x.shape[-1] ** 0.5)
    return (out * _gain(scale, unit_offset, dtype)).astype(x.dtype)


def l2_normalize(x, *, groups=1, eps=1e-12):
    """``x / max(||x||, eps)`` over each of ``groups`` equal slices of the last axis.

    As x-transformers' ``l2norm(t, groups)`` (``F.normalize`` per group), used
    by cosine-sim / grouped qk-norm.

    Args:
      x: ``[..., D]`` with D divisible by ``groups``.
      groups: number of contiguous groups of ``D // groups`` features.
      eps: lower bound on each group's norm.

    Returns:
      ``[..., D]`` in x's dtype.
    """
    x = jnp.asarray(x)
    dim = x.shape[-1]
    if not isinstance(groups, int) or groups < 1 or dim % groups:
        raise ValueError(f"groups must be an int >= 1 dividing D={dim}, got {groups!r}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    grouped = x.astype(_compute_dtype(x.dtype)).reshape(*x.shape[:-1], groups, dim // groups)
    return _normalize(grouped, eps).reshape(x.shape).astype(x.dtype)

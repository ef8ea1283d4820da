"""Normalisation layers: LayerNorm (no bias), RMSNorm, ScaleNorm, SimpleRMSNorm.

Papers: LayerNorm 1607.06450, RMSNorm 1910.07467, ScaleNorm 1910.05895.

Gains follow x-transformers 2.x storage so that converted weights load unchanged: with
``unit_offset`` the stored gain is (effective gain - 1) and starts at 0, which keeps
weight decay from pulling the effective gain towards zero.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import NORM
from xtx.ops import norms as norm_ops

NORM_KINDS = ("layernorm", "rmsnorm", "scalenorm", "simple_rmsnorm")


class Norm(nn.Module):
    """A norm over the last axis.

    Attributes:
      kind: one of ``NORM_KINDS``.
      unit_offset: store the gain as (gain - 1), initialised to 0.
      use_bias: LayerNorm only: also learn a bias (x-transformers 0.x / torch LayerNorm).
      eps: LayerNorm epsilon (x-transformers uses 1e-5, not Flax's 1e-6).
    """

    kind: str = "layernorm"
    unit_offset: bool = False
    use_bias: bool = False
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"Norm kind must be one of {NORM_KINDS}, got {self.kind!r}")
        if self.kind == "simple_rmsnorm":
            return norm_ops.rms_norm(x)
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        shape = (1,) if self.kind == "scalenorm" else (x.shape[-1],)
        axes = (None,) if self.kind == "scalenorm" else (NORM,)
        scale = self.param("scale", nn.with_logical_partitioning(init, axes), shape, jnp.float32)
        if self.kind == "layernorm":
            bias = None
            if self.use_bias:
                bias = self.param(
                    "bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape
                )
            return norm_ops.layer_norm(x, scale, bias, eps=self.eps, unit_offset=self.unit_offset)
        if self.kind == "rmsnorm":
            return norm_ops.rms_norm(x, scale, unit_offset=self.unit_offset)
        return norm_ops.scale_norm(x, scale, unit_offset=self.unit_offset)

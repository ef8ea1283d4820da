"""Building blocks shared by every xtx Linen module.

* Logical axis names: every parameter is created with ``nn.with_logical_partitioning``
  so that one rules table maps it onto a device mesh (data parallel, FSDP, tensor
  parallel) without touching model code.
* ``Projection``: an einsum dense layer whose kernel keeps the head axes separate
  (``[D, N, H]`` for queries), stored ``[in..., out...]``.
* ``ConfiguredMeta``: lets a module be built either from its frozen config
  (``Attention(config=cfg)``) or from the flat x-transformers keywords
  (``Decoder(dim=512, depth=6, attn_dim_head=64)``), which are routed into the config by
  the class's ``config_from_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Logical axis names of parameters.
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "kv"
VOCAB = "vocab"
NORM = "norm"
# The stacked-layers axis of parameters under `scan_layers` (replicate it: rule to None).
LAYERS = "layers"
# Logical axis names of activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
# Attention heads of activations (q/k/v and the attention output). Only sequence-parallel
# rule sets map them: the layer then moves q/k/v from length shards to head shards for
# attention and back (all-to-alls), see ``Attention``.
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"


class ConfiguredMeta(type(nn.Module)):
    """Builds the module's ``config`` from flat keywords when no config is given."""

    def __call__(cls, *args: Any, **kwargs: Any):
        if args or "config" in kwargs or not hasattr(cls, "config_from_kwargs"):
            return super().__call__(*args, **kwargs)
        linen_kwargs = {k: kwargs.pop(k) for k in ("parent", "name") if k in kwargs}
        return super().__call__(config=cls.config_from_kwargs(**kwargs), **linen_kwargs)


def torch_linear_init(in_axis: int | Sequence[int] = -2, out_axis: int | Sequence[int] = -1):
    """PyTorch's ``nn.Linear`` default: U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(
        1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis
    )


def torch_bias_init(fan_in: int):
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Projection(nn.Module):
    """``y = x @ W (+ b)`` over the last ``in_ndim`` axes of x, with a shaped kernel.

    Attributes:
      out_shape: trailing output shape, e.g. ``(heads, dim_head)``.
      in_shape: trailing input shape contracted away, e.g. ``(heads, dim_head)``.
      axes: logical names of the kernel axes (``len(in_shape) + len(out_shape)``).
      use_bias: add a bias of shape ``out_shape``.
      kernel_init: default is PyTorch's Linear init.
    """

    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    use_bias: bool = False
    kernel_init: Any = None
    bias_init: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        if x.shape[-n_in:] != self.in_shape:
            raise ValueError(
                f"{self.name}: expected input with trailing shape {self.in_shape}, got {x.shape}"
            )
        in_axes = tuple(range(n_in))
        out_axes = tuple(range(n_in, n_in + n_out))
        init = self.kernel_init or torch_linear_init(in_axes, out_axes)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = jnp.tensordot(x, kernel.astype(dtype), axes=(tuple(range(-n_in, 0)), in_axes))
        if self.use_bias:
            fan_in = 1
            for s in self.in_shape:
                fan_in *= s
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(
                    self.bias_init or torch_bias_init(fan_in), self.axes[n_in:]
                ),
                self.out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(dtype)
        return y


def dropout(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
    """Inverted dropout with the module's ``'dropout'`` RNG stream."""
    if deterministic or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))

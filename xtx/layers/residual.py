"""How a sublayer's output joins the residual stream: plain, GRU-gated, hyper-connections.

Papers: learned residual scale (Normformer) arXiv:2110.09456; GRU gating (GTrXL)
arXiv:1910.06764; hyper-connections arXiv:2409.19606 with Sinkhorn-constrained
("manifold constrained") residual mixing arXiv:2512.24880.

Every combiner has x-transformers 2.31's two steps: ``prepare(x)`` returns the branch
input, the residual to combine with, and extra arguments, and ``__call__(out, residual,
**extra)`` returns the new hidden state. Plain and gated residuals carry ``x`` as
``[B, T, D]``; hyper-connections carry ``S`` streams as ``[B, T, S, D]`` (x-transformers
folds them into the batch as ``(b s)``, which changes no value).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import EMBED, MLP, NORM
from xtx.layers.norms import Norm

Array = jax.Array


def _torch_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Residual(nn.Module):
    """``x = out + residual``, or ``out + residual * scale`` with ``scale_residual``."""

    dim: int
    scale_residual: bool = False

    def prepare(self, x: Array) -> tuple[Array, Array, dict[str, Any]]:
        return x, x, {}

    @nn.compact
    def __call__(self, out: Array, residual: Array) -> Array:
        if self.scale_residual:
            scale = self.param(
                "residual_scale",
                nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                (self.dim,),
            )
            residual = residual * scale.astype(residual.dtype)
        return out + residual


class GRUGating(nn.Module):
    """``x = GRUCell(input=out, hidden=residual)`` with PyTorch's gate math and order.

    Gates are stacked ``(r, z, n)`` on the middle kernel axis::

        r = sigmoid(W_ir o + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz o + b_iz + W_hz h + b_hz)
        n = tanh(W_in o + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    which is not Flax's ``GRUCell`` parametrisation (that one has no ``b_hr``/``b_hz``).
    """

    dim: int
    scale_residual: bool = False

    def prepare(self, x: Array) -> tuple[Array, Array, dict[str, Any]]:
        return x, x, {}

    @nn.compact
    def __call__(self, out: Array, residual: Array) -> Array:
        D = self.dim
        if self.scale_residual:
            scale = self.param(
                "residual_scale",
                nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                (D,),
            )
            residual = residual * scale.astype(residual.dtype)
        # PyTorch's GRUCell init: every weight and bias U(+-1/sqrt(hidden)).
        init = _torch_uniform(D**-0.5)
        kernel_axes = (EMBED, None, MLP)
        ih = self.param("ih_kernel", nn.with_logical_partitioning(init, kernel_axes), (D, 3, D))
        hh = self.param("hh_kernel", nn.with_logical_partitioning(init, kernel_axes), (D, 3, D))
        ih_bias = self.param("ih_bias", nn.with_logical_partitioning(init, (None, MLP)), (3, D))
        hh_bias = self.param("hh_bias", nn.with_logical_partitioning(init, (None, MLP)), (3, D))
        dtype = out.dtype
        gi = jnp.einsum("...d,dge->...ge", out, ih.astype(dtype)) + ih_bias.astype(dtype)
        gh = jnp.einsum("...d,dge->...ge", residual, hh.astype(dtype)) + hh_bias.astype(dtype)
        r = jax.nn.sigmoid(gi[..., 0, :] + gh[..., 0, :])
        z = jax.nn.sigmoid(gi[..., 1, :] + gh[..., 1, :])
        n = jnp.tanh(gi[..., 2, :] + r * gh[..., 2, :])
        return (1.0 - z) * n + z * residual


def sinkhorn(t: Array, iters: int) -> Array:
    """Sinkhorn-Knopp over the last two axes, as x-transformers 2.31 ``sinkhorn``.

    A softmax over the rows axis (-2), then ``iters`` rounds of L1-normalising the
    last axis and then axis -2 (``x / max(sum |x|, 1e-12)``), computed in float32.
    """
    dtype = t.dtype
    t = jax.nn.softmax(t.astype(jnp.float32), axis=-2)

    def l1_normalize(u, axis):
        return u / jnp.maximum(jnp.sum(jnp.abs(u), axis=axis, keepdims=True), 1e-12)

    for _ in range(iters):
        t = l1_normalize(t, -1)
        t = l1_normalize(t, -2)
    return t.astype(dtype)


class HyperConnection(nn.Module):
    """Dynamic hyper-connections over ``S`` residual streams (2409.19606, Algorithm 2).

    From the streams ``h`` ``[B, T, S, D]`` and their LayerNorm ``n``:

    * ``alpha = n @ A * a + alpha_static`` ``[B, T, S, 1 + S]``; column 0 (through a
      sigmoid) weights the streams into the branch input, columns 1.. (through Sinkhorn)
      mix the streams into the new residual streams;
    * ``beta = 2 sigmoid(2 sigmoid(n @ b) * c + beta_static)`` ``[B, T, S]`` spreads the
      branch output over the streams: ``h' = residual + beta * out``.

    x-transformers 2.31 reshapes each stream's residual row ``[S]`` into a ``[1, S]``
    matrix before Sinkhorn, so the mixing weights come out as all ones (every new
    stream is the sum of the old ones) whatever the parameters; this follows it.
    """

    dim: int
    num_streams: int
    layer_index: int
    sinkhorn_iters: int = 5

    def setup(self):
        S, D = self.num_streams, self.dim

        def static_alpha_init(key, shape, dtype=jnp.float32):
            # Layer i reads stream i mod S; the residual mixing starts as the identity.
            read = jax.nn.one_hot(self.layer_index % S, S, dtype=dtype)[:, None]
            return jnp.concatenate([read, jnp.eye(S, dtype=dtype)], axis=1)

        def const(value):
            return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)

        self.norm = Norm("layernorm", unit_offset=False)
        self.static_beta = self.param(
            "static_beta", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (S,)
        )
        self.static_alpha = self.param(
            "static_alpha",
            nn.with_logical_partitioning(static_alpha_init, (None, None)),
            (S, 1 + S),
        )
        self.dynamic_alpha_fn = self.param(
            "dynamic_alpha_fn",
            nn.with_logical_partitioning(nn.initializers.zeros, (EMBED, None)),
            (D, S + 1),
        )
        self.dynamic_alpha_scale = self.param(
            "dynamic_alpha_scale", nn.with_logical_partitioning(const(1e-2), ()), ()
        )
        self.dynamic_beta_fn = self.param(
            "dynamic_beta_fn", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)), (D,)
        )
        self.dynamic_beta_scale = self.param(
            "dynamic_beta_scale", nn.with_logical_partitioning(const(1e-2), ()), ()
        )

    def prepare(self, streams: Array) -> tuple[Array, Array, dict[str, Any]]:
        """``[B, T, S, D]`` streams -> branch input ``[B, T, D]``, residual streams, beta."""
        S = self.num_streams
        dtype = streams.dtype
        normed = self.norm(streams)
        alpha = normed @ self.dynamic_alpha_fn.astype(dtype) * self.dynamic_alpha_scale.astype(
            dtype
        ) + self.static_alpha.astype(dtype)  # [B, T, S, 1 + S]
        alpha_input = jax.nn.sigmoid(alpha[..., :1])
        alpha_residual = alpha[..., 1:]
        alpha_residual = sinkhorn(
            alpha_residual.reshape(*alpha_residual.shape[:-1], -1, S), self.sinkhorn_iters
        ).reshape(alpha_residual.shape)
        alpha = jnp.concatenate([alpha_input, alpha_residual], axis=-1)
        beta_gate = jax.nn.sigmoid(normed @ self.dynamic_beta_fn.astype(dtype)) * 2.0
        beta = beta_gate * self.dynamic_beta_scale.astype(dtype) + self.static_beta.astype(dtype)
        beta = jax.nn.sigmoid(beta) * 2.0  # [B, T, S]
        mixed = jnp.einsum("btsu,btsd->btud", alpha, streams)  # [B, T, 1 + S, D]
        return mixed[..., 0, :], mixed[..., 1:, :], {"beta": beta}

    def __call__(self, out: Array, residual: Array, *, beta: Array) -> Array:
        """Adds the branch output ``[B, T, D]`` to the streams, weighted per stream."""
        return residual + out[..., None, :] * beta[..., None]

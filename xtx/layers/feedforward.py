"""The position-wise feedforward block, with GLU variants.

Papers: 1706.03762 (FFN), 2002.05202 (GLU variants), 2204.02311 (SwiGLU in PaLM),
2109.08668 (squared ReLU), 2212.14034 (no bias), 2110.09456 (Normformer post-activation
LayerNorm).

``FF(x) = W2 act(W1 x + b1) + b2`` with inner width ``int(mult * dim)``; with ``glu`` the
first projection is twice as wide and its first half (value) is multiplied by the
activation of its second half (gate). GELU is the exact erf form, as in PyTorch.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from xtx.config import Config
from xtx.layers.base import EMBED, MLP, Projection, dropout
from xtx.layers.norms import Norm

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeedForwardConfig(Config):
    """Feedforward options; x-transformers keywords with the ``ff_`` prefix.

    Attributes:
      mult: inner width multiplier.
      glu: gated linear unit (value * act(gate)).
      swish: SiLU instead of GELU.
      relu_squared: ``relu(x) ** 2`` instead of GELU.
      no_bias: drop the biases of the plain (non-GLU) input projection and the output.
      dropout: dropout after the activation.
      post_act_ln: LayerNorm (gain stored as is, init 1, no bias) of the inner
        activations, before the dropout (Normformer, 2110.09456).
    """

    mult: float = 4
    glu: bool = False
    swish: bool = False
    relu_squared: bool = False
    no_bias: bool = False
    dropout: float = 0.0
    post_act_ln: bool = False

    def __post_init__(self):
        if self.mult <= 0:
            raise ValueError(f"ff_mult must be > 0, got {self.mult}")
        if self.swish and self.relu_squared:
            raise ValueError("ff_swish and ff_relu_squared both choose the activation; pick one")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ff_dropout must be in [0, 1), got {self.dropout}")

    def inner_dim(self, dim: int) -> int:
        return int(dim * self.mult)


class FeedForward(nn.Module):
    """Position-wise MLP over ``[B, T, D]``."""

    config: FeedForwardConfig
    dim: int

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
        inner = cfg.inner_dim(self.dim)
        if cfg.swish:
            act = jax.nn.silu
        elif cfg.relu_squared:
            act = lambda t: jax.nn.relu(t) ** 2  # noqa: E731
        else:
            act = lambda t: jax.nn.gelu(t, approximate=False)  # noqa: E731
        if cfg.glu:
            # x-transformers keeps the GLU projection's bias even with ff_no_bias.
            h = Projection((2 * inner,), (self.dim,), (EMBED, MLP), use_bias=True, name="proj_in")(
                x
            )
            value, gate = h[..., :inner], h[..., inner:]
            h = value * act(gate)
        else:
            h = Projection(
                (inner,), (self.dim,), (EMBED, MLP), use_bias=not cfg.no_bias, name="proj_in"
            )(x)
            h = act(h)
        if cfg.post_act_ln:
            # Always the plain-stored LayerNorm, whatever norm_add_unit_offset says.
            h = Norm("layernorm", unit_offset=False, name="post_act_norm")(h)
        h = dropout(self, h, cfg.dropout, deterministic)
        return Projection(
            (self.dim,), (inner,), (MLP, EMBED), use_bias=not cfg.no_bias, name="proj_out"
        )(h)

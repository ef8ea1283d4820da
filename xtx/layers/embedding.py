"""Embeddings: the token table (shareable, for tied encoder/decoder embeddings) and
absolute positions."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import EMBED, VOCAB
from xtx.ops import l2_normalize, sinusoidal_embedding


class TokenEmbedding(nn.Module):
    """``[V, E]`` lookup table.

    Attributes:
      num_tokens: vocabulary size V.
      dim: embedding width E.
      std: init standard deviation (default: kaiming normal, ``sqrt(2 / E)``, as
        x-transformers).
    """

    num_tokens: int
    dim: int
    std: float | None = None

    def setup(self):
        std = (2.0 / self.dim) ** 0.5 if self.std is None else self.std
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(std), (VOCAB, EMBED)),
            (self.num_tokens, self.dim),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """``[..., E] -> [..., V]``: dot products with every embedding row."""
        return jnp.einsum("...e,ve->...v", h, self.embedding.astype(h.dtype))


class PositionalEmbedding(nn.Module):
    """Absolute positions: a learned table or a scaled sinusoid (x-transformers 2.x).

    Learned: ``P[t] * dim**-0.5`` with ``P ~ N(0, 1)`` (``l2norm``: ``l2(P[t])`` with
    ``P ~ N(0, 1e-5)``, 1910.05895). Sinusoidal (``scaled_sinusoidal``, 2202.10447):
    ``[sin(t w), cos(t w)] * s`` with a learned scalar ``s`` initialised to
    ``dim**-0.5``.

    Attributes:
      max_seq_len: number of learned positions.
      dim: embedding width.
      scaled_sinusoidal: use the fixed sinusoid with a learned scale.
      l2norm: l2-normalise the learned embedding instead of scaling it.
    """

    max_seq_len: int
    dim: int
    scaled_sinusoidal: bool = False
    l2norm: bool = False

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        """Embeddings of positions ``0 .. length-1``: ``[length, dim]``."""
        if length > self.max_seq_len:
            raise ValueError(
                f"sequence length {length} exceeds max_seq_len={self.max_seq_len} of the "
                "absolute positional embedding"
            )
        if self.scaled_sinusoidal:
            scale = self.param("scale", nn.initializers.constant(self.dim**-0.5), (1,))
            return sinusoidal_embedding(jnp.arange(length), self.dim) * scale
        std = 1e-5 if self.l2norm else 1.0
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(std), (None, EMBED)),
            (self.max_seq_len, self.dim),
        )
        pos = table[:length]
        return l2_normalize(pos) if self.l2norm else pos * self.dim**-0.5

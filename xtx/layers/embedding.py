"""Token embedding table, shareable between modules (tied encoder/decoder embeddings)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import EMBED, VOCAB


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

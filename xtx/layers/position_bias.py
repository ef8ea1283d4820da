"""Dynamic position bias: an MLP from relative distance to one logits bias per head.

Paper: SwinV2 (2111.09883) continuous position bias, after CWT-style dynamic bias
(2108.00154); as x-transformers 2.31 ``DynamicPositionBias`` (``dynamic_pos_bias=True``).

The MLP maps a distance ``delta = pos_q - pos_k`` (optionally ``sign(delta) log(|delta| +
1)``) through ``Linear(1, w) -> [norm] -> SiLU``, ``depth - 1`` times ``Linear(w, w) ->
[norm] -> SiLU`` and ``Linear(w, N)``. It runs once on the ``2S - 1`` possible distances,
in float32, and the ``[N, T, S]`` bias is gathered from that table. With ``norm``, the
first norm is x-transformers' bias-free LayerNorm (gain initialised to 1) and the later
ones are ``torch.nn.LayerNorm`` (gain and bias); both use eps 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import Projection
from xtx.layers.norms import Norm

Array = jax.Array


class DynamicPositionBias(nn.Module):
    """Relative-distance MLP bias shared by every self-attention layer of a stack.

    Attributes:
      width: hidden width of the MLP (x-transformers uses ``dim // 4``).
      heads: number of attention heads N (one output per head).
      depth: number of hidden ``Linear -> SiLU`` layers (>= 1).
      log_distance: feed ``sign(d) log(|d| + 1)`` instead of the distance d.
      norm: LayerNorm before each SiLU.
    """

    width: int
    heads: int
    depth: int = 2
    log_distance: bool = False
    norm: bool = False

    @nn.compact
    def __call__(self, q_pos: Array, k_pos: Array) -> Array:
        """The bias ``[N, T, S]`` for query positions ``[T]`` and key positions ``[S]``.

        Positions must be consecutive integers with the queries right-aligned to the keys
        (the last T key positions), so every distance lies in ``[-(S - 1), S - 1]``.
        """
        if self.depth < 1:
            raise ValueError(f"DynamicPositionBias depth must be >= 1, got {self.depth}")
        S = k_pos.shape[-1]
        distances = jnp.arange(-(S - 1), S, dtype=jnp.float32)[:, None]  # [2S - 1, 1]
        if self.log_distance:
            distances = jnp.sign(distances) * jnp.log(jnp.abs(distances) + 1.0)
        h = distances
        for i in range(self.depth):
            fan_in = 1 if i == 0 else self.width
            h = Projection((self.width,), (fan_in,), (None, None), True, name=f"hidden_{i}")(h)
            if self.norm:
                # x-transformers: its own bias-free LayerNorm first, torch's after.
                h = Norm("layernorm", use_bias=i > 0, name=f"norm_{i}")(h)
            h = jax.nn.silu(h)
        table = Projection((self.heads,), (self.width,), (None, None), True, name="to_heads")(h)
        index = q_pos[:, None] - k_pos[None, :] + (S - 1)  # [T, S] rows of the table
        return jnp.transpose(table[index], (2, 0, 1))  # [N, T, S]

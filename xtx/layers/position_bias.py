"""Dynamic position bias: an MLP from relative distance to one logits bias per head.

Paper: SwinV2 (2111.09883) continuous position bias, after CWT-style dynamic bias
(2108.00154); as x-transformers 2.31 ``DynamicPositionBias`` (``dynamic_pos_bias=True``).

The MLP maps a distance ``delta = pos_q - pos_k`` (optionally ``sign(delta) log(|delta| +
1)``) through ``Linear(1, w) -> [norm] -> SiLU``, ``depth - 1`` times ``Linear(w, w) ->
[norm] -> SiLU`` and ``Linear(w, N)``. It runs once on the ``2S - 1`` possible distances,
in float32, and that ``[N, 2S - 1]`` table goes to attention as a ``RelativeBias``
(``xtx.ops.relative_bias``), which the blockwise kernel expands block by block instead of
materialising ``[N, T, S]``. With ``norm``, the first norm is x-transformers' bias-free
LayerNorm (gain initialised to 1) and the later ones are ``torch.nn.LayerNorm`` (gain and
bias); both use eps 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.base import Projection
from xtx.layers.norms import Norm
from xtx.ops.relative_bias import RelativeBias


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
    def __call__(self, num_keys: int) -> RelativeBias:
        """The bias over ``num_keys`` consecutive key positions.

        Args:
          num_keys: S, the keys with a position (XL memory included, memory key/values
            not). The table covers every distance in ``[-(S - 1), S - 1]``, which is all
            of them when the queries are among the keys (right-aligned by default).

        Returns:
          A ``RelativeBias`` with table ``[N, 2S - 1]``.
        """
        if self.depth < 1:
            raise ValueError(f"DynamicPositionBias depth must be >= 1, got {self.depth}")
        if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
            raise ValueError(f"DynamicPositionBias num_keys must be an int >= 1, got {num_keys!r}")
        S = num_keys
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
        # Row r holds distance q - k = r - (S - 1); RelativeBias columns run over k - q.
        return RelativeBias.centered(table.T[:, ::-1])  # [N, 2S - 1]

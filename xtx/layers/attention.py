"""Multi-head attention (self and cross) as a Linen module over ``xtx.ops.attention``.

Paper: 1706.03762; grouped-query / multi-query attention 2305.13245 / 1911.02150;
persistent memory key/values 1907.01470.

Shapes: x ``[B, T, D]``, context ``[B, S, Dc]``; inside, q ``[B, T, N, H]`` and k, v
``[B, S, K, H]`` (N query heads, K key/value heads, H head dim).

Parameters mirror x-transformers 2.x (bias-free q/k/v/out projections, memory k/v of
shape ``[K, M, H]``) so that ``xtx.interop`` converts weights one to one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config, check_not_yet
from xtx.layers.base import EMBED, HEAD_DIM, HEADS, KV_HEADS, Projection
from xtx.ops import AttentionMask, apply_rotary, attention, pad_keys

Array = jax.Array


# Declared options whose implementation has not landed yet: setting one raises.
PENDING_ATTENTION = {
    "sparse_topk": None,
    "sparse_topk_straight_through": False,
    "pre_talking_heads": False,
    "post_talking_heads": False,
    "talking_heads": False,
    "hard": False,
    "softclamp_logits": False,
    "use_entmax15": False,
    "on_attn": False,
    "gate_values": False,
    "head_scale": False,
    "qk_norm": False,
    "qk_norm_dim_scale": False,
    "qk_rmsnorm": False,
    "collab_heads": False,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(Config):
    """Per-layer attention options; x-transformers keywords with the ``attn_`` prefix.

    Attributes:
      dim_head: width of each head (x-transformers default 64, independent of ``dim``).
      kv_heads: number of key/value heads (grouped-query attention); None = ``heads``.
      one_kv_head: multi-query attention (``kv_heads = 1``).
      dropout: dropout on the attention probabilities.
      num_mem_kv: learned memory key/values prepended to every head's keys and values.
      dim_context: width of the cross-attention context (None = model dim).
      flash: accepted for x-transformers compatibility: use the fast attention path
        (same results; xtx picks the fastest backend for the platform anyway).
      implementation: ``xtx.ops.attention`` backend (``"auto"``, ``"reference"``, ...).
    """

    dim_head: int = 64
    kv_heads: int | None = None
    one_kv_head: bool = False
    dropout: float = 0.0
    num_mem_kv: int = 0
    dim_context: int | None = None
    flash: bool = False
    implementation: str = "auto"
    # Logits-side features (x-transformers keywords without the attn_ prefix).
    sparse_topk: int | None = None
    sparse_topk_straight_through: bool = False
    pre_talking_heads: bool = False
    post_talking_heads: bool = False
    talking_heads: bool = False
    hard: bool = False
    softclamp_logits: bool = False
    logit_softclamp_value: float = 50.0
    use_entmax15: bool = False
    # Projection-side features.
    on_attn: bool = False
    gate_values: bool = False
    head_scale: bool = False
    qk_norm: bool = False
    qk_norm_groups: int = 1
    qk_norm_scale: float = 10.0
    qk_norm_dim_scale: bool = False
    qk_rmsnorm: bool = False
    collab_heads: bool = False
    collab_compression: float = 0.3

    def __post_init__(self):
        check_not_yet(self, PENDING_ATTENTION, prefix="attn_")
        if self.dim_head <= 0:
            raise ValueError(f"attn_dim_head must be a positive int, got {self.dim_head}")
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise ValueError(f"attn_kv_heads must be a positive int, got {self.kv_heads}")
        if self.one_kv_head and self.kv_heads not in (None, 1):
            raise ValueError(
                f"attn_one_kv_head=True means one key/value head, but attn_kv_heads={self.kv_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {self.dropout}")
        if self.num_mem_kv < 0:
            raise ValueError(f"attn_num_mem_kv must be >= 0, got {self.num_mem_kv}")

    def num_kv_heads(self, heads: int) -> int:
        kv = 1 if self.one_kv_head else (self.kv_heads or heads)
        if heads % kv:
            raise ValueError(
                f"heads ({heads}) must be divisible by the number of key/value heads ({kv})"
            )
        return kv


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotarySettings(Config):
    """Rotary embedding options shared by every self-attention layer of a stack."""

    dim: int
    base: float = 10000.0
    interpolation_factor: float = 1.0
    base_rescale_factor: float = 1.0
    interleaved: bool = True


class AttentionIntermediates(NamedTuple):
    """What one attention layer hands to later layers.

    Attributes:
      logits: pre-softmax logits ``[B, N, T, S]`` after biases and masks, when the stack
        uses residual attention; otherwise None.
      values: the layer's values ``[B, S, K, H]`` (before memory key/values).
    """

    logits: Array | None
    values: Array


class Attention(nn.Module):
    """Self- or cross-attention.

    Attributes:
      config: the ``AttentionConfig``.
      dim: model width (input and output).
      heads: number of query heads.
      causal: mask future keys (self-attention in a decoder).
      is_cross: keys and values come from ``context``.
      rotary: rotary settings, or None.
    """

    config: AttentionConfig
    dim: int
    heads: int
    causal: bool = False
    is_cross: bool = False
    rotary: RotarySettings | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        key_mask: Array | None = None,
        query_mask: Array | None = None,
        attn_mask: Array | None = None,
        mem: Array | None = None,
        rotary_pos: Array | None = None,
        bias: Array | None = None,
        prev_attn: Array | None = None,
        value_residual: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, AttentionIntermediates]:
        """Attends from x to itself (or to ``context``).

        Args:
          x: ``[B, T, D]`` normalised input.
          context: ``[B, S, Dc]`` for cross-attention.
          key_mask: ``[B, S]`` bool over the keys built from ``mem`` + x (or context);
            False keys are never attended.
          query_mask: ``[B, T]`` bool; outputs of False queries are zero.
          attn_mask: extra bool mask broadcastable to ``[B, N, T, S]``.
          mem: ``[B, M, D]`` normalised XL memory prepended to the keys and values.
          rotary_pos: key positions ``[S]`` (queries take the last T) for rotary.
          bias: additive logits bias ``[.., N, T, S]`` over the non-memory keys.
          prev_attn: pre-softmax logits ``[B, N, T, S]`` of the previous layer (residual
            attention, 2012.11747).
          value_residual: values ``[B, S, K, H]`` of the first layer (value residual
            learning, 2410.17897).
          deterministic: disable dropout.

        Returns:
          ``([B, T, D], AttentionIntermediates)``.
        """
        if prev_attn is not None or value_residual is not None:
            raise NotImplementedError("residual attention and value residuals are not in yet")
        cfg = self.config
        N, H = self.heads, cfg.dim_head
        K = cfg.num_kv_heads(N)
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"Attention input must have last dim {self.dim}, got {x.shape}")

        kv_input = x
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs `context` [B, S, D_context]")
            kv_input = context
        elif mem is not None:
            kv_input = jnp.concatenate([mem.astype(x.dtype), x], axis=1)
        dim_kv = kv_input.shape[-1]

        q = Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name="to_q")(x)  # [B, T, N, H]
        k = Projection((K, H), (dim_kv,), (EMBED, KV_HEADS, HEAD_DIM), name="to_k")(kv_input)
        v = Projection((K, H), (dim_kv,), (EMBED, KV_HEADS, HEAD_DIM), name="to_v")(kv_input)
        values = v  # [B, S, K, H], before memory key/values: the value residual source

        if self.rotary is not None and rotary_pos is not None:
            r = self.rotary
            rot = dict(
                rot_dim=r.dim,
                base=r.base,
                interleaved=r.interleaved,
                interpolation_factor=r.interpolation_factor,
                base_rescale_factor=r.base_rescale_factor,
            )
            q = apply_rotary(q, rotary_pos[..., -T:], **rot)
            k = apply_rotary(k, rotary_pos, **rot)

        if cfg.num_mem_kv:
            M = cfg.num_mem_kv
            init = nn.initializers.normal(1.0)
            axes = (KV_HEADS, None, HEAD_DIM)
            mem_k = self.param("mem_k", nn.with_logical_partitioning(init, axes), (K, M, H))
            mem_v = self.param("mem_v", nn.with_logical_partitioning(init, axes), (K, M, H))

            def prepend(t, m):
                m = jnp.broadcast_to(jnp.swapaxes(m, 0, 1)[None], (B, M, K, H))
                return jnp.concatenate([m.astype(t.dtype), t], axis=1)

            k, v = prepend(k, mem_k), prepend(v, mem_v)
            if key_mask is not None:
                key_mask = pad_keys(key_mask, M)
            if bias is not None:
                pad = [(0, 0)] * (bias.ndim - 1) + [(M, 0)]
                bias = jnp.pad(bias, pad)
            if attn_mask is not None:
                attn_mask = jnp.asarray(attn_mask, bool)
                lead = attn_mask.shape[:-1]
                attn_mask = jnp.concatenate([jnp.ones((*lead, M), bool), attn_mask], axis=-1)

        mask = None
        if self.causal or key_mask is not None or attn_mask is not None:
            mask = AttentionMask(
                causal=self.causal and not self.is_cross,
                key_padding=key_mask,
                explicit=attn_mask,
            )
        rng = None
        if cfg.dropout > 0.0 and not deterministic:
            rng = self.make_rng("dropout")
        out = attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            dropout_rate=0.0 if deterministic else cfg.dropout,
            dropout_rng=rng,
            implementation=cfg.implementation,
        )  # [B, T, N, H]
        out = Projection((D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)
        if query_mask is not None:
            out = jnp.where(query_mask[..., None], out, jnp.zeros((), out.dtype))
        return out, AttentionIntermediates(logits=None, values=values)

"""Multi-head attention (self and cross) as a Linen module over ``xtx.ops.attention``.

Paper: 1706.03762; grouped-query / multi-query attention 2305.13245 / 1911.02150;
persistent memory key/values 1907.01470.

Around the projections: cosine-sim / grouped qk-norm 2010.04245, QK RMSNorm 2302.05442,
xPos 2212.10554, value residual learning 2410.17897, Normformer head scale 2110.09456,
AlphaFold2-style value gates, attention on attention 1908.06954; and two options of the
seed x-transformers 0.12 that 2.31 removed (no PyTorch counterpart to convert):
collaborative heads 2006.16362 and Shortformer's position-infused attention 2012.15832.

On the logits and probabilities (computed by ``xtx.ops.attention``): talking heads
2003.02436, explicit sparse top-k attention 1912.11637, hard (one-hot, straight-through)
attention, logit softclamp, residual attention (RealFormer) 2012.11747, and the seed's
1.5-entmax 1909.00015.

Shapes: x ``[B, T, D]``, context ``[B, S, Dc]``; inside, q ``[B, T, N, H]`` and k, v
``[B, S, K, H]`` (N query heads, K key/value heads, H head dim).

KV cache (decoding): a self-attention layer may take a ``LayerKVCache`` of fixed size
``[B, K, L, H]`` (heads-major) and the number of positions already filled. The T new
keys (after rotary, qk-norm and value-residual mixing: everything that is per token) are
written at that offset with ``lax.dynamic_update_slice`` and the queries attend to all
L slots with a causal mask offset by the fill; slots not yet written are masked by the
key mask the stack passes in. Shapes never change, so one jitted decoding step serves
every position. xPos keys are scaled at their absolute position with the centre fixed at
``L // 2`` (the centre cancels in ``q . k``, so this equals the uncached model's scores).

A cross-attention layer in a decoding stack hands back the context's keys (after qk-norm)
and values (heads-major) in its intermediates; given them back as ``kv_cache`` it uses
them instead of its projections of ``context``, which are then dead code that XLA drops:
the context is projected once, at the prefill.

Parameters mirror x-transformers 2.x (bias-free q/k/v/out projections, memory k/v of
shape ``[K, M, H]``) so that ``xtx.interop`` converts weights one to one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.attention_config import AttentionConfig, RotarySettings
from xtx.layers.base import (
    ACT_HEADS,
    ACT_KV_HEADS,
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LENGTH,
    Projection,
)
from xtx.ops import (
    AttentionMask,
    apply_rotary,
    attention,
    cached_attention,
    l2_normalize,
    pad_keys,
    sinusoidal_embedding,
    xpos_scale,
)
from xtx.ops.relative_bias import RelativeBias

Array = jax.Array


__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionIntermediates",
    "LayerKVCache",
    "RotarySettings",
]


def _identity_init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Identity (torch's ``dirac_`` on a 1x1 conv): talking heads start as a no-op mix."""
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class LayerKVCache(NamedTuple):
    """The key/value cache of one attention layer (a pytree of fixed shape).

    Heads-major, unlike the ``[B, S, K, H]`` of the attention interface: a decoding step
    reads every cached key and value, and in this layout the score and output einsums
    take them without a transpose (a copy of the whole cache per layer and step
    otherwise: 4x slower attention at 320 slots, batch 8, on CPU). The layer hands the
    cache to ``xtx.ops.cached_attention``, which reads it before writing the new tokens
    (memory key/values go along as its ``prefix``, scored apart from the cache).

    Attributes:
      keys: ``[B, K, L, H]`` keys after rotary / qk-norm, L cache slots (a
        cross-attention layer: the context's S keys).
      values: ``[B, K, L, H]`` values (after value-residual mixing).
    """

    keys: Array
    values: Array


class AttentionIntermediates(NamedTuple):
    """What one attention layer hands to later layers.

    Attributes:
      logits: the final pre-softmax logits ``[B, N, T, S]`` (after talking heads, biases,
        softclamp and masks) when asked for with ``return_logits`` (residual attention);
        otherwise None.
      values: the layer's values ``[B, S, K, H]`` (before memory key/values; with a KV
        cache, the T new tokens' values before mixing).
      kv_cache: self-attention: the updated ``LayerKVCache`` when one was passed in,
        else None; cross-attention: the context's keys/values (``[B, K, S, H]``).
    """

    logits: Array | None
    values: Array
    kv_cache: LayerKVCache | None = None


def _sequence_parallel() -> bool:
    """True when the active logical axis rules map ``ACT_HEADS`` (sequence parallel)."""
    return any(name == ACT_HEADS and mesh is not None for name, mesh in nn.get_logical_axis_rules())


def _heads_sharded(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    """Sequence parallel: q ``[B, T, N, H]``, k, v ``[B, S, K, H]`` arrive split along the
    length; attention needs every key, so they are resharded along the heads instead
    (an all-to-all each). A no-op under any other rules."""
    if not _sequence_parallel():
        return q, k, v

    def reshard(x, heads):
        # Pinned to length shards first, so that each device projects its own tokens
        # (XLA may otherwise gather the layer input and project every token twice).
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, None, None))
        return nn.with_logical_constraint(x, (BATCH, None, heads, None))

    return reshard(q, ACT_HEADS), reshard(k, ACT_KV_HEADS), reshard(v, ACT_KV_HEADS)


def _length_sharded(out: Array) -> Array:
    """Sequence parallel: the attention output ``[B, T, N, H]`` back to length shards."""
    if not _sequence_parallel():
        return out
    # Pinned to head shards first: otherwise XLA pulls the length split back into the
    # attention kernel's loop, gathering the heads of every block.
    out = nn.with_logical_constraint(out, (BATCH, None, ACT_HEADS, None))
    return nn.with_logical_constraint(out, (BATCH, LENGTH, None, None))


def heads_major(x: Array) -> Array:
    """``[B, S, K, H]`` <-> ``[B, K, S, H]`` (the cache layout; its own inverse)."""
    return jnp.swapaxes(x, 1, 2)


def _cached_context_part(name: str, cached: Array, fresh: Array) -> Array:
    """The cached context keys or values (heads-major) as ``[B, S, K, H]``, checked
    against the fresh ones' shape."""
    cached = heads_major(cached)
    if cached.shape != fresh.shape:
        raise ValueError(
            f"the cached context {name} must have the shape of the context's {name} "
            f"[B, S, K, H] = {fresh.shape}, got {cached.shape} (a context of another length?)"
        )
    return cached.astype(fresh.dtype)


class Attention(nn.Module):
    """Self- or cross-attention.

    Attributes:
      config: the ``AttentionConfig``.
      dim: model width (input and output).
      heads: number of query heads.
      causal: mask future keys (self-attention in a decoder).
      is_cross: keys and values come from ``context``.
      rotary: rotary settings, or None.
      position_infused: add a fixed sinusoid over the model dim to the query and key
        inputs (not the values): Shortformer's position-infused attention (2012.15832).
      learned_value_residual_mix: with a ``value_residual``, mix it in with a learned
        per-token, per-head gate ``sigmoid(W x + b)`` instead of 1/2.
    """

    config: AttentionConfig
    dim: int
    heads: int
    causal: bool = False
    is_cross: bool = False
    rotary: RotarySettings | None = None
    position_infused: bool = False
    learned_value_residual_mix: bool = False

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
        bias: Array | RelativeBias | None = None,
        prev_attn: Array | None = None,
        value_residual: Array | None = None,
        return_logits: bool = False,
        kv_cache: LayerKVCache | None = None,
        cache_index: Array | None = None,
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
          bias: additive logits bias over the keys but the memory key/values: a dense
            ``[.., N, T, S]`` array or a ``RelativeBias`` (memory key/values get bias 0).
          prev_attn: pre-softmax logits ``[B, N, T, S]`` of the previous layer (residual
            attention, 2012.11747).
          value_residual: values ``[B, S, K, H]`` of the first layer (value residual
            learning, 2410.17897).
          return_logits: hand back the final pre-softmax logits in the intermediates
            (the next layer's ``prev_attn`` under residual attention).
          kv_cache: self-attention: the layer's ``LayerKVCache`` ``[B, L, K, H]``; the new
            keys/values are written at ``cache_index`` and the queries attend to all L
            slots (``key_mask`` must then be ``[B, L]``, False at empty slots, and
            ``rotary_pos`` the ``[T]`` positions of the new tokens). Cross-attention:
            the context's keys/values returned by an earlier call (the prefill), used
            instead of projecting ``context`` again.
          cache_index: int32 ``[]``, the number of cache slots already filled: the
            position of the first of the T new tokens.
          deterministic: disable dropout.

        Returns:
          ``([B, T, D], AttentionIntermediates)``; a cross-attention layer's
          intermediates hold the context's keys/values as ``kv_cache``.
        """
        cfg = self.config
        N, H = self.heads, cfg.dim_head
        K = cfg.num_kv_heads(N)
        B, T, D = x.shape
        if D != self.dim:
            raise ValueError(f"Attention input must have last dim {self.dim}, got {x.shape}")

        # A cross-attention layer's kv_cache holds the context's keys/values (read only);
        # a self-attention layer's is the fixed buffer of past tokens it writes into.
        cached_context = self.is_cross and kv_cache is not None
        self_cache = None if self.is_cross else kv_cache
        if self_cache is not None:
            self._check_cache(self_cache, cache_index, B, mem)
        kv_input = x
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs `context` [B, S, D_context]")
            kv_input = context
        elif mem is not None:
            kv_input = jnp.concatenate([mem.astype(x.dtype), x], axis=1)
        dim_kv = kv_input.shape[-1]
        S = kv_input.shape[1]
        q_input, k_input = x, kv_input
        if self.position_infused and not self.is_cross:
            # Shortformer: positions colour queries and keys only; queries are the last T
            # of the S key positions (XL memory first), or follow the cache fill.
            if self_cache is not None:
                pos = cache_index + jnp.arange(T)
                pos_emb = sinusoidal_embedding(pos, D).astype(x.dtype)  # [T, D]
                q_input, k_input = x + pos_emb, kv_input + pos_emb
            else:
                pos_emb = sinusoidal_embedding(jnp.arange(S), D).astype(x.dtype)  # [S, D]
                q_input, k_input = x + pos_emb[S - T :], kv_input + pos_emb

        if cfg.collab_heads:
            q, k = self._collab_queries_keys(q_input, k_input)  # [B, T, N, C], [B, S, 1, C]
        else:
            q = Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name="to_q")(q_input)
            k = Projection((K, H), (dim_kv,), (EMBED, KV_HEADS, HEAD_DIM), name="to_k")(k_input)
        v = Projection((K, H), (dim_kv,), (EMBED, KV_HEADS, HEAD_DIM), name="to_v")(kv_input)
        if cached_context:
            v = _cached_context_part("values", kv_cache.values, v)
        values = v  # [B, S, K, H], before memory key/values: the value residual source
        if value_residual is not None:
            v = self._mix_value_residual(x, v, value_residual)

        scale = H**-0.5  # the logits scale; collaborative heads keep the per-head one
        norm_mem_k = None  # what qk-norm also does to the memory keys
        if cfg.qk_norm:
            q, k, norm_mem_k, scale = self._cosine_sim_queries_keys(q, k)
        if cfg.qk_rmsnorm:
            q, k = self._rmsnorm_queries_keys(q, k)
        if cached_context:
            k = _cached_context_part("keys", kv_cache.keys, k)

        if self.rotary is not None and rotary_pos is not None:
            r = self.rotary
            rot = dict(
                rot_dim=r.dim,
                base=r.base,
                interleaved=r.interleaved,
                interpolation_factor=r.interpolation_factor,
                base_rescale_factor=r.base_rescale_factor,
            )
            q_xpos = k_xpos = None
            if r.xpos_scale_base is not None:
                # Cached keys keep the scale of their absolute position: a fixed centre.
                xpos = xpos_scale(
                    rotary_pos,
                    r.dim,
                    scale_base=r.xpos_scale_base,
                    max_position=None if self_cache is None else self_cache.keys.shape[2],
                    interleaved=r.interleaved,
                )  # [S, rot_dim]
                q_xpos, k_xpos = xpos[..., -T:, :], 1.0 / xpos
            q = apply_rotary(q, rotary_pos[..., -T:], scale=q_xpos, **rot)
            k = apply_rotary(k, rotary_pos, scale=k_xpos, **rot)
        new_cache = None
        if self.is_cross:
            new_cache = LayerKVCache(heads_major(k), heads_major(values))  # what a decoder caches
        if cfg.collab_heads:
            k = jnp.broadcast_to(k, (B, S, N, k.shape[-1]))  # every head reads the shared keys
        # A self-attention cache goes to ``cached_attention``, which reads the old cache
        # and writes the new tokens last; memory key/values are handed to it apart.
        fused_cache = self_cache is not None
        mem_prefix = None

        if cfg.num_mem_kv:
            M = cfg.num_mem_kv
            init = nn.initializers.normal(1.0)
            axes = (KV_HEADS, None, HEAD_DIM)
            mem_k = self.param("mem_k", nn.with_logical_partitioning(init, axes), (K, M, H))
            mem_v = self.param("mem_v", nn.with_logical_partitioning(init, axes), (K, M, H))
            if norm_mem_k is not None:
                mem_k = norm_mem_k(mem_k)

            mem_prefix = tuple(jnp.swapaxes(m, 0, 1)[None] for m in (mem_k, mem_v))  # [1,M,K,H]
            if not fused_cache:  # the cache path hands them to cached_attention apart
                k, v = (
                    jnp.concatenate([jnp.broadcast_to(m, (B, M, K, H)).astype(t.dtype), t], axis=1)
                    for m, t in zip(mem_prefix, (k, v), strict=True)
                )
                mem_prefix = None
            if key_mask is not None:
                key_mask = pad_keys(key_mask, M)
            if isinstance(bias, RelativeBias):
                # The memory key/values lead the keys without a position.
                bias = dataclasses.replace(bias, prefix=bias.prefix + M)
            elif bias is not None:
                pad = [(0, 0)] * (bias.ndim - 1) + [(M, 0)]
                bias = jnp.pad(bias, pad)
            if attn_mask is not None:
                attn_mask = jnp.asarray(attn_mask, bool)
                lead = attn_mask.shape[:-1]
                attn_mask = jnp.concatenate([jnp.ones((*lead, M), bool), attn_mask], axis=-1)

        mask = None
        if self_cache is not None:
            # Query i sits at slot cache_index + i, behind the memory key/values.
            mask = AttentionMask(
                causal=True,
                q_offset=cache_index + cfg.num_mem_kv,
                key_padding=key_mask,
                explicit=attn_mask,
            )
        elif self.causal or key_mask is not None or attn_mask is not None:
            mask = AttentionMask(
                causal=self.causal and not self.is_cross,
                key_padding=key_mask,
                explicit=attn_mask,
            )
        rng = None
        if cfg.dropout > 0.0 and not deterministic:
            rng = self.make_rng("dropout")
        talking = {}  # head-mixing weights [N_in, N_out] (x-transformers' 1x1 Conv2d)
        for name, on in (
            ("pre_talking_heads", cfg.pre_talking_heads),
            ("post_talking_heads", cfg.post_talking_heads),
        ):
            if on:
                init = nn.with_logical_partitioning(_identity_init, (None, None))
                talking[name] = self.param(name, init, (N, N))
        attention_kwargs = dict(
            mask=mask,
            bias=bias,
            scale=scale,
            dropout_rate=0.0 if deterministic else cfg.dropout,
            dropout_rng=rng,
            implementation=cfg.implementation,
            prev_logits=prev_attn,
            logit_softclamp=cfg.logit_softclamp_value if cfg.softclamp_logits else None,
            sparse_topk=cfg.sparse_topk,
            sparse_topk_straight_through=cfg.sparse_topk_straight_through,
            normalizer=cfg.normalizer,
            return_logits=return_logits,
            **talking,
        )
        if fused_cache:
            out, *cache_parts = cached_attention(
                q,
                k,
                v,
                self_cache.keys,
                self_cache.values,
                cache_index,
                prefix=mem_prefix,
                **attention_kwargs,
            )
            new_cache = LayerKVCache(*cache_parts)
        else:
            q, k, v = _heads_sharded(q, k, v)
            out = attention(q, k, v, **attention_kwargs)  # [B, T, N, H]
        logits = None
        if return_logits:
            out, logits = out  # logits [B, N, T, S]
        if not fused_cache:
            out = _length_sharded(out)
        if cfg.head_scale:
            # Normformer (2110.09456): a learned scalar per head, initialised to 1.
            init = nn.with_logical_partitioning(nn.initializers.ones, (HEADS,))
            out = out * self.param("head_scale", init, (N,))[:, None].astype(out.dtype)
        if cfg.gate_values:
            # AlphaFold2-style gating by the layer input; zero init gives a gate of 1/2.
            gate = Projection(
                (N, H),
                (D,),
                (EMBED, HEADS, HEAD_DIM),
                kernel_init=nn.initializers.zeros,
                name="to_v_gate",
            )(x)
            out = out * jax.nn.sigmoid(gate)
        if cfg.on_attn:
            # Attention on attention (1908.06954): project to 2D, then a GLU.
            out = Projection((2 * D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)
            out, gate = jnp.split(out, 2, axis=-1)
            out = out * jax.nn.sigmoid(gate)
        else:
            out = Projection((D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)
        if query_mask is not None:
            out = jnp.where(query_mask[..., None], out, jnp.zeros((), out.dtype))
        return out, AttentionIntermediates(logits=logits, values=values, kv_cache=new_cache)

    def _check_cache(self, kv_cache: LayerKVCache, cache_index, B: int, mem) -> None:
        """Raises ValueError unless a self-attention KV cache fits this layer and call."""
        if not self.causal:
            raise ValueError("a self-attention kv_cache needs a causal layer, got causal=False")
        if mem is not None:
            raise ValueError("kv_cache and XL memories (mem) cannot be combined")
        if self.config.collab_heads:
            raise ValueError("kv_cache is not supported with collab_heads")
        if cache_index is None:
            raise ValueError("kv_cache needs cache_index (the number of filled slots)")
        K, H = self.config.num_kv_heads(self.heads), self.config.dim_head
        for name, t in (("keys", kv_cache.keys), ("values", kv_cache.values)):
            if t.ndim != 4 or t.shape[:2] != (B, K) or t.shape[3] != H:
                raise ValueError(
                    f"kv_cache.{name} must have shape [B, K, L, H] = [{B}, {K}, L, {H}], "
                    f"got {t.shape}"
                )

    # Helpers of __call__ that create parameters (they run inside its compact scope).

    def _collab_queries_keys(self, q_input: Array, k_input: Array) -> tuple[Array, Array]:
        """Collaborative heads (2006.16362): shared q/k of width C, mixed per head.

        ``S_h = sum_c q_c m_{h,c} k_c``: queries are scaled by head h's mixing vector and
        every head reads the one shared key. Returns q ``[B, T, N, C]``, k ``[B, S, 1, C]``.
        """
        N, D = self.heads, self.dim
        C = self.config.collab_dim(N)
        q = Projection((C,), (D,), (EMBED, None), name="to_q")(q_input)  # [B, T, C]
        k = Projection((C,), (k_input.shape[-1],), (EMBED, None), name="to_k")(k_input)
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (HEADS, None))
        mixing = self.param("collab_mixing", init, (N, C))
        q = q[:, :, None, :] * mixing.astype(q.dtype)  # [B, T, N, C]
        return q, k[:, :, None, :]

    def _mix_value_residual(self, x: Array, v: Array, value_residual: Array) -> Array:
        """Value residual learning (2410.17897): ``v <- r + w (v - r)``, r = first values.

        ``w`` is 1/2, or ``sigmoid(W x + b)`` per token and head with a learned mix.
        """
        if value_residual.shape != v.shape:
            raise ValueError(
                f"value_residual must have the values' shape [B, S, K, H] = {v.shape}, "
                f"got {value_residual.shape}"
            )
        mix = 0.5
        if self.learned_value_residual_mix:
            N = self.heads
            if v.shape[1] != x.shape[1] or v.shape[2] != N:
                # The mix is per query token and query head (as in x-transformers).
                raise ValueError(
                    "the learned value residual mix needs one key per query and one "
                    f"key/value head per query head; got values {v.shape} for queries "
                    f"{x.shape[:2]} with {N} heads (XL memories or grouped key/values: "
                    "use learned_value_residual_mix=False)"
                )
            mix = Projection(
                (N,), (self.dim,), (EMBED, HEADS), use_bias=True, name="to_value_residual_mix"
            )(x)
            mix = jax.nn.sigmoid(mix)[..., None]  # [B, T, N, 1]
        value_residual = value_residual.astype(v.dtype)
        return value_residual + mix * (v - value_residual)

    def _cosine_sim_queries_keys(self, q: Array, k: Array):
        """Cosine-sim attention (2010.04245): l2-normalised q and k per group of dims.

        Returns ``(q, k, norm_mem_k, scale)``: the logits scale is ``qk_norm_scale``, or
        ``dim_head ** -0.5`` with learned per-head, per-dim gains (``qk_norm_dim_scale``).
        ``norm_mem_k`` does to memory keys ``[K, M, H]`` what was done to the keys.
        """
        cfg = self.config
        N, H, K = self.heads, cfg.dim_head, cfg.num_kv_heads(self.heads)
        q = l2_normalize(q, groups=cfg.qk_norm_groups)
        k = l2_normalize(k, groups=cfg.qk_norm_groups)
        k_gain = None
        scale = cfg.qk_norm_scale
        if cfg.qk_norm_dim_scale:
            init = nn.with_logical_partitioning(
                nn.initializers.constant(H**0.25), (HEADS, HEAD_DIM)
            )
            q_gain = self.param("qk_norm_q_scale", init, (N, H))
            k_gain = self.param("qk_norm_k_scale", init, (K, H))
            q, k = (q * q_gain).astype(q.dtype), (k * k_gain).astype(k.dtype)
            scale = H**-0.5

        def norm_mem_k(mem_k):
            mem_k = l2_normalize(mem_k, groups=cfg.qk_norm_groups)
            return mem_k if k_gain is None else mem_k * k_gain[:, None, :]

        return q, k, norm_mem_k, scale

    def _rmsnorm_queries_keys(self, q: Array, k: Array) -> tuple[Array, Array]:
        """QK RMSNorm (2302.05442): ``sqrt(H) q / |q| (gamma + 1)``, gamma per head and dim."""
        cfg = self.config
        N, H, K = self.heads, cfg.dim_head, cfg.num_kv_heads(self.heads)
        init = nn.with_logical_partitioning(nn.initializers.zeros, (HEADS, HEAD_DIM))
        q_gamma = self.param("q_rmsnorm", init, (N, H))
        k_gamma = self.param("k_rmsnorm", init, (K, H))
        q = (l2_normalize(q) * H**0.5 * (q_gamma + 1.0)).astype(q.dtype)
        k = (l2_normalize(k) * H**0.5 * (k_gamma + 1.0)).astype(k.dtype)
        return q, k

"""The transformer block stack: ``AttentionLayers`` and its ``Encoder`` / ``Decoder`` /
``CrossAttender`` specialisations, configured like x-transformers 2.x.

Paper: 1706.03762; pre-norm 2002.04745; sandwich transformer 1911.03864; macaron
1906.02762; T5 relative bias 1910.10683; ALiBi 2108.12409; rotary 2104.09864; GRU
gating 1910.06764; Normformer 2110.09456; LayerScale 2103.17239; ReZero 2003.04887;
token shift 2106.07477; ALBERT weight tying 1909.11942; hyper-connections 2409.19606;
xPos 2212.10554; dynamic position bias 2111.09883; value residual learning 2410.17897;
position-infused attention (Shortformer, seed x-transformers only) 2012.15832.

A stack is a sequence of sublayers, each ``'a'`` (self-attention), ``'c'``
(cross-attention) or ``'f'`` (feedforward), numbered consecutively as in x-transformers
(a Decoder of depth 2 is a, f, a, f = ``layers_0`` .. ``layers_3``). One sublayer step::

    pre-norm:  x = x + branch(norm(x))        (then one final norm after the stack)
    post-norm: x = norm(x + branch(x))

The ``+`` may be a GRU gate or a hyper-connection over several residual streams
(``xtx.layers.residual``). ``execute_order`` lists the sublayers to run: weight tying
runs one block ``depth`` times, ``layers_execute_order`` any sequence of indices.

Shapes: x ``[B, T, D]``, context ``[B, S, Dc]``, masks ``[B, T]`` / ``[B, S]``.

KV cache: ``init_kv_cache`` builds a ``KVCache`` (one ``LayerKVCache`` ``[B, K, L, H]`` per
self-attention run, the cross-attention keys/values of the context, a ``[B, L]`` key mask
and the fill count); ``stack(x, cache=cache)`` writes the T new tokens at the fill, places
every position (rotary, xPos, T5 / ALiBi / dynamic bias) at ``fill + t`` and returns
``(out, new_cache)``. The first call on a fresh cache (the prefill) also projects the
context; later calls read its keys/values from the cache. Under ``scan_layers`` each entry
is stacked over the depth and rides along the scanned axis. The plain and the cached call
share one body (``_run``); they differ only in the masks and positions they set up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.layers.attention import Attention, LayerKVCache, RotarySettings
from xtx.layers.base import ACT_EMBED, BATCH, EMBED, HEADS, LAYERS, LENGTH, NORM, ConfiguredMeta
from xtx.layers.feedforward import FeedForward
from xtx.layers.norms import Norm
from xtx.layers.position_bias import DynamicPositionBias
from xtx.layers.residual import GRUGating, HyperConnection, Residual
from xtx.layers.stack_config import LAYER_TYPES, AttentionLayersConfig
from xtx.ops import alibi_slopes
from xtx.ops.barriers import cotangent_barrier
from xtx.ops.relative_bias import RelativeBias
from xtx.ops.token_shift import shift_tokens

Array = jax.Array

__all__ = [
    "LAYER_TYPES",
    "AttentionLayers",
    "AttentionLayersConfig",
    "CrossAttender",
    "Decoder",
    "Encoder",
    "KVCache",
    "LayerKVCache",
    "Sublayer",
    "init_kv_cache",
    "remat_policy",
    "stack_layer_params",
    "unstack_layer_params",
]


class Sublayer(nn.Module):
    """One residual step of the stack: norms around an attention or feedforward branch.

    In order: the residual combiner's ``prepare`` (identity, or the hyper-connection
    read-out of the streams), pre-norm, token shift, the branch, ReZero gate, layer
    scale, sandwich norm, the residual combine (add, GRU gate or hyper-connection
    write-back), post-norm. ``index`` is the sublayer's position in ``layer_types``.

    ``carry`` holds what flows between sublayers besides the hidden state (residual
    attention logits, first-layer values); the sublayer returns it updated. In a cached
    call (``cache_index`` given) an attention sublayer reads ``kv_cache`` (its
    ``LayerKVCache``, or None for a cross-attention layer before the prefill) and
    returns the updated one in the carry under ``"kv_cache"``.
    """

    config: AttentionLayersConfig
    layer_type: str
    index: int = 0
    # A field, not an argument: under `nn.remat` every call argument is traced.
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x, carry, *, context, masks, mem, rotary_pos, bias, kv_cache=None, cache_index=None
    ):
        cfg = self.config
        deterministic = self.deterministic
        norm = lambda name: Norm(cfg.norm_kind, unit_offset=cfg.norm_add_unit_offset, name=name)  # noqa: E731
        if cfg.num_residual_streams > 1:
            combiner = HyperConnection(
                cfg.dim,
                cfg.num_residual_streams,
                self.index,
                cfg.hyper_conn_sinkhorn_iters,
                name="residual",
            )
        elif cfg.gate_residual:
            combiner = GRUGating(cfg.dim, cfg.scale_residual, name="residual")
        else:
            combiner = Residual(cfg.dim, cfg.scale_residual, name="residual")
        x, residual, combine_args = combiner.prepare(x)
        # ReZero replaces every block norm with the identity.
        if cfg.pre_norm and not cfg.use_rezero:
            pre_norm = norm("pre_norm")
            x = pre_norm(x)
            if mem is not None:
                # XL memories go through the consuming layer's own pre-norm.
                mem = pre_norm(mem)
        shifts = cfg.shifts_of(self.index)
        if shifts:
            # x-transformers hands the padding mask to attention branches only, so only
            # they zero padded positions before shifting.
            x = shift_tokens(x, shifts, masks["query"] if self.layer_type != "f" else None)
        if self.layer_type == "f":
            out = FeedForward(cfg.ff, cfg.dim, name="ff")(x, deterministic=deterministic)
            if cfg.macaron:
                out = out * 0.5
        elif self.layer_type == "a":
            rotary = None
            if cfg.uses_rotary:
                rotary = RotarySettings(
                    dim=cfg.rotary_dim,
                    interpolation_factor=cfg.rotary_interpolation_factor,
                    base_rescale_factor=cfg.rotary_base_rescale_factor,
                    xpos_scale_base=cfg.rotary_xpos_scale_base if cfg.rotary_xpos else None,
                )
            out, inter = Attention(
                cfg.attn,
                cfg.dim,
                cfg.heads,
                causal=cfg.causal,
                rotary=rotary,
                position_infused=cfg.position_infused_attn,
                learned_value_residual_mix=self.index in cfg.learned_value_mix_layers,
                name="attn",
            )(
                x,
                key_mask=masks["self_keys"],
                query_mask=masks["query"],
                attn_mask=masks["attn"],
                mem=mem,
                rotary_pos=rotary_pos,
                bias=bias,
                prev_attn=carry["prev_attn"] if cfg.residual_attn else None,
                value_residual=carry["values"] if cfg.add_value_residual else None,
                return_logits=cfg.residual_attn,
                kv_cache=kv_cache,
                cache_index=cache_index,
                deterministic=deterministic,
            )
            carry = dict(carry, prev_attn=inter.logits)
            if carry["values"] is None:
                carry["values"] = inter.values
        else:
            out, inter = Attention(
                cfg.cross_attn_config, cfg.dim, cfg.heads, is_cross=True, name="attn"
            )(
                x,
                context,
                key_mask=masks["context"],
                query_mask=masks["query"],
                prev_attn=carry["prev_cross_attn"] if cfg.cross_residual_attn else None,
                value_residual=carry["cross_values"] if cfg.add_value_residual else None,
                return_logits=cfg.cross_residual_attn,
                kv_cache=kv_cache,
                deterministic=deterministic,
            )
            carry = dict(carry, prev_cross_attn=inter.logits)
            if carry["cross_values"] is None:
                carry["cross_values"] = inter.values
        if cache_index is not None and self.layer_type != "f":
            carry["kv_cache"] = inter.kv_cache
        if cfg.use_rezero and self.layer_type != "f":
            # Seed x-transformers gates attention branches (self and cross), not FF.
            gate = self.param(
                "rezero_gate", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,)
            )
            out = out * gate.astype(out.dtype)
        if cfg.use_layerscale:
            # Stored like the norm gains: minus one when norm_add_unit_offset.
            offset = float(cfg.norm_add_unit_offset)
            init = nn.initializers.constant(cfg.layerscale_init_value - offset)
            gamma = self.param(
                "layer_scale", nn.with_logical_partitioning(init, (NORM,)), (cfg.dim,)
            )
            out = out * (gamma + offset).astype(out.dtype)
        if cfg.sandwich_norm:
            out = norm("sandwich_norm")(out)
        x = combiner(out, residual, **combine_args)
        if not cfg.pre_norm and not cfg.use_rezero:
            x = norm("post_norm")(x)
        if x.ndim == 3:
            # Names the hidden state's axes for sharding rules (a no-op without rules):
            # e.g. "length" -> the model axis gives sequence parallelism between layers.
            x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        return x, carry


class KVCache(NamedTuple):
    """The key/value cache of a stack for incremental decoding (a pytree of fixed shape).

    A fresh cache (``init_kv_cache``) has ``length`` None and its ``cross`` entries None:
    the first call on it, the prefill, is known when tracing. It writes from slot 0 and
    projects the context once; every later call finds the context's keys/values here.

    Attributes:
      layers: one ``LayerKVCache`` ``[B, K, L, H]`` (heads-major) per run of a self-attention layer
        (in execution order; a tied layer run twice has two). With ``scan_layers`` one
        ``[depth, B, K, L, H]`` per self-attention sublayer of the scanned block.
      cross: the same for cross-attention, holding the context's keys/values
        ``[B, K, S, H]`` (``[depth, B, K, S, H]`` scanned); None before the prefill.
      key_mask: ``[B, L]`` bool, True at the slots filled with a (non-padding) token.
      length: int32 ``[]``, the number of slots filled: the next token's position; None
        before the prefill.
    """

    layers: tuple[LayerKVCache, ...]
    cross: tuple[LayerKVCache | None, ...]
    key_mask: Array
    length: Array | None


def init_kv_cache(
    config: AttentionLayersConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32
) -> KVCache:
    """An empty ``KVCache`` of ``max_len`` slots for the stack ``config``.

    Args:
      config: the stack's ``AttentionLayersConfig``.
      batch_size: B.
      max_len: L, the most tokens the cache holds (prompt and generated).
      dtype: dtype of the cached self-attention keys and values.

    Returns:
      A fresh ``KVCache``: zero keys/values, an all-False key mask, ``length`` and the
      cross-attention entries None.
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    check_cache_support(config)
    K, H = config.attn.num_kv_heads(config.heads), config.attn.dim_head
    shape = (batch_size, K, max_len, H)  # heads-major, see LayerKVCache
    if config.scan_layers:
        shape = (config.depth, *shape)
    layers = tuple(
        LayerKVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        for _ in range(_cache_entries(config, "a"))
    )
    cross = (None,) * _cache_entries(config, "c")
    return KVCache(layers, cross, jnp.zeros((batch_size, max_len), bool), None)


def _cache_entries(config: AttentionLayersConfig, layer_type: str) -> int:
    """How many cache entries of ``layer_type`` (``'a'`` or ``'c'``) the stack's KVCache
    holds: one per run in the execution order, or one per sublayer of the scanned block."""
    if config.scan_layers:
        return config.scan_block.count(layer_type)
    return sum(config.layer_types[i] == layer_type for i in config.execute_order)


def check_cache_support(config: AttentionLayersConfig) -> None:
    """Raises ValueError when the stack cannot decode with a KV cache, saying why."""
    if not config.causal:
        raise ValueError("a KV cache needs a causal stack (Decoder), got causal=False")
    if any(config.shifts_of(i) for i in range(len(config.layer_types))):
        raise ValueError("a KV cache is not supported with shift_tokens (token shift)")
    if config.attn.collab_heads:
        raise ValueError("a KV cache is not supported with attn_collab_heads")


def _checked_cache(cache: Any, config: AttentionLayersConfig, B: int, T: int) -> KVCache:
    """The cache, after checking that it fits the stack and ``T`` new tokens."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache (see init_kv_cache), got {type(cache).__name__}")
    check_cache_support(config)
    what = "sublayer of the scanned block" if config.scan_layers else "run"
    for field, layer_type, kind in (("layers", "a", "self"), ("cross", "c", "cross")):
        expected, got = _cache_entries(config, layer_type), len(getattr(cache, field))
        if got != expected:
            raise ValueError(
                f"cache.{field} must hold one LayerKVCache per {kind}-attention {what} "
                f"({expected}), got {got}"
            )
    if config.scan_layers:
        for entry in (*cache.layers, *cache.cross):
            if entry is not None and entry.keys.shape[0] != config.depth:
                raise ValueError(
                    f"with scan_layers the cache entries are stacked over the depth "
                    f"({config.depth}) on axis 0, got keys of shape {entry.keys.shape}"
                )
    if cache.key_mask.ndim != 2 or cache.key_mask.shape[0] != B:
        raise ValueError(f"cache.key_mask must be [B, L] with B = {B}, got {cache.key_mask.shape}")
    L = cache.key_mask.shape[1]
    if T > L:
        raise ValueError(f"{T} new tokens do not fit in a cache of max_len {L}")
    return cache


def _checked_mems(mems: Any, num_self: int, B: int, D: int) -> tuple[Array, ...] | None:
    """XL memories as a tuple of ``[B, M, D]`` arrays, one per self-attention layer."""
    if mems is None:
        return None
    if not isinstance(mems, tuple | list):
        raise TypeError(
            f"mems must be a tuple of [B, M, D] arrays, one per self-attention layer, "
            f"got {type(mems).__name__}"
        )
    if len(mems) != num_self:
        raise ValueError(
            f"mems must hold one array per self-attention layer ({num_self}), got {len(mems)}"
        )
    mems = tuple(jnp.asarray(m) for m in mems)
    for i, m in enumerate(mems):
        if m.ndim != 3 or m.shape[0] != B or m.shape[2] != D:
            raise ValueError(f"mems[{i}] must have shape [B, M, D] = [{B}, M, {D}], got {m.shape}")
        if m.shape != mems[0].shape:
            raise ValueError(
                f"every mems entry must have the same length M: mems[0] is {mems[0].shape}, "
                f"mems[{i}] is {m.shape}"
            )
    return mems


def _checked_mem_masks(mem_masks: Any, mems: tuple[Array, ...] | None, B: int) -> Any:
    """Per-layer ``[B, M]`` bool memory masks (entries may be None), or None."""
    if mem_masks is None:
        return None
    if mems is None:
        raise ValueError("mem_masks was given without mems")
    if not isinstance(mem_masks, tuple | list):
        raise TypeError(
            f"mem_masks must be a tuple of [B, M] masks, got {type(mem_masks).__name__}"
        )
    if len(mem_masks) != len(mems):
        raise ValueError(
            f"mem_masks must hold one [B, M] mask per mems entry ({len(mems)}), "
            f"got {len(mem_masks)}"
        )
    expected = mems[0].shape[:2] if mems else (B, 0)
    checked = []
    for i, m in enumerate(mem_masks):
        if m is not None:
            m = jnp.asarray(m)
            if m.shape != expected:
                raise ValueError(
                    f"mem_masks[{i}] must have shape [B, M] = {expected}, got {m.shape}"
                )
            m = m.astype(bool)
        checked.append(m)
    return tuple(checked)


def _memory_key_mask(
    key_mask: Array | None, mem_mask: Array | None, B: int, T: int, mem_len: int
) -> Array | None:
    """The ``[B, M + T]`` self-attention key mask: memory rows first, True unless masked."""
    if mem_mask is None:
        if key_mask is None or not mem_len:
            return key_mask
        mem_mask = jnp.ones((B, mem_len), bool)
    elif key_mask is None:
        key_mask = jnp.ones((B, T), bool)
    return jnp.concatenate([mem_mask, key_mask.astype(bool)], axis=1)


def _empty_carry() -> dict[str, Any]:
    """What flows between sublayers besides the hidden state, before the first one."""
    return {"prev_attn": None, "prev_cross_attn": None, "values": None, "cross_values": None}


def remat_policy(name: str) -> Any:
    """The ``jax.checkpoint`` policy of a ``REMAT_POLICIES`` name ("none" is no remat)."""
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.checkpoint_dots_with_no_batch_dims,
    }[name]


def _maybe_remat(module_cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """``module_cls`` wrapped in ``nn.remat`` with the named policy, or as it is."""
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy), prevent_cse=False)


class _ScanBlock(nn.Module):
    """One block of ``scan_block`` sublayers: the body of the scan over layers.

    ``__call__(x, per_layer, context, masks, rotary_pos, bias, cache_index)`` with
    ``per_layer`` = this layer's (XL memory ``[B, M, D]``, self-attention key mask
    ``[B, S]``, self-attention caches, cross-attention caches), any of them None (the
    caches are tuples, one entry per attention sublayer of the block). Returns
    ``(x, (hidden, new self caches, new cross caches))`` with ``hidden`` the
    self-attention input; in a cached call (``cache_index`` given) hidden is None.
    """

    config: AttentionLayersConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, per_layer, context, masks, rotary_pos, bias, cache_index):
        cfg = self.config
        mem, self_keys, self_caches, cross_caches = per_layer
        caches = {"a": iter(self_caches or ()), "c": iter(cross_caches or ())}
        new_caches = {"a": [], "c": []}
        hidden = None
        for j, layer_type in enumerate(cfg.scan_block):
            layer_masks, layer_mem, cache_kwargs = masks, None, {}
            if layer_type == "a":
                hidden = x
                layer_masks = dict(masks, self_keys=self_keys)
                layer_mem = mem
            if cache_index is not None and layer_type != "f":
                cache_kwargs = dict(kv_cache=next(caches[layer_type]), cache_index=cache_index)
            # Nothing but the hidden state flows between scanned sublayers (the config
            # rules out residual attention and value residuals), so the carry starts empty.
            new_x, carry = Sublayer(cfg, layer_type, j, self.deterministic, name=f"layers_{j}")(
                x,
                _empty_carry(),
                context=context,
                masks=layer_masks,
                mem=layer_mem,
                rotary_pos=rotary_pos,
                bias=bias,
                **cache_kwargs,
            )
            if "kv_cache" in carry:
                new_caches[layer_type].append(carry["kv_cache"])
            if cfg.layer_dropout > 0.0 and not self.deterministic:
                skip = jax.random.bernoulli(self.make_rng("dropout"), cfg.layer_dropout)
                new_x = jnp.where(skip, x, new_x)
            x = new_x
        if cache_index is not None:
            hidden = None  # decoding has no use for the XL hiddens
        return x, (hidden, tuple(new_caches["a"]), tuple(new_caches["c"]))


def stack_layer_params(params: dict[str, Any], config: AttentionLayersConfig) -> dict[str, Any]:
    """Unrolled stack parameters (``layers_{i}``) -> the ``scan_layers`` layout.

    ``params`` is the stack's subtree (``variables["params"]["attn_layers"]`` of a
    wrapper). Sublayer ``b * n + j`` of the unrolled stack (n sublayers per block)
    becomes entry ``b`` of ``blocks/layers_{j}``; other entries are kept.
    """
    n = len(config.scan_block)
    missing = [f"layers_{i}" for i in range(n * config.depth) if f"layers_{i}" not in params]
    if missing:
        raise ValueError(
            f"stack_layer_params: the unrolled parameters lack {missing[:3]} "
            f"(expected layers_0 .. layers_{n * config.depth - 1})"
        )
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["blocks"] = {
        f"layers_{j}": jax.tree.map(
            lambda *leaves: jnp.stack(leaves),
            *[nn.meta.unbox(params[f"layers_{b * n + j}"]) for b in range(config.depth)],
        )
        for j in range(n)
    }
    return out


def unstack_layer_params(params: dict[str, Any], config: AttentionLayersConfig) -> dict[str, Any]:
    """The inverse of ``stack_layer_params``: ``blocks/layers_{j}`` -> ``layers_{i}``."""
    if "blocks" not in params:
        raise ValueError("unstack_layer_params: the parameters have no 'blocks' (not scanned)")
    n = len(config.scan_block)
    blocks = nn.meta.unbox(params["blocks"])
    out = {k: v for k, v in params.items() if k != "blocks"}
    for b in range(config.depth):
        for j in range(n):
            out[f"layers_{b * n + j}"] = jax.tree.map(
                lambda leaf, b=b: leaf[b], blocks[f"layers_{j}"]
            )
    return out


class AttentionLayers(nn.Module, metaclass=ConfiguredMeta):
    """A stack of attention / feedforward sublayers.

    Build it from keywords like x-transformers (``AttentionLayers(dim=512, depth=6,
    heads=8, attn_dim_head=64)``) or from a config (``AttentionLayers(config=cfg)``).
    """

    config: AttentionLayersConfig

    config_overrides = {}

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> AttentionLayersConfig:
        for key, value in cls.config_overrides.items():
            if key in kwargs and kwargs[key] != value:
                raise TypeError(f"{cls.__name__} sets {key}={value}; do not pass {key}")
            kwargs[key] = value
        return AttentionLayersConfig.from_flat(owner=cls.__name__, **kwargs)

    @property
    def dim(self) -> int:
        return self.config.dim

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: Array | None = None,
        context_mask: Array | None = None,
        attn_mask: Array | None = None,
        self_attn_kv_mask: Array | None = None,
        mems: tuple[Array, ...] | list[Array] | None = None,
        mem_masks: tuple[Array | None, ...] | list[Array | None] | None = None,
        return_hiddens: bool = False,
        cache: KVCache | None = None,
        deterministic: bool = True,
    ) -> Array | tuple[Array, list[Array]] | tuple[Array, KVCache]:
        """Runs the stack.

        Args:
          x: ``[B, T, D]`` embeddings.
          context: ``[B, S, Dc]``; required when the stack cross-attends.
          mask: ``[B, T]`` bool, False at padding: padding keys are not attended and the
            attention outputs of padding queries are zero.
          context_mask: ``[B, S]`` bool over the context.
          attn_mask: extra bool mask ``[T, S]``, ``[N, T, S]`` or ``[B, N, T, S]``.
          self_attn_kv_mask: ``[B, T]`` key mask for self-attention that replaces ``mask``
            on the key side (used by the forgetful causal mask).
          mems: per self-attention layer ``[B, M, D]`` XL memories (pre-norm hiddens,
            1901.02860), the same M for every layer; keys are ``[memory; tokens]``.
          mem_masks: per self-attention layer ``[B, M]`` bool, False at memory rows that
            must not be attended (default: every memory row is attended).
          return_hiddens: also return the input hidden of each self-attention layer (the
            XL memories of the next segment).
          cache: a ``KVCache`` (``init_kv_cache``): x holds the T tokens after the
            ``cache.length`` already decoded; positions follow the cache. The first call
            on a fresh cache projects ``context`` into it; later calls use those
            keys/values and ignore the values of ``context`` (its shape must not change).
          deterministic: disable dropout and layer dropout.

        Returns:
          ``[B, T, D]``; with ``return_hiddens`` also the list of hiddens; with ``cache``
          the pair ``([B, T, D], new_cache)``.
        """
        cfg = self.config
        B, T, D = x.shape
        if D != cfg.dim:
            raise ValueError(f"AttentionLayers input must have last dim {cfg.dim}, got {x.shape}")
        if cfg.cross_attend and context is None:
            raise ValueError("this stack cross-attends (cross_attend=True): pass `context`")
        if not cfg.cross_attend and context is not None:
            raise ValueError("`context` was given but the stack has cross_attend=False")
        if mask is not None and mask.shape != (B, T):
            raise ValueError(f"mask must have shape [B, T] = {(B, T)}, got {mask.shape}")
        if context is not None and context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(
                    f"context_mask must have shape [B, S] = {context.shape[:2]}, "
                    f"got {context_mask.shape}"
                )
        layer_types = cfg.layer_types
        # Each run of a self-attention layer takes its own memory (tied layers run often).
        num_self = sum(layer_types[i] == "a" for i in cfg.execute_order)
        if cache is not None:
            return self._cached(
                x, cache, context, mask, context_mask, attn_mask, self_attn_kv_mask, mems,
                return_hiddens, num_self, deterministic,
            )  # fmt: skip
        mems = _checked_mems(mems, num_self, B, D)
        mem_len = mems[0].shape[1] if mems else 0
        mem_masks = _checked_mem_masks(mem_masks, mems, B)

        key_mask = self_attn_kv_mask if self_attn_kv_mask is not None else mask
        # One key mask per self-attention layer: the memory part may differ by layer.
        self_key_masks = [
            _memory_key_mask(key_mask, mem_mask, B, T, mem_len)
            for mem_mask in (mem_masks or (None,) * num_self)
        ]
        masks = {
            "self_keys": self_key_masks[0] if self_key_masks else key_mask,
            "query": mask,
            "attn": attn_mask,
            "context": context_mask,
        }
        # Keys span the memory then the tokens; queries are the last T positions.
        S = mem_len + T
        key_pos = jnp.arange(S) - mem_len
        # Position biases are tables over key-query distances (RelativeBias, queries
        # right-aligned with the keys), expanded per block by the attention backend.
        bias = self._position_bias(S)
        rotary_pos = key_pos if cfg.uses_rotary else None

        if mems is not None or return_hiddens:
            if cfg.num_residual_streams > 1:
                # x-transformers would hand the [B*S, T, D] streams on as memories.
                raise ValueError(
                    "num_residual_streams > 1 (hyper-connections) does not support mems or "
                    "return_hiddens (XL recurrence)"
                )
        x, hiddens, _ = self._run(
            x, context, masks, self_key_masks, mems, rotary_pos, bias, deterministic
        )
        if return_hiddens:
            return x, hiddens
        return x

    def _position_bias(self, num_keys: int, q_offset: Array | None = None) -> Any:
        """The stack's shared relative-position bias over ``num_keys`` positioned keys
        (a ``RelativeBias``, queries at ``q_offset``: right-aligned when None), or None."""
        cfg = self.config
        bias = None
        if cfg.rel_pos_bias:
            table = self.param(
                "rel_pos",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, HEADS)),
                (cfg.rel_pos_num_buckets, cfg.heads),
            )
            bias = RelativeBias.t5(
                table,
                causal=cfg.causal,
                num_buckets=cfg.rel_pos_num_buckets,
                max_distance=cfg.rel_pos_max_distance,
                scale=cfg.attn.dim_head**0.5,
            )
        elif cfg.alibi_pos_bias:
            slopes = alibi_slopes(cfg.alibi_num_heads or cfg.heads, total_heads=cfg.heads)
            bias = RelativeBias.alibi(slopes, num_keys)
        elif cfg.dynamic_pos_bias:
            bias = DynamicPositionBias(
                cfg.dim // 4,
                cfg.heads,
                cfg.dynamic_pos_bias_mlp_depth,
                cfg.dynamic_pos_bias_log_distance,
                cfg.dynamic_pos_bias_norm,
                name="rel_pos",
            )(num_keys)
        if bias is not None and q_offset is not None:
            bias = dataclasses.replace(bias, q_offset=q_offset)
        return bias

    def _split_streams(self, x: Array) -> Array:
        """``[B, T, D]`` -> ``[B, T, S, D]`` residual streams under hyper-connections."""
        streams = self.config.num_residual_streams
        if streams == 1:
            return x
        stream_emb = self.param(
            "stream_emb",
            nn.with_logical_partitioning(nn.initializers.zeros, (None, EMBED)),
            (streams, x.shape[-1]),
        )
        return x[:, :, None, :] + stream_emb.astype(x.dtype)  # [B, T, S, D]

    def _finish(self, x: Array) -> Array:
        """Sums the residual streams and applies the final norm."""
        cfg = self.config
        if cfg.num_residual_streams > 1:
            x = x.sum(axis=2)
        if cfg.has_final_norm:
            x = Norm(cfg.norm_kind, unit_offset=cfg.norm_add_unit_offset, name="final_norm")(x)
        return x

    def _cached(
        self,
        x,
        cache,
        context,
        mask,
        context_mask,
        attn_mask,
        self_attn_kv_mask,
        mems,
        return_hiddens,
        num_self,
        deterministic,
    ):
        """One decoding step: the T tokens of x after the ``cache.length`` cached ones."""
        cfg = self.config
        B, T, _ = x.shape
        if mems is not None or return_hiddens:
            raise ValueError("cache cannot be combined with mems or return_hiddens (XL)")
        if attn_mask is not None:
            raise ValueError("cache cannot be combined with attn_mask (its [T, S] keys are "
                             "the cache slots); use mask for padding")  # fmt: skip
        cache = _checked_cache(cache, cfg, B, T)
        # A fresh cache (length None) is being prefilled: its fill is 0.
        index = jnp.asarray(0 if cache.length is None else cache.length, jnp.int32)
        L = cache.key_mask.shape[1]
        new_keys = self_attn_kv_mask if self_attn_kv_mask is not None else mask
        new_keys = jnp.ones((B, T), bool) if new_keys is None else new_keys.astype(bool)
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, new_keys, (0, index))  # [B, L]
        masks = {"self_keys": key_mask, "query": mask, "attn": None, "context": context_mask}
        positions = index + jnp.arange(T, dtype=jnp.int32)  # [T]
        bias = self._position_bias(L, q_offset=index)
        rotary_pos = positions if cfg.uses_rotary else None
        x, _, (layers, cross) = self._run(
            x, context, masks, [key_mask] * num_self, None, rotary_pos, bias, deterministic,
            caches=(cache.layers, cache.cross, index),
        )  # fmt: skip
        return x, KVCache(layers, cross, key_mask, index + T)

    def _run(
        self, x, context, masks, self_key_masks, mems, rotary_pos, bias, deterministic, caches=None
    ):
        """The stack proper, shared by the plain and the cached call: residual streams,
        the sublayers (scanned or unrolled), the final norm.

        ``self_key_masks`` holds one self-attention key mask per self-attention run;
        ``caches`` is ``(self-attention caches, cross-attention caches, fill)`` in a
        cached call. Returns ``(x, XL hiddens, (new self caches, new cross caches))``,
        the last None without ``caches``.
        """
        run = self._scanned if self.config.scan_layers else self._unrolled
        x, hiddens, new_caches = run(
            self._split_streams(x),
            context,
            masks,
            self_key_masks,
            mems,
            rotary_pos,
            bias,
            deterministic,
            caches,
        )
        return self._finish(x), hiddens, new_caches

    def _unrolled(
        self, x, context, masks, self_key_masks, mems, rotary_pos, bias, deterministic, caches
    ):
        """Runs ``execute_order`` one sublayer module at a time (``layers_{i}``).

        Attention run r of each kind reads cache entry r (see ``_run``).
        """
        cfg = self.config
        layer_types = cfg.layer_types
        # One module per entry of layer_types; the execution order may repeat (weight
        # tying) or skip entries, and a repeated module reuses its parameters.
        layer_cls = _maybe_remat(Sublayer, cfg.remat_policy)
        layers = [
            layer_cls(cfg, t, i, deterministic, name=f"layers_{i}")
            for i, t in enumerate(layer_types)
        ]
        order = cfg.execute_order
        mem_iter = iter(mems or ())
        key_mask_iter = iter(self_key_masks)
        cache_iters = {"a": iter(caches[0]), "c": iter(caches[1])} if caches else {}
        new_caches = {"a": [], "c": []}
        hiddens: list[Array] = []
        carry = _empty_carry()
        # XLA:CPU would re-add the residual gradient's whole chain in every consumer
        # (quadratic in depth); the barrier writes it once per sublayer. Exact identity.
        barrier = jax.default_backend() == "cpu"
        for i in order:
            layer, layer_type = layers[i], layer_types[i]
            mem, layer_masks, cache_kwargs = None, masks, {}
            if layer_type == "a":
                hiddens.append(x)
                mem = next(mem_iter) if mems else None
                layer_masks = dict(masks, self_keys=next(key_mask_iter))
            if caches and layer_type != "f":
                cache_kwargs = dict(kv_cache=next(cache_iters[layer_type]), cache_index=caches[2])
            new_x, new_carry = layer(
                x,
                carry,
                context=context,
                masks=layer_masks,
                mem=mem,
                rotary_pos=rotary_pos,
                bias=bias,
                **cache_kwargs,
            )
            if "kv_cache" in new_carry:
                new_carry = dict(new_carry)
                new_caches[layer_type].append(new_carry.pop("kv_cache"))
            if cfg.layer_dropout > 0.0 and not deterministic:
                # Stochastic depth: a dropped sublayer leaves the hidden state (and what it
                # would have handed to later sublayers) as it was.
                skip = jax.random.bernoulli(self.make_rng("dropout"), cfg.layer_dropout)
                new_x = jnp.where(skip, x, new_x)
                # A dropped first attention layer hands on no residual logits: zeros add
                # nothing, which is what x-transformers' "no prev_attn" means.
                new_carry = {
                    k: v
                    if v is None
                    else jnp.where(skip, jnp.zeros_like(v) if carry[k] is None else carry[k], v)
                    for k, v in new_carry.items()
                }
            if barrier:
                new_x = cotangent_barrier(new_x)
            x, carry = new_x, new_carry
        if self.is_initializing():
            # Sublayers left out of the execution order still own weights (x-transformers
            # builds them), so create them to keep the parameter tree complete.
            for i in sorted(set(range(len(layers))) - set(order)):
                layers[i](
                    x,
                    carry,
                    context=context,
                    masks=masks,
                    mem=None,
                    rotary_pos=rotary_pos,
                    bias=bias,
                )
        if not caches:
            return x, hiddens, None
        return x, hiddens, (tuple(new_caches["a"]), tuple(new_caches["c"]))

    def _scanned(
        self, x, context, masks, self_key_masks, mems, rotary_pos, bias, deterministic, caches
    ):
        """Runs one block ``depth`` times under ``nn.scan``: one compiled block body.

        Parameters get a leading ``depth`` axis (logical name ``layers``) under
        ``blocks/layers_{j}``; ``stack_layer_params`` converts from the unrolled tree.
        The cache entries, stacked over the depth, ride along the scanned axis with the
        XL memories and key masks, and come back stacked (see ``_run``).
        """
        cfg = self.config
        block = _maybe_remat(_ScanBlock, cfg.remat_policy)
        scan = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: LAYERS},
        )
        key_masks = None
        if any(m is not None for m in self_key_masks):
            S = (mems[0].shape[1] if mems else 0) + x.shape[1]
            ones = jnp.ones((x.shape[0], S), bool)
            key_masks = jnp.stack([ones if m is None else m for m in self_key_masks])
        self_caches, cross_caches, cache_index = caches or (None, None, None)
        per_layer = (jnp.stack(mems) if mems else None, key_masks, self_caches, cross_caches)
        x, (hidden, new_self, new_cross) = scan(cfg, deterministic, name="blocks")(
            x, per_layer, context, masks, rotary_pos, bias, cache_index
        )
        hiddens = [] if hidden is None else [hidden[i] for i in range(cfg.depth)]
        return x, hiddens, None if caches is None else (new_self, new_cross)


class Encoder(AttentionLayers):
    """Bidirectional stack (BERT-like)."""

    config_overrides = {"causal": False}


class Decoder(AttentionLayers):
    """Causal stack (GPT-like)."""

    config_overrides = {"causal": True}


class CrossAttender(AttentionLayers):
    """Cross-attention + feedforward only: ``context`` is required."""

    config_overrides = {"cross_attend": True, "only_cross": True}

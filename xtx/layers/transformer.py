"""The transformer block stack: ``AttentionLayers`` and its ``Encoder`` / ``Decoder`` /
``CrossAttender`` specialisations, configured like x-transformers 2.x.

Paper: 1706.03762; pre-norm 2002.04745; sandwich transformer 1911.03864; macaron
1906.02762; T5 relative bias 1910.10683; ALiBi 2108.12409; rotary 2104.09864.

A stack is a sequence of sublayers, each ``'a'`` (self-attention), ``'c'``
(cross-attention) or ``'f'`` (feedforward), numbered consecutively as in x-transformers
(a Decoder of depth 2 is a, f, a, f = ``layers_0`` .. ``layers_3``). One sublayer step::

    pre-norm:  x = x + branch(norm(x))        (then one final norm after the stack)
    post-norm: x = norm(x + branch(x))

Shapes: x ``[B, T, D]``, context ``[B, S, Dc]``, masks ``[B, T]`` / ``[B, S]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config, check_not_yet, field_names, split_prefixed, unknown_keyword_error
from xtx.layers.attention import Attention, AttentionConfig, RotarySettings
from xtx.layers.base import HEADS, ConfiguredMeta
from xtx.layers.feedforward import FeedForward, FeedForwardConfig
from xtx.layers.norms import Norm
from xtx.ops import alibi_bias, alibi_slopes, t5_position_bias

Array = jax.Array

LAYER_TYPES = ("a", "c", "f")

# Declared options whose implementation has not landed yet: setting one raises.
PENDING_STACK = {
    "rotary_xpos": False,
    "dynamic_pos_bias": False,
    "position_infused_attn": False,
    "residual_attn": False,
    "cross_residual_attn": False,
    "add_value_residual": False,
    "gate_residual": False,
    "use_rezero": False,
    "scale_residual": False,
    "use_layerscale": False,
    "shift_tokens": 0,
    "weight_tie_layers": False,
    "layers_execute_order": None,
    "num_residual_streams": 1,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionLayersConfig(Config):
    """Options of a transformer stack (x-transformers ``AttentionLayers`` keywords).

    ``attn_*`` keywords go to ``attn`` (and to ``cross_attn`` unless overridden with
    ``cross_attn_*``), ``ff_*`` keywords go to ``ff``.
    """

    dim: int
    depth: int | None = None
    heads: int = 8
    causal: bool = False
    cross_attend: bool = False
    only_cross: bool = False
    pre_norm: bool = True
    sandwich_norm: bool = False
    use_scalenorm: bool = False
    use_rmsnorm: bool = False
    use_simple_rmsnorm: bool = False
    norm_add_unit_offset: bool = True
    macaron: bool = False
    sandwich_coef: int | None = None
    custom_layers: tuple[str, ...] | None = None
    rotary_pos_emb: bool = False
    rotary_emb_dim: int | None = None
    rotary_interpolation_factor: float = 1.0
    rotary_base_rescale_factor: float = 1.0
    rel_pos_bias: bool = False
    rel_pos_num_buckets: int = 32
    rel_pos_max_distance: int = 128
    alibi_pos_bias: bool = False
    alibi_num_heads: int | None = None
    layer_dropout: float = 0.0
    disable_abs_pos_emb: bool | None = None
    rotary_xpos: bool = False
    rotary_xpos_scale_base: int = 512
    dynamic_pos_bias: bool = False
    dynamic_pos_bias_log_distance: bool = False
    dynamic_pos_bias_mlp_depth: int = 2
    dynamic_pos_bias_norm: bool = False
    position_infused_attn: bool = False
    residual_attn: bool = False
    cross_residual_attn: bool = False
    add_value_residual: bool = False
    gate_residual: bool = False
    use_rezero: bool = False
    scale_residual: bool = False
    use_layerscale: bool = False
    layerscale_init_value: float = 0.0
    shift_tokens: int | tuple[int, ...] = 0
    weight_tie_layers: bool = False
    layers_execute_order: tuple[int, ...] | None = None
    num_residual_streams: int = 1
    attn: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    cross_attn: AttentionConfig | None = None
    ff: FeedForwardConfig = dataclasses.field(default_factory=FeedForwardConfig)

    def __post_init__(self):
        check_not_yet(self, PENDING_STACK)
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if self.heads <= 0:
            raise ValueError(f"heads must be a positive int, got {self.heads}")
        if self.custom_layers is None and self.depth is None:
            raise ValueError("depth must be given (or custom_layers)")
        if self.depth is not None and self.depth <= 0:
            raise ValueError(f"depth must be a positive int, got {self.depth}")
        if self.only_cross and not self.cross_attend:
            raise ValueError("only_cross=True needs cross_attend=True")
        if sum((self.use_scalenorm, self.use_rmsnorm, self.use_simple_rmsnorm)) > 1:
            raise ValueError("use_scalenorm, use_rmsnorm and use_simple_rmsnorm exclude each other")
        if self.sandwich_norm and not self.pre_norm:
            raise ValueError("sandwich_norm=True needs pre_norm=True")
        if sum((self.rel_pos_bias, self.alibi_pos_bias)) > 1:
            raise ValueError("rel_pos_bias and alibi_pos_bias exclude each other; pick one")
        if self.rel_pos_num_buckets > self.rel_pos_max_distance:
            raise ValueError(
                f"rel_pos_num_buckets ({self.rel_pos_num_buckets}) must be <= "
                f"rel_pos_max_distance ({self.rel_pos_max_distance})"
            )
        if self.alibi_num_heads is not None and not 0 < self.alibi_num_heads <= self.heads:
            raise ValueError(
                f"alibi_num_heads must be in [1, heads={self.heads}], got {self.alibi_num_heads}"
            )
        if self.sandwich_coef is not None and not 0 < self.sandwich_coef <= (self.depth or 0):
            raise ValueError(
                f"sandwich_coef must be in [1, depth={self.depth}], got {self.sandwich_coef}"
            )
        if self.custom_layers is not None:
            bad = [t for t in self.custom_layers if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"custom_layers entries must be in {LAYER_TYPES}, got {bad}")
        if self.rotary_pos_emb and self.rotary_dim > self.attn.dim_head:
            raise ValueError(
                f"rotary_emb_dim ({self.rotary_dim}) must be <= attn_dim_head "
                f"({self.attn.dim_head})"
            )
        if not 0.0 <= self.layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1), got {self.layer_dropout}")
        self.attn.num_kv_heads(self.heads)

    @classmethod
    def flat_keywords(cls) -> set[str]:
        """Every flat keyword ``from_flat`` accepts (``attn_*``, ``ff_*``, ...)."""
        own = set(field_names(cls))
        attn = field_names(AttentionConfig)
        return (
            own
            | {f"attn_{n}" for n in attn}
            | {f"cross_attn_{n}" for n in attn}
            | {f"ff_{n}" for n in field_names(FeedForwardConfig)}
        )

    @classmethod
    def from_flat(cls, *, owner: str | None = None, **kwargs: Any) -> AttentionLayersConfig:
        """Builds a config from x-transformers style flat keywords.

        ``owner`` names the public class in error messages (``Decoder``, ...).
        """
        valid = cls.flat_keywords()
        for name in kwargs:
            if name not in valid:
                raise unknown_keyword_error(owner or cls.__name__, name, valid)
        cross, rest = split_prefixed(kwargs, "cross_attn_")
        attn, rest = split_prefixed(rest, "attn_")
        ff, rest = split_prefixed(rest, "ff_")
        attn_cfg = rest.pop("attn", None) or AttentionConfig()
        ff_cfg = rest.pop("ff", None) or FeedForwardConfig()
        attn_cfg = attn_cfg.replace(**attn) if attn else attn_cfg
        ff_cfg = ff_cfg.replace(**ff) if ff else ff_cfg
        cross_cfg = rest.pop("cross_attn", None)
        if cross:
            cross_cfg = (cross_cfg or attn_cfg).replace(**cross)
        if "custom_layers" in rest and rest["custom_layers"] is not None:
            rest["custom_layers"] = tuple(rest["custom_layers"])
        return cls(attn=attn_cfg, cross_attn=cross_cfg, ff=ff_cfg, **rest)

    # Derived properties.

    @property
    def rotary_dim(self) -> int:
        return self.rotary_emb_dim or self.attn.dim_head // 2

    @property
    def cross_attn_config(self) -> AttentionConfig:
        return self.cross_attn or self.attn

    @property
    def norm_kind(self) -> str:
        if self.use_scalenorm:
            return "scalenorm"
        if self.use_rmsnorm:
            return "rmsnorm"
        if self.use_simple_rmsnorm:
            return "simple_rmsnorm"
        return "layernorm"

    @property
    def abs_pos_emb_disabled(self) -> bool:
        """Whether a wrapper around this stack should skip absolute positions."""
        if self.disable_abs_pos_emb is not None:
            return self.disable_abs_pos_emb
        return self.rel_pos_bias or self.rotary_pos_emb

    @property
    def layer_types(self) -> tuple[str, ...]:
        if self.cross_attend and not self.only_cross:
            block = ("a", "c", "f")
        elif self.cross_attend:
            block = ("c", "f")
        else:
            block = ("a", "f")
        if self.macaron:
            block = ("f", *block)
        if self.custom_layers is not None:
            return tuple(self.custom_layers)
        if self.sandwich_coef is not None:
            k = self.sandwich_coef
            return ("a",) * k + block * (self.depth - k) + ("f",) * k
        return block * self.depth


class Sublayer(nn.Module):
    """One residual step of the stack: norms around an attention or feedforward branch.

    ``carry`` holds what flows between sublayers besides the hidden state (residual
    attention logits, first-layer values); the sublayer returns it updated.
    """

    config: AttentionLayersConfig
    layer_type: str

    @nn.compact
    def __call__(self, x, carry, *, context, masks, mem, rotary_pos, bias, deterministic):
        cfg = self.config
        norm = lambda name: Norm(cfg.norm_kind, unit_offset=cfg.norm_add_unit_offset, name=name)  # noqa: E731
        residual = x
        if cfg.pre_norm:
            pre_norm = norm("pre_norm")
            x = pre_norm(x)
            if mem is not None:
                # XL memories go through the consuming layer's own pre-norm.
                mem = pre_norm(mem)
        if self.layer_type == "f":
            out = FeedForward(cfg.ff, cfg.dim, name="ff")(x, deterministic=deterministic)
            if cfg.macaron:
                out = out * 0.5
        elif self.layer_type == "a":
            rotary = None
            if cfg.rotary_pos_emb:
                rotary = RotarySettings(
                    dim=cfg.rotary_dim,
                    interpolation_factor=cfg.rotary_interpolation_factor,
                    base_rescale_factor=cfg.rotary_base_rescale_factor,
                )
            out, inter = Attention(
                cfg.attn, cfg.dim, cfg.heads, causal=cfg.causal, rotary=rotary, name="attn"
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
                deterministic=deterministic,
            )
            carry = dict(carry, prev_cross_attn=inter.logits)
            if carry["cross_values"] is None:
                carry["cross_values"] = inter.values
        if cfg.sandwich_norm:
            out = norm("sandwich_norm")(out)
        x = out + residual
        if not cfg.pre_norm:
            x = norm("post_norm")(x)
        return x, carry


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
        return_hiddens: bool = False,
        deterministic: bool = True,
    ) -> Array | tuple[Array, list[Array]]:
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
          mems: per self-attention layer ``[B, M, D]`` XL memories (pre-norm hiddens).
          return_hiddens: also return the input hidden of each self-attention layer (the
            XL memories of the next segment).
          deterministic: disable dropout and layer dropout.

        Returns:
          ``[B, T, D]``, and the list of hiddens when ``return_hiddens``.
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
        num_self = layer_types.count("a")
        if mems is not None and len(mems) != num_self:
            raise ValueError(
                f"mems must hold one array per self-attention layer ({num_self}), got {len(mems)}"
            )
        mem_len = mems[0].shape[1] if mems else 0

        key_mask = self_attn_kv_mask if self_attn_kv_mask is not None else mask
        if key_mask is not None and mem_len:
            key_mask = jnp.concatenate([jnp.ones((B, mem_len), bool), key_mask], axis=1)
        masks = {
            "self_keys": key_mask,
            "query": mask,
            "attn": attn_mask,
            "context": context_mask,
        }
        # Keys span the memory then the tokens; queries are the last T positions.
        S = mem_len + T
        key_pos = jnp.arange(S) - mem_len
        q_pos = key_pos[-T:]
        bias = None
        if cfg.rel_pos_bias:
            table = self.param(
                "rel_pos",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, HEADS)),
                (cfg.rel_pos_num_buckets, cfg.heads),
            )
            bias = t5_position_bias(
                table,
                q_pos,
                key_pos,
                causal=cfg.causal,
                num_buckets=cfg.rel_pos_num_buckets,
                max_distance=cfg.rel_pos_max_distance,
                scale=cfg.attn.dim_head**0.5,
            )
        elif cfg.alibi_pos_bias:
            slopes = alibi_slopes(cfg.alibi_num_heads or cfg.heads, total_heads=cfg.heads)
            bias = alibi_bias(slopes, q_pos, key_pos)

        hiddens = []
        mem_iter = iter(mems or ())
        carry = {"prev_attn": None, "prev_cross_attn": None, "values": None, "cross_values": None}
        for i, layer_type in enumerate(layer_types):
            layer = Sublayer(cfg, layer_type, name=f"layers_{i}")
            mem = None
            if layer_type == "a":
                hiddens.append(x)
                mem = next(mem_iter) if mems else None
            new_x, new_carry = layer(
                x,
                carry,
                context=context,
                masks=masks,
                mem=mem,
                rotary_pos=key_pos if cfg.rotary_pos_emb else None,
                bias=bias,
                deterministic=deterministic,
            )
            if cfg.layer_dropout > 0.0 and not deterministic:
                # Stochastic depth: a dropped sublayer leaves the hidden state (and what it
                # would have handed to later sublayers) as it was.
                skip = jax.random.bernoulli(self.make_rng("dropout"), cfg.layer_dropout)
                new_x = jnp.where(skip, x, new_x)
                new_carry = {
                    k: v if carry[k] is None else jnp.where(skip, carry[k], v)
                    for k, v in new_carry.items()
                }
            x, carry = new_x, new_carry
        if cfg.pre_norm:
            x = Norm(cfg.norm_kind, unit_offset=cfg.norm_add_unit_offset, name="final_norm")(x)
        if return_hiddens:
            return x, hiddens
        return x


class Encoder(AttentionLayers):
    """Bidirectional stack (BERT-like)."""

    config_overrides = {"causal": False}


class Decoder(AttentionLayers):
    """Causal stack (GPT-like)."""

    config_overrides = {"causal": True}


class CrossAttender(AttentionLayers):
    """Cross-attention + feedforward only: ``context`` is required."""

    config_overrides = {"cross_attend": True, "only_cross": True}

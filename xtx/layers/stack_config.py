"""Configuration of a transformer stack: ``AttentionLayersConfig``.

The x-transformers ``AttentionLayers`` keywords as one frozen dataclass: the options of
the stack itself, plus nested ``AttentionConfig`` (``attn_*``), ``FeedForwardConfig``
(``ff_*``) and an optional cross-attention ``AttentionConfig`` (``cross_attn_*``).
Validation lives here so that a bad combination fails when the config is built, before
any tracing; the derived properties (layer types, execution order, norm kind, rotary
dims) are what ``xtx.layers.transformer`` and ``xtx.interop`` read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from xtx.config import Config, field_names, split_prefixed, unknown_keyword_error
from xtx.layers.attention_config import AttentionConfig
from xtx.layers.feedforward import FeedForwardConfig

Array = jax.Array
LAYER_TYPES = ("a", "c", "f")
# Rematerialisation policies by name (see ``xtx.layers.transformer.remat_policy``):
# "none" stores every activation for the backward pass, "full" only each layer's input,
# "dots" the matmul outputs, "dots_no_batch" the matmul outputs without batch dims (the
# weight-gradient-friendly choice of MaxText).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


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
    learned_value_residual_mix: bool = True
    gate_residual: bool = False
    use_rezero: bool = False
    scale_residual: bool = False
    use_layerscale: bool = False
    layerscale_init_value: float = 0.0
    shift_tokens: int | tuple[int, ...] = 0
    weight_tie_layers: bool = False
    layers_execute_order: tuple[int, ...] | None = None
    num_residual_streams: int = 1
    hyper_conn_sinkhorn_iters: int = 5
    # xtx execution options (no effect on the math, no x-transformers keyword).
    scan_layers: bool = False
    remat_policy: str = "none"
    attn: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    cross_attn: AttentionConfig | None = None
    ff: FeedForwardConfig = dataclasses.field(default_factory=FeedForwardConfig)

    def __post_init__(self):
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
        biases = [
            name
            for name in ("rel_pos_bias", "alibi_pos_bias", "dynamic_pos_bias")
            if getattr(self, name)
        ]
        if len(biases) > 1:
            raise ValueError(f"{' and '.join(biases)} exclude each other; pick one")
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
        if self.uses_rotary and self.rotary_dim > self.attn.dim_head:
            raise ValueError(
                f"rotary_emb_dim ({self.rotary_dim}) must be <= attn_dim_head "
                f"({self.attn.dim_head})"
            )
        if not 0.0 <= self.layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1), got {self.layer_dropout}")
        if self.layer_dropout > 0.0 and self.add_value_residual:
            # Which layer's values are "the first" would depend on the dropout draw,
            # which a traced program cannot branch on.
            raise ValueError("layer_dropout > 0 cannot be combined with add_value_residual")
        self._check_stack_structure()
        self._check_projection_options()
        self.attn.num_kv_heads(self.heads)

    def _check_projection_options(self) -> None:
        """xPos, dynamic bias, position-infused attention, value residual, collab heads."""
        if self.rotary_xpos and not self.causal:
            # x-transformers asserts the same: the key scale 1/s grows without bound when
            # queries can look ahead.
            raise ValueError("rotary_xpos=True needs causal=True (a Decoder), got causal=False")
        if self.rotary_xpos and not self.rotary_xpos_scale_base > 0:
            raise ValueError(
                f"rotary_xpos_scale_base must be > 0, got {self.rotary_xpos_scale_base!r}"
            )
        if self.dynamic_pos_bias:
            depth = self.dynamic_pos_bias_mlp_depth
            if not isinstance(depth, int) or depth < 1:
                raise ValueError(f"dynamic_pos_bias_mlp_depth must be an int >= 1, got {depth!r}")
            if self.dim < 4:
                raise ValueError(
                    f"dynamic_pos_bias needs dim >= 4 (its MLP is dim // 4 wide), got {self.dim}"
                )
        if self.position_infused_attn and self.dim % 2:
            raise ValueError(
                f"position_infused_attn needs an even dim (sin and cos halves), got {self.dim}"
            )
        if self.learned_value_mix_layers and self.attn.num_kv_heads(self.heads) != self.heads:
            raise ValueError(
                "add_value_residual with learned_value_residual_mix=True mixes per query head, "
                f"so it needs attn_kv_heads = heads ({self.heads}); set "
                "learned_value_residual_mix=False for grouped key/values"
            )
        if self.attn.collab_heads and self.layer_types.count("a"):
            width = self.attn.collab_dim(self.heads)
            if self.uses_rotary and self.rotary_dim > width:
                raise ValueError(
                    f"rotary_emb_dim ({self.rotary_dim}) must be <= the collaborative heads' "
                    f"shared query/key width ({width})"
                )
        if self.cross_attn_config.collab_heads and "c" in self.layer_types:
            self.cross_attn_config.collab_dim(self.heads)

    def _check_stack_structure(self) -> None:
        """Residual, layer-order and token-shift options (x-transformers 2.31's asserts)."""
        streams = self.num_residual_streams
        if not isinstance(streams, int) or streams < 1:
            raise ValueError(f"num_residual_streams must be an int >= 1, got {streams!r}")
        if streams > 1 and self.gate_residual:
            raise ValueError(
                "gate_residual and num_residual_streams > 1 (hyper-connections) exclude each other"
            )
        if streams > 1 and self.scale_residual:
            # x-transformers silently ignores scale_residual with hyper-connections.
            raise ValueError(
                "scale_residual has no effect with num_residual_streams > 1 (hyper-connections); "
                "drop one of them"
            )
        self._check_execution_options()
        iters = self.hyper_conn_sinkhorn_iters
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"hyper_conn_sinkhorn_iters must be an int >= 0, got {iters!r}")
        if self.use_rezero and self.sandwich_norm:
            raise ValueError("use_rezero drops the block norms that sandwich_norm needs; pick one")
        if self.weight_tie_layers:
            for name in ("custom_layers", "sandwich_coef", "layers_execute_order"):
                if getattr(self, name) is not None:
                    raise ValueError(f"weight_tie_layers and {name} exclude each other")
        num_layers = len(self.layer_types)
        order = self.layers_execute_order
        if order is not None:
            if self.custom_layers is not None and self.depth is not None:
                raise ValueError("pass depth or custom_layers, not both, with layers_execute_order")
            if not order or any(not isinstance(i, int) or not 0 <= i < num_layers for i in order):
                raise ValueError(
                    f"layers_execute_order must be a non-empty tuple of layer indices in "
                    f"[0, {num_layers}), got {order!r}"
                )
        shifts = self.shift_tokens
        if isinstance(shifts, tuple) and len(shifts) != num_layers:
            raise ValueError(
                f"shift_tokens as a tuple needs one entry per layer ({num_layers}), got {shifts}"
            )
        values = shifts if isinstance(shifts, tuple) else (shifts,)
        if any(not isinstance(s, int) or s < 0 for s in values):
            raise ValueError(f"shift_tokens must be ints >= 0, got {shifts!r}")
        widest = max(values)
        chunks = widest + 1 if self.causal else 2 * widest + 1
        if widest and chunks > self.dim:
            raise ValueError(
                f"shift_tokens={widest} cuts the features into {chunks} chunks, more than "
                f"dim={self.dim}"
            )

    def _check_execution_options(self) -> None:
        """``remat_policy`` is a known name; ``scan_layers`` only on a uniform stack."""
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"
            )
        if not self.scan_layers:
            return
        # A scan runs one block of sublayers `depth` times with stacked weights: every
        # block must be built alike and nothing may flow between layers but the hidden.
        blockers = {
            "custom_layers": self.custom_layers is not None,
            "sandwich_coef": self.sandwich_coef is not None,
            "layers_execute_order": self.layers_execute_order is not None,
            "weight_tie_layers": self.weight_tie_layers,
            "residual_attn": self.residual_attn,
            "cross_residual_attn": self.cross_residual_attn,
            "add_value_residual": self.add_value_residual,
            "num_residual_streams > 1": self.num_residual_streams > 1,
            "shift_tokens given per layer": isinstance(self.shift_tokens, tuple),
        }
        used = [name for name, on in blockers.items() if on]
        if used:
            raise ValueError(
                f"scan_layers=True needs identical layers with nothing carried between them "
                f"but the hidden state; {', '.join(used)} rule that out: set scan_layers=False"
            )

    @property
    def scan_block(self) -> tuple[str, ...]:
        """The sublayer types of one scanned block (``layer_types`` is it ``depth`` times)."""
        types = self.layer_types
        return types[: len(types) // self.depth]

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
        for name in ("custom_layers", "layers_execute_order", "shift_tokens"):
            if isinstance(rest.get(name), list):
                rest[name] = tuple(rest[name])
        return cls(attn=attn_cfg, cross_attn=cross_cfg, ff=ff_cfg, **rest)

    # Derived properties.

    @property
    def rotary_dim(self) -> int:
        return self.rotary_emb_dim or self.attn.dim_head // 2

    @property
    def uses_rotary(self) -> bool:
        """Rotary positions are on (``rotary_xpos`` turns them on, as in x-transformers)."""
        return self.rotary_pos_emb or self.rotary_xpos

    @property
    def learned_value_mix_layers(self) -> tuple[int, ...]:
        """Indices of the self-attention sublayers with a learned value residual mix.

        As x-transformers: every self-attention layer after the first one built (the
        first is the residual's source; cross-attention always mixes 1/2).
        """
        if not (self.add_value_residual and self.learned_value_residual_mix):
            return ()
        self_attn = [i for i, t in enumerate(self.layer_types) if t == "a"]
        return tuple(self_attn[1:])

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
        return self.rel_pos_bias or self.uses_rotary or self.position_infused_attn

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
        if self.weight_tie_layers:
            # One block of parameters, run depth times (see execute_order).
            return block
        if self.custom_layers is not None:
            return tuple(self.custom_layers)
        if self.sandwich_coef is not None:
            k = self.sandwich_coef
            return ("a",) * k + block * (self.depth - k) + ("f",) * k
        return block * self.depth

    @property
    def execute_order(self) -> tuple[int, ...]:
        """Indices into ``layer_types`` in running order; a repeated index reuses weights."""
        if self.weight_tie_layers:
            return tuple(range(len(self.layer_types))) * self.depth
        if self.layers_execute_order is not None:
            return tuple(self.layers_execute_order)
        return tuple(range(len(self.layer_types)))

    def shifts_of(self, index: int) -> tuple[int, ...]:
        """Token shifts of sublayer ``index``: ``0..s`` when causal, else ``-s..s``."""
        s = self.shift_tokens
        s = s[index] if isinstance(s, tuple) else s
        if not s:
            return ()
        return tuple(range(0 if self.causal else -s, s + 1))

    @property
    def has_final_norm(self) -> bool:
        """Pre-norm stacks end with a norm; ReZero keeps it although its blocks have none."""
        return self.pre_norm or self.use_rezero

"""Weights to and from the PyTorch library x-transformers (2.31).

``from_x_transformers(torch_model)`` reads a constructed x-transformers model (its
structure gives the config, its ``state_dict`` the weights) and returns the equivalent
xtx module and its variables. ``to_x_transformers(module, variables)`` goes back: a
``state_dict`` that loads with ``strict=True`` into the equivalent x-transformers model.

Both directions go through one table of (xtx path, torch key, layout) built from the
xtx config, so they cannot drift apart. A torch option that xtx does not implement (yet)
raises ``UnsupportedOption`` naming it, a torch weight that no table row consumes raises
too, and ``verify=True`` (the default) runs both models on a small input and raises if
they disagree: a conversion is never silently wrong.

Layouts: torch ``Linear.weight`` is ``[out, in]``; xtx kernels are ``[in..., out...]``
with head axes kept apart (``to_q``: ``[D, N, H]``, ``to_out``: ``[N, H, D]``), the head
index being the slow axis of torch's ``(h d)``.

This module imports torch lazily; xtx itself does not depend on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xtx.layers.attention import AttentionConfig
from xtx.layers.feedforward import FeedForwardConfig
from xtx.layers.transformer import AttentionLayersConfig
from xtx.models.continuous import ContinuousConfig, ContinuousTransformerWrapper
from xtx.models.transformer_wrapper import TransformerWrapper, TransformerWrapperConfig
from xtx.models.vit import ViTConfig, ViTransformerWrapper
from xtx.models.xtransformer import XTransformer, XTransformerConfig
from xtx.ops import rotary_inv_freq

__all__ = [
    "UnsupportedOption",
    "config_from_x_transformers",
    "from_x_transformers",
    "to_x_transformers",
    "torch_model_from_config",
]


class UnsupportedOption(ValueError):
    """An x-transformers option that xtx cannot convert (yet)."""


# ---------------------------------------------------------------------------
# Weight layouts: (to xtx, to torch) pairs of numpy functions.


@dataclasses.dataclass(frozen=True)
class Layout:
    to_xtx: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda w: w, lambda w: w)
LINEAR = Layout(lambda w: w.T, lambda w: w.T)  # [out, in] <-> [in, out]


def heads_in(heads: int, dim_head: int) -> Layout:
    """``[N*H, D]`` <-> ``[D, N, H]`` (q/k/v projections)."""
    return Layout(
        lambda w: w.T.reshape(w.shape[1], heads, dim_head),
        lambda w: w.reshape(w.shape[0], heads * dim_head).T,
    )


def heads_out(heads: int, dim_head: int) -> Layout:
    """``[D, N*H]`` <-> ``[N, H, D]`` (output projection)."""
    return Layout(
        lambda w: w.T.reshape(heads, dim_head, w.shape[0]),
        lambda w: w.reshape(heads * dim_head, w.shape[-1]).T,
    )


def squeeze_lead(w_shape_lead: int) -> Layout:
    """``[1, N, D]`` <-> ``[N, D]`` (ViT positions)."""
    return Layout(lambda w: w[0], lambda w: w[None])


Row = tuple[tuple[str, ...], str, Layout]


def _norm_rows(cfg_kind: str, path: tuple[str, ...], key: str, *, lead: str = "") -> list[Row]:
    if cfg_kind == "simple_rmsnorm":
        return []
    name = "gamma" if cfg_kind == "layernorm" else "g"
    return [((*path, "scale"), f"{key}.{name}", SAME)]


def _stack_rows(cfg: AttentionLayersConfig, path: tuple[str, ...], prefix: str) -> list[Row]:
    rows: list[Row] = []
    kind = cfg.norm_kind
    for i, t in enumerate(cfg.layer_types):
        lp, lk = (*path, f"layers_{i}"), f"{prefix}layers.{i}"
        if cfg.pre_norm:
            rows += _norm_rows(kind, (*lp, "pre_norm"), f"{lk}.0.0")
        if cfg.sandwich_norm:
            rows += _norm_rows(kind, (*lp, "sandwich_norm"), f"{lk}.0.1")
        if not cfg.pre_norm:
            rows += _norm_rows(kind, (*lp, "post_norm"), f"{lk}.0.2")
        if t in ("a", "c"):
            acfg = cfg.attn if t == "a" else cfg.cross_attn_config
            N, H, K = cfg.heads, acfg.dim_head, acfg.num_kv_heads(cfg.heads)
            ap, ak = (*lp, "attn"), f"{lk}.1"
            rows += [
                ((*ap, "to_q", "kernel"), f"{ak}.to_q.weight", heads_in(N, H)),
                ((*ap, "to_k", "kernel"), f"{ak}.to_k.weight", heads_in(K, H)),
                ((*ap, "to_v", "kernel"), f"{ak}.to_v.weight", heads_in(K, H)),
                ((*ap, "to_out", "kernel"), f"{ak}.to_out.weight", heads_out(N, H)),
            ]
            if acfg.num_mem_kv:
                rows += [
                    ((*ap, "mem_k"), f"{ak}.mem_k", SAME),
                    ((*ap, "mem_v"), f"{ak}.mem_v", SAME),
                ]
        else:
            fp = (*lp, "ff")
            fk = f"{lk}.1.fn.ff" if cfg.macaron else f"{lk}.1.ff"
            fcfg = cfg.ff
            if fcfg.glu:
                rows += [
                    ((*fp, "proj_in", "kernel"), f"{fk}.0.proj.weight", LINEAR),
                    ((*fp, "proj_in", "bias"), f"{fk}.0.proj.bias", SAME),
                ]
            else:
                rows.append(((*fp, "proj_in", "kernel"), f"{fk}.0.0.weight", LINEAR))
                if not fcfg.no_bias:
                    rows.append(((*fp, "proj_in", "bias"), f"{fk}.0.0.bias", SAME))
            rows.append(((*fp, "proj_out", "kernel"), f"{fk}.2.weight", LINEAR))
            if not fcfg.no_bias:
                rows.append(((*fp, "proj_out", "bias"), f"{fk}.2.bias", SAME))
    if cfg.pre_norm:
        rows += _norm_rows(kind, (*path, "final_norm"), f"{prefix}final_norm")
    if cfg.rel_pos_bias:
        rows.append(((*path, "rel_pos"), f"{prefix}rel_pos.relative_attention_bias.weight", SAME))
    return rows


def _wrapper_rows(
    cfg: TransformerWrapperConfig, path: tuple[str, ...], prefix: str, *, token_path=None
) -> list[Row]:
    rows: list[Row] = [
        (token_path or (*path, "token_emb", "embedding"), f"{prefix}token_emb.emb.weight", SAME)
    ]
    if cfg.has_abs_pos_emb:
        if cfg.scaled_sinu_pos_emb:
            rows.append(((*path, "pos_emb_scale"), f"{prefix}pos_emb.scale", SAME))
        else:
            rows.append(((*path, "pos_emb"), f"{prefix}pos_emb.emb.weight", SAME))
    if cfg.post_emb_norm:
        rows.append(((*path, "post_emb_norm", "scale"), f"{prefix}post_emb_norm.gamma", SAME))
    if cfg.embed_dim != cfg.dim:
        rows += [
            ((*path, "project_emb", "kernel"), f"{prefix}project_emb.weight", LINEAR),
            ((*path, "project_emb", "bias"), f"{prefix}project_emb.bias", SAME),
        ]
    if cfg.memory_token_count:
        rows.append(((*path, "memory_tokens"), f"{prefix}memory_tokens", SAME))
    rows += _stack_rows(cfg.attn_layers, (*path, "attn_layers"), f"{prefix}attn_layers.")
    if not cfg.return_only_embed and not cfg.tie_embedding:
        rows.append(((*path, "to_logits", "kernel"), f"{prefix}to_logits.weight", LINEAR))
    return rows


def _rows(config: Any) -> list[Row]:
    if isinstance(config, TransformerWrapperConfig):
        return _wrapper_rows(config, (), "")
    if isinstance(config, XTransformerConfig):
        shared = ("shared_token_emb", "embedding") if config.tie_token_emb else None
        return _wrapper_rows(config.enc, ("encoder",), "encoder.", token_path=shared) + (
            _wrapper_rows(config.dec, ("decoder",), "decoder.net.", token_path=shared)
        )
    if isinstance(config, ViTConfig):
        rows: list[Row] = [
            (("pos_embedding",), "pos_embedding", squeeze_lead(1)),
            (("patch_norm_in", "scale"), "patch_to_embedding.0.gamma", SAME),
            (("patch_proj", "kernel"), "patch_to_embedding.1.weight", LINEAR),
            (("patch_proj", "bias"), "patch_to_embedding.1.bias", SAME),
            (("patch_norm_out", "scale"), "patch_to_embedding.2.gamma", SAME),
        ]
        if config.post_emb_norm:
            rows.append((("post_emb_norm", "scale"), "post_emb_norm.gamma", SAME))
        if config.num_register_tokens:
            rows.append((("register_tokens",), "register_tokens", SAME))
        rows += _stack_rows(config.attn_layers, ("attn_layers",), "attn_layers.")
        if config.num_classes is not None:
            rows += [
                (("mlp_head", "kernel"), "mlp_head.weight", LINEAR),
                (("mlp_head", "bias"), "mlp_head.bias", SAME),
            ]
        return rows
    if isinstance(config, ContinuousConfig):
        rows = []
        if config.has_abs_pos_emb:
            if config.scaled_sinu_pos_emb:
                rows.append((("pos_emb_scale",), "pos_emb.scale", SAME))
            else:
                rows.append((("pos_emb",), "pos_emb.emb.weight", SAME))
        if config.post_emb_norm:
            rows.append((("post_emb_norm", "scale"), "post_emb_norm.gamma", SAME))
        if config.num_memory_tokens:
            rows.append((("memory_tokens",), "memory_tokens", SAME))
        if config.has_project_in:
            rows.append((("project_in", "kernel"), "project_in.weight", LINEAR))
        rows += _stack_rows(config.attn_layers, ("attn_layers",), "attn_layers.")
        if config.has_project_out:
            rows.append((("project_out", "kernel"), "project_out.weight", LINEAR))
        return rows
    raise TypeError(f"no x-transformers layout for {type(config).__name__}")


def _buffers(config: Any) -> dict[str, np.ndarray]:
    """Persistent torch buffers that a strict ``load_state_dict`` expects."""
    stacks: list[tuple[str, AttentionLayersConfig]] = []
    if isinstance(config, TransformerWrapperConfig):
        stacks = [("attn_layers.", config.attn_layers)]
    elif isinstance(config, XTransformerConfig):
        stacks = [
            ("encoder.attn_layers.", config.enc.attn_layers),
            ("decoder.net.attn_layers.", config.dec.attn_layers),
        ]
    elif isinstance(config, ViTConfig | ContinuousConfig):
        stacks = [("attn_layers.", config.attn_layers)]
    out = {}
    for prefix, s in stacks:
        if s.rotary_pos_emb:
            inv = rotary_inv_freq(s.rotary_dim, base_rescale_factor=s.rotary_base_rescale_factor)
            out[f"{prefix}rotary_pos_emb.inv_freq"] = np.asarray(inv, np.float32)
    return out


# ---------------------------------------------------------------------------
# Reading the config from a torch model.


def _fail(option: str, detail: str = "") -> UnsupportedOption:
    more = f" ({detail})" if detail else ""
    return UnsupportedOption(
        f"x-transformers option {option} is not supported by xtx.interop yet{more}"
    )


def _expect(obj: Any, checks: dict[str, tuple[Any, str]]) -> None:
    """Raises for every attribute of ``obj`` that differs from its supported value."""
    for attr, (supported, option) in checks.items():
        if not hasattr(obj, attr):
            continue
        value = getattr(obj, attr)
        if value is None and supported in (False, 0):
            continue
        if value != supported:
            raise _fail(option, f"{type(obj).__name__}.{attr}={value!r}")


_ATTENTION_CHECKS = {
    "max_attend_past": (None, "attn_max_attend_past"),
    "use_latent_q": (False, "attn_use_latent_q"),
    "use_latent_kv": (False, "attn_use_latent_kv"),
    "qkv_receive_diff_residuals": (False, "qkv_receive_diff_residuals"),
    "laser": (False, "attn_laser"),
    "to_v_gate": (None, "attn_gate_values"),
    "to_output_gate": (None, "attn_output_gate"),
    "to_v_head_gate": (None, "attn_gate_value_heads"),
    "qk_norm": (False, "attn_qk_norm"),
    "q_rmsnorm": (None, "attn_qk_rmsnorm"),
    "k_rmsnorm": (None, "attn_k_rmsnorm"),
    "value_rmsnorm": (None, "attn_value_rmsnorm"),
    "data_dependent_alibi": (None, "attn_data_dependent_alibi"),
    "rel_proj_pos_bias": (None, "attn_use_rel_proj_pos_bias"),
    "head_scale": (False, "attn_head_scale"),
    "attn_on_attn": (False, "attn_on_attn"),
    "orthog_projected_values": (False, "attn_orthog_projected_values"),
    "orthog_projected_values_per_head": (False, "attn_orthog_projected_values_per_head"),
    "hybrid_module": (None, "attn_hybrid_module"),
    "sublayer_dropout": (None, "attn_sublayer_dropout"),
}
_ATTEND_CHECKS = {
    "inverted_attention": (False, "attn_inverted_attention"),
    "pre_softmax_talking_heads": (None, "attn_pre_talking_heads"),
    "post_softmax_talking_heads": (None, "attn_post_talking_heads"),
    "pre_scale_post_talking_heads": (None, "attn_pre_scale_post_talking_heads"),
    "selective": (False, "attn_selective"),
    "cog_signed": (False, "attn_cog_signed"),
    "l2_distance": (False, "attn_l2_distance"),
    "add_zero_kv": (False, "attn_add_zero_kv"),
    "head_learned_sink": (False, "attn_head_learned_sink"),
    "softclamp_logits": (False, "attn_softclamp_logits"),
    "cope": (None, "attn_use_cope"),
    "flash_pack_seq": (False, "attn_flash_pack_seq"),
}
_STACK_CHECKS = {
    "num_residual_streams": (1, "num_residual_streams"),
    "polar_pos_emb": (None, "polar_pos_emb"),
    "pre_and_post_norm": (False, "pre_and_post_norm"),
    "residual_attn": (False, "residual_attn"),
    "cross_residual_attn": (False, "cross_residual_attn"),
    "need_condition": (False, "use_adaptive_layernorm / use_adaptive_rmsnorm"),
    "depth_scale_residual": (False, "depth_scale_residual"),
    "residual_scale": (None, "scale_residual (constant)"),
    "cross_attn_tokens_dropout": (0.0, "cross_attn_tokens_dropout"),
    "softclamp_output": (False, "softclamp_output"),
    "unet_skips": (False, "unet_skips"),
    "reinject_input": (False, "reinject_input"),
    "add_value_residual": (False, "add_value_residual"),
}
_WRAPPER_CHECKS = {
    "max_mem_len": (0, "max_mem_len (XL recurrence)"),
    "shift_mem_down": (0, "shift_mem_down"),
    "embeds": (None, "embed_num_tokens"),
    "ff_deep_embed": (None, "ff_deep_embed"),
    "emb_frac_gradient": (1.0, "emb_frac_gradient"),
    "recycling": (False, "recycling"),
    "looped": (False, "looped"),
    "cls_token": (None, "use_cls_token"),
    "attn_pool": (None, "attn_pool"),
    "average_pool_embed": (False, "average_pool_embed"),
    "to_mixture": (None, "mixture_of_softmax"),
    "sigsoftmax_logits": (False, "sigsoftmax_logits"),
    "has_multiple_heads": (False, "num_output_heads"),
    "add_continuous_pred_head": (False, "add_continuous_pred_head"),
    "memory_tokens_interspersed_every": (None, "memory_tokens_interspersed_every"),
    "squeeze_out_last_dim": (False, "squeeze_out_last_dim"),
    "input_not_include_cache": (False, "input_not_include_cache"),
}


def _norm_kind(norm: Any) -> tuple[str, bool]:
    name = type(norm).__name__
    kinds = {
        "LayerNorm": "layernorm",
        "RMSNorm": "rmsnorm",
        "ScaleNorm": "scalenorm",
        "SimpleRMSNorm": "simple_rmsnorm",
    }
    if name not in kinds:
        raise _fail(f"norm class {name}")
    return kinds[name], bool(getattr(norm, "unit_offset", True))


def _dropout_p(module: Any) -> float:
    return float(getattr(module, "p", 0.0))


def _attention_config(attn: Any, heads: int) -> AttentionConfig:
    _expect(attn, _ATTENTION_CHECKS)
    _expect(attn.attend, _ATTEND_CHECKS)
    fn = attn.attend.attn_fn
    if getattr(fn, "func", None) is None or fn.func.__name__ != "softmax":
        raise _fail("a non-softmax attention (attn_hard / attn_sigmoid / custom_attn_fn)")
    if attn.rotate_num_heads != heads:
        raise _fail("rotate_num_heads")
    dim_head = attn.to_q.out_features // heads
    if not math.isclose(attn.scale, dim_head**-0.5):
        raise _fail("a custom attention scale", f"scale={attn.scale}")
    if type(attn.to_out).__name__ != "Linear":
        raise _fail("attn_on_attn / output projection variants")
    dim_context = attn.to_k.in_features
    return AttentionConfig(
        dim_head=dim_head,
        kv_heads=attn.kv_heads if attn.kv_heads != heads else None,
        dropout=float(attn.attend.dropout),
        num_mem_kv=attn.num_mem_kv,
        dim_context=dim_context if dim_context != attn.to_q.in_features else None,
        flash=bool(attn.attend.flash),
    )


def _ff_config(ff: Any) -> tuple[FeedForwardConfig, bool]:
    macaron = type(ff).__name__ == "Scale"
    if macaron:
        if ff.scale != 0.5:
            raise _fail("a feedforward Scale other than macaron's 0.5")
        ff = ff.fn
    if type(ff).__name__ != "FeedForward":
        raise _fail(f"feedforward class {type(ff).__name__} (e.g. shift_tokens)")
    seq = list(ff.ff)
    if len(seq) != 3:
        raise _fail("ff_post_act_ln / ff_sublayer_dropout")
    proj_in, drop, proj_out = seq
    inner = proj_out.in_features
    dim = proj_out.out_features
    if proj_out.out_features != dim:
        raise _fail("ff dim_out")
    glu = type(proj_in).__name__ == "GLU"
    if glu:
        act = proj_in.act
        if not isinstance(proj_in.mult_bias, float | int):
            raise _fail("ff_glu_mult_bias")
        if proj_in.up_softclamp_value is not None:
            raise _fail("ff_glu_softclamp")
        no_bias = proj_out.bias is None
    else:
        mods = list(proj_in)
        if len(mods) != 2:
            raise _fail("ff_softclamp_value")
        act = mods[1]
        no_bias = mods[0].bias is None
    act_name = type(act).__name__
    if act_name not in ("GELU", "SiLU", "ReluSquared"):
        raise _fail(f"ff activation {act_name} (ff_solu / ff_custom_activation)")
    if act_name == "GELU" and getattr(act, "approximate", "none") != "none":
        raise _fail("tanh-approximate GELU")
    return (
        FeedForwardConfig(
            mult=inner / dim if inner % dim else inner // dim,
            glu=glu,
            swish=act_name == "SiLU",
            relu_squared=act_name == "ReluSquared",
            no_bias=no_bias,
            dropout=_dropout_p(drop),
        ),
        macaron,
    )


def _stack_config(al: Any) -> AttentionLayersConfig:
    name = type(al).__name__
    if name not in ("AttentionLayers", "Encoder", "Decoder", "CrossAttender"):
        raise _fail(f"attn_layers class {name}")
    _expect(al, _STACK_CHECKS)
    if tuple(al.layers_execute_order) != tuple(range(len(al.layer_types))):
        raise _fail("layers_execute_order / weight_tie_layers")
    if any(m is not None for m in al.layer_integrators) or any(
        m is not None for m in al.skip_combines
    ):
        raise _fail("integrate_layers / attn_aggregated_residuals / unet_skips")
    dropouts = set(al.layer_dropouts)
    if len(dropouts) > 1:
        raise _fail("per-layer layer_dropout")
    layer_types = tuple(al.layer_types)
    heads = al.attn_heads
    attn_cfgs, cross_cfgs, ff_cfgs, macarons, norm_kinds = [], [], [], set(), set()
    for (norms, block, residual), t in zip(al.layers, layer_types, strict=True):
        if type(residual).__name__ != "Residual":
            raise _fail(f"residual {type(residual).__name__} (gate_residual, ...)")
        if residual.residual_scale is not None:
            raise _fail("scale_residual")
        for norm in norms:
            if norm is not None:
                norm_kinds.add(_norm_kind(norm))
        if type(block).__name__ in ("LayerScale", "AdaptiveLayerScale", "ShiftTokens"):
            raise _fail(f"{type(block).__name__} (use_layerscale / shift_tokens)")
        if t == "a":
            attn_cfgs.append(_attention_config(block, heads))
        elif t == "c":
            cross_cfgs.append(_attention_config(block, heads))
        else:
            ff_cfg, macaron = _ff_config(block)
            ff_cfgs.append(ff_cfg)
            macarons.add(macaron)
    if not isinstance(al.final_norm, type(None)) and type(al.final_norm).__name__ != "Identity":
        norm_kinds.add(_norm_kind(al.final_norm))
    for what, cfgs in (("attention", attn_cfgs), ("cross-attention", cross_cfgs), ("ff", ff_cfgs)):
        if len(set(cfgs)) > 1:
            raise _fail(f"per-layer {what} options (tuple-valued attn_/ff_ keywords)")
    if len(norm_kinds) > 1 or len(macarons) > 1:
        raise _fail("mixed norm kinds or partial macaron")
    kind, unit_offset = norm_kinds.pop() if norm_kinds else ("layernorm", True)
    attn_cfg = attn_cfgs[0] if attn_cfgs else (cross_cfgs[0] if cross_cfgs else AttentionConfig())
    cross_cfg = cross_cfgs[0] if cross_cfgs and cross_cfgs[0] != attn_cfg else None
    macaron = bool(macarons and macarons.pop())

    kwargs: dict[str, Any] = dict(
        dim=al.dim,
        heads=heads,
        causal=al.causal,
        cross_attend=al.cross_attend,
        only_cross=al.cross_attend and "a" not in layer_types,
        pre_norm=al.pre_norm,
        sandwich_norm=al.sandwich_norm,
        use_scalenorm=kind == "scalenorm",
        use_rmsnorm=kind == "rmsnorm",
        use_simple_rmsnorm=kind == "simple_rmsnorm",
        norm_add_unit_offset=unit_offset,
        macaron=macaron,
        layer_dropout=float(dropouts.pop()),
        attn=attn_cfg,
        cross_attn=cross_cfg,
        ff=ff_cfgs[0] if ff_cfgs else FeedForwardConfig(),
    )
    rot = al.rotary_pos_emb
    if rot is not None:
        if getattr(rot, "scale", None) is not None:
            raise _fail("rotary_xpos")
        inv = rot.inv_freq.detach().double().cpu().numpy()
        rot_dim = 2 * inv.shape[0]
        base = float(inv[1] ** (-rot_dim / 2.0)) if inv.shape[0] > 1 else 10000.0
        rescale = (base / 10000.0) ** ((rot_dim - 2) / rot_dim) if rot_dim > 2 else 1.0
        if math.isclose(rescale, 1.0, rel_tol=1e-6):
            rescale = 1.0
        expected = np.asarray(rotary_inv_freq(rot_dim, base_rescale_factor=rescale))
        if not np.allclose(expected, inv, rtol=1e-5):
            raise _fail("a custom rotary base")
        kwargs.update(
            rotary_pos_emb=True,
            rotary_emb_dim=rot_dim if rot_dim != attn_cfg.dim_head // 2 else None,
            rotary_interpolation_factor=float(rot.interpolation_factor),
            rotary_base_rescale_factor=rescale,
        )
    rel = al.rel_pos
    if rel is not None:
        rname = type(rel).__name__
        if rname == "RelativePositionBias":
            kwargs.update(
                rel_pos_bias=True,
                rel_pos_num_buckets=rel.num_buckets,
                rel_pos_max_distance=rel.max_distance,
            )
            if not math.isclose(rel.scale, attn_cfg.dim_head**0.5):
                raise _fail("a custom T5 bias scale")
        elif rname == "AlibiPositionalBias":
            kwargs.update(alibi_pos_bias=True, alibi_num_heads=rel.heads)
            if rel.total_heads != heads:
                raise _fail("alibi total heads")
        else:
            raise _fail(f"positional bias {rname} (dynamic_pos_bias, ...)")
    default_disable = bool(kwargs.get("rel_pos_bias") or kwargs.get("rotary_pos_emb"))
    if bool(al.disable_abs_pos_emb) != default_disable:
        kwargs["disable_abs_pos_emb"] = bool(al.disable_abs_pos_emb)
    cfg = AttentionLayersConfig(depth=1, **kwargs)
    block = cfg.layer_types
    if len(layer_types) % len(block) == 0 and block * (len(layer_types) // len(block)) == (
        layer_types
    ):
        return dataclasses.replace(cfg, depth=len(layer_types) // len(block))
    return dataclasses.replace(cfg, depth=None, custom_layers=layer_types)


def _pos_emb_kind(pos_emb: Any) -> str:
    name = type(pos_emb).__name__
    if name == "always":
        return "none"
    if name == "AbsolutePositionalEmbedding":
        return "learned"
    if name == "ScaledSinusoidalEmbedding":
        return "sinusoidal"
    raise _fail(f"positional embedding {name}")


def _wrapper_config(tw: Any, *, return_only_embed: bool | None = None) -> TransformerWrapperConfig:
    _expect(tw, _WRAPPER_CHECKS)
    stack = _stack_config(tw.attn_layers)
    pos_kind = _pos_emb_kind(tw.pos_emb)
    has_logits = tw.to_logits is not None
    tied = has_logits and not isinstance(tw.to_logits, __import__("torch").nn.Module)
    tie_scale = getattr(tw, "tie_embedding_scale", None) if tied else None
    emb_dim = tw.emb_dim
    logits_dim = None
    if has_logits and not tied:
        if type(tw.to_logits).__name__ != "Linear" or tw.to_logits.bias is not None:
            raise _fail("a custom to_logits")
        if tw.to_logits.out_features != tw.num_tokens:
            logits_dim = tw.to_logits.out_features
    cfg = TransformerWrapperConfig(
        num_tokens=tw.num_tokens,
        max_seq_len=tw.max_seq_len,
        attn_layers=stack,
        emb_dim=emb_dim if emb_dim != stack.dim else None,
        emb_dropout=_dropout_p(tw.emb_dropout),
        post_emb_norm=type(tw.post_emb_norm).__name__ != "Identity",
        num_memory_tokens=tw.num_memory_tokens or None,
        tie_embedding=tied,
        tie_embedding_scale=(
            None if tie_scale is None or math.isclose(tie_scale, stack.dim**-0.5) else tie_scale
        ),
        logits_dim=logits_dim,
        use_abs_pos_emb=(
            pos_kind != "none" or tw.max_seq_len == 0 or stack.abs_pos_emb_disabled
        ),
        scaled_sinu_pos_emb=pos_kind == "sinusoidal",
        l2norm_embed=bool(tw.l2norm_embed),
        return_only_embed=not has_logits if return_only_embed is None else return_only_embed,
    )
    if pos_kind != "none" and not cfg.has_abs_pos_emb:
        raise _fail("an absolute positional embedding next to rotary/T5 (disable_abs_pos_emb)")
    return cfg


def config_from_x_transformers(model: Any) -> Any:
    """The xtx config equivalent to a constructed x-transformers model."""
    name = type(model).__name__
    if name == "TransformerWrapper":
        return _wrapper_config(model)
    if name == "XTransformer":
        if model.cross_attn_tokens_dropout:
            raise _fail("cross_attn_tokens_dropout")
        ar = model.decoder
        if ar.mask_prob:
            raise _fail("mask_prob on the XTransformer decoder")
        enc = _wrapper_config(model.encoder, return_only_embed=True)
        dec = _wrapper_config(ar.net)
        return XTransformerConfig(
            enc=enc,
            dec=dec,
            tie_token_emb=model.decoder.net.token_emb is model.encoder.token_emb,
            ignore_index=ar.ignore_index,
            pad_value=ar.pad_value,
        )
    if name == "ViTransformerWrapper":
        stack = _stack_config(model.attn_layers)
        num_patches, dim = model.pos_embedding.shape[1:]
        patch_dim = model.patch_to_embedding[1].in_features
        channels = patch_dim // model.patch_size**2
        head = model.mlp_head
        return ViTConfig(
            image_size=int(round(math.sqrt(num_patches))) * model.patch_size,
            patch_size=model.patch_size,
            attn_layers=stack,
            channels=channels,
            num_classes=head.out_features if type(head).__name__ == "Linear" else None,
            post_emb_norm=type(model.post_emb_norm).__name__ != "Identity",
            num_register_tokens=(
                model.register_tokens.shape[0] if model.has_register_tokens else 0
            ),
            emb_dropout=_dropout_p(model.dropout),
        )
    if name == "ContinuousTransformerWrapper":
        if model.max_mem_len:
            raise _fail("max_mem_len (XL recurrence)")
        stack = _stack_config(model.attn_layers)
        pos_kind = _pos_emb_kind(model.pos_emb)
        dim = stack.dim
        pin, pout = model.project_in, model.project_out
        for proj, what in ((pin, "project_in"), (pout, "project_out")):
            if type(proj).__name__ not in ("Identity", "Linear"):
                raise _fail(f"a custom {what}")
        dim_in = pin.in_features if type(pin).__name__ == "Linear" else None
        dim_out = None
        if type(pout).__name__ == "Linear":
            dim_out = pout.out_features // (2 if model.probabilistic else 1)
        return ContinuousConfig(
            attn_layers=stack,
            max_seq_len=model.max_seq_len,
            dim_in=dim_in,
            dim_out=dim_out,
            num_memory_tokens=model.memory_tokens.shape[0] if model.has_memory_tokens else None,
            post_emb_norm=type(model.post_emb_norm).__name__ != "Identity",
            emb_dropout=_dropout_p(model.emb_dropout),
            use_abs_pos_emb=(
                pos_kind != "none" or not model.max_seq_len or stack.abs_pos_emb_disabled
            ),
            scaled_sinu_pos_emb=pos_kind == "sinusoidal",
            average_pool_embed=bool(model.average_pool_embed),
            probabilistic=bool(model.probabilistic),
            use_identity_if_same_dim=(dim_in == dim and type(pin).__name__ == "Identity"),
        )
    raise _fail(f"model class {name}")


def module_for_config(config: Any) -> nn.Module:
    """The xtx module for a config."""
    for cfg_type, cls in (
        (TransformerWrapperConfig, TransformerWrapper),
        (XTransformerConfig, XTransformer),
        (ViTConfig, ViTransformerWrapper),
        (ContinuousConfig, ContinuousTransformerWrapper),
    ):
        if isinstance(config, cfg_type):
            return cls(config=config)
    raise TypeError(f"no xtx module for {type(config).__name__}")


# ---------------------------------------------------------------------------
# The two directions.


def params_from_state_dict(config: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """xtx ``params`` (a nested dict of float32 jax arrays) from a torch state_dict."""
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    flat: dict[tuple[str, ...], Any] = {}
    used = set()
    for path, key, layout in _rows(config):
        if key not in arrays:
            raise KeyError(f"the state_dict has no {key!r}, which {type(config).__name__} needs")
        flat[path] = jnp.asarray(layout.to_xtx(arrays[key]), jnp.float32)
        used.add(key)
    buffers = _buffers(config)
    for key, value in buffers.items():
        if key in arrays and not np.allclose(arrays[key], value, rtol=1e-5):
            raise _fail(f"buffer {key} differs from the one xtx computes")
        used.add(key)
    # Tied XTransformer embeddings appear under two keys holding one tensor.
    leftover = sorted(set(arrays) - used)
    if leftover:
        raise _fail(f"weights {leftover[:5]}{'...' if len(leftover) > 5 else ''}")
    return traverse_util.unflatten_dict(flat)


def state_dict_from_params(config: Any, params: Any) -> dict[str, Any]:
    """A torch state_dict (``torch.Tensor`` values) from xtx ``params``."""
    import torch

    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    out = {}
    for path, key, layout in _rows(config):
        if path not in flat:
            raise KeyError(f"params have no {'/'.join(path)}, which {key!r} needs")
        value = np.asarray(jax.device_get(flat[path]), np.float32)
        out[key] = torch.from_numpy(np.array(layout.to_torch(value), np.float32, copy=True))
    for key, value in _buffers(config).items():
        out[key] = torch.from_numpy(np.array(value, copy=True))
    return out


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().to(dtype=__import__("torch").float32).cpu().numpy()
    return np.asarray(t, np.float32)


def from_x_transformers(
    model: Any, *, verify: bool = True, atol: float = 1e-4
) -> tuple[nn.Module, dict[str, Any]]:
    """Converts a constructed x-transformers 2.31 model into xtx.

    Args:
      model: an x-transformers ``TransformerWrapper``, ``XTransformer``,
        ``ViTransformerWrapper`` or ``ContinuousTransformerWrapper``.
      verify: run both models on a small random input and raise if the outputs differ
        by more than ``atol``.
      atol: tolerance of the verification.

    Returns:
      ``(module, variables)`` such that ``module.apply(variables, ...)`` equals
      ``model(...)`` (in eval mode).

    Raises:
      UnsupportedOption: the model uses an option xtx cannot convert.
    """
    config = config_from_x_transformers(model)
    module = module_for_config(config)
    variables = {"params": params_from_state_dict(config, model.state_dict())}
    if verify:
        verify_against(model, module, variables, atol=atol)
    return module, variables


def to_x_transformers(module: nn.Module, variables: dict[str, Any]) -> dict[str, Any]:
    """The torch ``state_dict`` of the x-transformers model equivalent to ``module``.

    Build the torch model with ``torch_model_from_config(module.config)`` (or by hand
    with the same keywords) and ``load_state_dict(state_dict, strict=True)``.
    """
    params = variables["params"] if "params" in variables else variables
    return state_dict_from_params(module.config, params)


# ---------------------------------------------------------------------------
# Building the torch model from an xtx config (for round trips and tests).


def _torch_stack_kwargs(cfg: AttentionLayersConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dim=cfg.dim, heads=cfg.heads)
    if cfg.custom_layers is not None:
        kw["custom_layers"] = tuple(cfg.custom_layers)
    else:
        kw["depth"] = cfg.depth
    defaults = AttentionLayersConfig(dim=cfg.dim, depth=1)
    for name in (
        "cross_attend",
        "only_cross",
        "pre_norm",
        "sandwich_norm",
        "use_scalenorm",
        "use_rmsnorm",
        "use_simple_rmsnorm",
        "norm_add_unit_offset",
        "macaron",
        "sandwich_coef",
        "rotary_pos_emb",
        "rotary_emb_dim",
        "rotary_interpolation_factor",
        "rotary_base_rescale_factor",
        "rel_pos_bias",
        "rel_pos_num_buckets",
        "rel_pos_max_distance",
        "alibi_pos_bias",
        "alibi_num_heads",
        "layer_dropout",
        "disable_abs_pos_emb",
    ):
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            kw[name] = value
    for prefix, sub, default in (
        ("attn_", cfg.attn, AttentionConfig()),
        ("ff_", cfg.ff, FeedForwardConfig()),
    ):
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if f.name == "implementation" or value == getattr(default, f.name):
                continue
            kw[prefix + f.name] = value
    if cfg.cross_attn is not None:
        for f in dataclasses.fields(cfg.cross_attn):
            value = getattr(cfg.cross_attn, f.name)
            if f.name != "implementation" and value != getattr(cfg.attn, f.name):
                kw["cross_attn_" + f.name] = value
    return kw


def _torch_stack(cfg: AttentionLayersConfig) -> Any:
    import x_transformers as xt

    kw = _torch_stack_kwargs(cfg)
    if cfg.cross_attend and cfg.only_cross:
        kw.pop("cross_attend"), kw.pop("only_cross")
        return xt.CrossAttender(causal=cfg.causal, **kw) if cfg.causal else xt.CrossAttender(**kw)
    return (xt.Decoder if cfg.causal else xt.Encoder)(**kw)


def _torch_wrapper_kwargs(cfg: TransformerWrapperConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len)
    base = TransformerWrapperConfig(num_tokens=1, max_seq_len=1, attn_layers=cfg.attn_layers)
    for f in dataclasses.fields(cfg):
        if f.name in ("num_tokens", "max_seq_len", "attn_layers", "check_token_ids"):
            continue
        value = getattr(cfg, f.name)
        if value != getattr(base, f.name):
            kw[f.name] = value
    return kw


def torch_model_from_config(config: Any) -> Any:
    """An x-transformers model with the architecture of an xtx config (random weights)."""
    import x_transformers as xt

    if isinstance(config, TransformerWrapperConfig):
        return xt.TransformerWrapper(
            attn_layers=_torch_stack(config.attn_layers), **_torch_wrapper_kwargs(config)
        )
    if isinstance(config, ViTConfig):
        kw = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in ("attn_layers", "channels_last")
        }
        return xt.ViTransformerWrapper(attn_layers=_torch_stack(config.attn_layers), **kw)
    if isinstance(config, ContinuousConfig):
        kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        kw.pop("attn_layers")
        return xt.ContinuousTransformerWrapper(attn_layers=_torch_stack(config.attn_layers), **kw)
    if isinstance(config, XTransformerConfig):
        kw: dict[str, Any] = dict(
            dim=config.enc.dim,
            tie_token_emb=config.tie_token_emb,
            ignore_index=config.ignore_index,
            pad_value=config.pad_value,
        )
        for side, wcfg in (("enc", config.enc), ("dec", config.dec)):
            stack = _torch_stack_kwargs(wcfg.attn_layers)
            stack.pop("dim")
            stack.pop("cross_attend", None)
            wrapper = _torch_wrapper_kwargs(wcfg)
            wrapper.pop("return_only_embed", None)
            for k, v in {**stack, **wrapper}.items():
                kw[f"{side}_{k}"] = v
        return xt.XTransformer(**kw)
    raise TypeError(f"no x-transformers model for {type(config).__name__}")


# ---------------------------------------------------------------------------
# Verification.


def example_inputs(config: Any, *, batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    """Small random inputs for a config: numpy arrays keyed by call argument."""
    rng = np.random.default_rng(seed)

    def tokens(cfg: TransformerWrapperConfig, n: int) -> np.ndarray:
        n = min(n, cfg.max_seq_len) if cfg.has_abs_pos_emb else n
        return rng.integers(0, cfg.num_tokens, (batch, n)).astype(np.int64)

    if isinstance(config, TransformerWrapperConfig):
        out = {"x": tokens(config, length)}
        if config.attn_layers.cross_attend:
            dc = config.attn_layers.cross_attn_config.dim_context or config.dim
            out["context"] = rng.standard_normal((batch, 5, dc)).astype(np.float32)
        return out
    if isinstance(config, XTransformerConfig):
        return {"src": tokens(config.enc, length), "tgt": tokens(config.dec, length)}
    if isinstance(config, ViTConfig):
        s = config.image_size
        return {"img": rng.standard_normal((batch, config.channels, s, s)).astype(np.float32)}
    if isinstance(config, ContinuousConfig):
        n = min(length, config.max_seq_len) if config.has_abs_pos_emb else length
        d = config.dim_in or config.attn_layers.dim
        out = {"x": rng.standard_normal((batch, n, d)).astype(np.float32)}
        if config.attn_layers.cross_attend:
            out["context"] = rng.standard_normal((batch, 5, config.attn_layers.dim)).astype(
                np.float32
            )
        return out
    raise TypeError(type(config).__name__)


def verify_against(torch_model: Any, module: nn.Module, variables: Any, *, atol: float) -> None:
    """Raises ``AssertionError`` if the two models disagree on a random input."""
    import torch

    inputs = example_inputs(module.config)
    names = list(inputs)
    n_positional = 2 if isinstance(module.config, XTransformerConfig) else 1
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            t_in = [torch.from_numpy(inputs[k]) for k in names]
            expected = torch_model(
                *t_in[:n_positional], **dict(zip(names[n_positional:], t_in[n_positional:]))
            )
    finally:
        torch_model.train(was_training)
    j_in = [jnp.asarray(inputs[k]) for k in names]
    got = module.apply(
        variables, *j_in[:n_positional], **dict(zip(names[n_positional:], j_in[n_positional:]))
    )
    expected = expected.detach().float().numpy()
    got = np.asarray(got)
    if expected.shape != got.shape or not np.allclose(got, expected, atol=atol, rtol=0):
        diff = np.abs(got - expected).max() if expected.shape == got.shape else "shape"
        raise AssertionError(
            f"converted model disagrees with x-transformers (max abs diff {diff}); "
            "please report the configuration"
        )

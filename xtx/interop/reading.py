"""Reading an xtx config from a constructed x-transformers model.

The torch modules do not keep their constructor keywords, so the config is read from
the module structure and attributes. Every attribute that selects a behaviour xtx does
not implement is checked against its supported value; anything else raises
``UnsupportedOption`` naming the x-transformers keyword.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import numpy as np

from xtx.interop.layout import _fail
from xtx.layers.attention_config import AttentionConfig
from xtx.layers.feedforward import FeedForwardConfig
from xtx.layers.stack_config import AttentionLayersConfig
from xtx.models.continuous import ContinuousConfig, ContinuousTransformerWrapper
from xtx.models.transformer_wrapper import TransformerWrapper, TransformerWrapperConfig
from xtx.models.vit import ViTConfig, ViTransformerWrapper
from xtx.models.xtransformer import XTransformer, XTransformerConfig
from xtx.ops import rotary_inv_freq

# ---------------------------------------------------------------------------
# Reading the config from a torch model.


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
    "to_output_gate": (None, "attn_output_gate"),
    "to_v_head_gate": (None, "attn_gate_value_heads"),
    "value_rmsnorm": (None, "attn_value_rmsnorm"),
    "data_dependent_alibi": (None, "attn_data_dependent_alibi"),
    "rel_proj_pos_bias": (None, "attn_use_rel_proj_pos_bias"),
    "orthog_projected_values": (False, "attn_orthog_projected_values"),
    "orthog_projected_values_per_head": (False, "attn_orthog_projected_values_per_head"),
    "hybrid_module": (None, "attn_hybrid_module"),
    "sublayer_dropout": (None, "attn_sublayer_dropout"),
}
_ATTEND_CHECKS = {
    "inverted_attention": (False, "attn_inverted_attention"),
    "pre_scale_post_talking_heads": (None, "attn_pre_scale_post_talking_heads"),
    "selective": (False, "attn_selective"),
    "cog_signed": (False, "attn_cog_signed"),
    "l2_distance": (False, "attn_l2_distance"),
    "add_zero_kv": (False, "attn_add_zero_kv"),
    "head_learned_sink": (False, "attn_head_learned_sink"),
    "cope": (None, "attn_use_cope"),
    "flash_pack_seq": (False, "attn_flash_pack_seq"),
}
_STACK_CHECKS = {
    "polar_pos_emb": (None, "polar_pos_emb"),
    "pre_and_post_norm": (False, "pre_and_post_norm"),
    "need_condition": (False, "use_adaptive_layernorm / use_adaptive_rmsnorm"),
    "depth_scale_residual": (False, "depth_scale_residual"),
    "residual_scale": (None, "scale_residual (constant)"),
    "cross_attn_tokens_dropout": (0.0, "cross_attn_tokens_dropout"),
    "softclamp_output": (False, "softclamp_output"),
    "unet_skips": (False, "unet_skips"),
    "reinject_input": (False, "reinject_input"),
}
_WRAPPER_CHECKS = {
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


def _projection_options(attn: Any) -> dict[str, Any]:
    """The projection-side options of an x-transformers ``Attention`` (qk-norm, gates...)."""
    opts: dict[str, Any] = {}
    out = attn.to_out
    if attn.attn_on_attn:
        mods = [type(m).__name__ for m in out] if type(out).__name__ == "Sequential" else []
        if mods != ["Linear", "GLU"]:
            raise _fail("an attn_on_attn output projection other than Linear + GLU")
        out = out[0]
        opts["on_attn"] = True
    if type(out).__name__ != "Linear" or out.bias is not None:
        raise _fail("output projection variants (attn_dim_out / project_out / orthog values)")
    if attn.qk_norm:
        opts.update(
            qk_norm=True,
            qk_norm_groups=attn.qk_norm_groups,
            qk_norm_dim_scale=bool(attn.qk_norm_dim_scale),
        )
        if not attn.qk_norm_dim_scale:
            opts["qk_norm_scale"] = float(attn.qk_norm_scale)
    if attn.k_rmsnorm is not None and attn.q_rmsnorm is None:
        raise _fail("attn_k_rmsnorm")
    opts["qk_rmsnorm"] = attn.q_rmsnorm is not None
    gate = attn.to_v_gate
    if gate is not None:
        if type(gate).__name__ != "Linear":
            raise _fail("attn_gate_values_rank")
        if attn.gate_values_headwise:
            raise _fail("attn_gate_values_headwise")
        if attn.to_v_gate_activation.__name__ != "sigmoid":
            raise _fail("attn_swiglu_values")
        opts["gate_values"] = True
    opts["head_scale"] = bool(attn.head_scale)
    return opts


def _attention_config(attn: Any, heads: int) -> AttentionConfig:
    _expect(attn, _ATTENTION_CHECKS)
    _expect(attn.attend, _ATTEND_CHECKS)
    attend = attn.attend
    fn = attend.attn_fn
    fn_name = getattr(getattr(fn, "func", None), "__name__", None)
    if fn_name not in ("softmax", "sparse_topk_attn", "one_hot_straight_through"):
        raise _fail("a non-softmax attention (attn_sigmoid / attn_gumbel_softmax / custom_attn_fn)")
    if fn_name != "softmax" and fn.keywords.get("temperature", 1.0) != 1.0:
        raise _fail(f"a {fn_name} temperature other than 1")
    sparse_topk = fn.keywords["sparse_topk"] if fn_name == "sparse_topk_attn" else None
    if attn.rotate_num_heads != heads:
        raise _fail("rotate_num_heads")
    dim_head = attn.to_q.out_features // heads
    if not math.isclose(attn.scale, dim_head**-0.5):
        raise _fail("a custom attention scale", f"scale={attn.scale}")
    dim_context = attn.to_k.in_features
    return AttentionConfig(
        dim_head=dim_head,
        kv_heads=attn.kv_heads if attn.kv_heads != heads else None,
        dropout=float(attn.attend.dropout),
        num_mem_kv=attn.num_mem_kv,
        dim_context=dim_context if dim_context != attn.to_q.in_features else None,
        flash=bool(attn.attend.flash),
        **_projection_options(attn),
        sparse_topk=sparse_topk,
        sparse_topk_straight_through=bool(
            sparse_topk is not None and fn.keywords.get("straight_through", False)
        ),
        pre_talking_heads=attend.pre_softmax_talking_heads is not None,
        post_talking_heads=attend.post_softmax_talking_heads is not None,
        hard=fn_name == "one_hot_straight_through",
        softclamp_logits=bool(attend.softclamp_logits),
        logit_softclamp_value=(
            float(attend.logit_softclamp_value) if attend.softclamp_logits else 50.0
        ),
    )


def _ff_config(ff: Any) -> tuple[FeedForwardConfig, bool]:
    macaron = type(ff).__name__ == "Scale"
    if macaron:
        if ff.scale != 0.5:
            raise _fail("a feedforward Scale other than macaron's 0.5")
        ff = ff.fn
    if type(ff).__name__ != "FeedForward":
        raise _fail(f"feedforward class {type(ff).__name__}")
    seq = list(ff.ff)
    # Sequential(proj_in, [post-act LayerNorm], dropout, proj_out, [sublayer dropout]).
    post_act_ln = len(seq) > 1 and type(seq[1]).__name__ == "LayerNorm"
    if post_act_ln:
        if seq[1].unit_offset:
            raise _fail("a unit-offset post-activation LayerNorm")
        seq = [seq[0], *seq[2:]]
    if len(seq) != 3:
        raise _fail("ff_sublayer_dropout")
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
            post_act_ln=post_act_ln,
        ),
        macaron,
    )


def _residual_options(residual: Any) -> tuple[bool, bool, int, int]:
    """(gate_residual, scale_residual, num_residual_streams, sinkhorn iters) of a combiner."""
    name = type(residual).__name__
    if name == "HyperConnection":
        if residual.num_input_views != 1:
            raise _fail("qkv_receive_diff_residuals")
        return False, False, residual.num_residual_streams, residual.sinkhorn_iters
    if name not in ("Residual", "GRUGating"):
        raise _fail(
            f"residual {name} (orthog_residual / mv_split_residual / gated_multi_residual / "
            "attn_aggregated_residuals)"
        )
    if getattr(residual, "scale_residual_constant", 1.0) != 1.0:
        raise _fail("scale_residual_constant")
    return name == "GRUGating", residual.residual_scale is not None, 1, 5


def _unwrap_branch(block: Any) -> tuple[Any, bool | None, tuple[int, ...]]:
    """Peels LayerScale and ShiftTokens off a sublayer's branch.

    Returns the branch, the LayerScale's unit offset (None without LayerScale) and the
    token shifts (empty without ShiftTokens).
    """
    layerscale = None
    if type(block).__name__ == "LayerScale":
        layerscale = bool(block.unit_offset)
        block = block.fn
    shifts: tuple[int, ...] = ()
    if type(block).__name__ == "ShiftTokens":
        shifts = tuple(int(s) for s in block.shifts)
        block = block.fn
    if type(block).__name__ in ("LayerScale", "AdaptiveLayerScale", "ShiftTokens"):
        raise _fail(f"{type(block).__name__} (use_adaptive_layerscale, ...)")
    return block, layerscale, shifts


def _value_residual_options(al: Any, layer_types: tuple[str, ...]) -> dict[str, Any]:
    """``add_value_residual`` and whether later self-attention layers learn the mix."""
    if not al.add_value_residual:
        return {}
    opts: dict[str, Any] = {"add_value_residual": True}
    if layer_types.count("a") > 1:
        mixes = [
            type(m.to_value_residual_mix).__name__
            for m in al.modules()
            if type(m).__name__ == "Attention"
        ]
        opts["learned_value_residual_mix"] = "Sequential" in mixes
    return opts


def _dynamic_pos_bias_options(rel: Any, dim: int) -> dict[str, Any]:
    """The ``dynamic_pos_bias_*`` keywords of an x-transformers ``DynamicPositionBias``."""
    hidden = list(rel.mlp)[:-1]
    if hidden[0][0].out_features != dim // 4:
        raise _fail("a dynamic position bias MLP width other than dim // 4")
    return dict(
        dynamic_pos_bias=True,
        dynamic_pos_bias_log_distance=bool(rel.log_distance),
        dynamic_pos_bias_mlp_depth=len(hidden),
        dynamic_pos_bias_norm=len(hidden[0]) == 3,  # Linear, LayerNorm, SiLU
    )


def _stack_config(al: Any) -> AttentionLayersConfig:
    name = type(al).__name__
    if name not in ("AttentionLayers", "Encoder", "Decoder", "CrossAttender"):
        raise _fail(f"attn_layers class {name}")
    _expect(al, _STACK_CHECKS)
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
    residuals, layerscales, shift_amounts = set(), set(), []
    for (norms, block, residual), t in zip(al.layers, layer_types, strict=True):
        residuals.add(_residual_options(residual))
        for norm in norms:
            if norm is not None:
                norm_kinds.add(_norm_kind(norm))
        block, layerscale, shifts = _unwrap_branch(block)
        layerscales.add(layerscale)
        amount = max(shifts, default=0)
        if shifts and shifts != tuple(range(0 if al.causal else -amount, amount + 1)):
            raise _fail("shift_tokens", f"shifts {shifts}")
        shift_amounts.append(amount)
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
    if len(residuals) > 1 or len(layerscales) > 1:
        raise _fail("per-layer residual or layer-scale options")
    has_norms = bool(norm_kinds)
    kind, unit_offset = norm_kinds.pop() if norm_kinds else ("layernorm", True)
    layerscale_offset = layerscales.pop()
    if layerscale_offset is not None:
        # SimpleRMSNorm has no gain, so only the LayerScale tells norm_add_unit_offset.
        if kind == "simple_rmsnorm" or not has_norms:
            unit_offset = layerscale_offset
        elif layerscale_offset != unit_offset:
            raise _fail("a LayerScale unit offset that differs from the norms'")
    gate_residual, scale_residual, streams, sinkhorn_iters = residuals.pop()
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
        gate_residual=gate_residual,
        scale_residual=scale_residual,
        num_residual_streams=streams,
        hyper_conn_sinkhorn_iters=sinkhorn_iters,
        use_layerscale=layerscale_offset is not None,
        residual_attn=bool(al.residual_attn),
        cross_residual_attn=bool(al.cross_residual_attn),
        **_value_residual_options(al, layer_types),
        attn=attn_cfg,
        cross_attn=cross_cfg,
        ff=ff_cfgs[0] if ff_cfgs else FeedForwardConfig(),
    )
    rot = al.rotary_pos_emb
    if rot is not None:
        if getattr(rot, "scale", None) is not None:
            kwargs.update(rotary_xpos=True, rotary_xpos_scale_base=rot.scale_base)
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
        elif rname == "DynamicPositionBias":
            kwargs.update(_dynamic_pos_bias_options(rel, al.dim))
        else:
            raise _fail(f"positional bias {rname}")
    default_disable = bool(kwargs.get("rel_pos_bias") or kwargs.get("rotary_pos_emb"))
    if bool(al.disable_abs_pos_emb) != default_disable:
        kwargs["disable_abs_pos_emb"] = bool(al.disable_abs_pos_emb)
    cfg = AttentionLayersConfig(depth=1, **kwargs)
    block = cfg.layer_types
    order = tuple(int(i) for i in al.layers_execute_order)
    repeats = len(order) // len(block)
    # Per-layer shifts can only be checked once the number of layers is known.
    shift_tokens = shift_amounts[0] if len(set(shift_amounts)) == 1 else tuple(shift_amounts)
    if layer_types == block and repeats > 1 and order == tuple(range(len(block))) * repeats:
        # weight_tie_layers builds one block and runs it depth times.
        return dataclasses.replace(
            cfg, depth=repeats, weight_tie_layers=True, shift_tokens=shift_tokens
        )
    structure: dict[str, Any] = {"shift_tokens": shift_tokens}
    if len(layer_types) % len(block) == 0 and block * (len(layer_types) // len(block)) == (
        layer_types
    ):
        structure["depth"] = len(layer_types) // len(block)
    else:
        structure.update(depth=None, custom_layers=layer_types)
    if order != tuple(range(len(layer_types))):
        structure["layers_execute_order"] = order
    return dataclasses.replace(cfg, **structure)


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
        use_abs_pos_emb=(pos_kind != "none" or tw.max_seq_len == 0 or stack.abs_pos_emb_disabled),
        scaled_sinu_pos_emb=pos_kind == "sinusoidal",
        l2norm_embed=bool(tw.l2norm_embed),
        return_only_embed=not has_logits if return_only_embed is None else return_only_embed,
        max_mem_len=int(tw.max_mem_len),
        shift_mem_down=int(tw.shift_mem_down),
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
            max_mem_len=int(model.max_mem_len),
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

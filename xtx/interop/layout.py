"""The weight layout table shared by both conversion directions.

One row per weight: (xtx parameter path, torch state_dict key, layout), built from
the xtx config. ``params_from_state_dict`` and ``state_dict_from_params`` both walk it,
so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xtx.layers.stack_config import AttentionLayersConfig
from xtx.layers.transformer import stack_layer_params, unstack_layer_params
from xtx.models.continuous import ContinuousConfig
from xtx.models.transformer_wrapper import TransformerWrapperConfig
from xtx.models.vit import ViTConfig
from xtx.models.xtransformer import XTransformerConfig
from xtx.ops import rotary_inv_freq


class UnsupportedOption(ValueError):
    """An x-transformers option that xtx cannot convert (yet)."""


def _fail(option: str, detail: str = "") -> UnsupportedOption:
    more = f" ({detail})" if detail else ""
    return UnsupportedOption(
        f"x-transformers option {option} is not supported by xtx.interop yet{more}"
    )


# ---------------------------------------------------------------------------
# Weight layouts: (to xtx, to torch) pairs of numpy functions.


@dataclasses.dataclass(frozen=True)
class Layout:
    to_xtx: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda w: w, lambda w: w)
LINEAR = Layout(lambda w: w.T, lambda w: w.T)  # [out, in] <-> [in, out]


# Conv2d(h, h, 1) weight ``[out, in, 1, 1]`` <-> head-mixing matrix ``[in, out]``.
CONV_1X1 = Layout(lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None])


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


# GRUCell bias ``[3*D]`` (gates r, z, n) <-> ``[3, D]``.
GRU_BIAS = Layout(lambda w: w.reshape(3, -1), lambda w: w.reshape(-1))

HYPER_CONNECTION_PARAMS = (
    "static_beta",
    "static_alpha",
    "dynamic_alpha_fn",
    "dynamic_alpha_scale",
    "dynamic_beta_fn",
    "dynamic_beta_scale",
)


def _residual_rows(cfg: AttentionLayersConfig, lp: tuple[str, ...], rk: str) -> list[Row]:
    """Weights of one sublayer's residual combiner (torch ``layers.{i}.2``)."""
    rp = (*lp, "residual")
    rows: list[Row] = []
    if cfg.num_residual_streams > 1:
        rows.append(((*rp, "norm", "scale"), f"{rk}.norm.weight", SAME))
        rows += [((*rp, name), f"{rk}.{name}", SAME) for name in HYPER_CONNECTION_PARAMS]
        return rows
    if cfg.scale_residual:
        rows.append(((*rp, "residual_scale"), f"{rk}.residual_scale", SAME))
    if cfg.gate_residual:
        # weight_ih / weight_hh ``[3*D, D]`` <-> ``[D, 3, D]``: the q/k/v layout, 3 "heads".
        gates = heads_in(3, cfg.dim)
        rows += [
            ((*rp, "ih_kernel"), f"{rk}.gru.weight_ih", gates),
            ((*rp, "hh_kernel"), f"{rk}.gru.weight_hh", gates),
            ((*rp, "ih_bias"), f"{rk}.gru.bias_ih", GRU_BIAS),
            ((*rp, "hh_bias"), f"{rk}.gru.bias_hh", GRU_BIAS),
        ]
    return rows


# Per-head ``[N, 1, H]`` <-> ``[N, H]`` (qk-norm gains, qk-rmsnorm gammas).
HEAD_GAIN = Layout(lambda w: w[:, 0, :], lambda w: w[:, None, :])
# Head scale ``[1, N, 1, 1]`` <-> ``[N]``.
HEAD_SCALE = Layout(lambda w: w.reshape(-1), lambda w: w.reshape(1, -1, 1, 1))


def _attention_extra_rows(
    cfg: AttentionLayersConfig, acfg: Any, index: int, ap: tuple[str, ...], ak: str
) -> list[Row]:
    """Output projection and the optional projection-side weights of one attention."""
    N, H = cfg.heads, acfg.dim_head
    # attn_on_attn: to_out = Sequential(Linear(N*H, 2*D), GLU).
    out_key = f"{ak}.to_out.0.weight" if acfg.on_attn else f"{ak}.to_out.weight"
    rows: list[Row] = [((*ap, "to_out", "kernel"), out_key, heads_out(N, H))]
    if acfg.qk_norm_dim_scale:
        rows += [
            ((*ap, "qk_norm_q_scale"), f"{ak}.qk_norm_q_scale", HEAD_GAIN),
            ((*ap, "qk_norm_k_scale"), f"{ak}.qk_norm_k_scale", HEAD_GAIN),
        ]
    if acfg.qk_rmsnorm:
        rows += [
            ((*ap, "q_rmsnorm"), f"{ak}.q_rmsnorm.gamma", HEAD_GAIN),
            ((*ap, "k_rmsnorm"), f"{ak}.k_rmsnorm.gamma", HEAD_GAIN),
        ]
    if acfg.head_scale:
        rows.append(((*ap, "head_scale"), f"{ak}.head_scale_params", HEAD_SCALE))
    if acfg.gate_values:
        rows.append(((*ap, "to_v_gate", "kernel"), f"{ak}.to_v_gate.weight", heads_in(N, H)))
    if index in cfg.learned_value_mix_layers:
        mix_key = f"{ak}.to_value_residual_mix.0"
        rows += [
            ((*ap, "to_value_residual_mix", "kernel"), f"{mix_key}.weight", LINEAR),
            ((*ap, "to_value_residual_mix", "bias"), f"{mix_key}.bias", SAME),
        ]
    return rows


def _dynamic_pos_bias_rows(cfg: AttentionLayersConfig, path: tuple[str, ...], key: str):
    """``DynamicPositionBias.mlp``: ``depth`` x Sequential(Linear, [norm], SiLU), Linear."""
    rows: list[Row] = []
    for i in range(cfg.dynamic_pos_bias_mlp_depth):
        rows += [
            ((*path, f"hidden_{i}", "kernel"), f"{key}.{i}.0.weight", LINEAR),
            ((*path, f"hidden_{i}", "bias"), f"{key}.{i}.0.bias", SAME),
        ]
        if cfg.dynamic_pos_bias_norm:
            # The first norm is x-transformers' LayerNorm (gamma), the rest torch's.
            if i == 0:
                rows.append(((*path, "norm_0", "scale"), f"{key}.0.1.gamma", SAME))
            else:
                rows += [
                    ((*path, f"norm_{i}", "scale"), f"{key}.{i}.1.weight", SAME),
                    ((*path, f"norm_{i}", "bias"), f"{key}.{i}.1.bias", SAME),
                ]
    last = f"{key}.{cfg.dynamic_pos_bias_mlp_depth}"
    rows += [
        ((*path, "to_heads", "kernel"), f"{last}.weight", LINEAR),
        ((*path, "to_heads", "bias"), f"{last}.bias", SAME),
    ]
    return rows


def _stack_rows(cfg: AttentionLayersConfig, path: tuple[str, ...], prefix: str) -> list[Row]:
    if cfg.use_rezero:
        raise _fail("use_rezero", "seed-only, removed in x-transformers 0.27")
    if cfg.position_infused_attn:
        raise _fail("position_infused_attn", "seed-only, removed in x-transformers 1.6")
    if cfg.attn.collab_heads or cfg.cross_attn_config.collab_heads:
        raise _fail("attn_collab_heads", "seed-only, removed in x-transformers 0.26")
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
        # Each branch wrapper adds an ``fn.`` level: LayerScale(ShiftTokens(branch)).
        bk = f"{lk}.1"
        if cfg.use_layerscale:
            rows.append(((*lp, "layer_scale"), f"{bk}.gamma", SAME))
            bk += ".fn"
        if cfg.shifts_of(i):
            bk += ".fn"
        rows += _residual_rows(cfg, lp, f"{lk}.2")
        if t in ("a", "c"):
            acfg = cfg.attn if t == "a" else cfg.cross_attn_config
            N, H, K = cfg.heads, acfg.dim_head, acfg.num_kv_heads(cfg.heads)
            ap, ak = (*lp, "attn"), bk
            rows += [
                ((*ap, "to_q", "kernel"), f"{ak}.to_q.weight", heads_in(N, H)),
                ((*ap, "to_k", "kernel"), f"{ak}.to_k.weight", heads_in(K, H)),
                ((*ap, "to_v", "kernel"), f"{ak}.to_v.weight", heads_in(K, H)),
            ]
            rows += _attention_extra_rows(cfg, acfg, i, ap, ak)
            if acfg.num_mem_kv:
                rows += [
                    ((*ap, "mem_k"), f"{ak}.mem_k", SAME),
                    ((*ap, "mem_v"), f"{ak}.mem_v", SAME),
                ]
            for when, on in (("pre", acfg.pre_talking_heads), ("post", acfg.post_talking_heads)):
                if on:
                    key = f"{ak}.attend.{when}_softmax_talking_heads.weight"
                    rows.append(((*ap, f"{when}_talking_heads"), key, CONV_1X1))
        else:
            fp = (*lp, "ff")
            fk = f"{bk}.fn.ff" if cfg.macaron else f"{bk}.ff"
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
            # ff is Sequential(proj_in, [post-act LayerNorm], dropout, proj_out).
            out_index = 2
            if fcfg.post_act_ln:
                rows.append(((*fp, "post_act_norm", "scale"), f"{fk}.1.gamma", SAME))
                out_index = 3
            rows.append(((*fp, "proj_out", "kernel"), f"{fk}.{out_index}.weight", LINEAR))
            if not fcfg.no_bias:
                rows.append(((*fp, "proj_out", "bias"), f"{fk}.{out_index}.bias", SAME))
    if cfg.pre_norm:
        rows += _norm_rows(kind, (*path, "final_norm"), f"{prefix}final_norm")
    if cfg.rel_pos_bias:
        rows.append(((*path, "rel_pos"), f"{prefix}rel_pos.relative_attention_bias.weight", SAME))
    if cfg.dynamic_pos_bias:
        rows += _dynamic_pos_bias_rows(cfg, (*path, "rel_pos"), f"{prefix}rel_pos.mlp")
    if cfg.num_residual_streams > 1:
        rows.append(((*path, "stream_emb"), f"{prefix}stream_emb", SAME))
    return rows


def _wrapper_rows(
    cfg: TransformerWrapperConfig, path: tuple[str, ...], prefix: str, *, token_path=None
) -> list[Row]:
    rows: list[Row] = [
        (token_path or (*path, "token_emb", "embedding"), f"{prefix}token_emb.emb.weight", SAME)
    ]
    if cfg.has_abs_pos_emb:
        if cfg.scaled_sinu_pos_emb:
            rows.append(((*path, "pos_emb", "scale"), f"{prefix}pos_emb.scale", SAME))
        else:
            rows.append(((*path, "pos_emb", "embedding"), f"{prefix}pos_emb.emb.weight", SAME))
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
                rows.append((("pos_emb", "scale"), "pos_emb.scale", SAME))
            else:
                rows.append((("pos_emb", "embedding"), "pos_emb.emb.weight", SAME))
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


def _stacks(config: Any) -> list[tuple[str, tuple[str, ...], AttentionLayersConfig]]:
    """(torch key prefix, xtx params path, config) of every stack in a model."""
    if isinstance(config, XTransformerConfig):
        return [
            ("encoder.attn_layers.", ("encoder", "attn_layers"), config.enc.attn_layers),
            ("decoder.net.attn_layers.", ("decoder", "attn_layers"), config.dec.attn_layers),
        ]
    if isinstance(config, TransformerWrapperConfig | ViTConfig | ContinuousConfig):
        return [("attn_layers.", ("attn_layers",), config.attn_layers)]
    return []


def _restack(config: Any, params: dict[str, Any], *, to_scanned: bool) -> dict[str, Any]:
    """Converts the stacks with ``scan_layers=True`` between unrolled and scanned layouts.

    The table rows speak of unrolled ``layers_{i}``; a scanned stack keeps the same
    weights with a leading depth axis under ``blocks`` (``stack_layer_params``).
    """
    for _, path, cfg in _stacks(config):
        if not cfg.scan_layers:
            continue
        parent = params
        for name in path[:-1]:
            parent = parent[name]
        convert = stack_layer_params if to_scanned else unstack_layer_params
        parent[path[-1]] = convert(parent[path[-1]], cfg)
    return params


def with_stack_options(config: Any, **options: Any) -> Any:
    """``config`` with ``options`` (e.g. ``scan_layers``) set on every stack in it."""
    if isinstance(config, XTransformerConfig):
        return config.replace(
            enc=with_stack_options(config.enc, **options),
            dec=with_stack_options(config.dec, **options),
        )
    if isinstance(config, TransformerWrapperConfig | ViTConfig | ContinuousConfig):
        return config.replace(attn_layers=config.attn_layers.replace(**options))
    raise TypeError(f"no stacks known in {type(config).__name__}")


def _buffers(config: Any) -> dict[str, np.ndarray]:
    """Persistent torch buffers that a strict ``load_state_dict`` expects."""
    out = {}
    for prefix, _, s in _stacks(config):
        if s.uses_rotary:
            inv = rotary_inv_freq(s.rotary_dim, base_rescale_factor=s.rotary_base_rescale_factor)
            out[f"{prefix}rotary_pos_emb.inv_freq"] = np.asarray(inv, np.float32)
        if s.rotary_xpos:
            # xPos's per-pair base zeta_k = (2k + 0.4 r) / (1.4 r), a persistent buffer.
            r = s.rotary_dim
            zeta = (np.arange(0, r, 2, dtype=np.float32) + 0.4 * r) / (1.4 * r)
            out[f"{prefix}rotary_pos_emb.scale"] = zeta.astype(np.float32)
    return out


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
    return _restack(config, traverse_util.unflatten_dict(flat), to_scanned=True)


def state_dict_from_params(config: Any, params: Any) -> dict[str, Any]:
    """A torch state_dict (``torch.Tensor`` values) from xtx ``params``."""
    import torch

    params = _restack(config, _mutable_copy(nn.meta.unbox(params)), to_scanned=False)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, key, layout in _rows(config):
        if path not in flat:
            raise KeyError(f"params have no {'/'.join(path)}, which {key!r} needs")
        value = np.asarray(jax.device_get(flat[path]), np.float32)
        out[key] = torch.from_numpy(np.array(layout.to_torch(value), np.float32, copy=True))
    for key, value in _buffers(config).items():
        out[key] = torch.from_numpy(np.array(value, copy=True))
    return out


def _mutable_copy(tree: Any) -> Any:
    """Nested plain dicts (FrozenDicts thawed) sharing the leaves."""
    if hasattr(tree, "items"):
        return {k: _mutable_copy(v) for k, v in tree.items()}
    return tree


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().to(dtype=__import__("torch").float32).cpu().numpy()
    return np.asarray(t, np.float32)

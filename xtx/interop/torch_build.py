"""Building the x-transformers model that has the architecture of an xtx config."""

from __future__ import annotations

import dataclasses
from typing import Any

from xtx.layers.attention_config import AttentionConfig
from xtx.layers.feedforward import FeedForwardConfig
from xtx.layers.stack_config import AttentionLayersConfig
from xtx.models.continuous import ContinuousConfig
from xtx.models.transformer_wrapper import TransformerWrapperConfig
from xtx.models.vit import ViTConfig
from xtx.models.xtransformer import XTransformerConfig

# ---------------------------------------------------------------------------
# Building the torch model from an xtx config (for round trips and tests).


# Seed (x-transformers 0.12) options that 2.31 removed: no torch 2.31 model has them.
XTX_ONLY = {
    "use_rezero",
    "position_infused_attn",
    "attn_use_entmax15",
    "attn_collab_heads",
    "attn_collab_compression",
}


def _torch_stack_kwargs(cfg: AttentionLayersConfig) -> dict[str, Any]:
    kw: dict[str, Any] = dict(dim=cfg.dim, heads=cfg.heads)
    if cfg.custom_layers is not None:
        kw["custom_layers"] = tuple(cfg.custom_layers)
    else:
        kw["depth"] = cfg.depth
    defaults = AttentionLayersConfig(dim=cfg.dim, depth=1)
    # Every non-default stack option is passed under its own name: xtx keeps the
    # x-transformers keyword names. Options with no x-transformers 2.31 counterpart
    # (the seed-only ones) are listed in XTX_ONLY and have no torch equivalent.
    for f in dataclasses.fields(cfg):
        if f.name in (
            "dim",
            "heads",
            "depth",
            "custom_layers",
            "causal",
            "attn",
            "cross_attn",
            "ff",
            # Execution options: how xtx runs the stack, not what it computes.
            "scan_layers",
            "remat_policy",
        ):
            continue
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        if f.name in XTX_ONLY:
            raise ValueError(f"{f.name} has no x-transformers 2.31 equivalent")
        kw[f.name] = value
    for prefix, sub, default in (
        ("attn_", cfg.attn, AttentionConfig()),
        ("ff_", cfg.ff, FeedForwardConfig()),
    ):
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if f.name == "implementation" or value == getattr(default, f.name):
                continue
            if prefix + f.name in XTX_ONLY:
                raise ValueError(f"{prefix}{f.name} has no x-transformers 2.31 equivalent")
            kw[prefix + f.name] = value
    if cfg.cross_attn is not None:
        for f in dataclasses.fields(cfg.cross_attn):
            value = getattr(cfg.cross_attn, f.name)
            if f.name != "implementation" and value != getattr(cfg.attn, f.name):
                if "attn_" + f.name in XTX_ONLY:
                    raise ValueError(f"cross_attn_{f.name} has no x-transformers 2.31 equivalent")
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
        if f.name in ("num_tokens", "max_seq_len", "attn_layers", "check_token_ids", "dtype"):
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
            if f.name not in ("attn_layers", "channels_last", "dtype")
        }
        return xt.ViTransformerWrapper(attn_layers=_torch_stack(config.attn_layers), **kw)
    if isinstance(config, ContinuousConfig):
        kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        kw.pop("attn_layers")
        kw.pop("dtype")
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

"""``ViTransformerWrapper``: image classification with a transformer encoder.

Papers: ViT 2010.11929; the x-transformers 2.x design follows "Better plain ViT
baselines" (SimpleViT, 2205.01580): patch LayerNorms, learned positions, no CLS token,
mean pooling, a linear head. Register tokens: 2309.16588.

Shapes: images ``[B, C, H, W]`` as in PyTorch (or ``[B, H, W, C]`` with
``channels_last=True``); patches ``[B, P, p*p*C]`` with the channel fastest;
embeddings ``[B, P, D]``; logits ``[B, num_classes]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config
from xtx.layers.base import EMBED, ConfiguredMeta, Projection, dropout
from xtx.layers.norms import Norm
from xtx.layers.transformer import AttentionLayers, AttentionLayersConfig
from xtx.models.transformer_wrapper import COMPUTE_DTYPES, wrapper_config

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(Config):
    """Options of ``ViTransformerWrapper`` (x-transformers keywords + ``channels_last``)."""

    image_size: int
    patch_size: int
    attn_layers: AttentionLayersConfig
    channels: int = 3
    num_classes: int | None = None
    post_emb_norm: bool = False
    num_register_tokens: int = 0
    emb_dropout: float = 0.0
    channels_last: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size "
                f"({self.patch_size})"
            )
        if self.attn_layers.causal:
            raise ValueError("ViTransformerWrapper needs an Encoder (non-causal attn_layers)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2


def patchify(images: Array, patch_size: int, *, channels_last: bool = False) -> Array:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]`` (einops ``b (h p1) (w p2) (p1 p2 c)``)."""
    if not channels_last:
        images = jnp.transpose(images, (0, 2, 3, 1))  # [B, H, W, C]
    B, H, W, C = images.shape
    p = patch_size
    x = images.reshape(B, H // p, p, W // p, p, C)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # [B, h, w, p1, p2, C]
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class ViTransformerWrapper(nn.Module, metaclass=ConfiguredMeta):
    """Vision transformer over image patches."""

    config: ViTConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> ViTConfig:
        return wrapper_config(ViTConfig, "ViTransformerWrapper", kwargs)

    @nn.compact
    def __call__(
        self,
        img: Array,
        *,
        return_embeddings: bool = False,
        return_logits_and_embeddings: bool = False,
        deterministic: bool = True,
    ) -> Array | tuple[Array, Array]:
        cfg = self.config
        dim = cfg.attn_layers.dim
        img = jnp.asarray(img)
        expected = (
            (cfg.image_size, cfg.image_size, cfg.channels)
            if cfg.channels_last
            else (cfg.channels, cfg.image_size, cfg.image_size)
        )
        if img.ndim != 4 or img.shape[1:] != expected:
            layout = "[B, H, W, C]" if cfg.channels_last else "[B, C, H, W]"
            raise ValueError(f"img must have shape {layout} = [B, *{expected}], got {img.shape}")
        x = patchify(img, cfg.patch_size, channels_last=cfg.channels_last)
        x = Norm("layernorm", name="patch_norm_in")(x)
        x = Projection((dim,), (cfg.patch_dim,), (None, EMBED), use_bias=True, name="patch_proj")(x)
        x = Norm("layernorm", name="patch_norm_out")(x)
        pos = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
            (cfg.num_patches, dim),
        )
        x = x + pos[None, : x.shape[1]].astype(x.dtype)
        if cfg.post_emb_norm:
            x = Norm("layernorm", name="post_emb_norm")(x)
        x = dropout(self, x, cfg.emb_dropout, deterministic).astype(cfg.dtype)
        R = cfg.num_register_tokens
        if R:
            reg = self.param(
                "register_tokens",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
                (R, dim),
            )
            x = jnp.concatenate([x, jnp.broadcast_to(reg[None], (x.shape[0], R, dim))], axis=1)
        embed = AttentionLayers(cfg.attn_layers, name="attn_layers")(x, deterministic=deterministic)
        if R:
            embed = embed[:, :-R]
        if cfg.num_classes is None or return_embeddings:
            return embed
        logits = Projection(
            (cfg.num_classes,), (dim,), (EMBED, None), use_bias=True, name="mlp_head"
        )(embed.mean(axis=1)).astype(jnp.float32)
        if return_logits_and_embeddings:
            return logits, embed
        return logits

"""Linen modules over ``xtx.ops``: attention, feedforward, norms and the block stack."""

from xtx.layers.attention import Attention, AttentionConfig, RotarySettings
from xtx.layers.base import Projection
from xtx.layers.embedding import TokenEmbedding
from xtx.layers.feedforward import FeedForward, FeedForwardConfig
from xtx.layers.norms import Norm
from xtx.layers.position_bias import DynamicPositionBias
from xtx.layers.transformer import (
    AttentionLayers,
    AttentionLayersConfig,
    CrossAttender,
    Decoder,
    Encoder,
)

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionLayers",
    "AttentionLayersConfig",
    "CrossAttender",
    "Decoder",
    "DynamicPositionBias",
    "Encoder",
    "FeedForward",
    "FeedForwardConfig",
    "Norm",
    "Projection",
    "RotarySettings",
    "TokenEmbedding",
]

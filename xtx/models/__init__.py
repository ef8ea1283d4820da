"""User-facing models composed from ``xtx.layers``."""

from xtx.models.continuous import ContinuousConfig, ContinuousTransformerWrapper
from xtx.models.transformer_wrapper import TransformerWrapper, TransformerWrapperConfig
from xtx.models.vit import ViTConfig, ViTransformerWrapper
from xtx.models.xtransformer import XTransformer, XTransformerConfig

__all__ = [
    "ContinuousConfig",
    "ContinuousTransformerWrapper",
    "TransformerWrapper",
    "TransformerWrapperConfig",
    "ViTConfig",
    "ViTransformerWrapper",
    "XTransformer",
    "XTransformerConfig",
]

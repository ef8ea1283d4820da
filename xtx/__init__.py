"""xtx: the x-transformers family for JAX/Flax.

Three floors, imported in one direction: ``xtx.ops`` (pure jittable functions),
``xtx.layers`` (Linen modules over them), ``xtx.models`` (user-facing models).
``xtx.interop`` converts weights to and from the PyTorch library x-transformers.
"""

from xtx import ops
from xtx.config import Config
from xtx.layers import (
    Attention,
    AttentionConfig,
    AttentionLayers,
    AttentionLayersConfig,
    CrossAttender,
    Decoder,
    Encoder,
    FeedForward,
    FeedForwardConfig,
    Norm,
)
from xtx.models import (
    AutoregressiveWrapper,
    BlockRecurrentConfig,
    BlockRecurrentTransformer,
    ContinuousAutoregressiveWrapper,
    ContinuousConfig,
    ContinuousTransformerWrapper,
    Longformer,
    LongformerConfig,
    MemorizingConfig,
    MemorizingTransformer,
    NonAutoregressiveWrapper,
    RecurrentMemoryConfig,
    RecurrentMemoryTransformer,
    TransformerWrapper,
    TransformerWrapperConfig,
    TransformerXL,
    TransformerXLConfig,
    ViTConfig,
    ViTransformerWrapper,
    XLAutoregressiveWrapper,
    XTransformer,
    XTransformerConfig,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttentionLayers",
    "AttentionLayersConfig",
    "AutoregressiveWrapper",
    "BlockRecurrentConfig",
    "BlockRecurrentTransformer",
    "Config",
    "ContinuousAutoregressiveWrapper",
    "ContinuousConfig",
    "ContinuousTransformerWrapper",
    "CrossAttender",
    "Decoder",
    "Encoder",
    "FeedForward",
    "FeedForwardConfig",
    "Longformer",
    "LongformerConfig",
    "MemorizingConfig",
    "MemorizingTransformer",
    "NonAutoregressiveWrapper",
    "Norm",
    "RecurrentMemoryConfig",
    "RecurrentMemoryTransformer",
    "TransformerWrapper",
    "TransformerWrapperConfig",
    "TransformerXL",
    "TransformerXLConfig",
    "ViTConfig",
    "ViTransformerWrapper",
    "XLAutoregressiveWrapper",
    "XTransformer",
    "XTransformerConfig",
    "ops",
]

"""User-facing models composed from ``xtx.layers``."""

from xtx.models.autoregressive import AutoregressiveWrapper
from xtx.models.block_recurrent import BlockRecurrentConfig, BlockRecurrentTransformer
from xtx.models.continuous import ContinuousConfig, ContinuousTransformerWrapper
from xtx.models.continuous_autoregressive import ContinuousAutoregressiveWrapper
from xtx.models.longformer import Longformer, LongformerConfig
from xtx.models.memorizing import MemorizingConfig, MemorizingTransformer
from xtx.models.nonautoregressive import NonAutoregressiveWrapper
from xtx.models.recurrent_memory import RecurrentMemoryConfig, RecurrentMemoryTransformer
from xtx.models.transformer_wrapper import TransformerWrapper, TransformerWrapperConfig
from xtx.models.transformer_xl import TransformerXL, TransformerXLConfig
from xtx.models.vit import ViTConfig, ViTransformerWrapper
from xtx.models.xl_autoregressive import XLAutoregressiveWrapper
from xtx.models.xtransformer import XTransformer, XTransformerConfig

__all__ = [
    "AutoregressiveWrapper",
    "BlockRecurrentConfig",
    "BlockRecurrentTransformer",
    "ContinuousAutoregressiveWrapper",
    "ContinuousConfig",
    "ContinuousTransformerWrapper",
    "Longformer",
    "LongformerConfig",
    "MemorizingConfig",
    "MemorizingTransformer",
    "NonAutoregressiveWrapper",
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
]

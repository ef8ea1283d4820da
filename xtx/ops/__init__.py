"""Pure, jittable functions: attention, masks, positional schemes and norms.

Nothing here imports Flax, so these can be used from raw JAX, Equinox or NNX code.
"""

from xtx.ops.attention import (
    attention,
    attention_logits,
    attention_output,
    available_backends,
    keep_top_k,
    mask_value,
    mix_heads,
    normalize_logits,
    reference_attention,
    register_backend,
    softclamp,
)
from xtx.ops.blockwise import blockwise_attention
from xtx.ops.entmax import entmax15
from xtx.ops.losses import autoregressive_loss, cross_entropy
from xtx.ops.masks import AttentionMask, pad_keys
from xtx.ops.norms import l2_normalize, layer_norm, rms_norm, scale_norm
from xtx.ops.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    rotary_angles,
    rotary_inv_freq,
    sinusoidal_embedding,
    t5_position_bias,
    t5_relative_position_bucket,
    xpos_scale,
)
from xtx.ops.relative_bias import RelativeBias
from xtx.ops.splash import splash_attention
from xtx.ops.token_shift import shift_tokens

__all__ = [
    "AttentionMask",
    "RelativeBias",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "attention_logits",
    "attention_output",
    "autoregressive_loss",
    "available_backends",
    "blockwise_attention",
    "cross_entropy",
    "entmax15",
    "keep_top_k",
    "l2_normalize",
    "layer_norm",
    "mask_value",
    "mix_heads",
    "normalize_logits",
    "pad_keys",
    "reference_attention",
    "register_backend",
    "rms_norm",
    "rotary_angles",
    "rotary_inv_freq",
    "scale_norm",
    "shift_tokens",
    "sinusoidal_embedding",
    "softclamp",
    "splash_attention",
    "t5_position_bias",
    "t5_relative_position_bucket",
    "xpos_scale",
]

"""Pure, jittable functions: attention, masks, positional schemes, norms and sampling.

Nothing here imports Flax, so these can be used from raw JAX, Equinox or NNX code.
"""

from xtx.ops.attention import (
    attention,
    attention_logits,
    attention_output,
    available_backends,
    cached_attention,
    keep_top_k,
    mask_value,
    mix_heads,
    normalize_logits,
    reference_attention,
    register_backend,
    softclamp,
)
from xtx.ops.barriers import cotangent_barrier
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
from xtx.ops.sampling import (
    FILTER_LOGITS_FNS,
    beam_candidates,
    contrastive_decode,
    decode_loop,
    gumbel_perturb,
    min_p,
    resolve_filter,
    sample_tokens,
    select_beams,
    top_a,
    top_k,
    top_p,
)
from xtx.ops.splash import splash_attention
from xtx.ops.token_shift import shift_tokens

__all__ = [
    "AttentionMask",
    "FILTER_LOGITS_FNS",
    "RelativeBias",
    "alibi_bias",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "attention_logits",
    "attention_output",
    "autoregressive_loss",
    "available_backends",
    "beam_candidates",
    "blockwise_attention",
    "cached_attention",
    "contrastive_decode",
    "cotangent_barrier",
    "cross_entropy",
    "decode_loop",
    "entmax15",
    "gumbel_perturb",
    "keep_top_k",
    "l2_normalize",
    "layer_norm",
    "mask_value",
    "min_p",
    "mix_heads",
    "normalize_logits",
    "pad_keys",
    "reference_attention",
    "register_backend",
    "resolve_filter",
    "rms_norm",
    "rotary_angles",
    "rotary_inv_freq",
    "sample_tokens",
    "scale_norm",
    "select_beams",
    "shift_tokens",
    "sinusoidal_embedding",
    "softclamp",
    "splash_attention",
    "t5_position_bias",
    "t5_relative_position_bucket",
    "top_a",
    "top_k",
    "top_p",
    "xpos_scale",
]

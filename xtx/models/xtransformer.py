"""``XTransformer``: the encoder-decoder of arXiv 1706.03762 returning its training loss.

``XTransformer(dim=512, enc_num_tokens=256, enc_depth=6, enc_heads=8,
enc_max_seq_len=1024, dec_num_tokens=256, dec_depth=6, dec_heads=8, dec_max_seq_len=1024,
tie_token_emb=True)``: ``enc_*`` / ``dec_*`` keywords configure the two halves as in
x-transformers 2.31. ``model.apply(variables, src, tgt, mask=src_mask)`` returns the
next-token cross-entropy of the decoder, which reads the encoder output through
cross-attention.

``model.generate(variables, src, start_tokens, seq_len)`` encodes ``src`` once and samples
from the decoder with ``AutoregressiveWrapper.generate``; its KV cache holds the
cross-attention keys/values of the encoder output, projected once at the prefill.

Shapes: src ``[B, S]``, tgt ``[B, T]`` int; ``mask`` ``[B, S]`` bool over src.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config, split_prefixed, unknown_keyword_error
from xtx.layers.base import ConfiguredMeta
from xtx.layers.embedding import TokenEmbedding
from xtx.layers.stack_config import AttentionLayersConfig
from xtx.models.autoregressive import AutoregressiveWrapper
from xtx.models.transformer_wrapper import TransformerWrapper, TransformerWrapperConfig
from xtx.ops import autoregressive_loss

Array = jax.Array

_ENC_WRAPPER_KEYS = (
    "num_tokens",
    "max_seq_len",
    "emb_dropout",
    "num_memory_tokens",
    "scaled_sinu_pos_emb",
    "use_abs_pos_emb",
)
_DEC_WRAPPER_KEYS = (
    "num_tokens",
    "max_seq_len",
    "emb_dropout",
    "scaled_sinu_pos_emb",
    "use_abs_pos_emb",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class XTransformerConfig(Config):
    """Encoder and decoder wrapper configs plus the loss options."""

    enc: TransformerWrapperConfig
    dec: TransformerWrapperConfig
    tie_token_emb: bool = False
    ignore_index: int = -100
    pad_value: int = 0

    def __post_init__(self):
        if not self.enc.return_only_embed:
            raise ValueError("the encoder of an XTransformer must have return_only_embed=True")
        if not self.dec.attn_layers.cross_attend or not self.dec.attn_layers.causal:
            raise ValueError("the decoder of an XTransformer must be causal and cross-attend")
        if self.tie_token_emb:
            if self.enc.num_tokens != self.dec.num_tokens:
                raise ValueError(
                    "tie_token_emb=True needs enc_num_tokens == dec_num_tokens, got "
                    f"{self.enc.num_tokens} and {self.dec.num_tokens}"
                )
            if self.enc.embed_dim != self.dec.embed_dim:
                raise ValueError("tie_token_emb=True needs the same embedding width on both sides")

    @classmethod
    def from_flat(
        cls,
        *,
        dim: int,
        tie_token_emb: bool = False,
        ignore_index: int = -100,
        pad_value: int = 0,
        **kwargs: Any,
    ) -> XTransformerConfig:
        enc, rest = split_prefixed(kwargs, "enc_")
        dec, rest = split_prefixed(rest, "dec_")
        # Check every keyword here, with its side prefix, so that a misspelt
        # ``enc_max_seq_length`` is reported as such and gets ``enc_max_seq_len`` as the
        # suggestion instead of failing deep inside the stack config.
        enc_valid = AttentionLayersConfig.flat_keywords() | set(_ENC_WRAPPER_KEYS)
        dec_valid = AttentionLayersConfig.flat_keywords() | set(_DEC_WRAPPER_KEYS)
        valid = (
            {"dim", "tie_token_emb", "ignore_index", "pad_value"}
            | {f"enc_{k}" for k in enc_valid}
            | {f"dec_{k}" for k in dec_valid}
        )
        unknown = [*rest]
        unknown += [f"enc_{k}" for k in enc if k not in enc_valid]
        unknown += [f"dec_{k}" for k in dec if k not in dec_valid]
        if unknown:
            raise unknown_keyword_error("XTransformer", unknown[0], valid)
        for side, kw in (("enc", enc), ("dec", dec)):
            if "dim" in kw:
                raise TypeError(f"set the model width with dim=..., not {side}_dim")
            for key in ("num_tokens", "max_seq_len"):
                if key not in kw:
                    raise TypeError(f"XTransformer needs {side}_{key}")
        enc_wrapper = {k: enc.pop(k) for k in _ENC_WRAPPER_KEYS if k in enc}
        dec_wrapper = {k: dec.pop(k) for k in _DEC_WRAPPER_KEYS if k in dec}
        for key in ("causal", "cross_attend"):
            for side, kw in (("enc", enc), ("dec", dec)):
                if key in kw:
                    raise TypeError(f"XTransformer sets {key} itself; do not pass {side}_{key}")
        enc_stack = AttentionLayersConfig.from_flat(dim=dim, causal=False, **enc)
        dec_stack = AttentionLayersConfig.from_flat(dim=dim, causal=True, cross_attend=True, **dec)
        return cls(
            enc=TransformerWrapperConfig(
                attn_layers=enc_stack, return_only_embed=True, **enc_wrapper
            ),
            dec=TransformerWrapperConfig(attn_layers=dec_stack, **dec_wrapper),
            tie_token_emb=tie_token_emb,
            ignore_index=ignore_index,
            pad_value=pad_value,
        )


class XTransformer(nn.Module, metaclass=ConfiguredMeta):
    """Encoder-decoder transformer that returns the decoder's next-token loss."""

    config: XTransformerConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> XTransformerConfig:
        return XTransformerConfig.from_flat(**kwargs)

    def setup(self):
        cfg = self.config
        shared = None
        if cfg.tie_token_emb:
            shared = TokenEmbedding(cfg.enc.num_tokens, cfg.enc.embed_dim, name="shared_token_emb")
        self.encoder = TransformerWrapper(cfg.enc, shared_token_emb=shared)
        self.decoder = TransformerWrapper(cfg.dec, shared_token_emb=shared)

    def encode(
        self,
        src: Array,
        *,
        mask: Array | None = None,
        attn_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Encoder embeddings ``[B, S, D]``."""
        return self.encoder(src, mask=mask, attn_mask=attn_mask, deterministic=deterministic)

    def decode(
        self,
        tgt: Array,
        encoded: Array,
        *,
        mask: Array | None = None,
        tgt_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Decoder logits ``[B, T, V]`` given the encoder output (``mask`` is over src)."""
        return self.decoder(
            tgt, mask=tgt_mask, context=encoded, context_mask=mask, deterministic=deterministic
        )

    def __call__(
        self,
        src: Array,
        tgt: Array,
        *,
        mask: Array | None = None,
        attn_mask: Array | None = None,
        src_mask: Array | None = None,
        tgt_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Next-token cross-entropy of ``tgt`` given ``src``.

        Args:
          src: ``[B, S]`` source tokens.
          tgt: ``[B, T]`` target tokens; those equal to ``ignore_index`` do not count and
            are fed to the decoder as ``pad_value``.
          mask: ``[B, S]`` source padding mask (x-transformers 2.x name).
          attn_mask: extra encoder self-attention mask.
          src_mask: the seed README's name for ``mask``.
          tgt_mask: ``[B, T]`` target padding mask (seed README); padded targets are
            neither attended to nor counted in the loss.
          deterministic: disable dropout.
        """
        cfg = self.config
        if src_mask is not None:
            if mask is not None:
                raise ValueError("pass the source mask once: mask= or src_mask=, not both")
            mask = src_mask
        encoded = self.encode(src, mask=mask, attn_mask=attn_mask, deterministic=deterministic)
        tgt = jnp.asarray(tgt)
        if tgt_mask is not None:
            tgt_mask = jnp.asarray(tgt_mask, bool)
            if tgt_mask.shape != tgt.shape:
                raise ValueError(
                    f"tgt_mask must have the shape of tgt {tgt.shape}, got {tgt_mask.shape}"
                )
            tgt = jnp.where(tgt_mask, tgt, cfg.ignore_index)
        inp = jnp.where(tgt == cfg.ignore_index, cfg.pad_value, tgt)
        logits = self.decode(
            inp, encoded, mask=mask, tgt_mask=tgt_mask, deterministic=deterministic
        )
        return autoregressive_loss(logits, tgt, ignore_index=cfg.ignore_index)

    def generate(
        self,
        variables: dict[str, Any],
        src: Array,
        start_tokens: Array,
        seq_len: int,
        *,
        src_mask: Array | None = None,
        **generate_kwargs: Any,
    ) -> Array:
        """Samples ``seq_len`` target tokens after ``start_tokens``, given ``src``.

        As x-transformers' ``XTransformer.generate``: the source is encoded once, then the
        decoder, wrapped in an ``AutoregressiveWrapper`` with this model's ``ignore_index``
        and ``pad_value``, generates with ``context`` = the encoder output and
        ``context_mask`` = ``src_mask``. With its KV cache (``cache_kv=True``, the
        default) the cross-attention keys/values are projected once, at the prefill.
        The encoder and the decoding loop are compiled once per configuration and shape.

        Args:
          variables: the XTransformer's variables (``model.init`` or
            ``xtx.interop.from_x_transformers``).
          src: ``[B, S]`` int source tokens.
          start_tokens: ``[B, P]`` int target prompt (e.g. a start token per row).
          seq_len: number of tokens to generate (>= 1).
          src_mask: ``[B, S]`` bool, False at source padding.
          **generate_kwargs: options of ``AutoregressiveWrapper.generate``
            (``temperature``, ``key``, ``filter_logits_fn``, ``filter_kwargs``,
            ``eos_token``, ``cache_kv``, ``prompt_lens``).

        Returns:
          ``[B, seq_len]`` int32 tokens.
        """
        for name in ("context", "context_mask"):
            if name in generate_kwargs:
                raise TypeError(
                    f"XTransformer.generate sets {name} itself (the encoded src and "
                    f"src_mask); do not pass {name}"
                )
        encode, decoder = _generation_parts(self.config)
        src = jnp.asarray(src)
        if src_mask is not None:
            src_mask = jnp.asarray(src_mask)
            if src_mask.shape != src.shape:
                raise ValueError(
                    f"src_mask must have the shape of src {src.shape}, got {src_mask.shape}"
                )
            src_mask = src_mask.astype(bool)
        encoded = encode(variables, src, src_mask)  # [B, S, D]
        return decoder.generate(
            _decoder_variables(variables, self.config.tie_token_emb),
            start_tokens,
            seq_len,
            context=encoded,
            context_mask=src_mask,
            **generate_kwargs,
        )


@functools.lru_cache(maxsize=8)
def _generation_parts(config: XTransformerConfig) -> tuple[Callable, AutoregressiveWrapper]:
    """The jitted encoder and the decoder's sampling wrapper of one configuration, kept
    so that a second ``generate`` with the same shapes compiles nothing. Both modules are
    top-level (``parent=None``), not children of the module whose method builds them."""
    model = XTransformer(config, parent=None)

    def encode(variables, src, mask):
        return model.apply(variables, src, mask=mask, method=XTransformer.encode)

    decoder = AutoregressiveWrapper(
        TransformerWrapper(config.dec, parent=None),
        ignore_index=config.ignore_index,
        pad_value=config.pad_value,
    )
    return jax.jit(encode), decoder


def _decoder_variables(variables: dict[str, Any], tie_token_emb: bool) -> dict[str, Any]:
    """The decoder's variables as a standalone ``TransformerWrapper`` holds them: its
    subtree, plus the shared token embedding under ``token_emb`` when tied."""
    if "decoder" not in variables.get("params", {}):
        raise ValueError(
            "variables must be an XTransformer's, with params['decoder'], got params "
            f"keys {sorted(variables.get('params', {}))}"
        )
    out = {}
    for collection, tree in variables.items():
        sub = dict(tree.get("decoder", {}))
        if tie_token_emb and "shared_token_emb" in tree:
            sub["token_emb"] = tree["shared_token_emb"]
        out[collection] = sub
    return out

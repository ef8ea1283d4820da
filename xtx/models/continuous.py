"""``ContinuousTransformerWrapper``: a transformer over real-valued vectors.

The x-transformers wrapper for continuous inputs (time series, embeddings, audio
frames): ``Linear(dim_in, dim)`` (no bias) -> absolute positions ``P[t] * dim**-0.5`` ->
optional post-embedding norm -> memory tokens -> dropout -> stack (with its final norm)
-> ``Linear(dim, dim_out)`` (no bias). With ``probabilistic=True`` the output is
``stack(mean, variance)`` of a diagonal Gaussian. Memory tokens: 2006.11527.
Transformer-XL memories (1901.02860): ``mems=`` in, ``return_mems=True`` out; unlike
``TransformerWrapper``, x-transformers builds the next memories from this segment's
hiddens alone (the old memories are not prepended), and so does this port.

Incremental decoding (``ContinuousAutoregressiveWrapper.generate``): ``cache =
model.init_cache(B, L)``, then ``out, cache = model.apply(variables, x, cache=cache)``
for the prompt and for each new frame; absolute positions continue at ``cache.length``.

Shapes: x ``[B, T, dim_in]``, mask ``[B, T]``, output ``[B, T, dim_out]`` (``[2, B, T,
dim_out]`` when probabilistic).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config
from xtx.layers.base import EMBED, ConfiguredMeta, Projection, dropout
from xtx.layers.embedding import PositionalEmbedding
from xtx.layers.norms import Norm
from xtx.layers.transformer import AttentionLayers, AttentionLayersConfig, KVCache, init_kv_cache
from xtx.models.transformer_wrapper import (
    COMPUTE_DTYPES,
    next_xl_memories,
    require_dropout_rng,
    wrapper_config,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuousConfig(Config):
    """Options of ``ContinuousTransformerWrapper`` (x-transformers keywords)."""

    attn_layers: AttentionLayersConfig
    max_seq_len: int | None = None
    dim_in: int | None = None
    dim_out: int | None = None
    num_memory_tokens: int | None = None
    post_emb_norm: bool = False
    emb_dropout: float = 0.0
    use_abs_pos_emb: bool = True
    scaled_sinu_pos_emb: bool = False
    average_pool_embed: bool = False
    probabilistic: bool = False
    use_identity_if_same_dim: bool = False
    max_mem_len: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.max_mem_len, int) or self.max_mem_len < 0:
            raise ValueError(f"max_mem_len must be an int >= 0, got {self.max_mem_len!r}")
        if self.probabilistic and self.dim_out is None:
            raise ValueError("probabilistic=True needs dim_out")
        if not 0.0 <= self.emb_dropout < 1.0:
            raise ValueError(f"emb_dropout must be in [0, 1), got {self.emb_dropout}")

    @property
    def has_abs_pos_emb(self) -> bool:
        return (
            bool(self.max_seq_len)
            and self.use_abs_pos_emb
            and not self.attn_layers.abs_pos_emb_disabled
        )

    @property
    def has_project_in(self) -> bool:
        dim = self.attn_layers.dim
        return self.dim_in is not None and (not self.use_identity_if_same_dim or self.dim_in != dim)

    @property
    def project_out_dim(self) -> int | None:
        if self.dim_out is None:
            return None
        return self.dim_out * (2 if self.probabilistic else 1)

    @property
    def has_project_out(self) -> bool:
        out = self.project_out_dim
        return out is not None and (
            not self.use_identity_if_same_dim or out != self.attn_layers.dim
        )


class ContinuousTransformerWrapper(nn.Module, metaclass=ConfiguredMeta):
    """Transformer over continuous vectors ``[B, T, dim_in] -> [B, T, dim_out]``."""

    config: ContinuousConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> ContinuousConfig:
        return wrapper_config(ContinuousConfig, "ContinuousTransformerWrapper", kwargs)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` frames (prompt and generated) for incremental
        decoding; at most ``max_seq_len`` with absolute positional embeddings."""
        cfg = self.config
        if cfg.has_abs_pos_emb and max_len > cfg.max_seq_len:
            raise ValueError(
                f"max_len must be <= max_seq_len = {cfg.max_seq_len} with absolute "
                f"positional embeddings, got {max_len}"
            )
        if cfg.num_memory_tokens:
            raise ValueError("a KV cache is not supported with num_memory_tokens")
        return init_kv_cache(cfg.attn_layers, batch_size, max_len, jnp.dtype(cfg.dtype))

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        lens: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        mems: tuple[Array, ...] | list[Array] | None = None,
        mem_masks: tuple[Array | None, ...] | list[Array | None] | None = None,
        return_mems: bool = False,
        return_embeddings: bool = False,
        deterministic: bool = True,
        cache: KVCache | None = None,
    ) -> Any:
        """Runs the model.

        Args:
          x: ``[B, T, dim_in]`` (``[B, T, dim]`` without ``project_in``).
          mask: ``[B, T]`` bool, False at padding (or give ``lens``).
          lens: ``[B]`` sequence lengths.
          context: ``[B, S, D]`` for a cross-attending stack.
          context_mask: ``[B, S]`` bool.
          mems: Transformer-XL memories, a tuple of ``[B, M, D]`` arrays (one per
            self-attention layer) from the previous segment; None on the first.
          mem_masks: per-layer ``[B, M]`` bool masks over ``mems``.
          return_mems: also return the next memories: per self-attention layer the last
            ``max_mem_len`` rows of its input hidden ``[B, min(T, max_mem_len), D]``,
            gradient-stopped (x-transformers does not prepend the old memories here).
          return_embeddings: return the final-normed hiddens.
          deterministic: disable dropout (pass ``rngs={"dropout": key}`` when False).
          cache: a ``KVCache`` from ``init_cache``: x holds the T frames that follow the
            ``cache.length`` frames already decoded.

        Returns:
          ``[B, T, dim_out]`` (see the module docstring), or ``(that, new_mems)``, or
          with ``cache`` ``(that, new_cache)``.
        """
        cfg = self.config
        require_dropout_rng(self, deterministic)
        dim = cfg.attn_layers.dim
        x = jnp.asarray(x)
        expected_in = cfg.dim_in if cfg.has_project_in else dim
        if x.ndim != 3 or x.shape[-1] != expected_in:
            raise ValueError(f"x must have shape [B, T, {expected_in}], got {x.shape}")
        B, T, _ = x.shape
        if lens is not None:
            if mask is not None:
                raise ValueError("pass either mask or lens, not both")
            mask = jnp.arange(T)[None, :] < jnp.asarray(lens)[:, None]
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != (B, T):
                raise ValueError(f"mask must have shape [B, T] = {(B, T)}, got {mask.shape}")
        orig_mask = mask
        if cache is not None and (cfg.num_memory_tokens or mems is not None or return_mems):
            raise ValueError("cache cannot be combined with num_memory_tokens or mems (XL)")
        if cfg.has_project_in:
            x = Projection((dim,), (cfg.dim_in,), (None, EMBED), name="project_in")(x)
        if cfg.has_abs_pos_emb:
            pos_emb = PositionalEmbedding(
                cfg.max_seq_len, dim, scaled_sinusoidal=cfg.scaled_sinu_pos_emb, name="pos_emb"
            )
            if cache is None:
                pos = pos_emb(T)
            else:
                # A fresh cache (length None) is being prefilled from position 0.
                offset = 0 if cache.length is None else cache.length
                pos = jax.lax.dynamic_slice_in_dim(pos_emb(cfg.max_seq_len), offset, T)
            x = x + pos.astype(x.dtype)
        if cfg.post_emb_norm:
            x = Norm("layernorm", name="post_emb_norm")(x)
        M = cfg.num_memory_tokens or 0
        if M:
            mem = self.param(
                "memory_tokens",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
                (M, dim),
            )
            x = jnp.concatenate([jnp.broadcast_to(mem[None], (B, M, dim)).astype(x.dtype), x], 1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((B, M), bool), mask], axis=1)
        x = dropout(self, x, cfg.emb_dropout, deterministic).astype(cfg.dtype)
        x = AttentionLayers(cfg.attn_layers, name="attn_layers")(
            x,
            mask=mask,
            context=context,
            context_mask=context_mask,
            mems=mems,
            mem_masks=mem_masks,
            return_hiddens=return_mems,
            cache=cache,
            deterministic=deterministic,
        )
        if cache is not None:
            x, cache = x
        new_mems = None
        if return_mems:
            x, hiddens = x
            new_mems = next_xl_memories(None, hiddens, cfg.max_mem_len)
        x = x[:, M:]
        if cfg.average_pool_embed:
            if orig_mask is None:
                x = x.mean(axis=1)
            else:
                w = orig_mask[..., None].astype(x.dtype)
                x = (x * w).sum(1) / jnp.maximum(w.sum(1), 1e-5)
        if not return_embeddings:
            if cfg.has_project_out:
                x = Projection((cfg.project_out_dim,), (dim,), (EMBED, None), name="project_out")(x)
            x = x.astype(jnp.float32)
            if cfg.probabilistic:
                mean, log_var = x[..., 0::2], x[..., 1::2]
                x = jnp.stack([mean, jnp.exp(log_var)])
        if cache is not None:
            return x, cache
        return (x, new_mems) if return_mems else x

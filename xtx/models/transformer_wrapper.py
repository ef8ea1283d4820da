"""``TransformerWrapper``: token embedding + a transformer stack + logits.

The x-transformers language-model wrapper (GPT-like with a ``Decoder``, BERT-like with
an ``Encoder``). Memory tokens: arXiv 2006.11527; tied embeddings: 1608.05859;
l2-normalised embeddings: 1910.05895; Transformer-XL recurrence: 1901.02860 (memories
are an explicit tuple passed in with ``mems=`` and returned with ``return_mems=True``);
enhanced recurrence (``shift_mem_down``): 2012.15688.

Shapes: tokens ``[B, T]`` int, embeddings ``[B, T, D]``, logits ``[B, T, V]``.

Incremental decoding: ``cache = model.init_cache(B, L)`` (a ``KVCache`` pytree of fixed
size), then ``logits, cache = model.apply(variables, tokens, cache=cache)`` for the prompt
and for each new token; absolute positions continue where the cache stops. Memory tokens
go in with the prompt (the first call on a fresh cache) and keep the first cache slots;
a cross-attending stack projects ``context`` at that call only.

Forward order (x-transformers 2.31): ``E[tok] + P[t] * emb_dim**-0.5`` -> post-emb norm
-> dropout -> project to ``dim`` -> prepend memory tokens -> stack (with its final norm)
-> drop memory tokens -> logits (``x @ E.T * dim**-0.5`` when tied).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config, field_names, unknown_keyword_error
from xtx.layers.base import EMBED, VOCAB, ConfiguredMeta, Projection, dropout
from xtx.layers.embedding import PositionalEmbedding, TokenEmbedding
from xtx.layers.norms import Norm
from xtx.layers.transformer import AttentionLayers, AttentionLayersConfig, KVCache, init_kv_cache
from xtx.ops import l2_normalize

Array = jax.Array


# Compute dtypes: parameters stay float32, attention logits/softmax and norms run in
# float32, logits are returned in float32; matmuls and activations use ``dtype``.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def wrapper_config(config_cls: type, owner: str, kwargs: dict[str, Any]) -> Any:
    """Builds a wrapper config from keywords: unknown ones are named, ``attn_layers`` is
    required and may be a module (``Decoder(...)``), a config or a dict."""
    names = field_names(config_cls)
    for key in kwargs:
        if key not in names:
            raise unknown_keyword_error(owner, key, names)
    if "attn_layers" not in kwargs:
        raise TypeError(f"{owner} needs attn_layers=Encoder(...) or Decoder(...)")
    return config_cls(**{**kwargs, "attn_layers": stack_config(kwargs["attn_layers"])})


def stack_config(attn_layers: Any) -> AttentionLayersConfig:
    """Accepts an ``AttentionLayers`` module (``Decoder(...)``), a config, or a dict."""
    if isinstance(attn_layers, AttentionLayers):
        return attn_layers.config
    if isinstance(attn_layers, AttentionLayersConfig):
        return attn_layers
    if isinstance(attn_layers, dict):
        return AttentionLayersConfig.from_dict(attn_layers)
    raise TypeError(
        "attn_layers must be an Encoder/Decoder/AttentionLayers module or an "
        f"AttentionLayersConfig, got {type(attn_layers).__name__}"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerWrapperConfig(Config):
    """Options of ``TransformerWrapper`` (x-transformers keywords)."""

    num_tokens: int
    max_seq_len: int
    attn_layers: AttentionLayersConfig
    emb_dim: int | None = None
    emb_dropout: float = 0.0
    post_emb_norm: bool = False
    num_memory_tokens: int | None = None
    tie_embedding: bool = False
    tie_embedding_scale: float | None = None
    logits_dim: int | None = None
    use_abs_pos_emb: bool = True
    scaled_sinu_pos_emb: bool = False
    l2norm_embed: bool = False
    return_only_embed: bool = False
    check_token_ids: bool = False
    dtype: str = "float32"
    max_mem_len: int = 0
    shift_mem_down: int = 0

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.max_mem_len, int) or self.max_mem_len < 0:
            raise ValueError(f"max_mem_len must be an int >= 0, got {self.max_mem_len!r}")
        if not isinstance(self.shift_mem_down, int) or self.shift_mem_down < 0:
            raise ValueError(f"shift_mem_down must be an int >= 0, got {self.shift_mem_down!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {self.num_tokens!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be an int >= 0, got {self.max_seq_len!r}")
        if not 0.0 <= self.emb_dropout < 1.0:
            raise ValueError(f"emb_dropout must be in [0, 1), got {self.emb_dropout}")
        if self.num_memory_tokens is not None and self.num_memory_tokens < 0:
            raise ValueError(f"num_memory_tokens must be >= 0, got {self.num_memory_tokens}")
        if self.tie_embedding and self.embed_dim != self.attn_layers.dim:
            raise ValueError(
                f"tie_embedding=True needs emb_dim == dim, got emb_dim={self.embed_dim} "
                f"and dim={self.attn_layers.dim}"
            )
        if self.scaled_sinu_pos_emb and self.embed_dim % 2:
            raise ValueError(f"scaled_sinu_pos_emb needs an even emb_dim, got {self.embed_dim}")

    @classmethod
    def from_flat(cls, **kwargs: Any) -> TransformerWrapperConfig:
        return wrapper_config(cls, "TransformerWrapper", kwargs)

    @property
    def dim(self) -> int:
        return self.attn_layers.dim

    @property
    def embed_dim(self) -> int:
        return self.emb_dim or self.attn_layers.dim

    @property
    def has_abs_pos_emb(self) -> bool:
        return (
            self.max_seq_len > 0
            and self.use_abs_pos_emb
            and not self.attn_layers.abs_pos_emb_disabled
        )

    @property
    def memory_token_count(self) -> int:
        return self.num_memory_tokens or 0


class TransformerWrapper(nn.Module, metaclass=ConfiguredMeta):
    """Token embeddings, positions, a transformer stack and the output logits.

    ``TransformerWrapper(num_tokens=256, max_seq_len=1024, attn_layers=Decoder(dim=512,
    depth=6, heads=8))``; ``variables = model.init(key, tokens)``;
    ``logits = model.apply(variables, tokens)``.
    """

    config: TransformerWrapperConfig
    shared_token_emb: TokenEmbedding | None = None

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> TransformerWrapperConfig:
        return TransformerWrapperConfig.from_flat(**kwargs)

    def setup(self):
        cfg = self.config
        E = cfg.embed_dim
        if self.shared_token_emb is not None:
            self.token_emb = self.shared_token_emb
        else:
            std = 1e-5 if cfg.l2norm_embed else None
            self.token_emb = TokenEmbedding(cfg.num_tokens, E, std=std)
        if cfg.has_abs_pos_emb:
            self.pos_emb = PositionalEmbedding(
                cfg.max_seq_len,
                E,
                scaled_sinusoidal=cfg.scaled_sinu_pos_emb,
                l2norm=cfg.l2norm_embed,
            )
        if cfg.post_emb_norm:
            self.post_emb_norm = Norm("layernorm", name="post_emb_norm")
        if E != cfg.dim:
            self.project_emb = Projection((cfg.dim,), (E,), (None, EMBED), use_bias=True)
        if cfg.memory_token_count:
            self.memory_tokens = self.param(
                "memory_tokens",
                nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
                (cfg.memory_token_count, cfg.dim),
            )
        self.attn_layers = AttentionLayers(cfg.attn_layers)
        if not cfg.return_only_embed and not cfg.tie_embedding:
            self.to_logits = Projection(
                (cfg.logits_dim or cfg.num_tokens,), (cfg.dim,), (EMBED, VOCAB)
            )

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache of ``max_len`` token slots for incremental decoding.

        Args:
          batch_size: B.
          max_len: L, the most tokens (prompt and generated) the cache holds; at most
            ``max_seq_len`` with absolute positional embeddings. Memory tokens take
            ``num_memory_tokens`` slots more.

        Returns:
          A fresh ``KVCache`` holding keys/values in the compute dtype.
        """
        cfg = self.config
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
        if cfg.has_abs_pos_emb and max_len > cfg.max_seq_len:
            raise ValueError(
                f"max_len must be <= max_seq_len = {cfg.max_seq_len} with absolute "
                f"positional embeddings, got {max_len}"
            )
        return init_kv_cache(
            cfg.attn_layers, batch_size, cfg.memory_token_count + max_len, jnp.dtype(cfg.dtype)
        )

    def embed(
        self, x: Array, *, deterministic: bool = True, positions: Array | None = None
    ) -> Array:
        """Token ids ``[B, T]`` -> input embeddings ``[B, T, D]`` (before memory tokens).

        ``positions`` (int ``[T]`` or ``[B, T]``; default ``0 .. T-1``) index the absolute
        positional embedding; values outside ``[0, max_seq_len)`` are clamped (they only
        occur at left padding, which no real token attends to).
        """
        cfg = self.config
        require_dropout_rng(self, deterministic)
        T = x.shape[1]
        tok = self.token_emb(x)
        if cfg.l2norm_embed:
            tok = l2_normalize(tok)
        h = tok
        if cfg.has_abs_pos_emb:
            if positions is None:
                pos = self.pos_emb(T)
            else:
                table = self.pos_emb(cfg.max_seq_len)  # [max_seq_len, E]
                pos = jnp.take(table, jnp.clip(positions, 0, cfg.max_seq_len - 1), axis=0)
            h = h + pos.astype(h.dtype)
        if cfg.post_emb_norm:
            h = self.post_emb_norm(h)
        h = dropout(self, h, cfg.emb_dropout, deterministic)
        if cfg.embed_dim != cfg.dim:
            h = self.project_emb(h)
        h = h.astype(cfg.dtype)
        return h

    def __call__(
        self,
        x: Array,
        *,
        mask: Array | None = None,
        context: Array | None = None,
        context_mask: Array | None = None,
        attn_mask: Array | None = None,
        self_attn_kv_mask: Array | None = None,
        mems: tuple[Array, ...] | list[Array] | None = None,
        mem_masks: tuple[Array | None, ...] | list[Array | None] | None = None,
        return_mems: bool = False,
        detach_mems: bool = True,
        return_embeddings: bool = False,
        return_logits_and_embeddings: bool = False,
        cache: KVCache | None = None,
        seq_start_pos: Array | None = None,
        deterministic: bool = True,
    ) -> Any:
        """Runs the model.

        Args:
          x: token ids ``[B, T]``.
          mask: ``[B, T]`` bool, False at padding.
          context: ``[B, S, Dc]`` for a cross-attending stack.
          context_mask: ``[B, S]`` bool.
          attn_mask: extra bool attention mask ``[T, T]``, ``[N, T, T]`` or ``[B, N, T, T]``.
          self_attn_kv_mask: ``[B, T]`` key-only mask for self-attention.
          mems: Transformer-XL memories from the previous segment, a tuple of ``[B, M, D]``
            arrays (one per self-attention layer, as returned with ``return_mems``); None
            on the first segment.
          mem_masks: per-layer ``[B, M]`` bool masks over ``mems`` (False: not attended).
          return_mems: also return the memories for the next segment.
          detach_mems: stop gradients through the returned memories (x-transformers'
            default).
          return_embeddings: return the final-normed hiddens ``[B, T, D]``.
          return_logits_and_embeddings: return ``(logits, embeddings)``.
          cache: a ``KVCache`` from ``init_cache``: x holds the T tokens that follow the
            tokens already decoded (a prompt, then one token a step).
          seq_start_pos: ``[B]`` int, for left-padded rows: the index of each row's first
            real token. Earlier keys are not attended (self-attention) and absolute
            positions count from it (as x-transformers; relative schemes need no shift).
            Memory tokens stay attended.
          deterministic: disable dropout (pass ``rngs={"dropout": key}`` when False).

        Returns:
          logits ``[B, T, V]`` (or embeddings, or both); with ``return_mems`` the pair
          ``(that, new_mems)``, see ``next_xl_memories``; with ``cache`` the pair
          ``(that, new_cache)``.
        """
        cfg = self.config
        x = jnp.asarray(x)
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"x must be int token ids of shape [B, T], got {x.dtype} {x.shape}")
        B, T = x.shape
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (B, T):
                raise ValueError(f"mask must have the shape of x {(B, T)}, got {mask.shape}")
            mask = mask.astype(bool)
        if cfg.check_token_ids:
            x = _checked_token_ids(x, cfg.num_tokens)
        M = cfg.memory_token_count
        if cache is not None:
            if mems is not None or return_mems:
                raise ValueError("cache cannot be combined with mems or return_mems (XL)")
            if not isinstance(cache, KVCache):
                raise TypeError(
                    f"cache must be a KVCache (see init_cache), got {type(cache).__name__}"
                )
            if cache.length is not None:
                M = 0  # the memory tokens went in with the prompt (the fresh cache's call)
        positions = None
        if cache is not None or seq_start_pos is not None:
            if cache is None and cfg.has_abs_pos_emb and T > cfg.max_seq_len:
                raise ValueError(
                    f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len} of the "
                    "absolute positional embedding"
                )
            positions = jnp.arange(T, dtype=jnp.int32)  # [T]
            if cache is not None and cache.length is not None:
                # The cache never holds more than max_seq_len tokens (init_cache); the
                # memory tokens fill its first slots.
                positions = positions + cache.length - cfg.memory_token_count
        if seq_start_pos is not None:
            seq_start_pos = jnp.asarray(seq_start_pos)
            if seq_start_pos.shape != (B,) or not jnp.issubdtype(seq_start_pos.dtype, jnp.integer):
                raise ValueError(
                    f"seq_start_pos must be int [B] = ({B},), got "
                    f"{seq_start_pos.dtype} {seq_start_pos.shape}"
                )
            left_pad = positions[None] >= seq_start_pos[:, None]  # [B, T] keys to attend
            if self_attn_kv_mask is not None:
                left_pad = left_pad & self_attn_kv_mask.astype(bool)
            self_attn_kv_mask = left_pad
            positions = positions[None] - seq_start_pos[:, None]  # [B, T]
        h = self.embed(x, deterministic=deterministic, positions=positions)
        if M:
            mem = jnp.broadcast_to(self.memory_tokens[None].astype(h.dtype), (B, M, cfg.dim))
            h = jnp.concatenate([mem, h], axis=1)
            if mask is not None:
                mask = jnp.concatenate([jnp.ones((B, M), bool), mask], axis=1)
            if self_attn_kv_mask is not None:
                self_attn_kv_mask = jnp.concatenate(
                    [jnp.ones((B, M), bool), self_attn_kv_mask.astype(bool)], axis=1
                )
            if attn_mask is not None:
                raise ValueError("attn_mask together with num_memory_tokens is not supported")
        if cfg.shift_mem_down and isinstance(mems, tuple | list):
            # Enhanced recurrence (2012.15688): layer l reads the memory of layer l + s, so
            # higher-level hiddens reach lower layers. Slicing as x-transformers does: a
            # shift of at least the layer count leaves the order unchanged.
            s = cfg.shift_mem_down
            mems = (*mems[s:], *mems[:s])
        h = self.attn_layers(
            h,
            context=context,
            mask=mask,
            context_mask=context_mask,
            attn_mask=attn_mask,
            self_attn_kv_mask=self_attn_kv_mask,
            mems=mems,
            mem_masks=mem_masks,
            return_hiddens=return_mems,
            cache=cache,
            deterministic=deterministic,
        )
        if return_mems:
            h, hiddens = h
        if cache is not None:
            h, cache = h
        h = h[:, M:]
        if return_embeddings or cfg.return_only_embed:
            out = h
        elif return_logits_and_embeddings:
            out = (self.logits(h), h)
        else:
            out = self.logits(h)
        if return_mems:
            new_mems = next_xl_memories(mems, hiddens, cfg.max_mem_len, detach=detach_mems)
            return out, new_mems
        if cache is not None:
            return out, cache
        return out

    def logits(self, h: Array) -> Array:
        """Final hiddens ``[B, T, D]`` -> logits ``[B, T, V]``."""
        cfg = self.config
        if cfg.tie_embedding:
            scale = cfg.tie_embedding_scale
            scale = cfg.dim**-0.5 if scale is None else scale
            return (self.token_emb.attend(h) * scale).astype(jnp.float32)
        return self.to_logits(h).astype(jnp.float32)


def next_xl_memories(
    mems: tuple[Array, ...] | list[Array] | None,
    hiddens: list[Array],
    max_mem_len: int,
    *,
    detach: bool = True,
) -> tuple[Array, ...]:
    """Transformer-XL memories for the next segment (1901.02860).

    Per self-attention layer: the last ``max_mem_len`` rows of ``[old memory; the layer's
    input hidden]`` (memory tokens included), ``[B, min(M + T, max_mem_len), D]``. Once
    the memory is full its shape stays ``[B, max_mem_len, D]``, so a jitted step fed its
    own memories stops retracing (from the second segment on when segments have at least
    ``max_mem_len`` tokens). ``max_mem_len=0`` gives empty ``[B, 0, D]`` memories, as
    x-transformers 2.27+ does (2.26 returned them untruncated).

    Args:
      mems: the memories the stack read (after ``shift_mem_down``), or None.
      hiddens: the input hidden ``[B, T, D]`` of each self-attention layer.
      max_mem_len: rows to keep.
      detach: wrap in ``jax.lax.stop_gradient``.

    Returns:
      a tuple with one ``[B, M', D]`` array per self-attention layer.
    """
    if mems is not None:
        hiddens = [jnp.concatenate([m, h], axis=1) for m, h in zip(mems, hiddens, strict=True)]
    new_mems = tuple(h[:, h.shape[1] - min(max_mem_len, h.shape[1]) :] for h in hiddens)
    if detach:
        new_mems = tuple(jax.lax.stop_gradient(m) for m in new_mems)
    return new_mems


def dropout_rates(config: Any, prefix: str = "") -> dict[str, float]:
    """Every non-zero ``*dropout*`` rate in a (nested) config, by dotted field name."""
    rates = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            rates.update(dropout_rates(value, f"{prefix}{f.name}."))
        elif "dropout" in f.name and isinstance(value, int | float) and value > 0:
            rates[f"{prefix}{f.name}"] = value
    return rates


def require_dropout_rng(module: nn.Module, deterministic: bool) -> None:
    """Raises a ValueError naming the dropout rates when they would need a missing RNG.

    Flax falls back to the ``'params'`` stream (as in ``init``), so that one counts too.
    """
    if deterministic or module.has_rng("dropout") or module.has_rng("params"):
        return
    rates = dropout_rates(module.config)
    if rates:
        listed = ", ".join(f"{k}={v}" for k, v in rates.items())
        raise ValueError(
            f"deterministic=False samples dropout ({listed}): pass "
            "rngs={'dropout': key} to apply, or deterministic=True"
        )


def _checked_token_ids(x: Array, num_tokens: int) -> Array:
    """Raises on ids outside ``[0, num_tokens)``: at once, or at run time under jit."""

    def check(ids):
        ids = jax.device_get(ids)
        bad = (ids < 0) | (ids >= num_tokens)
        if bad.any():
            raise ValueError(
                f"token id {int(ids[bad][0])} in x is outside the vocabulary [0, {num_tokens})"
            )

    if isinstance(x, jax.core.Tracer):
        jax.debug.callback(check, x)
    else:
        check(x)
    return x

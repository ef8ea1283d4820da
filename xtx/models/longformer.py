"""Longformer (Beltagy et al., arXiv 2004.05150): sliding windows, dilation, global tokens.

Every token attends to the tokens within ``window`` positions of it (only the past ones
for language modelling, ``causal=True``; both sides for an encoder). A head with dilation
``d`` looks at every d-th token over a ``window * d`` reach: the sequence is split into
its ``d`` interleaved sub-sequences (positions equal modulo d) and each runs an ordinary
window of ``window`` positions, which is the same set of keys. Windows go through
``xtx.ops.attention`` as an ``AttentionMask`` window, so the blockwise kernel never
visits key blocks outside them: memory and time grow linearly with the length.

Global tokens (encoders): the positions marked in ``global_mask`` attend to every token,
and every token attends to them, with their own projections for the global queries, keys
and values (the paper's Q_g, K_g, V_g). Local queries read the global tokens' *local*
keys/values as prefix keys that every query sees (``AttentionMask.prefix``); in the
window those positions are masked so that nothing is counted twice. At most
``max_global`` global tokens per row (a static shape).

The model processes a whole sequence in one call; the recurrent-state contract of the
gallery (``init_state`` / ``state=`` / ``reset=``) is kept with an empty state.

Shapes: tokens ``[B, T]``, logits ``[B, T, V]``, ``global_mask`` bool ``[B, T]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xtx.config import Config
from xtx.layers.base import (
    EMBED,
    HEAD_DIM,
    HEADS,
    MLP,
    VOCAB,
    ConfiguredMeta,
    Projection,
    dropout,
)
from xtx.layers.norms import Norm
from xtx.models.gallery_common import (
    check_absolute_recipe,
    check_batch_size,
    check_reset,
    check_tokens,
    config_from_keywords,
    token_embedding,
)
from xtx.ops import AttentionMask, apply_rotary, attention, sinusoidal_embedding
from xtx.ops.attention import reference_attention

Array = jax.Array


@flax.struct.dataclass
class LongformerState:
    """Longformer keeps nothing between calls: an empty state for the common contract."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongformerConfig(Config):
    """Options of ``Longformer``.

    Attributes:
      num_tokens, dim, depth, heads: vocabulary, width, layers, heads.
      window: positions seen on each side (``causal``: before) of a token; an int or
        one per layer (the paper grows it with depth).
      dilation: per-head dilation (a tuple of ``heads`` ints, or one tuple per layer);
        None is 1 everywhere.
      causal: language modelling (past only) instead of a two-sided encoder.
      max_global: the most global tokens per row (0: none); encoders only.
      max_seq_len: longest sequence (learned absolute positions are not used: the
        positions are sinusoidal, this only bounds the input).
      ff_mult, dropout: feedforward width multiplier and dropout.
      position: ``"sinusoidal"`` (absolute positions added to the embeddings, the
        paper's) or ``"rotary"`` (RoPE on every window's queries and keys).
      emb_std: standard deviation of the token embedding table's init (1.0; the
        plain decoder's ``sqrt(2 / dim)`` trains faster with pre-norm layers, whose
        updates are small next to a unit-variance residual stream).
      attn_implementation: ``xtx.ops.attention`` backend for the windows.
    """

    num_tokens: int
    dim: int
    depth: int
    heads: int
    window: int | tuple[int, ...]
    dilation: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    causal: bool = True
    max_global: int = 0
    max_seq_len: int = 65536
    ff_mult: int = 4
    dropout: float = 0.0
    position: str = "sinusoidal"
    emb_std: float = 1.0
    attn_implementation: str = "auto"

    def __post_init__(self):
        for name in ("num_tokens", "dim", "depth", "heads", "max_seq_len", "ff_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads or self.dim % 2:
            raise ValueError(f"dim ({self.dim}) must be even and divisible by heads")
        check_absolute_recipe(self.position, self.emb_std)
        windows = self.layer_windows
        if len(windows) != self.depth or any(not isinstance(w, int) or w < 1 for w in windows):
            raise ValueError(
                f"window must be an int >= 1 or one per layer ({self.depth}), got {self.window!r}"
            )
        for layer, dil in enumerate(self.layer_dilations):
            if len(dil) != self.heads or any(not isinstance(d, int) or d < 1 for d in dil):
                raise ValueError(
                    f"dilation of layer {layer} must be {self.heads} ints >= 1 (one per head), "
                    f"got {dil!r}"
                )
        if not isinstance(self.max_global, int) or self.max_global < 0:
            raise ValueError(f"max_global must be an int >= 0, got {self.max_global!r}")
        if self.max_global and self.causal:
            raise ValueError(
                "global tokens attend to the whole sequence, which a causal (language model) "
                "Longformer cannot allow: use causal=False or max_global=0"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def layer_windows(self) -> tuple[int, ...]:
        w = self.window
        return tuple(w) if isinstance(w, tuple | list) else (w,) * self.depth

    @property
    def layer_dilations(self) -> tuple[tuple[int, ...], ...]:
        d = self.dilation
        if d is None:
            return ((1,) * self.heads,) * self.depth
        if d and isinstance(d[0], tuple | list):
            if len(d) != self.depth:
                raise ValueError(f"dilation needs one tuple per layer ({self.depth}), got {d!r}")
            return tuple(tuple(x) for x in d)
        return (tuple(d),) * self.depth


def _window_attention(
    q, k, v, *, dilation, window, causal, prefix, implementation, segment_ids=None
):
    """Local attention of one group of heads that share a dilation.

    q, k, v: ``[B, T, n, H]``; ``prefix``: ``(keys [B, G, n, H], values, valid [B, G],
    local_valid [B, T])`` or None; ``segment_ids``: int ``[B, T]`` or None (a token sees
    only its own document's tokens). Returns ``[B, T, n, H]``.
    """
    B, T, n, H = q.shape
    d = dilation
    pad = (-T) % d
    Tp = T + pad

    def split(x):  # [B, T, ...] -> [B * d, Tp / d, ...]: sub-sequence r holds t = r mod d
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(B, Tp // d, d, *x.shape[2:])
        return jnp.moveaxis(x, 2, 1).reshape(B * d, Tp // d, *x.shape[3:])

    qs, ks, vs = split(q), split(k), split(v)
    key_valid = split(jnp.ones((B, T), bool))  # padding (added by split) is False
    G = 0
    if prefix is not None:
        gk, gv, g_valid, local_valid = prefix
        G = gk.shape[1]
        key_valid = key_valid & split(local_valid)
        rep = lambda x: jnp.repeat(x, d, axis=0)  # noqa: E731  (row b*d + r <- b)
        ks = jnp.concatenate([rep(gk), ks], axis=1)
        vs = jnp.concatenate([rep(gv), vs], axis=1)
        key_valid = jnp.concatenate([rep(g_valid), key_valid], axis=1)
    seg = None if segment_ids is None else split(segment_ids)
    mask = AttentionMask(
        window=(window, 0 if causal else window),
        key_padding=key_valid,
        prefix=G,
        q_segment_ids=seg,
        kv_segment_ids=seg,
    )
    out = attention(qs, ks, vs, mask=mask, implementation=implementation)  # [B*d, Tp/d, n, H]
    out = jnp.moveaxis(out.reshape(B, d, Tp // d, n, H), 1, 2).reshape(B, Tp, n, H)
    return out[:, :T]


class LongformerAttention(nn.Module):
    """Sliding-window (dilated) attention plus global attention."""

    config: LongformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, global_idx=None, global_valid=None, segment_ids=None):
        """``x [B, T, D]``; ``global_idx`` int ``[B, G]`` positions, ``global_valid [B, G]``;
        ``segment_ids`` int ``[B, T]`` (packed documents)."""
        cfg = self.config
        N, D = cfg.heads, cfg.dim
        H = D // N
        proj = lambda name: Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name=name)  # noqa: E731
        q = proj("to_q")(x)
        k, v = proj("to_k")(x), proj("to_v")(x)
        B, T = x.shape[:2]
        if cfg.position == "rotary":
            q, k = apply_rotary(q, jnp.arange(T)), apply_rotary(k, jnp.arange(T))
        prefix = None
        if global_idx is not None:
            take = lambda a: jnp.take_along_axis(a, global_idx[:, :, None, None], axis=1)  # noqa: E731
            is_global = (
                jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], global_idx].max(global_valid)
            )
            prefix = (take(k), take(v), global_valid, ~is_global)
        dilations = cfg.layer_dilations[self.layer]
        out = jnp.zeros_like(q)
        for d in sorted(set(dilations)):
            heads = jnp.asarray([h for h in range(N) if dilations[h] == d])
            sub = lambda a, heads=heads: a[:, :, heads]  # noqa: E731
            sub_prefix = None
            if prefix is not None:
                sub_prefix = (sub(prefix[0]), sub(prefix[1]), prefix[2], prefix[3])
            o = _window_attention(
                sub(q),
                sub(k),
                sub(v),
                dilation=d,
                window=cfg.layer_windows[self.layer],
                causal=cfg.causal,
                prefix=sub_prefix,
                implementation=cfg.attn_implementation,
                segment_ids=segment_ids,
            )
            out = out.at[:, :, heads].set(o)
        if global_idx is not None:
            # Global queries see every token, through their own projections: [B, G, T]
            # scores, linear in T. Their rows replace the local ones.
            qg = proj("to_q_global")(jnp.take_along_axis(x, global_idx[:, :, None], axis=1))
            kg, vg = proj("to_k_global")(x), proj("to_v_global")(x)
            og = reference_attention(qg, kg, vg)  # [B, G, N, H]
            # Unused slots point at real positions: send them out of bounds and drop them.
            where = jnp.where(global_valid, global_idx, T)
            out = out.at[jnp.arange(B)[:, None], where].set(og, mode="drop")
        return Projection((D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)


class Longformer(nn.Module, metaclass=ConfiguredMeta):
    """A pre-norm Longformer language model or encoder (see the module docstring)::

    state = model.init_state(batch_size)          # empty: Longformer has no recurrence
    variables = model.init(key, tokens, state=state)
    logits, state = model.apply(variables, tokens, state=state, global_mask=None)
    """

    config: LongformerConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> LongformerConfig:
        return config_from_keywords(cls.__name__, LongformerConfig, kwargs)

    def init_state(self, batch_size: int) -> LongformerState:
        check_batch_size(batch_size)
        return LongformerState()

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        state: LongformerState | None = None,
        reset: Array | None = None,
        global_mask: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, LongformerState]:
        """Logits ``[B, T, V]`` and the (empty) state.

        Args:
          tokens: ``[B, T]`` int ids.
          state, reset: the gallery contract; Longformer carries nothing, so ``reset``
            changes nothing (it is checked for shape).
          global_mask: bool ``[B, T]``, True at global tokens (at most ``max_global``
            per row; encoders only).
          deterministic: disable dropout.
        """
        cfg = self.config
        B, T = check_tokens(tokens, cfg.max_seq_len, "max_seq_len")
        if state is not None and not isinstance(state, LongformerState):
            raise TypeError(f"state must be a LongformerState, got {type(state).__name__}")
        check_reset(reset, B)
        segment_ids = _check_segment_ids(segment_ids, B, T, global_mask)
        global_idx = global_valid = None
        if global_mask is not None:
            if not cfg.max_global:
                raise ValueError("global_mask was given but max_global=0 (no global tokens)")
            if tuple(global_mask.shape) != (B, T):
                raise ValueError(
                    f"global_mask must be bool [B, T] = {(B, T)}, got {global_mask.shape}"
                )
            global_mask = global_mask.astype(bool)
            G = min(cfg.max_global, T)
            # The first G marked positions of each row, in order (stable sort on ~mask).
            global_idx = jnp.argsort(~global_mask, axis=1, stable=True)[:, :G]
            global_valid = jnp.take_along_axis(global_mask, global_idx, axis=1)
        embed = token_embedding(self, cfg.num_tokens, cfg.dim, std=cfg.emb_std)
        x = jnp.take(embed, tokens, axis=0)
        if cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(jnp.arange(T), cfg.dim)
        x = dropout(self, x, cfg.dropout, deterministic)
        for i in range(cfg.depth):
            h = Norm("layernorm", name=f"attn_norm_{i}")(x)
            h = LongformerAttention(cfg, i, name=f"attn_{i}")(
                h, global_idx, global_valid, segment_ids
            )
            x = x + dropout(self, h, cfg.dropout, deterministic)
            h = Norm("layernorm", name=f"ff_norm_{i}")(x)
            h = Projection(
                (cfg.dim * cfg.ff_mult,), (cfg.dim,), (EMBED, MLP), True, name=f"ff_in_{i}"
            )(h)
            h = dropout(self, jax.nn.gelu(h, approximate=False), cfg.dropout, deterministic)
            h = Projection(
                (cfg.dim,), (cfg.dim * cfg.ff_mult,), (MLP, EMBED), True, name=f"ff_out_{i}"
            )(h)
            x = x + dropout(self, h, cfg.dropout, deterministic)
        x = Norm("layernorm", name="final_norm")(x)
        logits = Projection((cfg.num_tokens,), (cfg.dim,), (EMBED, VOCAB), True, name="to_logits")(
            x
        )
        return logits, LongformerState()


def _check_segment_ids(segment_ids, B: int, T: int, global_mask) -> Array | None:
    if segment_ids is None:
        return None
    if tuple(jnp.shape(segment_ids)) != (B, T) or not jnp.issubdtype(
        jnp.asarray(segment_ids).dtype, jnp.integer
    ):
        raise ValueError(
            f"segment_ids must be int [B, T] = {(B, T)}, got "
            f"{jnp.asarray(segment_ids).dtype} {tuple(jnp.shape(segment_ids))}"
        )
    if global_mask is not None:
        raise ValueError(
            "segment_ids and global_mask cannot be combined: global tokens attend to the "
            "whole row, across documents"
        )
    return jnp.asarray(segment_ids, jnp.int32)

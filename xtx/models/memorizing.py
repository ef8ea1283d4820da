"""Memorizing Transformer (Wu et al., arXiv 2203.08913): kNN-augmented attention.

A Transformer-XL (``xtx.models.transformer_xl``: relative positions, per-layer XL memory)
in which one layer (``knn_layer``) also reads an external memory of the (key, value)
pairs of everything it has seen: a fixed-capacity ring buffer per batch row and head
(``knn_memory_size`` entries). Each query retrieves its ``knn_top_k`` best keys by exact
inner product (``jax.lax.top_k``; ``approximate=True`` uses ``jax.lax.approx_max_k``),
attends over them, and a learned per-head gate ``g = sigmoid(b_h)`` mixes the result with
the layer's local attention: ``g * memory + (1 - g) * local``. As in the paper, queries
and keys of this layer are L2-normalised (with a learned per-head scale), the memory is
searched *before* the current segment's keys are added (no token retrieves its own
segment, so nothing leaks from the future), stored entries carry no gradient, and a
reset empties a row's memory. The layer's local attention uses a T5 relative bias.

State: ``MemorizingState(xl=XLState, knn=KNNMemory)``, fixed shapes throughout.

Shapes: tokens ``[B, T]``; kNN memory keys/values ``[B, N, C, H]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xtx.layers.base import EMBED, HEAD_DIM, HEADS, MLP, VOCAB, ConfiguredMeta, Projection, dropout
from xtx.layers.norms import Norm
from xtx.models.gallery_common import (
    check_batch_size,
    config_from_keywords,
)
from xtx.models.transformer_xl import (
    TransformerXLConfig,
    XLLayer,
    XLState,
    _check_inputs,
    _next_state,
    _rel_biases,
    clear_rows,
    ff_activation,
    rotate_over_memory,
    xl_embed,
)
from xtx.ops import AttentionMask, RelativeBias, attention, l2_normalize

Array = jax.Array


@flax.struct.dataclass
class KNNMemory:
    """The external memory of the kNN layer, a ring buffer per batch row.

    Attributes:
      keys, values: ``[B, N, C, H]`` float32 (normalised keys).
      valid: ``[B, C]`` bool, True for filled slots.
      pointer: ``[B]`` int32, the next slot to write.
    """

    keys: Array
    values: Array
    valid: Array
    pointer: Array


@flax.struct.dataclass
class MemorizingState:
    xl: XLState
    knn: KNNMemory


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemorizingConfig(TransformerXLConfig):
    """``TransformerXLConfig`` plus the kNN layer.

    Attributes:
      knn_layer: index of the kNN-augmented layer (default: three quarters up the stack,
        as the paper's layer 9 of 12).
      knn_memory_size: ring-buffer capacity C per row (tokens).
      knn_top_k: keys retrieved per query.
      approximate: ``jax.lax.approx_max_k`` instead of the exact ``top_k``.
      num_buckets, max_distance: the T5 bias of the kNN layer's local attention.
    """

    knn_layer: int | None = None
    knn_memory_size: int = 1024
    knn_top_k: int = 32
    approximate: bool = False
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.knn_layer_index < self.depth:
            raise ValueError(f"knn_layer must be in [0, depth={self.depth}), got {self.knn_layer}")
        if not isinstance(self.knn_top_k, int) or self.knn_top_k < 1:
            raise ValueError(f"knn_top_k must be a positive int, got {self.knn_top_k!r}")
        if not isinstance(self.knn_memory_size, int) or self.knn_memory_size < self.knn_top_k:
            raise ValueError(
                f"knn_memory_size ({self.knn_memory_size!r}) must be an int >= knn_top_k "
                f"({self.knn_top_k}): the memory cannot return more keys than it holds"
            )

    @property
    def knn_layer_index(self) -> int:
        return (3 * self.depth) // 4 if self.knn_layer is None else self.knn_layer


class KNNAttention(nn.Module):
    """Local attention over ``[XL memory; segment]`` gated with kNN attention."""

    config: MemorizingConfig

    @nn.compact
    def __call__(self, x, mem, mem_valid, knn: KNNMemory):
        cfg = self.config
        N, H = cfg.heads, cfg.head_dim
        B, T, D = x.shape
        C, K = cfg.knn_memory_size, cfg.knn_top_k
        kv_in = jnp.concatenate([mem.astype(x.dtype), x], axis=1)
        proj = lambda name: Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name=name)  # noqa: E731
        q = l2_normalize(proj("to_q")(x))
        k = l2_normalize(proj("to_k")(kv_in))
        v = proj("to_v")(kv_in)
        # Cosine similarities need a sharper softmax: a learned per-head scale (init 10).
        log_scale = self.param(
            "log_scale",
            nn.with_logical_partitioning(nn.initializers.constant(math.log(10.0)), (HEADS,)),
            (N,),
        )
        qs = q * jnp.exp(log_scale)[:, None].astype(q.dtype)
        # Rotary positions (when chosen) reach the local attention only: the kNN memory
        # stores and retrieves the position-free keys, as in the paper.
        if cfg.position == "rotary":
            (q_local, k_local), bias = rotate_over_memory(qs, k), None
        else:
            buckets = self.param(
                "rel_pos",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, HEADS)),
                (cfg.num_buckets, N),
            )
            q_local, k_local = qs, k
            bias = RelativeBias.t5(
                buckets, causal=True, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance
            )
        local = attention(
            q_local,
            k_local,
            v,
            mask=AttentionMask(
                causal=True,
                key_padding=jnp.concatenate([mem_valid, jnp.ones((B, T), bool)], axis=1),
            ),
            bias=bias,
            scale=1.0,
            implementation=cfg.attn_implementation,
        )
        # Retrieval from the memory as it was before this segment.
        scores = jnp.einsum("btnh,bnch->bntc", qs.astype(jnp.float32), knn.keys)
        neg = jnp.finfo(jnp.float32).min
        scores = jnp.where(knn.valid[:, None, None, :], scores, neg)
        if cfg.approximate:
            top, idx = jax.lax.approx_max_k(scores, K)
        else:
            top, idx = jax.lax.top_k(scores, K)  # [B, N, T, K]
        got = jnp.take_along_axis(knn.valid[:, None, None, :], idx, axis=-1)
        probs = jax.nn.softmax(jnp.where(got, top, neg), axis=-1) * got
        vals = jnp.take_along_axis(knn.values[:, :, None], idx[..., None], axis=3)
        memory_out = jnp.einsum("bntk,bntkh->btnh", probs, vals).astype(local.dtype)
        gate_bias = self.param(
            "gate", nn.with_logical_partitioning(nn.initializers.zeros, (HEADS,)), (N,)
        )
        # A row with an empty memory falls back to its local attention alone.
        has_memory = knn.valid.any(axis=-1)[:, None, None, None]
        gate = jnp.where(has_memory, jax.nn.sigmoid(gate_bias)[:, None], 0.0).astype(local.dtype)
        out = gate * memory_out + (1.0 - gate) * local
        out = Projection((D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)
        return out, _insert(knn, k[:, -T:], v[:, -T:], C)


def _insert(knn: KNNMemory, k: Array, v: Array, C: int) -> KNNMemory:
    """Writes the segment's ``[B, T, N, H]`` keys/values into the ring (no gradient)."""
    B, T = k.shape[:2]
    n = min(T, C)  # a segment longer than the memory keeps its last C tokens
    k, v = (jax.lax.stop_gradient(a[:, T - n :].astype(jnp.float32)) for a in (k, v))
    slots = (knn.pointer[:, None] + jnp.arange(n)) % C  # [B, n]
    rows = jnp.arange(B)[:, None]
    return KNNMemory(
        keys=knn.keys.at[rows, :, slots].set(k),
        values=knn.values.at[rows, :, slots].set(v),
        valid=knn.valid.at[rows, slots].set(True),
        pointer=(knn.pointer + n) % C,
    )


class KNNLayer(nn.Module):
    """``XLLayer`` with ``KNNAttention`` in place of the relative attention (post-norm)."""

    config: MemorizingConfig

    @nn.compact
    def __call__(self, x, mem, mem_valid, knn, *, deterministic=True):
        cfg = self.config
        ff_in = Projection((cfg.dim * cfg.ff_mult,), (cfg.dim,), (EMBED, MLP), True, name="ff_in")
        ff_out = Projection((cfg.dim,), (cfg.dim * cfg.ff_mult,), (MLP, EMBED), True, name="ff_out")
        attn_norm, ff_norm = Norm("layernorm", name="attn_norm"), Norm("layernorm", name="ff_norm")
        if cfg.pre_norm:
            branch, knn = KNNAttention(cfg, name="attn")(
                attn_norm(x), attn_norm(mem), mem_valid, knn
            )
            x = x + dropout(self, branch, cfg.dropout, deterministic)
            h = dropout(self, ff_activation(cfg, ff_in(ff_norm(x))), cfg.dropout, deterministic)
            return x + dropout(self, ff_out(h), cfg.dropout, deterministic), knn
        branch, knn = KNNAttention(cfg, name="attn")(x, mem, mem_valid, knn)
        x = attn_norm(x + dropout(self, branch, cfg.dropout, deterministic))
        h = dropout(self, ff_activation(cfg, ff_in(x)), cfg.dropout, deterministic)
        return ff_norm(x + dropout(self, ff_out(h), cfg.dropout, deterministic)), knn


class MemorizingTransformer(nn.Module, metaclass=ConfiguredMeta):
    """Transformer-XL with one kNN-augmented layer::

    state = model.init_state(batch_size)
    variables = model.init(key, tokens, state=state)
    logits, state = model.apply(variables, tokens, state=state, reset=None)
    """

    config: MemorizingConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> MemorizingConfig:
        return config_from_keywords(cls.__name__, MemorizingConfig, kwargs)

    def init_state(self, batch_size: int) -> MemorizingState:
        cfg = self.config
        check_batch_size(batch_size)
        B, N, C, H = batch_size, cfg.heads, cfg.knn_memory_size, cfg.head_dim
        return MemorizingState(
            xl=XLState(
                mems=jnp.zeros((cfg.depth, B, cfg.mem_len, cfg.dim), jnp.float32),
                valid=jnp.zeros((B, cfg.mem_len), bool),
            ),
            knn=KNNMemory(
                keys=jnp.zeros((B, N, C, H), jnp.float32),
                values=jnp.zeros((B, N, C, H), jnp.float32),
                valid=jnp.zeros((B, C), bool),
                pointer=jnp.zeros((B,), jnp.int32),
            ),
        )

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        *,
        state: MemorizingState,
        reset: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, MemorizingState]:
        """Logits ``[B, T, V]`` of one segment and the next state (see ``TransformerXL``)."""
        cfg = self.config
        if not isinstance(state, MemorizingState):
            raise TypeError(
                f"state must be a MemorizingState from init_state, got {type(state).__name__}"
            )
        B, T = _check_inputs(cfg, tokens, state.xl, reset)
        knn = state.knn
        expected = (B, cfg.heads, cfg.knn_memory_size, cfg.head_dim)
        if tuple(knn.keys.shape) != expected:
            raise ValueError(
                f"state.knn was built for another batch size or config: keys "
                f"{tuple(knn.keys.shape)}, this call needs {expected} (use init_state({B}))"
            )
        mems, valid = state.xl.mems, state.xl.valid
        if reset is not None:
            keep = ~reset.astype(bool)
            mems, valid = clear_rows(mems, valid, keep)
            knn = KNNMemory(
                keys=knn.keys,
                values=knn.values,
                valid=knn.valid & keep[:, None],
                pointer=jnp.where(keep, knn.pointer, 0),
            )
        x = dropout(self, xl_embed(self, cfg, tokens), cfg.dropout, deterministic)
        u = v = None
        if not cfg.untie_r and cfg.position == "relative":
            u, v = _rel_biases(self, cfg)
        hiddens = []
        for i in range(cfg.depth):
            hiddens.append(x)
            if i == cfg.knn_layer_index:
                x, knn = KNNLayer(cfg, name=f"layers_{i}")(
                    x, mems[i], valid, knn, deterministic=deterministic
                )
            else:
                x = XLLayer(cfg, name=f"layers_{i}")(
                    x, mems[i], valid, u, v, deterministic=deterministic
                )
        if cfg.pre_norm:
            x = Norm("layernorm", name="final_norm")(x)
        x = dropout(self, x, cfg.dropout, deterministic)
        logits = Projection((cfg.num_tokens,), (cfg.dim,), (EMBED, VOCAB), True, name="to_logits")(
            x
        )
        return logits, MemorizingState(xl=_next_state(cfg, mems, valid, hiddens), knn=knn)

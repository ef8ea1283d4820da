"""Recurrent Memory Transformer (Bulatov et al., arXiv 2207.06881), decoder form.

A segment is processed as ``[read memory; tokens; write memory]``: ``num_memory`` memory
vectors are placed before the tokens (every token reads them) and the same memory is
placed again after the tokens, where causal attention lets it see the whole segment;
the final-layer outputs at the write positions become the memory of the next segment.
The first memory of a sequence is learned (``memory_init``); the read and the write
copies get their own learned position embeddings (so the model can tell them apart and
from the tokens, whose positions are sinusoidal within the segment).

The read memory is a prefix of keys seen by every query (``AttentionMask.prefix``), the
rest is causal, so the blockwise kernel applies unchanged.

Gradient horizon: the memory entering segment ``s`` keeps its gradient for
``bptt_segments`` segments; every ``bptt_segments``-th segment (counted per row from the
last reset) starts from a stop-gradient copy. Differentiate through several ``apply``
calls (a ``lax.scan`` over segments) to train through time.

Shapes: tokens ``[B, T]`` with ``T <= segment_len``, memory ``[B, M, D]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xtx.config import Config
from xtx.layers.base import EMBED, HEAD_DIM, HEADS, MLP, VOCAB, ConfiguredMeta, Projection
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

Array = jax.Array


@flax.struct.dataclass
class RMTState:
    """Recurrent Memory Transformer state.

    Attributes:
      memory: ``[B, M, D]`` float32, the write outputs of the previous segment.
      fresh: ``[B]`` bool, True where the row starts a sequence (use the learned memory).
      segments: ``[B]`` int32, segments seen since the last reset (for the BPTT horizon).
    """

    memory: Array
    fresh: Array
    segments: Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecurrentMemoryConfig(Config):
    """Options of ``RecurrentMemoryTransformer``.

    Attributes:
      num_tokens, dim, depth, heads: vocabulary, width, layers, heads.
      segment_len: longest segment per call.
      num_memory: memory vectors M.
      bptt_segments: segments a memory keeps its gradient through (>= 1).
      ff_mult: feedforward width multiplier.
      position: ``"sinusoidal"`` (absolute positions added to the token embeddings, as
        the paper's backbones) or ``"rotary"`` (RoPE in every attention over
        ``[read memory; tokens; write memory]``).
      emb_std: standard deviation of the token embedding table's init (1.0; the
        plain decoder's ``sqrt(2 / dim)`` trains faster with pre-norm layers, whose
        updates are small next to a unit-variance residual stream).
      attn_implementation: ``xtx.ops.attention`` backend.
    """

    num_tokens: int
    dim: int
    depth: int
    heads: int
    segment_len: int
    num_memory: int = 8
    bptt_segments: int = 2
    ff_mult: int = 4
    position: str = "sinusoidal"
    emb_std: float = 1.0
    attn_implementation: str = "auto"

    def __post_init__(self):
        for name in (
            "num_tokens", "dim", "depth", "heads", "segment_len", "num_memory",
            "bptt_segments", "ff_mult",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads or self.dim % 2:
            raise ValueError(f"dim ({self.dim}) must be even and divisible by heads")
        check_absolute_recipe(self.position, self.emb_std)


class _Block(nn.Module):
    """Pre-norm causal self-attention (with a prefix seen by all) and a GELU feedforward."""

    config: RecurrentMemoryConfig

    @nn.compact
    def __call__(self, x, prefix: int):
        cfg = self.config
        N, D = cfg.heads, cfg.dim
        H = D // N
        h = Norm("layernorm", name="attn_norm")(x)
        proj = lambda name: Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name=name)  # noqa: E731
        q, k = proj("to_q")(h), proj("to_k")(h)
        if cfg.position == "rotary":  # read memory, tokens, write memory in order
            positions = jnp.arange(h.shape[1])
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)
        out = attention(
            q,
            k,
            proj("to_v")(h),
            mask=AttentionMask(causal=True, prefix=prefix),
            implementation=cfg.attn_implementation,
        )
        x = x + Projection((D,), (N, H), (HEADS, HEAD_DIM, EMBED), name="to_out")(out)
        h = Norm("layernorm", name="ff_norm")(x)
        h = Projection((D * cfg.ff_mult,), (D,), (EMBED, MLP), True, name="ff_in")(h)
        h = jax.nn.gelu(h, approximate=False)
        return x + Projection((D,), (D * cfg.ff_mult,), (MLP, EMBED), True, name="ff_out")(h)


class RecurrentMemoryTransformer(nn.Module, metaclass=ConfiguredMeta):
    """RMT language model with explicit memory state::

    state = model.init_state(batch_size)
    variables = model.init(key, tokens, state=state)
    logits, state = model.apply(variables, tokens, state=state, reset=None)
    """

    config: RecurrentMemoryConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> RecurrentMemoryConfig:
        return config_from_keywords(cls.__name__, RecurrentMemoryConfig, kwargs)

    def init_state(self, batch_size: int) -> RMTState:
        """A fresh state: every row starts from the learned memory."""
        cfg = self.config
        check_batch_size(batch_size)
        return RMTState(
            memory=jnp.zeros((batch_size, cfg.num_memory, cfg.dim), jnp.float32),
            fresh=jnp.ones((batch_size,), bool),
            segments=jnp.zeros((batch_size,), jnp.int32),
        )

    @nn.compact
    def __call__(
        self, tokens: Array, *, state: RMTState, reset: Array | None = None
    ) -> tuple[Array, RMTState]:
        """Logits ``[B, T, V]`` of the segment's tokens and the next state."""
        cfg = self.config
        B, T = _check(cfg, tokens, state, reset)
        M, D = cfg.num_memory, cfg.dim
        fresh, segments = state.fresh, state.segments
        if reset is not None:
            fresh = fresh | reset.astype(bool)
            segments = jnp.where(reset, 0, segments)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, EMBED))
        memory_init = self.param("memory_init", init, (M, D))
        read_pos = self.param("read_pos", init, (M, D))
        write_pos = self.param("write_pos", init, (M, D))
        memory = jnp.where(fresh[:, None, None], memory_init[None], state.memory)
        # The gradient horizon: cut the memory's history every bptt_segments segments.
        cut = (segments % cfg.bptt_segments == 0)[:, None, None]
        memory = jnp.where(cut, jax.lax.stop_gradient(memory), memory)

        embed = token_embedding(self, cfg.num_tokens, D, std=cfg.emb_std)
        x = jnp.take(embed, tokens, axis=0)
        if cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(jnp.arange(T), D)
        h = jnp.concatenate([memory + read_pos, x, memory + write_pos], axis=1)  # [B, M+T+M, D]
        for i in range(cfg.depth):
            h = _Block(cfg, name=f"layers_{i}")(h, M)
        h = Norm("layernorm", name="final_norm")(h)
        logits = Projection((cfg.num_tokens,), (D,), (EMBED, VOCAB), True, name="to_logits")(
            h[:, M : M + T]
        )
        new_state = RMTState(
            memory=h[:, M + T :].astype(jnp.float32),
            fresh=jnp.zeros((B,), bool),
            segments=segments + 1,
        )
        return logits, new_state


def _check(cfg: RecurrentMemoryConfig, tokens: Array, state: Any, reset: Any) -> tuple[int, int]:
    B, T = check_tokens(tokens, cfg.segment_len, "segment_len")
    if not isinstance(state, RMTState):
        raise TypeError(f"state must be an RMTState from init_state, got {type(state).__name__}")
    expected = (B, cfg.num_memory, cfg.dim)
    if tuple(state.memory.shape) != expected or tuple(state.fresh.shape) != (B,):
        raise ValueError(
            f"state was built for another batch size or config: memory "
            f"{tuple(state.memory.shape)}; this call needs [B, num_memory, dim] = {expected} "
            f"(use init_state({B}))"
        )
    check_reset(reset, B)
    return B, T

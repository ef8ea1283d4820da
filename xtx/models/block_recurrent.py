"""Block-Recurrent Transformer (Hutchins et al., arXiv 2203.07852).

A segment is cut into blocks of ``block_len`` tokens that a ``lax.scan`` processes in
order. Every layer attends causally over ``[previous keys; block]`` (a sliding window
carried as a per-layer Transformer-XL memory of ``mem_len`` hidden states, by default one
block, with relative positions). One layer (``recurrent_layer``) is recurrent: besides
the token stream it updates ``num_state`` state vectors that persist from block to block
and from segment to segment:

* token stream: self-attention over the window and cross-attention to the state;
  the two outputs are concatenated, projected and added (pre-norm), then an MLP;
* state stream (state vectors plus learned state IDs): self-attention among the state
  vectors and cross-attention to the block's tokens, concatenated and projected, then
  a gate instead of a residual, an MLP, and a second gate.

Keys and values are shared as in the paper: the tokens' keys/values serve the token
self-attention and the state's cross-attention; the state's keys/values serve the state
self-attention and the tokens' cross-attention. Both self-attentions of the recurrent
layer use a T5 relative bias. Gates (``gate``): ``"fixed"`` is ``c' = c * sigmoid(b) +
z * (1 - sigmoid(b))`` with a learned bias b; ``"lstm"`` is ``c' = c * f + tanh(z) * i``
with input and forget gates computed from the update (forget bias initialised high, so
the state starts out remembering).

Gradient horizon: with ``state_grad_blocks=n`` the state continues from a stop-gradient
copy at every n-th block of a call, counting from the call's first block (so the state
that enters a call carries no gradient); with None the gradient flows through every
block, and across calls when they are differentiated together (a scan over segments).
XL memories never carry gradient.

State: ``BlockRecurrentState(xl=XLState, state=[B, S, D], fresh=[B])``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xtx.layers.base import EMBED, HEAD_DIM, HEADS, MLP, VOCAB, ConfiguredMeta, Projection
from xtx.layers.norms import Norm
from xtx.models.gallery_common import (
    check_batch_size,
    check_choice,
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
    rotate_over_memory,
    xl_embed,
)
from xtx.ops import AttentionMask, RelativeBias, attention

Array = jax.Array
GATES = ("fixed", "lstm")


@flax.struct.dataclass
class BlockRecurrentState:
    """XL memories of every layer, the recurrent state vectors, and which rows are new."""

    xl: XLState
    state: Array  # [B, S, D] float32
    fresh: Array  # [B] bool: start from the learned initial state


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockRecurrentConfig(TransformerXLConfig):
    """``TransformerXLConfig`` plus the recurrence.

    Attributes:
      block_len: tokens per block W (``segment_len`` must be a multiple).
      num_state: state vectors S.
      recurrent_layer: index of the recurrent layer (default three quarters up).
      gate: ``"fixed"`` or ``"lstm"``.
      state_grad_blocks: blocks a state keeps its gradient through (None: the segment).
      num_buckets, max_distance: T5 bias of the recurrent layer's self-attentions.
    """

    block_len: int
    num_state: int = 32
    recurrent_layer: int | None = None
    gate: str = "fixed"
    state_grad_blocks: int | None = None
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_len", "num_state"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.segment_len % self.block_len:
            raise ValueError(
                f"segment_len ({self.segment_len}) must be a multiple of block_len "
                f"({self.block_len})"
            )
        if not 0 <= self.recurrent_index < self.depth:
            raise ValueError(
                f"recurrent_layer must be in [0, depth={self.depth}), got {self.recurrent_layer}"
            )
        check_choice("gate", self.gate, GATES)
        if self.state_grad_blocks is not None and self.state_grad_blocks < 1:
            raise ValueError(
                f"state_grad_blocks must be None or >= 1, got {self.state_grad_blocks}"
            )

    @property
    def recurrent_index(self) -> int:
        return (3 * self.depth) // 4 if self.recurrent_layer is None else self.recurrent_layer


class _Gate(nn.Module):
    """``c' = gate(c, z)``: fixed or LSTM-style, per feature."""

    kind: str
    dim: int

    @nn.compact
    def __call__(self, c, z):
        if self.kind == "fixed":
            b = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)), (self.dim,)
            )
            g = jax.nn.sigmoid(b)
            return c * g + z * (1.0 - g)
        i = Projection((self.dim,), (self.dim,), (EMBED, None), True, name="input_gate")(z)
        f = Projection(
            (self.dim,), (self.dim,), (EMBED, None), True,
            bias_init=nn.initializers.constant(2.0), name="forget_gate",
        )(z)  # fmt: skip
        return c * jax.nn.sigmoid(f) + jnp.tanh(z) * jax.nn.sigmoid(i)


class RecurrentLayer(nn.Module):
    """The recurrent layer: token and state streams with shared keys and values."""

    config: BlockRecurrentConfig

    @nn.compact
    def __call__(self, x, mem, mem_valid, state):
        cfg = self.config
        N, H, D = cfg.heads, cfg.head_dim, cfg.dim
        B, W = x.shape[:2]
        proj = lambda name: Projection((N, H), (D,), (EMBED, HEADS, HEAD_DIM), name=name)  # noqa: E731
        out = lambda name, n: Projection((D,), (n, N, H), (None, HEADS, HEAD_DIM, EMBED), name=name)  # noqa: E731
        state_ids = self.param(
            "state_ids",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
            (cfg.num_state, D),
        )
        norm_x = Norm("layernorm", name="token_norm")
        norm_s = Norm("layernorm", name="state_norm")
        h = norm_x(jnp.concatenate([mem.astype(x.dtype), x], axis=1))  # [B, M + W, D]
        hs = norm_s(state + state_ids)
        k_tok, v_tok = proj("to_k")(h), proj("to_v")(h)
        k_st, v_st = proj("state_to_k")(hs), proj("state_to_v")(hs)
        q_self, q_cross = proj("to_q_self")(h[:, -W:]), proj("to_q_cross")(h[:, -W:])
        qs_self, qs_cross = proj("state_to_q_self")(hs), proj("state_to_q_cross")(hs)
        t5 = dict(num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        if cfg.position == "rotary":  # on copies: the state's queries and keys have no position
            (q_tok, k_self), token_bias = rotate_over_memory(q_self, k_tok), None
        else:
            buckets = self.param(
                "rel_pos",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, HEADS)),
                (cfg.num_buckets, N),
            )
            q_tok, k_self = q_self, k_tok
            token_bias = RelativeBias.t5(buckets, causal=True, **t5)
        token_self = attention(
            q_tok,
            k_self,
            v_tok,
            mask=AttentionMask(
                causal=True, key_padding=jnp.concatenate([mem_valid, jnp.ones((B, W), bool)], 1)
            ),
            bias=token_bias,
            implementation=cfg.attn_implementation,
        )
        token_cross = attention(q_cross, k_st, v_st, implementation=cfg.attn_implementation)
        x = x + out("token_out", 2)(jnp.stack([token_self, token_cross], axis=2))
        x = x + _mlp(cfg, Norm("layernorm", name="token_ff_norm")(x), "token_ff")
        # The state reads the block's own tokens (not the XL memory: it saw those before).
        state_bias = RelativeBias.t5(
            self.param(
                "state_rel_pos",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, HEADS)),
                (cfg.num_buckets, N),
            ),
            causal=False,
            **t5,
        )
        state_self = attention(
            qs_self, k_st, v_st, bias=state_bias, implementation=cfg.attn_implementation
        )
        state_cross = attention(
            qs_cross, k_tok[:, -W:], v_tok[:, -W:], implementation=cfg.attn_implementation
        )
        update = out("state_out", 2)(jnp.stack([state_self, state_cross], axis=2))
        state = _Gate(cfg.gate, D, name="gate_attn")(state, update)
        update = _mlp(cfg, Norm("layernorm", name="state_ff_norm")(state), "state_ff")
        state = _Gate(cfg.gate, D, name="gate_ff")(state, update)
        return x, state


def _mlp(cfg, h, name):
    h = Projection((cfg.dim * cfg.ff_mult,), (cfg.dim,), (EMBED, MLP), True, name=f"{name}_in")(h)
    h = jax.nn.gelu(h, approximate=False)
    return Projection((cfg.dim,), (cfg.dim * cfg.ff_mult,), (MLP, EMBED), True, name=f"{name}_out")(
        h
    )


class _BlockStep(nn.Module):
    """One block through every layer: the body of the scan over a segment's blocks."""

    config: BlockRecurrentConfig

    @nn.compact
    def __call__(self, carry, block):
        cfg = self.config
        mems, valid, state, count = carry
        x = block  # [B, W, D] embedded tokens
        if cfg.state_grad_blocks is not None:
            cut = count % cfg.state_grad_blocks == 0
            state = jnp.where(cut, jax.lax.stop_gradient(state), state)
        u = v = None
        if not cfg.untie_r and cfg.position == "relative":
            u, v = _rel_biases(self, cfg)
        hiddens = []
        for i in range(cfg.depth):
            hiddens.append(x)
            if i == cfg.recurrent_index:
                x, state = RecurrentLayer(cfg, name=f"layers_{i}")(x, mems[i], valid, state)
            else:
                x = XLLayer(cfg, name=f"layers_{i}")(x, mems[i], valid, u, v)
        nxt = _next_state(cfg, mems, valid, hiddens)
        return (nxt.mems, nxt.valid, state, count + 1), x


class BlockRecurrentTransformer(nn.Module, metaclass=ConfiguredMeta):
    """Block-Recurrent Transformer language model::

    state = model.init_state(batch_size)
    variables = model.init(key, tokens, state=state)
    logits, state = model.apply(variables, tokens, state=state, reset=None)
    """

    config: BlockRecurrentConfig

    @classmethod
    def config_from_kwargs(cls, **kwargs: Any) -> BlockRecurrentConfig:
        if "block_len" in kwargs:
            kwargs.setdefault("mem_len", kwargs["block_len"])  # a window of one block
        return config_from_keywords(cls.__name__, BlockRecurrentConfig, kwargs)

    def init_state(self, batch_size: int) -> BlockRecurrentState:
        cfg = self.config
        check_batch_size(batch_size)
        B = batch_size
        return BlockRecurrentState(
            xl=XLState(
                mems=jnp.zeros((cfg.depth, B, cfg.mem_len, cfg.dim), jnp.float32),
                valid=jnp.zeros((B, cfg.mem_len), bool),
            ),
            state=jnp.zeros((B, cfg.num_state, cfg.dim), jnp.float32),
            fresh=jnp.ones((B,), bool),
        )

    @nn.compact
    def __call__(
        self, tokens: Array, *, state: BlockRecurrentState, reset: Array | None = None
    ) -> tuple[Array, BlockRecurrentState]:
        """Logits ``[B, T, V]`` (``T`` a multiple of ``block_len``) and the next state."""
        cfg = self.config
        if not isinstance(state, BlockRecurrentState):
            raise TypeError(
                f"state must be a BlockRecurrentState from init_state, got {type(state).__name__}"
            )
        B, T = _check_inputs(cfg, tokens, state.xl, reset)
        W = cfg.block_len
        if T % W:
            raise ValueError(f"tokens length {T} must be a multiple of block_len={W}")
        if tuple(state.state.shape) != (B, cfg.num_state, cfg.dim):
            raise ValueError(
                f"state.state was built for another batch size or config: "
                f"{tuple(state.state.shape)}, this call needs {(B, cfg.num_state, cfg.dim)}"
            )
        mems, valid, fresh = state.xl.mems, state.xl.valid, state.fresh
        if reset is not None:
            keep = ~reset.astype(bool)
            mems, valid = clear_rows(mems, valid, keep)
            fresh = fresh | ~keep
        initial = self.param(
            "initial_state",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, EMBED)),
            (cfg.num_state, cfg.dim),
        )
        rec = jnp.where(fresh[:, None, None], initial[None], state.state)
        x = xl_embed(self, cfg, tokens)
        blocks = jnp.moveaxis(x.reshape(B, T // W, W, cfg.dim), 1, 0)  # [n, B, W, D]
        scan = nn.scan(
            _BlockStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=0,
            out_axes=0,
        )
        carry = (mems, valid, rec, jnp.int32(0))
        (mems, valid, rec, _), ys = scan(cfg, name="blocks")(carry, blocks)
        h = jnp.moveaxis(ys, 0, 1).reshape(B, T, cfg.dim)
        if cfg.pre_norm:
            h = Norm("layernorm", name="final_norm")(h)
        logits = Projection((cfg.num_tokens,), (cfg.dim,), (EMBED, VOCAB), True, name="to_logits")(
            h
        )
        new = BlockRecurrentState(
            xl=XLState(mems=mems, valid=valid),
            state=rec.astype(jnp.float32),
            fresh=jnp.zeros((B,), bool),
        )
        return logits, new

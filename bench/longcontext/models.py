"""The benchmark's models: every family behind one interface, under one budget.

``build(name, budget)`` returns a ``Family``: a Flax module plus
``logits(params, inputs [B, L], resets [n, B]) -> [B, L, V]``, which reads a stream of
``n`` segments of ``S`` tokens the way the family is meant to read it:

=================  ==========================================================  =============
family             what sees the past                                          reach
=================  ==========================================================  =============
``plain``          nothing: a decoder run on each segment alone                the segment
``full``           causal attention over the whole stream (quadratic)          everything
``xl_wrapper``     ``TransformerWrapper`` + XL memories (``max_mem_len = S``)   depth x S
``transformer_xl``  ``TransformerXL`` (relative positions, ``mem_len = S``)      depth x S
``longformer``     one causal window of ``S`` tokens over the stream           depth x S
``memorizing``     XL memory + a kNN memory of the whole stream at one layer   the memory
``block_recurrent``  state vectors updated once per segment (one block)         the state
``rmt``            memory tokens read before and written after each segment    the memory
=================  ==========================================================  =============

``resets[s, b]`` clears row ``b``'s state before segment ``s``; for the models that read
the stream in one call (``full``, ``longformer``) it starts a new document there (tokens
never attend across it). The recurrent families are unrolled over the segments with
``lax.scan``, so a loss on the last segment reaches back through whatever the family lets
gradients through (XL memories never; the block-recurrent state and the RMT memory across
the whole stream unless a horizon is set).

Every family gets the same width, depth, heads, optimiser and data; the parameter counts
differ by what each design adds (``parameter_count`` prints them, ``match_budget`` evens
them out with the feedforward width where a family's extra machinery makes it larger).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import xtx

Array = jax.Array
FAMILIES = (
    "plain",
    "full",
    "xl_wrapper",
    "transformer_xl",
    "longformer",
    "memorizing",
    "block_recurrent",
    "rmt",
)
LABELS = {
    "plain": "Transformer (one segment)",
    "full": "full attention (whole stream)",
    "xl_wrapper": "TransformerWrapper + XL memories",
    "transformer_xl": "TransformerXL",
    "longformer": "Longformer",
    "memorizing": "MemorizingTransformer",
    "block_recurrent": "BlockRecurrentTransformer",
    "rmt": "RecurrentMemoryTransformer",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """What every family shares, and the few knobs a family has of its own.

    Attributes:
      dim, depth, heads: width, layers and attention heads of every model.
      segment_len, segments: ``S`` tokens a segment, ``n`` segments a stream.
      vocab: vocabulary size.
      ff_mult: feedforward width multiplier (``match_budget`` may lower it for the
        families whose extra layers would otherwise make them larger).
      knn_top_k: keys a Memorizing query retrieves.
      knn_segments: kNN memory capacity in segments (None: the whole stream).
      num_state: block-recurrent state vectors.
      num_memory: RMT memory tokens.
      bptt_segments: RMT / block-recurrent gradient horizon in segments (None: the stream).
      rmt_curriculum: RMT's stream phase starts on streams of 2 segments (half its steps)
        before the full ones, the RMT paper's curriculum over length (reported as such).
      position: ``"rotary"`` (default): every family uses the plain decoder's block
        recipe (rotary positions, GELU, unscaled embedding), so that the families differ
        only in how they reach the past; ``"paper"``: the gallery models as their papers
        build them (Transformer-XL relative positions / T5 biases, ReLU, sqrt(d)-scaled
        embeddings; absolute sinusoids for RMT and Longformer). On single-segment MQAR
        (dim 64, depth 2, 800 steps) the paper recipes stayed at 0.1-0.3 accuracy where
        the decoder recipe reached 1.0 (see the README's benchmark section).
    """

    dim: int
    depth: int
    heads: int
    segment_len: int
    segments: int
    vocab: int = 256
    ff_mult: int = 4
    knn_top_k: int = 16
    knn_segments: int | None = None
    num_state: int = 16
    num_memory: int = 16
    bptt_segments: int | None = None
    rmt_curriculum: bool = False
    position: str = "rotary"

    def __post_init__(self):
        if self.position not in ("rotary", "paper"):
            raise ValueError(f"Budget.position must be 'rotary' or 'paper', got {self.position!r}")

    @property
    def length(self) -> int:
        return self.segment_len * self.segments

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Family:
    """A model family bound to a budget.

    Attributes:
      name: the key in ``FAMILIES``.
      module: the Flax module.
      init: ``(key, batch_size) -> params``.
      logits: ``(params, inputs [B, L], resets [n, B] | None) -> logits [B, L, V]``.
      config: the module's config as a dict (for results.json).
      ff_mult: the feedforward multiplier used.
      reach: what the design lets the model see, in words (for the report).
      curriculum: stream lengths (segments) of the stages its stream phase trains on
        before the full streams, an equal share of the steps each (empty: none).
    """

    name: str
    module: Any
    init: Callable[[Array, int], Any]
    logits: Callable[[Any, Array, Array | None], Array]
    config: dict[str, Any]
    ff_mult: int
    reach: str
    curriculum: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return LABELS[self.name]


def _segments(inputs: Array, budget: Budget) -> Array:
    """``[B, L] -> [n, B, S]`` (any whole number of segments; a curriculum starts short)."""
    B, L = inputs.shape
    S = budget.segment_len
    if L % S:
        raise ValueError(f"inputs length {L} must be a multiple of segment_len={S}")
    return jnp.moveaxis(inputs.reshape(B, L // S, S), 1, 0)


def _unsegment(logits: Array) -> Array:
    """``[n, B, S, V] -> [B, n * S, V]``."""
    n, B, S, V = logits.shape
    return jnp.moveaxis(logits, 0, 1).reshape(B, n * S, V)


def _no_resets(inputs: Array, budget: Budget) -> Array:
    return jnp.zeros((inputs.shape[1] // budget.segment_len, inputs.shape[0]), bool)


def _doc_ids(resets: Array, budget: Budget) -> Array:
    """Document id of every token ``[B, L]``: a reset before segment s starts a new one."""
    docs = jnp.cumsum(resets.astype(jnp.int32), axis=0)  # [n, B]
    return jnp.repeat(docs.T, budget.segment_len, axis=1)


def _scanned(module, budget: Budget, init_state: Callable, step: Callable) -> Callable:
    """``logits`` for a family that reads one segment a call: ``step(params, segment,
    state, reset) -> (logits, state)`` scanned over the stream."""

    def logits(params, inputs, resets):
        B = inputs.shape[0]
        resets = _no_resets(inputs, budget) if resets is None else resets

        def body(state, xs):
            segment, reset = xs
            out, state = step(params, segment, state, reset)
            return state, out

        _, out = jax.lax.scan(body, init_state(B), (_segments(inputs, budget), resets))
        return _unsegment(out)

    return logits


def _gallery(module, budget: Budget) -> tuple[Callable, Callable]:
    def init(key, B):
        tokens = jnp.zeros((B, budget.segment_len), jnp.int32)
        return module.init(key, tokens, state=module.init_state(B))["params"]

    def step(params, segment, state, reset):
        return module.apply({"params": params}, segment, state=state, reset=reset)

    return init, _scanned(module, budget, module.init_state, step)


def _decoder(budget: Budget, ff_mult: int, max_seq_len: int, **wrapper_kw):
    return xtx.TransformerWrapper(
        num_tokens=budget.vocab,
        max_seq_len=max_seq_len,
        attn_layers=xtx.Decoder(
            dim=budget.dim,
            depth=budget.depth,
            heads=budget.heads,
            attn_dim_head=budget.dim // budget.heads,
            rotary_pos_emb=True,
            ff_mult=ff_mult,
        ),
        **wrapper_kw,
    )


def _plain(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    module = _decoder(budget, ff_mult, S, use_abs_pos_emb=False)

    def init(key, B):
        return module.init(key, jnp.zeros((B, S), jnp.int32))["params"]

    def logits(params, inputs, resets):
        B, L = inputs.shape
        out = module.apply({"params": params}, inputs.reshape(-1, S))
        return out.reshape(B, L, -1)

    return Family("plain", module, init, logits, _cfg(module), ff_mult, "its own segment")


def _full(budget: Budget, ff_mult: int) -> Family:
    module = _decoder(budget, ff_mult, budget.length, use_abs_pos_emb=False)

    def init(key, B):
        return module.init(key, jnp.zeros((B, budget.length), jnp.int32))["params"]

    def logits(params, inputs, resets):
        if resets is None:
            return module.apply({"params": params}, inputs)
        doc = _doc_ids(resets, budget)
        same = doc[:, None, :, None] == doc[:, None, None, :]  # [B, 1, L, L]
        return module.apply({"params": params}, inputs, attn_mask=same)

    return Family("full", module, init, logits, _cfg(module), ff_mult, "the whole stream")


def _xl_wrapper(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    module = _decoder(budget, ff_mult, S, max_mem_len=S, use_abs_pos_emb=False)
    depth = budget.depth

    def init_state(B):
        mems = tuple(jnp.zeros((B, S, budget.dim), jnp.float32) for _ in range(depth))
        return mems, jnp.zeros((B, S), bool)

    def init(key, B):
        return module.init(key, jnp.zeros((B, S), jnp.int32))["params"]

    def step(params, segment, state, reset):
        mems, valid = state
        keep = ~reset
        valid = valid & keep[:, None]
        mems = tuple(jnp.where(keep[:, None, None], m, 0.0) for m in mems)
        out, new_mems = module.apply(
            {"params": params},
            segment,
            mems=mems,
            mem_masks=(valid,) * depth,
            return_mems=True,
        )
        valid = jnp.concatenate([valid, jnp.ones_like(valid)], axis=1)[:, -S:]
        return out, (tuple(m.astype(jnp.float32) for m in new_mems), valid)

    logits = _scanned(module, budget, init_state, step)
    reach = f"depth x max_mem_len = {depth} x {S} tokens (stop-gradient memories)"
    return Family("xl_wrapper", module, init, logits, _cfg(module), ff_mult, reach)


def _transformer_xl(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    module = xtx.TransformerXL(**_xl_shared(budget, ff_mult))
    init, logits = _gallery(module, budget)
    reach = f"depth x mem_len = {budget.depth} x {S} tokens (stop-gradient memories)"
    return Family("transformer_xl", module, init, logits, _cfg(module), ff_mult, reach)


def _longformer(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    module = xtx.Longformer(
        **_shared(budget, ff_mult),
        window=S,
        causal=True,
        max_seq_len=budget.length,
        **_absolute_recipe(budget),
    )

    def init(key, B):
        return module.init(key, jnp.zeros((B, budget.length), jnp.int32))["params"]

    def logits(params, inputs, resets):
        ids = None if resets is None else _doc_ids(resets, budget)
        return module.apply({"params": params}, inputs, segment_ids=ids)[0]

    reach = f"depth x window = {budget.depth} x {S} tokens"
    return Family("longformer", module, init, logits, _cfg(module), ff_mult, reach)


def _memorizing(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    capacity = S * (budget.knn_segments or budget.segments)
    module = xtx.MemorizingTransformer(
        **_xl_shared(budget, ff_mult),
        knn_memory_size=capacity,
        knn_top_k=budget.knn_top_k,
    )
    init, logits = _gallery(module, budget)
    reach = f"kNN memory of {capacity} tokens (top {budget.knn_top_k}) at layer "
    reach += f"{module.config.knn_layer_index}"
    return Family("memorizing", module, init, logits, _cfg(module), ff_mult, reach)


def _block_recurrent(budget: Budget, ff_mult: int) -> Family:
    S = budget.segment_len
    module = xtx.BlockRecurrentTransformer(
        **_xl_shared(budget, ff_mult),
        block_len=S,
        num_state=budget.num_state,
        gate="fixed",
    )
    init, logits = _gallery(module, budget)
    reach = f"{budget.num_state} state vectors, unbounded"
    return Family("block_recurrent", module, init, logits, _cfg(module), ff_mult, reach)


def _rmt(budget: Budget, ff_mult: int) -> Family:
    module = xtx.RecurrentMemoryTransformer(
        **_shared(budget, ff_mult),
        segment_len=budget.segment_len,
        num_memory=budget.num_memory,
        bptt_segments=budget.bptt_segments or budget.segments,
        **_absolute_recipe(budget),
    )
    init, logits = _gallery(module, budget)
    reach = f"{budget.num_memory} memory tokens, unbounded"
    curriculum = (2,) if budget.rmt_curriculum and budget.segments > 2 else ()
    if curriculum:
        reach += "; curriculum: 2-segment streams first"
    return Family("rmt", module, init, logits, _cfg(module), ff_mult, reach, curriculum)


def _shared(budget: Budget, ff_mult: int) -> dict[str, Any]:
    return dict(
        num_tokens=budget.vocab,
        dim=budget.dim,
        depth=budget.depth,
        heads=budget.heads,
        ff_mult=ff_mult,
    )


def _xl_shared(budget: Budget, ff_mult: int) -> dict[str, Any]:
    """Options every Transformer-XL-based family shares: one segment per call, an XL
    memory of one segment, the block recipe."""
    S = budget.segment_len
    return dict(**_shared(budget, ff_mult), segment_len=S, mem_len=S, **_xl_recipe(budget))


def _xl_recipe(budget: Budget) -> dict[str, Any]:
    """Block options of the Transformer-XL-based families: ``"rotary"`` gives them the
    plain decoder's block (pre-norm, rotary, GELU, unscaled embedding), ``"paper"`` the
    papers' (pre-norm, their relative positions, ReLU, sqrt(d)-scaled embedding)."""
    if budget.position == "rotary":
        return dict(pre_norm=True, position="rotary", ff_activation="gelu", emb_scale=False)
    return dict(pre_norm=True)


def _absolute_recipe(budget: Budget) -> dict[str, Any]:
    """Block options of RMT and Longformer (whose papers add absolute sinusoids to a
    unit-variance embedding; their feedforwards are GELU already)."""
    if budget.position == "rotary":
        return dict(position="rotary", emb_std=(2 / budget.dim) ** 0.5)
    return dict(position="sinusoidal")


def _cfg(module) -> dict[str, Any]:
    return module.config.to_dict()


_BUILDERS = {
    "plain": _plain,
    "full": _full,
    "xl_wrapper": _xl_wrapper,
    "transformer_xl": _transformer_xl,
    "longformer": _longformer,
    "memorizing": _memorizing,
    "block_recurrent": _block_recurrent,
    "rmt": _rmt,
}


def build(name: str, budget: Budget, ff_mult: int | None = None) -> Family:
    """The family ``name`` under ``budget`` (``ff_mult`` overrides the budget's)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    return _BUILDERS[name](budget, budget.ff_mult if ff_mult is None else ff_mult)


def parameter_count(family: Family) -> int:
    """Number of parameters (no arrays are made)."""
    shapes = jax.eval_shape(lambda key: family.init(key, 1), jax.random.key(0))
    return int(sum(x.size for x in jax.tree.leaves(shapes)))


def match_budget(name: str, budget: Budget, target: int, tolerance: float = 0.1) -> Family:
    """The family with the feedforward multiplier (at most the budget's) whose parameter
    count is nearest ``target``; the budget's own when that is within ``tolerance``."""
    family = build(name, budget)
    count = parameter_count(family)
    if abs(count - target) <= tolerance * target:
        return family
    best, best_gap = family, abs(count - target)
    for mult in range(budget.ff_mult - 1, 0, -1):
        candidate = build(name, budget, mult)
        gap = abs(parameter_count(candidate) - target)
        if gap < best_gap:
            best, best_gap = candidate, gap
    return best

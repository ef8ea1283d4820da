"""``XLAutoregressiveWrapper``: segment-recurrent loss and generation for a Transformer-XL
``TransformerWrapper`` (1901.02860), as x-transformers 2.31's ``XLAutoregressiveWrapper``.

The wrapped network is a causal ``TransformerWrapper`` with ``max_mem_len >= 1``; its
``max_seq_len`` is the segment length L. ``wrapper.apply(variables, x)`` predicts
``x[:, 1:]`` from ``x[:, :-1]`` split into segments of L tokens; each segment reads the
memories the previous ones left (``mems=`` / ``return_mems=True`` of the network). The
loss of a segment is the per-row mean over its targets that are not ``ignore_index`` (0
for a row without any), averaged over rows and weighted by the segment's share of the
tokens, summed over segments: x-transformers' weighting.

The segments run in one ``lax.scan``, which needs fixed shapes: memories are carried as
``[B, max_mem_len, D]`` per layer, right-aligned, with a mask hiding the rows not yet
filled (a fully hidden memory is the same as none), and a ragged last segment (when
``T - 1`` is not a multiple of L) is padded to L with ``pad_value`` inputs and
``ignore_index`` targets. Causality keeps the padding out of every real position, the
targets keep it out of the loss, and the memories after a segment are cut at its real
length (the network is run as a copy keeping ``max_mem_len + L`` rows, from which the
rows ending at the last real token are taken), so padding changes nothing, and one
compiled segment serves them all. ``bptt_segments=N`` truncates backprop through time
as x-transformers' ``tbptt_steps``: the memories leaving segment i are detached when
``(i + 1) % N == 0``; the default None lets gradients through every memory. N may be a
traced int, so one compiled step serves every value.

``wrapper.generate(variables, prompts, seq_len)`` samples across segment boundaries in one
compiled program: the prompt's whole segments before its last token only build memories
(a scan); then a ``lax.while_loop``, fed the prompt's last token first, reruns the current
segment (a fixed ``[B, L]`` buffer in which causality hides the slots not yet written)
on the memories of the segments before it; when the buffer is full, its memories become
the next segment's. The network cannot combine a KV cache with memories, hence the rerun
(O(L) per token). Every segment, the one being decoded included, sees exactly the
memories the loss gives it. x-transformers 2.31 differs once decoding itself crosses a
boundary: it rebuilds the segment it just finished on memories that already hold that
segment's last but one token, so its tokens after the boundary drift from the loss's view
of the sequence; up to the first boundary crossed by decoding both agree.

Shapes: tokens ``[B, T]``, memories a tuple of ``[B, M, D]`` (one per self-attention
layer), prompts ``[B, P]``, output ``[B, seq_len]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xtx.models.transformer_wrapper import TransformerWrapper
from xtx.models.wrapper_common import (
    check_count,
    check_eos_token,
    check_instance,
    compiled_program,
    sampling_key,
    sampling_options,
    token_prompts,
    training_tokens,
)
from xtx.ops.sampling import check_range, decode_loop, resolve_filter, sample_tokens

Array = jax.Array

__all__ = ["XLAutoregressiveWrapper"]

# Memories as carried through the loops: (per-layer [B, max_mem_len, D], filled rows []).
Memory = tuple[tuple[Array, ...], Array]


class XLAutoregressiveWrapper:
    """Transformer-XL training loss and sampling over segments of ``max_seq_len`` tokens.

    Attributes:
      net: a causal ``TransformerWrapper`` with ``max_mem_len >= 1``.
      ignore_index: target id skipped by the loss (fed to the network as ``pad_value``).
      pad_value: id written after EOS by ``generate``.
      max_seq_len: the segment length L.
      max_mem_len: rows of memory per layer.
    """

    def __init__(self, net: TransformerWrapper, ignore_index: int = -100, pad_value: int = 0):
        check_instance("net", net, TransformerWrapper)
        cfg = net.config
        if not cfg.attn_layers.causal:
            raise ValueError("XLAutoregressiveWrapper needs a causal net (attn_layers=Decoder)")
        if cfg.max_mem_len < 1:
            raise ValueError(
                f"XLAutoregressiveWrapper needs a net with max_mem_len >= 1, got {cfg.max_mem_len}"
            )
        if cfg.max_seq_len < 1:
            raise ValueError("the net's max_seq_len (the segment length) must be >= 1, got 0")
        self.net = net
        # Keeps every memory row of [old memories; segment], to cut them at any length.
        self._net_all_rows = net.clone(
            config=dataclasses.replace(cfg, max_mem_len=cfg.max_mem_len + cfg.max_seq_len)
        )
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = cfg.max_seq_len
        self.max_mem_len = cfg.max_mem_len
        self._compiled: dict[tuple, Callable] = {}
        self._mem_shapes: dict[int, Any] = {}

    def init(self, rngs: Any, x: Array) -> dict[str, Any]:
        """The network's variables, initialised on (the first segment of) tokens ``x``."""
        return self.net.init(rngs, jnp.asarray(x)[:, : self.max_seq_len])

    def apply(
        self,
        variables: dict[str, Any],
        x: Array,
        *,
        mems: tuple[Array, ...] | None = None,
        return_mems: bool = False,
        bptt_segments: int | Array | None = None,
        rngs: dict[str, Array] | None = None,
        deterministic: bool = True,
    ) -> Array | tuple[Array, tuple[Array, ...]]:
        """The segment-recurrent next-token loss.

        Args:
          variables: the network's variables.
          x: ``[B, T]`` int tokens, ``T >= 2``, any length (split into segments of L).
          mems: memories before ``x``, a tuple of ``[B, M, D]`` with ``M <= max_mem_len``
            (as returned with ``return_mems``); None to start afresh.
          return_mems: also return the memories after ``x``.
          bptt_segments: N >= 1 (int or traced int): the memories leaving segment i are
            detached when ``(i + 1) % N == 0``; None (or a traced 0): never.
          rngs: ``{"dropout": key}`` when ``deterministic=False`` (folded per segment).
          deterministic: disable dropout.

        Returns:
          The scalar float32 loss; with ``return_mems`` the pair ``(loss, mems)``, the
          memories a tuple of ``[B, min(M + T - 1, max_mem_len), D]``.
        """
        x = training_tokens(x)
        B, T = x.shape
        if bptt_segments is None:
            bptt = jnp.int32(0)
        elif isinstance(bptt_segments, int) and not isinstance(bptt_segments, bool):
            if bptt_segments < 1:
                raise ValueError(f"bptt_segments must be an int >= 1 or None, got {bptt_segments}")
            bptt = jnp.int32(bptt_segments)
        else:
            bptt = jnp.asarray(bptt_segments, jnp.int32)
        dropout_key = (rngs or {}).get("dropout")
        L, N = self.max_seq_len, T - 1
        inp, labels = x[:, :-1], x[:, 1:]
        inp = jnp.where(inp == self.ignore_index, self.pad_value, inp).astype(jnp.int32)
        memory, mem_len = self._memory(variables, mems, B)

        def segment(memory, xs):  # one padded segment -> (memory, weighted loss)
            tokens, targets, i, length = xs
            seg_rngs = None
            if dropout_key is not None:
                seg_rngs = {"dropout": jax.random.fold_in(dropout_key, i)}
            logits, (new_mems, filled) = self._run(
                variables, tokens, memory, length, seg_rngs, deterministic
            )
            valid = targets != self.ignore_index
            losses = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), jnp.where(valid, targets, 0)
            )
            row_loss = jnp.where(valid, losses, 0.0).sum(1) / jnp.maximum(valid.sum(1), 1)
            detach = (bptt > 0) & ((i + 1) % jnp.maximum(bptt, 1) == 0)
            new_mems = tuple(jnp.where(detach, jax.lax.stop_gradient(m), m) for m in new_mems)
            return (new_mems, filled), row_loss.mean() * (length / N)

        S = -(-N // L)  # segments, the last one padded
        pad = S * L - N
        inp = jnp.pad(inp, ((0, 0), (0, pad)), constant_values=self.pad_value)
        labels = jnp.pad(labels, ((0, 0), (0, pad)), constant_values=self.ignore_index)
        lengths = jnp.minimum(N - jnp.arange(S) * L, L)  # [S] real tokens per segment

        def by_segment(a):  # [B, S * L] -> [S, B, L]
            return a.reshape(B, S, L).swapaxes(0, 1)

        xs = (by_segment(inp), by_segment(labels), jnp.arange(S), lengths)
        memory, losses = jax.lax.scan(segment, memory, xs)
        total = losses.sum()
        if not return_mems:
            return total
        kept = min(mem_len + N, self.max_mem_len)
        return total, tuple(m[:, m.shape[1] - kept :] for m in memory[0])

    def generate(
        self,
        variables: dict[str, Any],
        prompts: Array,
        seq_len: int,
        *,
        key: Array | None = None,
        temperature: float = 1.0,
        filter_logits_fn: str | Callable[..., Array] = "top_k",
        filter_kwargs: dict[str, Any] | None = None,
        eos_token: int | None = None,
        mems: tuple[Array, ...] | None = None,
    ) -> Array:
        """Samples ``seq_len`` tokens after each prompt, across segment boundaries.

        Args:
          variables: the network's variables.
          prompts: ``[B, P]`` int tokens (or ``[P]`` for one prompt), any length.
          seq_len: number of tokens to generate (>= 1).
          key: PRNG key; required unless ``temperature == 0``.
          temperature: divides the filtered logits; 0 takes the argmax (greedy).
          filter_logits_fn: ``"top_k"``, ``"top_p"``, ``"top_a"``, ``"min_p"`` or a
            function ``[B, V] -> [B, V]``.
          filter_kwargs: keywords of the filter.
          eos_token: a row stops at this id; later positions hold ``pad_value``.
          mems: memories before the prompt (as ``apply`` returns them), or None.

        Returns:
          ``[B, seq_len]`` int32 tokens (``[seq_len]`` for a 1-D prompt).
        """
        prompts, unbatched = token_prompts(prompts)
        check_count("seq_len", seq_len)
        check_range("temperature", temperature, 0.0, math.inf)
        V = self.net.config.num_tokens
        check_eos_token(eos_token, V)
        filter_fn = resolve_filter(filter_logits_fn)
        filter_kwargs = dict(filter_kwargs or {})
        key = sampling_key(key, temperature, filter_fn, filter_kwargs, V)
        memory, _ = self._memory(variables, mems, prompts.shape[0])
        static = sampling_options(seq_len, temperature, filter_fn, filter_kwargs, eos_token)
        program = compiled_program(self._compiled, static, self._generate_fn)
        out = program(variables, prompts.astype(jnp.int32), memory, key)
        return out[0] if unbatched else out

    def _generate_fn(self, seq_len, temperature, filter_fn, filter_items, eos_token):
        """The program ``(variables, prompts, memory, key) -> [B, seq_len]``."""
        L, filter_kwargs = self.max_seq_len, dict(filter_items)

        def sample(logits, key, i):
            return sample_tokens(
                logits,
                jax.random.fold_in(key, i),
                temperature=temperature,
                filter_fn=filter_fn,
                filter_kwargs=filter_kwargs,
            )

        def generate(variables, prompts, memory, key):
            B, P = prompts.shape
            leading = (P - 1) // L  # whole segments before the one the prompt ends in

            def read(memory, tokens):  # a whole segment only builds memories
                return self._run(variables, tokens, memory, L)[1], None

            if leading:
                segments = prompts[:, : leading * L].reshape(B, leading, L).swapaxes(0, 1)
                memory, _ = jax.lax.scan(read, memory, segments)
            # The buffer holds the current segment but the prompt's last token, which the
            # loop feeds first; `last` is the slot of the newest token in it.
            tail = prompts[:, leading * L : -1]
            buffer = jnp.zeros((B, L), jnp.int32).at[:, : tail.shape[1]].set(tail)
            last = jnp.int32(tail.shape[1] - 1)

            def step(state, prev, i):
                buffer, last, memory, next_memory = state
                # A full buffer is a finished segment: prev opens the next one.
                full = last == L - 1
                memory = jax.tree.map(lambda n, m: jnp.where(full, n, m), next_memory, memory)
                opened = jnp.zeros_like(buffer).at[:, 0].set(prev)
                written = jax.lax.dynamic_update_slice(
                    buffer, prev[:, None], (0, jnp.minimum(last + 1, L - 1))
                )
                buffer = jnp.where(full, opened, written)
                last = jnp.where(full, 0, last + 1)
                # The memories after this buffer, used once it is full.
                logits, next_memory = self._run(variables, buffer, memory, L)
                logits = jax.lax.dynamic_index_in_dim(logits, last, 1, keepdims=False)
                return sample(logits, key, i), (buffer, last, memory, next_memory)

            state = (buffer, last, memory, memory)
            return decode_loop(
                step,
                state,
                prompts[:, -1],
                seq_len,
                start=0,
                eos_token=eos_token,
                pad_value=self.pad_value,
            )

        return generate

    def _memory(self, variables: Any, mems: Any, B: int) -> tuple[Memory, int]:
        """User memories (or None) -> the fixed-shape carried form, and how many rows
        they fill."""
        M = self.max_mem_len
        if mems is None:
            if B not in self._mem_shapes:  # per layer: [B, 1, D] and dtype, traced once
                probe = jax.ShapeDtypeStruct((B, 1), jnp.int32)
                self._mem_shapes[B] = jax.eval_shape(
                    lambda v, t: self.net.apply(v, t, return_mems=True)[1], variables, probe
                )
            zeros = tuple(jnp.zeros((B, M, s.shape[2]), s.dtype) for s in self._mem_shapes[B])
            return (zeros, jnp.int32(0)), 0
        if not isinstance(mems, tuple | list) or not mems:
            raise TypeError(
                f"mems must be a tuple of [B, M, D] arrays (as returned with return_mems), "
                f"got {type(mems).__name__}"
            )
        mems = tuple(jnp.asarray(m) for m in mems)
        ok = all(m.ndim == 3 and m.shape[0] == B for m in mems)
        if not ok or len({m.shape[1] for m in mems}) != 1 or mems[0].shape[1] > M:
            raise ValueError(
                f"mems must be [B, M, D] arrays with B = {B} and one M <= max_mem_len = {M}, "
                f"got shapes {[tuple(m.shape) for m in mems]}"
            )
        filled = mems[0].shape[1]
        padded = tuple(jnp.pad(m, ((0, 0), (M - filled, 0), (0, 0))) for m in mems)
        return (padded, jnp.int32(filled)), filled

    def _run(
        self,
        variables: Any,
        tokens: Array,
        memory: Memory,
        length: int | Array,
        rngs: dict[str, Array] | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, Memory]:
        """One segment ``[B, T']`` whose first ``length`` tokens are real -> (logits
        ``[B, T', V]``, the memories after its real tokens, not detached).

        The memory rows not yet filled are masked.
        """
        mems, filled = memory
        B, M = tokens.shape[0], self.max_mem_len
        mask = jnp.broadcast_to(jnp.arange(M) >= M - filled, (B, M))  # right-aligned rows
        logits, all_rows = self._net_all_rows.apply(
            variables,
            tokens,
            mems=mems,
            mem_masks=(mask,) * len(mems),
            return_mems=True,
            detach_mems=False,
            rngs=rngs,
            deterministic=deterministic,
        )  # all_rows: [B, M + T', D] each
        new_mems = tuple(jax.lax.dynamic_slice_in_dim(r, length, M, axis=1) for r in all_rows)
        return logits, (new_mems, jnp.minimum(filled + length, M))

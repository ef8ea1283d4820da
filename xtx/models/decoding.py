"""Compiled decoding of a causal network, token by token: the programs behind
``AutoregressiveWrapper.generate`` and ``beam_search``.

Decoding is one compiled program: the prompt fills a fixed-size KV cache
(``TransformerWrapper.init_cache``), then a ``lax.while_loop`` decodes one token a step
(the loop stops early once every row has produced ``eos_token``). Without the cache each
step reruns the model over a fixed-size input buffer; causality makes the slots not yet
written invisible. ``Stepper`` is that choice for one network; a contrastive amateur
(2210.15097) decodes in the same loop with its own stepper, and
``ContinuousAutoregressiveWrapper`` feeds frames through one. Beam search runs the
``B * beams`` beams as one batch and, when it reorders them, gathers every cache leaf
along its batch axis (found by comparing the state with that of one more row, traced
abstractly, so any cache pytree works).

Prompts of different lengths are moved to the right (left padding with ``pad_value``),
and each row's positions start at its first token (``seq_start_pos``).

Shapes: prompts ``[B, P]`` (frames ``[B, P, D]`` through ``Stepper``), next-token logits
``[B, V]``, output ``[B, seq_len]``, beams ``[B, K, seq_len]`` with scores ``[B, K]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xtx.models.wrapper_common import token_prompts
from xtx.ops.sampling import (
    beam_candidates,
    contrastive_decode,
    decode_loop,
    sample_tokens,
    select_beams,
)

Array = jax.Array


def prepare_prompts(prompts: Any, prompt_lens: Any, pad_value: int) -> tuple[Array, Array, bool]:
    """Checks prompts (``[B, P]``, ``[P]`` or a list of 1-D prompts; ``prompt_lens`` ``[B]``
    for prompts padded at the end) -> (``[B, P]`` int32 right-aligned, ``seq_start_pos``
    ``[B]``, whether a batch axis was added)."""
    if isinstance(prompts, list | tuple):
        prompts, prompt_lens = _pad_prompt_list(prompts, prompt_lens, pad_value)
    prompts, unbatched = token_prompts(prompts)
    B, P = prompts.shape
    seq_start_pos = jnp.zeros((B,), jnp.int32)
    if prompt_lens is not None:
        lens = np.asarray(prompt_lens)
        if lens.shape != (B,) or not np.issubdtype(lens.dtype, np.integer):
            raise ValueError(
                f"prompt_lens must be int [B] matching prompts {tuple(prompts.shape)}, "
                f"got {lens.dtype} {lens.shape}"
            )
        if (lens < 1).any() or (lens > P).any():
            raise ValueError(f"prompt_lens must be in [1, P = {P}], got {lens.tolist()}")
        prompts, seq_start_pos = _align_right(prompts, jnp.asarray(lens), pad_value)
    return prompts.astype(jnp.int32), seq_start_pos, unbatched


def _pad_prompt_list(prompts: Any, prompt_lens: Any, pad_value: int) -> tuple[Array, Array]:
    """A list of 1-D prompts -> ``[B, P]`` padded at the end, and their lengths."""
    if prompt_lens is not None:
        raise ValueError("prompt_lens is derived from a list of prompts: do not pass both")
    if not prompts:
        raise ValueError("prompts must not be an empty list")
    rows = [np.asarray(p) for p in prompts]
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}] must be a non-empty 1-D int array, got {row.dtype} {row.shape}"
            )
    P = max(row.size for row in rows)
    padded = np.full((len(rows), P), pad_value, np.int32)
    for i, row in enumerate(rows):
        padded[i, : row.size] = row
    return jnp.asarray(padded), np.asarray([row.size for row in rows])


def _align_right(prompts: Array, lens: Array, pad_value: int) -> tuple[Array, Array]:
    """Moves each row's first ``lens[b]`` tokens to the end of ``[B, P]`` (left padding with
    ``pad_value``); returns the aligned prompts and each row's start ``P - lens``."""
    P = prompts.shape[1]
    start = (P - lens).astype(jnp.int32)  # [B]
    src = jnp.arange(P)[None] - start[:, None]  # [B, P] source column of each slot
    aligned = jnp.take_along_axis(prompts, jnp.clip(src, 0, P - 1), axis=1)
    return jnp.where(src >= 0, aligned, pad_value).astype(prompts.dtype), start


class Stepper:
    """One causal network decoding step by step, with a KV cache or an input buffer as
    state. Inputs are tokens (``[B, P]`` prompts, ``[B]`` steps) or frames (``[B, P, D]``,
    ``[B, D]``); outputs keep the network's leading axes (``[2, B, D]`` for a
    probabilistic continuous network)."""

    def __init__(self, net, variables, net_kwargs: dict, cache_kv: bool, total: int):
        self.net, self.variables, self.net_kwargs = net, variables, net_kwargs
        self.cache_kv, self.total = cache_kv, total  # total: positions ever fed

    def prefill(self, prompts: Array) -> tuple[Array, Any]:
        """``[B, P, ...]`` prompts -> (the output at the last position ``[..., B, V]``,
        state)."""
        B, P = prompts.shape[:2]
        if self.cache_kv:
            cache = self.net.init_cache(B, self.total)
            out, state = self.net.apply(self.variables, prompts, cache=cache, **self.net_kwargs)
        else:
            # A fixed-size input buffer; causality hides the slots not yet written.
            pad = jnp.zeros((B, self.total - P, *prompts.shape[2:]), prompts.dtype)
            state = jnp.concatenate([prompts, pad], axis=1)
            out = self.net.apply(self.variables, prompts, **self.net_kwargs)
        return out[..., -1, :], state

    def step(self, state: Any, token: Array, pos: Array) -> tuple[Array, Any]:
        """Feeds ``[B, ...]`` inputs at position ``pos`` -> (the output there ``[..., B, V]``,
        state)."""
        if self.cache_kv:
            out, state = self.net.apply(
                self.variables, token[:, None], cache=state, **self.net_kwargs
            )
            return out[..., -1, :], state
        start = (0, pos) + (0,) * (state.ndim - 2)
        state = jax.lax.dynamic_update_slice(state, token[:, None], start)
        out = self.net.apply(self.variables, state, **self.net_kwargs)  # [..., B, total, V]
        return jax.lax.dynamic_index_in_dim(out, pos, -2, keepdims=False), state

    def batch_axes(self, prompts: Array, state: Any) -> list[int | None]:
        """Per leaf of the ``state`` after ``prefill(prompts)``: the axis that grows with
        the batch, found by comparing with the state of one more row (traced abstractly),
        so any cache pytree works; None for leaves shared by all rows (the fill length)."""
        B = prompts.shape[0]

        def wider(a):
            return jax.ShapeDtypeStruct((B + 1, *jnp.shape(a)[1:]), jnp.result_type(a))

        def prefill(prompts, net_kwargs):
            stepper = Stepper(self.net, self.variables, net_kwargs, self.cache_kv, self.total)
            return stepper.prefill(prompts)[1]

        grown = jax.eval_shape(prefill, wider(prompts), jax.tree.map(wider, self.net_kwargs))
        return [
            next((i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n), None)
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(grown), strict=True)
        ]


def take_rows(state: Any, rows: Array, axes: list[int | None]) -> Any:
    """Gathers batch rows ``rows`` of every leaf along its batch axis (``axes``, one per
    leaf as ``Stepper.batch_axes`` gives them)."""
    leaves, treedef = jax.tree.flatten(state)
    leaves = [
        leaf if a is None else jnp.take(leaf, rows, axis=a)
        for leaf, a in zip(leaves, axes, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def repeat_rows(tree: Any, times: int) -> Any:
    """Repeats every array's leading (batch) axis: row b becomes rows b * times .. + times-1."""
    return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), times, axis=0), tree)


def decode_program(
    net, pad_value, seq_len, temperature, filter_fn, filter_items, eos_token, amateur_net,
    cd_items, cache_kv,
) -> Callable:  # fmt: skip
    """The sampling program ``(variables, amateur_variables, prompts, seq_start_pos, key,
    net_kwargs) -> [B, seq_len]`` of ``net`` (and a contrastive ``amateur_net``)."""
    filter_kwargs, cd_kwargs = dict(filter_items), dict(cd_items)

    def decode(variables, amateur_variables, prompts, seq_start_pos, key, net_kwargs):
        B, P = prompts.shape
        # Left padding: keys before a row's start are hidden, positions count from it.
        net_kwargs = dict(net_kwargs, seq_start_pos=seq_start_pos)
        total = P + seq_len - 1  # positions ever fed to the model
        models = [Stepper(net, variables, net_kwargs, cache_kv, total)]
        if amateur_net is not None:
            models.append(Stepper(amateur_net, amateur_variables, net_kwargs, cache_kv, total))

        def sample(logits, i):  # one [B, V] per model -> [B]
            if amateur_net is not None:
                logits = [contrastive_decode(*logits, **cd_kwargs)]
            return sample_tokens(
                logits[0],
                jax.random.fold_in(key, i),
                temperature=temperature,
                filter_fn=filter_fn,
                filter_kwargs=filter_kwargs,
            )

        def step(states, prev, i):
            stepped = [m.step(s, prev, P + i - 1) for m, s in zip(models, states, strict=True)]
            logits, states = zip(*stepped, strict=True)
            return sample(logits, i), tuple(states)

        logits, states = zip(*(m.prefill(prompts) for m in models), strict=True)
        first = sample(logits, 0)
        return decode_loop(
            step, tuple(states), first, seq_len, eos_token=eos_token, pad_value=pad_value
        )

    return decode


def beam_program(
    net, pad_value, _, beams, seq_len, temperature, filter_fn, filter_items, eos_token, cache_kv
) -> Callable:
    """The beam-search program ``(variables, prompts, key, net_kwargs) ->
    (tokens [B, K, seq_len], scores [B, K])`` of ``net``."""
    K = beams
    sampling = dict(
        temperature=temperature,
        filter_fn=filter_fn,
        filter_kwargs=dict(filter_items),
        pad_value=pad_value,
    )

    def search(variables, prompts, key, net_kwargs):
        B, P = prompts.shape
        total = P + seq_len - 1
        expert = Stepper(net, variables, net_kwargs, cache_kv, total)
        logits, state = expert.prefill(prompts)  # [B, V]
        log_probs, candidates = beam_candidates(
            logits[:, None], jnp.zeros((B, 1), bool), jax.random.fold_in(key, 0), K, **sampling
        )
        scores, _, tokens = select_beams(jnp.zeros((B, 1)), log_probs, candidates, K)
        # Every beam starts from its prompt's state: row b * K + k holds beam k of b.
        axes = expert.batch_axes(prompts, state)
        state = take_rows(state, jnp.repeat(jnp.arange(B), K), axes)
        expert = Stepper(net, variables, repeat_rows(net_kwargs, K), cache_kv, total)
        out = jnp.full((B * K, seq_len), pad_value, jnp.int32).at[:, 0].set(tokens.ravel())
        done = jnp.zeros((B * K,), bool) if eos_token is None else out[:, 0] == eos_token

        def cond(carry):
            i, *_, done = carry
            return (i < seq_len) & ~jnp.all(done)

        def body(carry):
            i, out, state, scores, done = carry
            logits, state = expert.step(state, out[:, i - 1], P + i - 1)  # [B * K, V]
            log_probs, candidates = beam_candidates(
                logits.reshape(B, K, -1), done.reshape(B, K), jax.random.fold_in(key, i), K,
                **sampling,
            )  # fmt: skip
            scores, parents, tokens = select_beams(scores, log_probs, candidates, K)
            rows = (jnp.arange(B)[:, None] * K + parents).ravel()  # [B * K]
            out, done = out[rows], done[rows]
            state = take_rows(state, rows, axes)
            out = jax.lax.dynamic_update_slice(out, tokens.reshape(-1, 1), (0, i))
            if eos_token is not None:
                done = done | (out[:, i] == eos_token)
            return i + 1, out, state, scores, done

        carry = (jnp.int32(1), out, state, scores, done)
        _, out, _, scores, _ = jax.lax.while_loop(cond, body, carry)
        return out.reshape(B, K, seq_len), scores

    return search

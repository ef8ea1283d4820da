"""Sampling for autoregressive decoding, as pure functions on ``[..., V]`` logits.

The filters are x-transformers 2.31's: ``top_k``, nucleus ``top_p`` (1904.09751),
``top_a``, ``min_p`` (2407.01082); each returns the logits with the dropped tokens at
-inf. ``sample_tokens`` is one decoding step: temperature 0 takes the argmax, otherwise
the filtered logits are divided by the temperature and a token is drawn. Contrastive
decoding (2210.15097, in the form of 2309.09117 appendix A) scores the expert's plausible
tokens by how much more the expert likes them than an amateur. Beam search picks its
candidates from Gumbel-perturbed logits when it samples (``gumbel_perturb``, the
Gumbel-top-k trick of 1903.06059) and keeps the beams with the best total log-probability
(``select_beams``).

``decode_loop`` is the token-by-token loop shared by the generation wrappers: a
``lax.while_loop`` that stops once every row has produced EOS, then pads after it.

Range checks run on Python numbers, before tracing: a bad threshold raises a ValueError
naming the keyword instead of producing NaNs inside a compiled loop.

Shapes: logits ``[B, V]`` (any leading axes for the filters), tokens ``[B]`` int32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "FILTER_LOGITS_FNS",
    "check_range",
    "beam_candidates",
    "contrastive_decode",
    "decode_loop",
    "gumbel_perturb",
    "min_p",
    "resolve_filter",
    "sample_tokens",
    "select_beams",
    "top_a",
    "top_k",
    "top_p",
]


def check_range(name: str, value: Any, low: float, high: float, *, open_low: bool = False):
    """Raises ValueError unless ``value`` is a real number in ``[low, high]`` (``(low,
    high]`` with ``open_low``), naming ``name``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def top_k(logits: Array, frac_num_tokens: float = 0.1, k: int | None = None) -> Array:
    """Keeps the k largest logits of ``[..., V]`` (default ``ceil(frac * V)``), -inf elsewhere."""
    V = logits.shape[-1]
    if k is None:
        check_range("filter_kwargs frac_num_tokens", frac_num_tokens, 0.0, 1.0, open_low=True)
        k = math.ceil(frac_num_tokens * V)
    elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"filter_kwargs k must be an int >= 1, got {k!r}")
    k = min(k, V)
    _, indices = jax.lax.top_k(logits, k)  # [..., k]
    keep = jnp.zeros(logits.shape, bool)
    keep = jnp.put_along_axis(keep, indices, True, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def top_p(logits: Array, thres: float = 0.9) -> Array:
    """Nucleus filter: keeps the most likely logits until their probability exceeds
    ``thres`` (the token that crosses it is kept), -inf elsewhere."""
    check_range("filter_kwargs thres", thres, 0.0, 1.0)
    order = jnp.argsort(-logits, axis=-1, stable=True)  # [..., V], descending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum_probs = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum_probs > thres
    # Shifted right by one: the token whose probability crosses thres stays.
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    sorted_logits = jnp.where(remove, -jnp.inf, sorted_logits)
    return jnp.put_along_axis(logits, order, sorted_logits, axis=-1, inplace=False)


def top_a(logits: Array, min_p_pow: float = 2.0, min_p_ratio: float = 0.02) -> Array:
    """Drops tokens with probability below ``max_prob ** min_p_pow * min_p_ratio``."""
    check_range("filter_kwargs min_p_pow", min_p_pow, 0.0, math.inf, open_low=True)
    check_range("filter_kwargs min_p_ratio", min_p_ratio, 0.0, 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    limit = jnp.max(probs, axis=-1, keepdims=True) ** min_p_pow * min_p_ratio
    return jnp.where(probs < limit, -jnp.inf, logits)


def min_p(logits: Array, min_p: float = 0.1) -> Array:
    """Min-p sampling (2407.01082): drops tokens with probability below ``min_p * max_prob``."""
    check_range("filter_kwargs min_p", min_p, 0.0, 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    limit = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < limit, -jnp.inf, logits)


FILTER_LOGITS_FNS: dict[str, Callable[..., Array]] = {
    "top_k": top_k,
    "top_p": top_p,
    "top_a": top_a,
    "min_p": min_p,
}


def resolve_filter(filter_logits_fn: str | Callable[..., Array] | None) -> Callable[..., Array]:
    """A filter name (a key of ``FILTER_LOGITS_FNS``), a callable, or None (no filter) ->
    the filter function."""
    if filter_logits_fn is None:
        return _identity
    if isinstance(filter_logits_fn, str):
        if filter_logits_fn not in FILTER_LOGITS_FNS:
            raise ValueError(
                f"filter_logits_fn must be one of {sorted(FILTER_LOGITS_FNS)} or a "
                f"callable, got {filter_logits_fn!r}"
            )
        return FILTER_LOGITS_FNS[filter_logits_fn]
    if callable(filter_logits_fn):
        return filter_logits_fn
    raise TypeError(f"filter_logits_fn must be a name or a callable, got {filter_logits_fn!r}")


def _identity(logits: Array) -> Array:
    return logits


def sample_tokens(
    logits: Array,
    key: Array | None,
    *,
    temperature: float,
    filter_fn: Callable[..., Array] = _identity,
    filter_kwargs: dict[str, Any] | None = None,
) -> Array:
    """One decoding step: ``[B, V]`` logits -> ``[B]`` int32 tokens.

    Args:
      logits: ``[B, V]`` scores of the next token.
      key: PRNG key (unused, and may be None, when ``temperature == 0``).
      temperature: 0 takes the argmax (the filter is skipped, as in x-transformers);
        otherwise ``filter_fn(logits) / temperature`` is sampled.
      filter_fn: ``[B, V] -> [B, V]`` filter, e.g. ``top_k``.
      filter_kwargs: keywords of the filter.

    Returns:
      ``[B]`` int32 token ids.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_fn(logits.astype(jnp.float32), **(filter_kwargs or {})) / temperature
    return jax.random.categorical(key, logits).astype(jnp.int32)


def contrastive_decode(
    expert_logits: Array, amateur_logits: Array, *, alpha: float = 0.1, beta: float = 0.5
) -> Array:
    """Contrastive decoding logits (2210.15097; 2309.09117 appendix A, algorithm 2).

    ``(1 + beta) * expert - beta * amateur`` on the tokens the expert finds plausible
    (``expert >= log(alpha) + max(expert)``, i.e. probability at least ``alpha`` times
    the best one); the rest get the most negative finite value, as x-transformers.

    Args:
      expert_logits: ``[..., V]`` logits of the large model.
      amateur_logits: ``[..., V]`` logits of the small model.
      alpha: plausibility cut-off in ``(0, 1]``.
      beta: contrast strength, ``>= 0`` (0 leaves the plausible expert logits as they are).

    Returns:
      ``[..., V]`` float32 logits.
    """
    check_range("contrastive_decode_kwargs alpha", alpha, 0.0, 1.0, open_low=True)
    check_range("contrastive_decode_kwargs beta", beta, 0.0, math.inf)
    if expert_logits.shape != amateur_logits.shape:
        raise ValueError(
            "expert and amateur logits must have the same shape (the same vocabulary), got "
            f"{expert_logits.shape} and {amateur_logits.shape}"
        )
    expert = expert_logits.astype(jnp.float32)
    amateur = amateur_logits.astype(jnp.float32)
    cutoff = math.log(alpha) + jnp.max(expert, axis=-1, keepdims=True)
    contrast = (1 + beta) * expert - beta * amateur
    return jnp.where(expert < cutoff, -jnp.finfo(jnp.float32).max, contrast)


def gumbel_perturb(logits: Array, key: Array, temperature: float) -> Array:
    """``logits / temperature + Gumbel(0, 1)`` noise: the top k of the result are k tokens
    drawn without replacement from ``softmax(logits / temperature)`` (1903.06059)."""
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    return logits.astype(jnp.float32) / temperature + noise


def beam_candidates(
    logits: Array,
    done: Array,
    key: Array | None,
    beams: int,
    *,
    temperature: float = 0.0,
    filter_fn: Callable[..., Array] = _identity,
    filter_kwargs: dict[str, Any] | None = None,
    pad_value: int = 0,
) -> tuple[Array, Array]:
    """What each beam proposes: its log-probabilities and ``beams`` candidate tokens.

    Candidates are the top ``beams`` logits, or with ``temperature > 0`` the top of the
    filtered, Gumbel-perturbed logits (x-transformers' stochastic beam search). A finished
    beam (``done``) has a single continuation, ``pad_value``, at log-probability 0; its
    other candidates are distinct tokens at -inf, so they are never kept.

    Args:
      logits: ``[B, K', V]`` next-token logits of each beam.
      done: ``[B, K']`` bool, beams that have produced EOS.
      key: PRNG key (unused when ``temperature == 0``).
      beams: K, candidates per beam.
      temperature: 0 is deterministic.
      filter_fn: filter applied before the noise.
      filter_kwargs: keywords of the filter.
      pad_value: the token a finished beam continues with.

    Returns:
      ``(log_probs [B, K', V] float32, candidates [B, K', K] int)``.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ranked = logits
    if temperature > 0:
        ranked = gumbel_perturb(
            filter_fn(logits.astype(jnp.float32), **(filter_kwargs or {})), key, temperature
        )
    candidates = jax.lax.top_k(ranked, beams)[1]  # [B, K', K]
    V = logits.shape[-1]
    only_pad = jnp.where(jnp.arange(V) == pad_value, 0.0, -jnp.inf)
    log_probs = jnp.where(done[..., None], only_pad, log_probs)
    distinct = (pad_value + jnp.arange(beams)) % V  # pad_value first
    return log_probs, jnp.where(done[..., None], distinct, candidates)


def select_beams(
    scores: Array, log_probs: Array, candidates: Array, beams: int
) -> tuple[Array, Array, Array]:
    """One beam-search pruning step: the ``beams`` best of ``beams * C`` extensions.

    Each of the K = ``beams`` beams of a row proposes C candidate tokens; an extension's
    score is the beam's score plus the candidate's log-probability. The K best extensions
    per row are kept, best first (ties go to the lower beam, then the lower candidate).

    Args:
      scores: ``[B, K]`` total log-probability of each beam.
      log_probs: ``[B, K, V]`` next-token log-probabilities of each beam.
      candidates: ``[B, K, C]`` int token ids each beam proposes.
      beams: K.

    Returns:
      ``(new_scores [B, K], parents [B, K], tokens [B, K])``: parents index the beam
      (in ``[0, K)``) each kept extension continues.
    """
    B, K, C = candidates.shape
    cand_scores = scores[..., None] + jnp.take_along_axis(log_probs, candidates, axis=-1)
    new_scores, flat = jax.lax.top_k(cand_scores.reshape(B, K * C), beams)  # [B, K]
    tokens = jnp.take_along_axis(candidates.reshape(B, K * C), flat, axis=-1)
    return new_scores, flat // C, tokens.astype(jnp.int32)


def decode_loop(
    step: Callable[[Any, Array, Array], tuple[Array, Any]],
    state: Any,
    prev: Array,
    seq_len: int,
    *,
    start: int = 1,
    eos_token: int | None = None,
    pad_value: int = 0,
) -> Array:
    """Decodes ``seq_len`` tokens in one ``lax.while_loop``.

    Args:
      step: ``(state, prev [B], i) -> (token [B], state)`` producing token ``i`` from the
        token before it (``i`` is a traced int32 in ``[start, seq_len)``).
      state: the loop state (a pytree of fixed shapes).
      prev: ``[B]`` int32: with ``start=1`` token 0 of the output, decoded beforehand;
        with ``start=0`` the token before the output (the prompt's last).
      seq_len: tokens to produce.
      start: 1 or 0, see ``prev``.
      eos_token: stop once every row has produced it; later positions hold ``pad_value``.
      pad_value: the padding id.

    Returns:
      ``[B, seq_len]`` int32 tokens.
    """
    B = prev.shape[0]
    prev = prev.astype(jnp.int32)
    out = jnp.full((B, seq_len), pad_value, jnp.int32)
    done = jnp.zeros((B,), bool)
    if start == 1:
        out = out.at[:, 0].set(prev)
        done = done if eos_token is None else prev == eos_token

    def cond(carry):
        i, *_, done = carry
        return (i < seq_len) & ~jnp.all(done)

    def body(carry):
        i, out, prev, state, done = carry
        token, state = step(state, prev, i)
        token = token.astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        if eos_token is not None:
            done = done | (token == eos_token)
        return i + 1, out, token, state, done

    carry = (jnp.int32(start), out, prev, state, done)
    _, out, *_ = jax.lax.while_loop(cond, body, carry)
    if eos_token is not None:
        # Everything after a row's first EOS becomes padding.
        is_eos = out == eos_token
        after = jnp.cumsum(is_eos, axis=1) - is_eos > 0
        out = jnp.where(after, pad_value, out)
    return out

"""``AutoregressiveWrapper``: next-token loss and compiled sampling for a ``TransformerWrapper``.

As x-transformers 2.31's ``AutoregressiveWrapper``: ``wrapper.apply(variables, x)`` is the
mean cross-entropy of ``logits[:, :-1]`` against ``x[:, 1:]`` (targets equal to
``ignore_index`` are skipped), optionally with the forgetful causal mask (2210.13432:
``mask_prob`` of the keys, never the first, are hidden from every query).
``wrapper.generate(variables, prompts, seq_len)`` samples ``seq_len`` tokens.

Generation is one compiled program: the prompt fills a fixed-size KV cache
(``TransformerWrapper.init_cache``), then a ``lax.while_loop`` decodes one token a step
(the loop stops early once every row has produced ``eos_token``). Without the cache each
step reruns the model over a fixed-size token buffer; causality makes the slots not yet
written invisible. The jitted program is kept on the wrapper per set of static options,
and ``jax.jit`` keeps one executable per shape, so a second call with the same shapes
compiles nothing.

Sampling filters (``top_k``, ``top_p``, ``top_a``, ``min_p``) are x-transformers'
definitions on ``[B, V]`` logits; the temperature divides the filtered logits; temperature
0 is greedy. Differences from x-transformers: EOS is looked for among the generated tokens
only (x-transformers also stops on an EOS inside the prompt), and the sequence is never
cut to the last ``max_seq_len`` tokens (a model with absolute positions raises instead).

Shapes: tokens ``[B, T]``, logits ``[B, T, V]``, prompts ``[B, P]``, output ``[B, seq_len]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xtx.models.transformer_wrapper import TransformerWrapper

Array = jax.Array

__all__ = ["FILTER_LOGITS_FNS", "AutoregressiveWrapper", "min_p", "top_a", "top_k", "top_p"]


def _check_range(name: str, value: Any, low: float, high: float, *, open_low: bool = False):
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (low < value if open_low else low <= value) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


def top_k(logits: Array, frac_num_tokens: float = 0.1, k: int | None = None) -> Array:
    """Keeps the k largest logits of ``[..., V]`` (default ``ceil(frac * V)``), -inf elsewhere."""
    V = logits.shape[-1]
    if k is None:
        _check_range("filter_kwargs frac_num_tokens", frac_num_tokens, 0.0, 1.0, open_low=True)
        k = math.ceil(frac_num_tokens * V)
    elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"filter_kwargs k must be an int >= 1, got {k!r}")
    k = min(k, V)
    values, indices = jax.lax.top_k(logits, k)  # [..., k]
    keep = jnp.zeros(logits.shape, bool)
    keep = jnp.put_along_axis(keep, indices, True, axis=-1, inplace=False)
    return jnp.where(keep, logits, -jnp.inf)


def top_p(logits: Array, thres: float = 0.9) -> Array:
    """Nucleus filter: keeps the most likely logits until their probability exceeds
    ``thres`` (the token that crosses it is kept), -inf elsewhere."""
    _check_range("filter_kwargs thres", thres, 0.0, 1.0)
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
    _check_range("filter_kwargs min_p_pow", min_p_pow, 0.0, math.inf, open_low=True)
    _check_range("filter_kwargs min_p_ratio", min_p_ratio, 0.0, 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    limit = jnp.max(probs, axis=-1, keepdims=True) ** min_p_pow * min_p_ratio
    return jnp.where(probs < limit, -jnp.inf, logits)


def min_p(logits: Array, min_p: float = 0.1) -> Array:
    """Min-p sampling (2407.01082): drops tokens with probability below ``min_p * max_prob``."""
    _check_range("filter_kwargs min_p", min_p, 0.0, 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    limit = min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < limit, -jnp.inf, logits)


FILTER_LOGITS_FNS: dict[str, Callable[..., Array]] = {
    "top_k": top_k,
    "top_p": top_p,
    "top_a": top_a,
    "min_p": min_p,
}


def forgetful_causal_mask(key: Array, B: int, T: int, mask_prob: float) -> Array:
    """``[B, T]`` bool key mask hiding ``min(int(T * mask_prob), T - 1)`` random keys per
    row, never the first (2210.13432, as x-transformers)."""
    rand = jax.random.normal(key, (B, T))
    rand = rand.at[:, 0].set(-jnp.finfo(rand.dtype).max)
    num_mask = min(int(T * mask_prob), T - 1)
    if num_mask <= 0:
        return jnp.ones((B, T), bool)
    _, indices = jax.lax.top_k(rand, num_mask)
    hidden = jnp.put_along_axis(jnp.zeros((B, T), bool), indices, True, axis=-1, inplace=False)
    return ~hidden


def _align_right(prompts: Array, lens: Array, pad_value: int) -> tuple[Array, Array]:
    """Moves each row's first ``lens[b]`` tokens to the end of ``[B, P]`` (left padding with
    ``pad_value``); returns the aligned prompts and each row's start ``P - lens``."""
    P = prompts.shape[1]
    start = (P - lens).astype(jnp.int32)  # [B]
    src = jnp.arange(P)[None] - start[:, None]  # [B, P] source column of each slot
    aligned = jnp.take_along_axis(prompts, jnp.clip(src, 0, P - 1), axis=1)
    return jnp.where(src >= 0, aligned, pad_value).astype(prompts.dtype), start


class AutoregressiveWrapper:
    """Next-token training loss and sampling around a decoder ``TransformerWrapper``.

    The variables are the wrapped network's: ``variables = wrapper.init(key, x)`` equals
    ``net.init(key, x)``, and variables converted with ``xtx.interop.from_x_transformers``
    work as they are.

    Attributes:
      net: the ``TransformerWrapper`` (a causal stack, for ``generate``).
      ignore_index: target id skipped by the loss.
      pad_value: id written after EOS by ``generate`` and fed in place of ``ignore_index``.
      mask_prob: fraction of keys hidden by the forgetful causal mask (in ``[0, 1)``).
    """

    def __init__(
        self,
        net: TransformerWrapper,
        ignore_index: int = -100,
        pad_value: int = 0,
        mask_prob: float = 0.0,
    ):
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"net must be a TransformerWrapper, got {type(net).__name__}")
        if not 0.0 <= mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob!r}")
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.mask_prob = mask_prob
        self.max_seq_len = net.config.max_seq_len
        self._compiled: dict[tuple, Callable] = {}

    def init(self, rngs: Any, x: Array, **net_kwargs: Any) -> dict[str, Any]:
        """The network's variables, initialised on tokens ``x`` ``[B, T]``."""
        return self.net.init(rngs, jnp.asarray(x), **net_kwargs)

    def apply(
        self,
        variables: dict[str, Any],
        x: Array,
        *,
        lens: Array | None = None,
        rngs: dict[str, Array] | None = None,
        deterministic: bool = True,
        **net_kwargs: Any,
    ) -> Array:
        """The next-token loss of x-transformers' wrapper.

        Args:
          variables: the network's variables.
          x: ``[B, T]`` int tokens; the model reads all T, the loss scores ``x[:, 1:]``.
          lens: optional ``[B]`` lengths: tokens at or past them become ``ignore_index``.
          rngs: ``{"mask": key}`` for the forgetful causal mask (``mask_prob > 0``), and
            ``{"dropout": key}`` when ``deterministic=False``.
          deterministic: disable dropout.
          **net_kwargs: passed on to the network (e.g. ``mask``, ``context``).

        Returns:
          The scalar float32 mean cross-entropy over targets that are not ``ignore_index``.
        """
        x = jnp.asarray(x)
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"x must be int tokens [B, T], got {x.dtype} {x.shape}")
        B, T = x.shape
        if T < 2:
            raise ValueError(f"x needs at least 2 tokens to predict one, got shape {x.shape}")
        rngs = dict(rngs or {})
        if lens is not None:
            lens = jnp.asarray(lens)
            if lens.shape != (B,):
                raise ValueError(f"lens must have shape [B] = ({B},), got {lens.shape}")
            x = jnp.where(jnp.arange(T) < lens[:, None], x, self.ignore_index)
        inp, target = x, x[:, 1:]
        inp = jnp.where(inp == self.ignore_index, self.pad_value, inp)
        if self.mask_prob > 0.0:
            if "mask" not in rngs:
                raise ValueError(
                    f"mask_prob={self.mask_prob} samples a forgetful causal mask: pass "
                    "rngs={'mask': key}"
                )
            net_kwargs["self_attn_kv_mask"] = forgetful_causal_mask(
                rngs.pop("mask"), B, T, self.mask_prob
            )
        logits = self.net.apply(
            variables, inp, deterministic=deterministic, rngs=rngs or None, **net_kwargs
        )[:, :-1]  # [B, T - 1, V]
        valid = target != self.ignore_index
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), jnp.where(valid, target, 0)
        )
        return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.sum(valid)

    def generate(
        self,
        variables: dict[str, Any],
        prompts: Array | list[Array],
        seq_len: int,
        *,
        prompt_lens: Array | None = None,
        key: Array | None = None,
        temperature: float = 1.0,
        filter_logits_fn: str | Callable[..., Array] = "top_k",
        filter_kwargs: dict[str, Any] | None = None,
        eos_token: int | None = None,
        cache_kv: bool = True,
        **net_kwargs: Any,
    ) -> Array:
        """Samples ``seq_len`` tokens after each prompt, in one compiled loop.

        Args:
          variables: the network's variables.
          prompts: ``[B, P]`` int tokens (or ``[P]`` for one prompt), or a list of 1-D
            prompts of different lengths.
          seq_len: number of tokens to generate (>= 1).
          prompt_lens: ``[B]`` lengths of prompts padded at the end; they are moved to the
            right (left padding) and positions start at each row's first token.
          key: PRNG key; required unless ``temperature == 0``.
          temperature: divides the filtered logits; 0 takes the argmax (greedy).
          filter_logits_fn: ``"top_k"``, ``"top_p"``, ``"top_a"``, ``"min_p"`` or a
            function ``[B, V] logits -> [B, V] logits``.
          filter_kwargs: keywords of the filter (e.g. ``{"k": 5}``, ``{"thres": 0.9}``).
          eos_token: a row stops at this id; later positions hold ``pad_value``.
          cache_kv: decode with a KV cache (False: rerun the model over all tokens).
          **net_kwargs: arrays passed to the network at every step (e.g. ``context``).

        Returns:
          ``[B, seq_len]`` int32 tokens (``[seq_len]`` for a 1-D prompt).
        """
        cfg = self.net.config
        if not cfg.attn_layers.causal:
            raise ValueError("generate needs a causal network (attn_layers=Decoder(...))")
        if isinstance(prompts, list | tuple):
            prompts, prompt_lens = self._pad_prompt_list(prompts, prompt_lens)
        prompts = jnp.asarray(prompts)
        unbatched = prompts.ndim == 1
        if unbatched:
            prompts = prompts[None]
        if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
            raise ValueError(
                f"prompts must be int tokens [B, P], got {prompts.dtype} {prompts.shape}"
            )
        B, P = prompts.shape
        if P < 1:
            raise ValueError(f"prompts must hold at least one token, got shape {prompts.shape}")
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
            prompts, seq_start_pos = _align_right(prompts, jnp.asarray(lens), self.pad_value)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if cfg.has_abs_pos_emb and P + seq_len - 1 > cfg.max_seq_len:
            raise ValueError(
                f"prompts of length {P} plus seq_len={seq_len} need {P + seq_len - 1} "
                f"positions, more than max_seq_len={cfg.max_seq_len} of the absolute "
                "positional embedding"
            )
        _check_range("temperature", temperature, 0.0, math.inf)
        if eos_token is not None and not (
            isinstance(eos_token, int) and 0 <= eos_token < cfg.num_tokens
        ):
            raise ValueError(
                f"eos_token must be a token id in [0, {cfg.num_tokens}), got {eos_token!r}"
            )
        if isinstance(filter_logits_fn, str):
            if filter_logits_fn not in FILTER_LOGITS_FNS:
                raise ValueError(
                    f"filter_logits_fn must be one of {sorted(FILTER_LOGITS_FNS)} or a "
                    f"callable, got {filter_logits_fn!r}"
                )
            filter_fn = FILTER_LOGITS_FNS[filter_logits_fn]
        elif callable(filter_logits_fn):
            filter_fn = filter_logits_fn
        else:
            raise TypeError(
                f"filter_logits_fn must be a name or a callable, got {filter_logits_fn!r}"
            )
        filter_kwargs = dict(filter_kwargs or {})
        greedy = temperature == 0
        if not greedy:
            if key is None:
                raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(..)")
            # Raise on bad thresholds now, not inside the trace.
            filter_fn(jnp.zeros((1, cfg.num_tokens)), **filter_kwargs)
        if key is None:
            key = jax.random.key(0)  # unused by greedy decoding
        static = (
            seq_len,
            float(temperature),
            filter_fn,
            tuple(sorted(filter_kwargs.items())),
            eos_token,
            bool(cache_kv),
        )
        decode = self._compiled.get(static)
        if decode is None:
            decode = jax.jit(self._decode_fn(*static))
            self._compiled[static] = decode
        out = decode(variables, prompts, seq_start_pos, key, net_kwargs)
        return out[0] if unbatched else out

    def _pad_prompt_list(self, prompts: Any, prompt_lens: Any) -> tuple[Array, Array]:
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
        padded = np.full((len(rows), P), self.pad_value, np.int32)
        for i, row in enumerate(rows):
            padded[i, : row.size] = row
        return jnp.asarray(padded), np.asarray([row.size for row in rows])

    def _decode_fn(self, seq_len, temperature, filter_fn, filter_items, eos_token, cache_kv):
        """The decode program ``(variables, prompts, seq_start_pos, key, net_kwargs)
        -> [B, seq_len]``."""
        net, pad_value = self.net, self.pad_value
        filter_kwargs = dict(filter_items)

        def sample(logits, key, i):  # [B, V] -> [B]
            if temperature == 0:
                return jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logits = filter_fn(logits.astype(jnp.float32), **filter_kwargs) / temperature
            return jax.random.categorical(jax.random.fold_in(key, i), logits).astype(jnp.int32)

        def decode(variables, prompts, seq_start_pos, key, net_kwargs):
            B, P = prompts.shape
            # Left padding: keys before a row's start are hidden, positions count from it.
            net_kwargs = dict(net_kwargs, seq_start_pos=seq_start_pos)
            total = P + seq_len - 1  # positions ever fed to the model
            prompts = prompts.astype(jnp.int32)
            if cache_kv:
                cache = net.init_cache(B, total)
                logits, state = net.apply(variables, prompts, cache=cache, **net_kwargs)
            else:
                # A fixed-size token buffer; causality hides the slots not yet written.
                state = jnp.concatenate([prompts, jnp.zeros((B, seq_len - 1), jnp.int32)], 1)
                logits = net.apply(variables, prompts, **net_kwargs)
            first = sample(logits[:, -1], key, 0)
            out = jnp.full((B, seq_len), pad_value, jnp.int32).at[:, 0].set(first)
            done = jnp.zeros((B,), bool) if eos_token is None else first == eos_token

            def cond(carry):
                i, _, _, done = carry
                return (i < seq_len) & ~jnp.all(done)

            def body(carry):
                i, out, state, done = carry
                prev = out[:, i - 1]  # [B]
                if cache_kv:
                    logits, state = net.apply(variables, prev[:, None], cache=state, **net_kwargs)
                    logits = logits[:, -1]
                else:
                    state = jax.lax.dynamic_update_slice(state, prev[:, None], (0, P + i - 1))
                    logits = net.apply(variables, state, **net_kwargs)  # [B, total, V]
                    logits = jax.lax.dynamic_index_in_dim(logits, P + i - 1, 1, keepdims=False)
                token = sample(logits, key, i)
                out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
                if eos_token is not None:
                    done = done | (token == eos_token)
                return i + 1, out, state, done

            _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, state, done))
            if eos_token is not None:
                # Everything after a row's first EOS becomes padding.
                is_eos = out == eos_token
                after = jnp.cumsum(is_eos, axis=1) - is_eos > 0
                out = jnp.where(after, pad_value, out)
            return out

        return decode

"""``AutoregressiveWrapper``: next-token loss, compiled sampling and beam search for a
``TransformerWrapper``.

As x-transformers 2.31's ``AutoregressiveWrapper``: ``wrapper.apply(variables, x)`` is the
mean cross-entropy of ``logits[:, :-1]`` against ``x[:, 1:]`` (targets equal to
``ignore_index`` are skipped), optionally with the forgetful causal mask (2210.13432:
``mask_prob`` of the keys, never the first, are hidden from every query).
``wrapper.generate(variables, prompts, seq_len)`` samples ``seq_len`` tokens, optionally
by contrastive decoding against a smaller amateur model (2210.15097);
``wrapper.beam_search(variables, prompts, seq_len)`` keeps the ``beams`` most likely
continuations (Gumbel-perturbed candidates with ``temperature > 0``, 1903.06059).

Decoding is one compiled program: the prompt fills a fixed-size KV cache
(``TransformerWrapper.init_cache``), then a ``lax.while_loop`` decodes one token a step
(the loop stops early once every row has produced ``eos_token``). Without the cache each
step reruns the model over a fixed-size token buffer; causality makes the slots not yet
written invisible. A contrastive amateur decodes in the same loop with its own cache. Beam
search runs the ``B * beams`` beams as one batch and, when it reorders them, gathers every
cache leaf along its batch axis (found by comparing the state with that of one more row,
traced abstractly, so any cache pytree works). The jitted program is kept on the wrapper
per set of static options, and ``jax.jit`` keeps one executable per shape, so a second
call with the same shapes compiles nothing.

Sampling filters and the sampling step live in ``xtx.ops.sampling`` (re-exported here).
Differences from x-transformers: EOS is looked for among the generated tokens only
(x-transformers also stops on an EOS inside the prompt); the sequence is never cut to the
last ``max_seq_len`` tokens (a model with absolute positions raises instead); beam search
supports ``eos_token`` (a finished beam keeps its score and continues with ``pad_value``),
is stochastic exactly when ``temperature > 0`` (x-transformers: ``stochastic=True``), and
ranks the first step's beams by score, not by their perturbed logits.

Shapes: tokens ``[B, T]``, logits ``[B, T, V]``, prompts ``[B, P]``, output ``[B, seq_len]``,
beams ``[K, B, seq_len]`` with scores ``[K, B]`` (x-transformers' layout).
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
from xtx.ops.sampling import (
    FILTER_LOGITS_FNS,
    beam_candidates,
    check_range,
    contrastive_decode,
    decode_loop,
    min_p,
    resolve_filter,
    sample_tokens,
    select_beams,
    top_a,
    top_k,
    top_p,
)

Array = jax.Array

__all__ = [
    "FILTER_LOGITS_FNS",
    "AutoregressiveWrapper",
    "contrastive_decode",
    "min_p",
    "top_a",
    "top_k",
    "top_p",
]


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
        amateur: tuple[Any, dict[str, Any]] | None = None,
        contrastive_decode_kwargs: dict[str, float] | None = None,
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
            function ``[B, V] logits -> [B, V] logits``; not applied with ``amateur``.
          filter_kwargs: keywords of the filter (e.g. ``{"k": 5}``, ``{"thres": 0.9}``).
          eos_token: a row stops at this id; later positions hold ``pad_value``.
          cache_kv: decode with a KV cache (False: rerun the model over all tokens).
          amateur: ``(amateur_net, amateur_variables)`` for contrastive decoding: a causal
            ``TransformerWrapper`` (or an ``AutoregressiveWrapper``) with the same
            vocabulary, fed the same tokens; its logits replace the filter.
          contrastive_decode_kwargs: ``{"alpha": 0.1, "beta": 0.5}`` (the defaults), see
            ``xtx.ops.sampling.contrastive_decode``.
          **net_kwargs: arrays passed to the network (and the amateur) at every step
            (e.g. ``context``).

        Returns:
          ``[B, seq_len]`` int32 tokens (``[seq_len]`` for a 1-D prompt).
        """
        prompts, seq_start_pos, unbatched = self._prompts(prompts, prompt_lens)
        self._check_decoding(self.net, prompts.shape[1], seq_len, temperature, eos_token)
        filter_fn = resolve_filter(filter_logits_fn)
        filter_kwargs = dict(filter_kwargs or {})
        amateur_net, amateur_variables, cd_items = None, None, ()
        if amateur is not None:
            amateur_net, amateur_variables = self._amateur(amateur, prompts.shape[1], seq_len)
            cd_kwargs = dict(contrastive_decode_kwargs or {})
            # Raise on unknown keywords and bad ranges now, not inside the trace.
            contrastive_decode(jnp.zeros((1, 2)), jnp.zeros((1, 2)), **cd_kwargs)
            cd_items = tuple(sorted(cd_kwargs.items()))
            filter_fn, filter_kwargs = resolve_filter(None), {}
        elif contrastive_decode_kwargs is not None:
            raise ValueError("contrastive_decode_kwargs needs amateur=(net, variables)")
        key = self._key(key, temperature, filter_fn, filter_kwargs)
        static = (
            seq_len,
            float(temperature),
            filter_fn,
            tuple(sorted(filter_kwargs.items())),
            eos_token,
            amateur_net,
            cd_items,
            bool(cache_kv),
        )
        decode = self._program(static, self._decode_fn)
        out = decode(variables, amateur_variables, prompts, seq_start_pos, key, net_kwargs)
        return out[0] if unbatched else out

    def beam_search(
        self,
        variables: dict[str, Any],
        prompts: Array | list[Array],
        seq_len: int,
        *,
        prompt_lens: Array | None = None,
        beams: int = 4,
        return_beams_and_scores: bool = False,
        temperature: float = 0.0,
        filter_logits_fn: str | Callable[..., Array] | None = None,
        filter_kwargs: dict[str, Any] | None = None,
        eos_token: int | None = None,
        cache_kv: bool = True,
        key: Array | None = None,
        **net_kwargs: Any,
    ) -> Array | tuple[Array, Array]:
        """The ``beams`` most likely continuations of each prompt, in one compiled loop.

        A beam's score is the sum of the log-softmax of the tokens it chose. Each step,
        every beam proposes its ``beams`` best next tokens (with ``temperature > 0``: the
        best after ``filter_logits_fn``, division by the temperature and Gumbel noise, a
        draw without replacement) and the ``beams`` best extensions by score survive.

        Args:
          variables: the network's variables.
          prompts: ``[B, P]`` int tokens (or ``[P]`` for one prompt), or a list of 1-D
            prompts of different lengths.
          seq_len: number of tokens to generate (>= 1).
          prompt_lens: ``[B]`` lengths of prompts padded at the end (as ``generate``).
          beams: K, beams kept per prompt (at most the vocabulary size).
          return_beams_and_scores: also return every beam and its score.
          temperature: 0 is deterministic beam search; > 0 is stochastic.
          filter_logits_fn: filter applied before the Gumbel noise (stochastic only).
          filter_kwargs: keywords of the filter.
          eos_token: a beam that produces it is finished: its score stays, its later
            tokens are ``pad_value``; the loop stops when every beam is finished.
          cache_kv: decode with a KV cache (False: rerun the model over all tokens).
          key: PRNG key; required when ``temperature > 0``.
          **net_kwargs: arrays with a leading batch axis B passed to the network at every
            step (e.g. ``context``); they are repeated for each beam.

        Returns:
          ``[B, seq_len]`` int32, the best beam; with ``return_beams_and_scores`` the pair
          ``(beams [K, B, seq_len], scores [K, B])``, best first. A 1-D prompt drops B.
        """
        prompts, seq_start_pos, unbatched = self._prompts(prompts, prompt_lens)
        self._check_decoding(self.net, prompts.shape[1], seq_len, temperature, eos_token)
        V = self.net.config.logits_dim or self.net.config.num_tokens
        if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= V:
            raise ValueError(f"beams must be an int in [1, {V}] (the vocabulary), got {beams!r}")
        filter_fn = resolve_filter(filter_logits_fn)
        filter_kwargs = dict(filter_kwargs or {})
        key = self._key(key, temperature, filter_fn, filter_kwargs)
        static = (
            "beam_search",
            seq_len,
            beams,
            float(temperature),
            filter_fn,
            tuple(sorted(filter_kwargs.items())),
            eos_token,
            bool(cache_kv),
        )
        search = self._program(static, self._beam_fn)
        net_kwargs = dict(net_kwargs, seq_start_pos=seq_start_pos)
        out, scores = search(variables, prompts, key, net_kwargs)  # [B, K, n], [B, K]
        if unbatched:
            out, scores = out[0], scores[0]
        if not return_beams_and_scores:
            return out[..., 0, :]
        return jnp.moveaxis(out, -2, 0), jnp.moveaxis(scores, -1, 0)

    def _prompts(self, prompts: Any, prompt_lens: Any) -> tuple[Array, Array, bool]:
        """Checks prompts -> ``([B, P] int32 right-aligned, seq_start_pos [B], unbatched)``."""
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
        return prompts.astype(jnp.int32), seq_start_pos, unbatched

    @staticmethod
    def _check_decoding(net, P, seq_len, temperature, eos_token, name="network"):
        """Raises on a network that cannot decode ``P + seq_len - 1`` positions, or bad
        sampling options."""
        cfg = net.config
        if not cfg.attn_layers.causal:
            raise ValueError(f"decoding needs a causal {name} (attn_layers=Decoder(...))")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if cfg.has_abs_pos_emb and P + seq_len - 1 > cfg.max_seq_len:
            raise ValueError(
                f"prompts of length {P} plus seq_len={seq_len} need {P + seq_len - 1} "
                f"positions, more than max_seq_len={cfg.max_seq_len} of the absolute "
                f"positional embedding of the {name}"
            )
        check_range("temperature", temperature, 0.0, math.inf)
        if eos_token is not None and not (
            isinstance(eos_token, int) and 0 <= eos_token < cfg.num_tokens
        ):
            raise ValueError(
                f"eos_token must be a token id in [0, {cfg.num_tokens}), got {eos_token!r}"
            )

    def _amateur(self, amateur: Any, P: int, seq_len: int) -> tuple[TransformerWrapper, Any]:
        """Checks ``amateur=(net, variables)`` against the expert."""
        if not (isinstance(amateur, tuple | list) and len(amateur) == 2):
            raise TypeError(
                f"amateur must be a pair (amateur_net, amateur_variables), got {type(amateur)}"
            )
        net, amateur_variables = amateur
        if isinstance(net, AutoregressiveWrapper):
            net = net.net
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"amateur_net must be a TransformerWrapper, got {type(net).__name__}")
        self._check_decoding(net, P, seq_len, 0.0, None, name="amateur")
        vocab = self.net.config.logits_dim or self.net.config.num_tokens
        amateur_vocab = net.config.logits_dim or net.config.num_tokens
        if amateur_vocab != vocab:
            raise ValueError(
                f"the amateur must score the expert's {vocab} tokens, got {amateur_vocab}"
            )
        return net, amateur_variables

    def _key(self, key, temperature, filter_fn, filter_kwargs) -> Array:
        """The PRNG key, after checking that sampling has one and a valid filter."""
        if temperature == 0:
            return jax.random.key(0) if key is None else key  # unused by greedy decoding
        if key is None:
            raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(..)")
        # Raise on bad thresholds now, not inside the trace.
        filter_fn(jnp.zeros((1, self.net.config.num_tokens)), **filter_kwargs)
        return key

    def _program(self, static: tuple, build: Callable) -> Callable:
        """The jitted program for ``static`` options, built once per wrapper."""
        program = self._compiled.get(static)
        if program is None:
            program = jax.jit(build(*static))
            self._compiled[static] = program
        return program

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

    def _decode_fn(
        self, seq_len, temperature, filter_fn, filter_items, eos_token, amateur_net, cd_items,
        cache_kv,
    ):  # fmt: skip
        """The decode program ``(variables, amateur_variables, prompts, seq_start_pos, key,
        net_kwargs) -> [B, seq_len]``."""
        net, pad_value = self.net, self.pad_value
        filter_kwargs, cd_kwargs = dict(filter_items), dict(cd_items)

        def decode(variables, amateur_variables, prompts, seq_start_pos, key, net_kwargs):
            B, P = prompts.shape
            # Left padding: keys before a row's start are hidden, positions count from it.
            net_kwargs = dict(net_kwargs, seq_start_pos=seq_start_pos)
            total = P + seq_len - 1  # positions ever fed to the model
            models = [_Stepper(net, variables, net_kwargs, cache_kv, total)]
            if amateur_net is not None:
                models.append(_Stepper(amateur_net, amateur_variables, net_kwargs, cache_kv, total))

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

    def _beam_fn(
        self, _, seq_len, beams, temperature, filter_fn, filter_items, eos_token, cache_kv
    ):
        """The beam-search program ``(variables, prompts, key, net_kwargs) ->
        (tokens [B, K, seq_len], scores [B, K])``."""
        net, pad_value, K = self.net, self.pad_value, beams
        sampling = dict(
            temperature=temperature,
            filter_fn=filter_fn,
            filter_kwargs=dict(filter_items),
            pad_value=pad_value,
        )

        def search(variables, prompts, key, net_kwargs):
            B, P = prompts.shape
            total = P + seq_len - 1
            expert = _Stepper(net, variables, net_kwargs, cache_kv, total)
            logits, state = expert.prefill(prompts)  # [B, V]
            log_probs, candidates = beam_candidates(
                logits[:, None], jnp.zeros((B, 1), bool), jax.random.fold_in(key, 0), K,
                **sampling,
            )  # fmt: skip
            scores, _, tokens = select_beams(jnp.zeros((B, 1)), log_probs, candidates, K)
            # Every beam starts from its prompt's state: row b * K + k holds beam k of b.
            axes = expert.batch_axes(prompts, state)
            state = _take_rows(state, jnp.repeat(jnp.arange(B), K), axes)
            expert = _Stepper(net, variables, _repeat_rows(net_kwargs, K), cache_kv, total)
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
                state = _take_rows(state, rows, axes)
                out = jax.lax.dynamic_update_slice(out, tokens.reshape(-1, 1), (0, i))
                if eos_token is not None:
                    done = done | (out[:, i] == eos_token)
                return i + 1, out, state, scores, done

            carry = (jnp.int32(1), out, state, scores, done)
            _, out, _, scores, _ = jax.lax.while_loop(cond, body, carry)
            return out.reshape(B, K, seq_len), scores

        return search


class _Stepper:
    """One network decoding token by token, with a KV cache or a token buffer as state."""

    def __init__(self, net, variables, net_kwargs: dict, cache_kv: bool, total: int):
        self.net, self.variables, self.net_kwargs = net, variables, net_kwargs
        self.cache_kv, self.total = cache_kv, total  # total: positions ever fed

    def prefill(self, prompts: Array) -> tuple[Array, Any]:
        """``[B, P]`` prompts -> (logits of the next token ``[B, V]``, state)."""
        B, P = prompts.shape
        if self.cache_kv:
            cache = self.net.init_cache(B, self.total)
            logits, state = self.net.apply(self.variables, prompts, cache=cache, **self.net_kwargs)
        else:
            # A fixed-size token buffer; causality hides the slots not yet written.
            pad = jnp.zeros((B, self.total - P), jnp.int32)
            state = jnp.concatenate([prompts, pad], axis=1)
            logits = self.net.apply(self.variables, prompts, **self.net_kwargs)
        return logits[:, -1], state

    def step(self, state: Any, token: Array, pos: Array) -> tuple[Array, Any]:
        """Feeds ``[B]`` tokens at position ``pos`` -> (next-token logits ``[B, V]``, state)."""
        if self.cache_kv:
            logits, state = self.net.apply(
                self.variables, token[:, None], cache=state, **self.net_kwargs
            )
            return logits[:, -1], state
        state = jax.lax.dynamic_update_slice(state, token[:, None], (0, pos))
        logits = self.net.apply(self.variables, state, **self.net_kwargs)  # [B, total, V]
        return jax.lax.dynamic_index_in_dim(logits, pos, 1, keepdims=False), state

    def batch_axes(self, prompts: Array, state: Any) -> list[int | None]:
        """Per leaf of the ``state`` after ``prefill(prompts)``: the axis that grows with
        the batch, found by comparing with the state of one more row (traced abstractly),
        so any cache pytree works; None for leaves shared by all rows (the fill length)."""
        B = prompts.shape[0]

        def wider(a):
            return jax.ShapeDtypeStruct((B + 1, *jnp.shape(a)[1:]), jnp.result_type(a))

        def prefill(prompts, net_kwargs):
            stepper = _Stepper(self.net, self.variables, net_kwargs, self.cache_kv, self.total)
            return stepper.prefill(prompts)[1]

        grown = jax.eval_shape(prefill, wider(prompts), jax.tree.map(wider, self.net_kwargs))
        return [
            next((i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n), None)
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(grown), strict=True)
        ]


def _take_rows(state: Any, rows: Array, axes: list[int | None]) -> Any:
    """Gathers batch rows ``rows`` of every leaf along its batch axis (``axes``, one per
    leaf as ``_Stepper.batch_axes`` gives them)."""
    leaves, treedef = jax.tree.flatten(state)
    leaves = [
        leaf if a is None else jnp.take(leaf, rows, axis=a)
        for leaf, a in zip(leaves, axes, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _repeat_rows(tree: Any, times: int) -> Any:
    """Repeats every array's leading (batch) axis: row b becomes rows b * times .. + times-1."""
    return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), times, axis=0), tree)

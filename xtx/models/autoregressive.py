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

Decoding is one compiled program (a KV cache or a rerun over a fixed-size buffer, a
``lax.while_loop`` that stops once every row has produced ``eos_token``), built in
``xtx.models.decoding``. The jitted program is kept on the wrapper per set of static
options, and ``jax.jit`` keeps one executable per shape, so a second call with the same
shapes compiles nothing.

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

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xtx.models.decoding import beam_program, decode_program, prepare_prompts
from xtx.models.transformer_wrapper import TransformerWrapper
from xtx.models.wrapper_common import (
    check_count,
    check_eos_token,
    check_instance,
    compiled_program,
    sampling_key,
    sampling_options,
    training_tokens,
)
from xtx.ops.sampling import (
    FILTER_LOGITS_FNS,
    check_range,
    contrastive_decode,
    min_p,
    resolve_filter,
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
        check_instance("net", net, TransformerWrapper)
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
        x = training_tokens(x)
        B, T = x.shape
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
        prompts, seq_start_pos, unbatched = prepare_prompts(prompts, prompt_lens, self.pad_value)
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
        key = sampling_key(key, temperature, filter_fn, filter_kwargs, self.net.config.num_tokens)
        static = (
            *sampling_options(seq_len, temperature, filter_fn, filter_kwargs, eos_token),
            amateur_net,
            cd_items,
            bool(cache_kv),
        )
        build = functools.partial(decode_program, self.net, self.pad_value)
        decode = compiled_program(self._compiled, static, build)
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
        prompts, seq_start_pos, unbatched = prepare_prompts(prompts, prompt_lens, self.pad_value)
        self._check_decoding(self.net, prompts.shape[1], seq_len, temperature, eos_token)
        V = self.net.config.logits_dim or self.net.config.num_tokens
        if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= V:
            raise ValueError(f"beams must be an int in [1, {V}] (the vocabulary), got {beams!r}")
        filter_fn = resolve_filter(filter_logits_fn)
        filter_kwargs = dict(filter_kwargs or {})
        key = sampling_key(key, temperature, filter_fn, filter_kwargs, self.net.config.num_tokens)
        static = (
            "beam_search",
            beams,
            *sampling_options(seq_len, temperature, filter_fn, filter_kwargs, eos_token),
            bool(cache_kv),
        )
        build = functools.partial(beam_program, self.net, self.pad_value)
        search = compiled_program(self._compiled, static, build)
        net_kwargs = dict(net_kwargs, seq_start_pos=seq_start_pos)
        out, scores = search(variables, prompts, key, net_kwargs)  # [B, K, n], [B, K]
        if unbatched:
            out, scores = out[0], scores[0]
        if not return_beams_and_scores:
            return out[..., 0, :]
        return jnp.moveaxis(out, -2, 0), jnp.moveaxis(scores, -1, 0)

    @staticmethod
    def _check_decoding(net, P, seq_len, temperature, eos_token, name="network"):
        """Raises on a network that cannot decode ``P + seq_len - 1`` positions, or bad
        sampling options."""
        cfg = net.config
        if not cfg.attn_layers.causal:
            raise ValueError(f"decoding needs a causal {name} (attn_layers=Decoder(...))")
        check_count("seq_len", seq_len)
        if cfg.has_abs_pos_emb and P + seq_len - 1 > cfg.max_seq_len:
            raise ValueError(
                f"prompts of length {P} plus seq_len={seq_len} need {P + seq_len - 1} "
                f"positions, more than max_seq_len={cfg.max_seq_len} of the absolute "
                f"positional embedding of the {name}"
            )
        check_range("temperature", temperature, 0.0, math.inf)
        check_eos_token(eos_token, cfg.num_tokens)

    def _amateur(self, amateur: Any, P: int, seq_len: int) -> tuple[TransformerWrapper, Any]:
        """Checks ``amateur=(net, variables)`` against the expert."""
        if not (isinstance(amateur, tuple | list) and len(amateur) == 2):
            raise TypeError(
                f"amateur must be a pair (amateur_net, amateur_variables), got {type(amateur)}"
            )
        net, amateur_variables = amateur
        if isinstance(net, AutoregressiveWrapper):
            net = net.net
        check_instance("amateur_net", net, TransformerWrapper)
        self._check_decoding(net, P, seq_len, 0.0, None, name="amateur")
        vocab = self.net.config.logits_dim or self.net.config.num_tokens
        amateur_vocab = net.config.logits_dim or net.config.num_tokens
        if amateur_vocab != vocab:
            raise ValueError(
                f"the amateur must score the expert's {vocab} tokens, got {amateur_vocab}"
            )
        return net, amateur_variables

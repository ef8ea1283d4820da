"""``NonAutoregressiveWrapper``: masked-token training and MaskGIT sampling.

As x-transformers 2.31's ``NonAutoregressiveWrapper`` (Mask-Predict 1904.09324, MaskGIT
2202.04200) around a bidirectional ``TransformerWrapper``. Training: each row draws a time
``t ~ U(0, 1)`` and hides ``max(schedule(t) * N, 1)`` random positions; of those, one
batch in two keeps ``no_replace_prob`` of them unchanged and one in two swaps
``random_token_prob`` for random tokens (BERT's recipe), the rest become ``mask_id``.
The loss is the cross-entropy at the hidden positions, weighted by x-transformers'
``schedule'(t) / (1 - schedule(t))`` when ``use_simple_mdlm_loss_weight`` (2406.07524).
Note: that weight is negative for the decreasing schedules ("linear": ``-1 / t``), so
the default loss is negative, as in x-transformers 2.31.10; pass
``use_simple_mdlm_loss_weight=False`` for the plain mean cross-entropy.

Self-conditioning adds ``to_self_cond(e)`` to the token embeddings, ``e`` being the
network's own final hiddens from a first pass (``null_embed`` without one). A token critic
(Nijkamp et al. 2021) is a second ``TransformerWrapper`` with one logit per position, or
(``self_token_critic``) a linear head on the generator's hiddens; it learns to spot the
tokens that differ from the data.

``generate`` is MaskGIT's iterative unmasking, ``steps`` rounds in one compiled
``lax.fori_loop``: sample every hidden position (top-k filter, Gumbel noise with an
annealed temperature), then hide again the ``schedule(t_i) * N`` least confident ones.
The masking itself, for training and sampling, is ``xtx.models.nonautoregressive_masking``.
The network may sample ``mask_id`` itself when it has a logit for it, as in
x-transformers; give it ``logits_dim = num_tokens - 1`` and ``mask_id = num_tokens - 1``
to rule that out.

Variables: ``{"params": {"net": ..., "null_embed": [E], "to_self_cond": {"kernel":
[E, E]}, "token_critic": ..., "critic_head": {"kernel": [D, 1], "bias": [1]}}}`` (the
entries of the options in use), the layout a Linen module with these submodules has.

Shapes: tokens ``[B, N]``, logits ``[B, N, V]``, embeddings ``[B, N, E]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xtx.layers.embedding import TokenEmbedding
from xtx.models.nonautoregressive_masking import (
    MaskingNoise,
    corrupt,
    draw_noise,
    gumbel_from_uniform,
    prepare_unmasking,
    resolve_schedule,
    unmasking_program,
)
from xtx.models.transformer_wrapper import TransformerWrapper
from xtx.models.wrapper_common import check_count, check_instance, check_prob, compiled_program

Array = jax.Array

__all__ = [
    "MaskingNoise",
    "NonAutoregressiveLosses",
    "NonAutoregressiveWrapper",
    "gumbel_from_uniform",
]


class NonAutoregressiveLosses(NamedTuple):
    """``loss`` (to minimise), ``generator_loss`` and ``critic_loss`` (None without a
    critic or with ``only_train_generator``), as x-transformers' ``Losses``."""

    loss: Array
    generator_loss: Array | None
    critic_loss: Array | None


def _add_to_token_embeddings(sum_embeds: Array):
    """Context in which every ``TokenEmbedding`` call returns ``embedding + sum_embeds``.

    x-transformers adds ``sum_embeds`` to ``token + position`` embeddings before the
    post-embedding norm; ``TransformerWrapper`` has no such argument, and adding to the
    token embedding is the same sum (l2-normalised embeddings are refused for this).
    """

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, TokenEmbedding) and context.method_name == "__call__":
            out = out + sum_embeds.astype(out.dtype)
        return out

    return nn.intercept_methods(interceptor)


class NonAutoregressiveWrapper:
    """Masked-token loss and MaskGIT sampling around a ``TransformerWrapper``.

    Attributes (x-transformers' keywords):
      net: the generator, a ``TransformerWrapper`` (usually an ``Encoder`` stack).
      mask_id: the token id of a hidden position (an id of ``net``'s vocabulary).
      steps: unmasking rounds of ``generate``.
      self_cond: condition on the network's previous hiddens.
      self_cond_train_prob: how often training conditions on a first pass.
      no_replace_prob: fraction of the hidden positions that keep their token.
      random_token_prob: fraction that get a random token.
      schedule: ``"linear"`` (``1 - t``), ``"cosine"`` or a jax function of ``t`` giving
        the masked fraction (differentiable when ``use_simple_mdlm_loss_weight``).
      can_mask_prev_unmasked: let ``generate`` hide again tokens it already revealed.
      token_critic: a ``TransformerWrapper`` with one logit per position (``logits_dim=1``).
      self_token_critic: a linear critic head on ``net``'s own hiddens instead.
      critic_loss_weight: weight of the critic loss in ``loss``.
      use_simple_mdlm_loss_weight: weight the loss by ``schedule'(t) / (1 - schedule(t))``.
    """

    def __init__(
        self,
        net: TransformerWrapper,
        *,
        mask_id: int,
        steps: int = 18,
        self_cond: bool = False,
        self_cond_train_prob: float = 0.75,
        no_replace_prob: float = 0.15,
        random_token_prob: float = 0.1,
        schedule: str | Callable[[Array], Array] = "linear",
        can_mask_prev_unmasked: bool = False,
        token_critic: TransformerWrapper | None = None,
        self_token_critic: bool = False,
        critic_loss_weight: float = 1.0,
        use_simple_mdlm_loss_weight: bool = True,
    ):
        check_instance("net", net, TransformerWrapper)
        cfg = net.config
        if cfg.return_only_embed:
            raise ValueError("net must produce logits, got return_only_embed=True")
        if isinstance(mask_id, bool) or not isinstance(mask_id, int | np.integer):
            raise TypeError(f"mask_id must be an int, got {mask_id!r}")
        if not 0 <= mask_id < cfg.num_tokens:
            raise ValueError(f"mask_id must be a token id in [0, {cfg.num_tokens}), got {mask_id}")
        check_count("steps", steps)
        for name, value in (
            ("self_cond_train_prob", self_cond_train_prob),
            ("no_replace_prob", no_replace_prob),
            ("random_token_prob", random_token_prob),
        ):
            check_prob(name, value)
        schedule_fn = resolve_schedule(schedule)
        if self_cond and cfg.embed_dim != cfg.dim:
            raise ValueError(
                f"self_cond feeds the hiddens (dim={cfg.dim}) back as embeddings, so it needs "
                f"emb_dim == dim, got emb_dim={cfg.embed_dim}"
            )
        if self_cond and cfg.l2norm_embed:
            raise ValueError("self_cond is not supported with l2norm_embed=True")
        if token_critic is not None:
            if self_token_critic:
                raise ValueError("pass either token_critic or self_token_critic=True, not both")
            check_instance("token_critic", token_critic, TransformerWrapper)
            if (token_critic.config.logits_dim or token_critic.config.num_tokens) != 1:
                raise ValueError(
                    "token_critic must output one logit per position (logits_dim=1), got "
                    f"{token_critic.config.logits_dim or token_critic.config.num_tokens}"
                )
        if isinstance(critic_loss_weight, bool) or not isinstance(critic_loss_weight, int | float):
            raise TypeError(f"critic_loss_weight must be a number, got {critic_loss_weight!r}")
        self.net = net
        self.mask_id = int(mask_id)
        self.steps = steps
        self.self_cond = bool(self_cond)
        self.self_cond_train_prob = self_cond_train_prob
        self.no_replace_prob = no_replace_prob
        self.random_token_prob = random_token_prob
        self.schedule = schedule
        self.schedule_fn = schedule_fn
        self.can_mask_prev_unmasked = bool(can_mask_prev_unmasked)
        self.token_critic = token_critic
        self.self_token_critic = bool(self_token_critic)
        self.critic_loss_weight = float(critic_loss_weight)
        self.use_simple_mdlm_loss_weight = bool(use_simple_mdlm_loss_weight)
        self.num_tokens = cfg.num_tokens
        self.max_seq_len = cfg.max_seq_len
        self._compiled: dict[tuple, Callable] = {}

    @property
    def has_critic(self) -> bool:
        return self.token_critic is not None or self.self_token_critic

    def init(self, rngs: Array | dict[str, Array], x: Array, **net_kwargs: Any) -> dict:
        """The wrapper's variables (see the module docstring), initialised on ``x`` ``[B, N]``."""
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        k_net, k_null, k_cond, k_critic, k_head, k_bias = jax.random.split(key, 6)
        x = jnp.asarray(x)
        params: dict[str, Any] = {"net": self.net.init(k_net, x, **net_kwargs)["params"]}
        E, D = self.net.config.embed_dim, self.net.config.dim
        if self.self_cond:
            params["null_embed"] = jax.random.normal(k_null, (E,))
            bound = E**-0.5  # torch.nn.Linear's init
            params["to_self_cond"] = {
                "kernel": jax.random.uniform(k_cond, (E, E), minval=-bound, maxval=bound)
            }
        if self.token_critic is not None:
            params["token_critic"] = self.token_critic.init(k_critic, x)["params"]
        if self.self_token_critic:
            bound = D**-0.5
            params["critic_head"] = {
                "kernel": jax.random.uniform(k_head, (D, 1), minval=-bound, maxval=bound),
                "bias": jax.random.uniform(k_bias, (1,), minval=-bound, maxval=bound),
            }
        return {"params": params}

    # -- training ------------------------------------------------------------------------

    def sample_noise(self, key: Array, batch_size: int, seq_len: int) -> MaskingNoise:
        """Draws the randomness of one training step on ``[batch_size, seq_len]`` tokens
        from ``key``."""
        return draw_noise(self, key, batch_size, seq_len)

    def apply(
        self,
        variables: dict[str, Any],
        x: Array,
        *,
        rngs: dict[str, Array] | None = None,
        only_train_generator: bool = False,
        only_train_critic: bool = False,
        generator_sample_temperature: float | None = None,
        deterministic: bool = True,
        **net_kwargs: Any,
    ) -> NonAutoregressiveLosses:
        """The losses of x-transformers' wrapper on tokens ``x`` ``[B, N]``.

        Args:
          variables: the wrapper's variables.
          x: ``[B, N]`` int tokens.
          rngs: ``{"mask": key}`` for the masking (``sample_noise``), and
            ``{"dropout": key}`` when ``deterministic=False``.
          only_train_generator: skip the critic.
          only_train_critic: no gradient into the generator; ``loss`` is the critic loss.
          generator_sample_temperature: temperature of the samples shown to the critic
            (default: drawn from U(0, 1) each step, as x-transformers).
          deterministic: disable dropout.
          **net_kwargs: passed on to the generator (e.g. ``mask``).

        Returns:
          ``NonAutoregressiveLosses``; scalars in float32.
        """
        x = self._check_tokens(x)
        rngs = dict(rngs or {})
        if "mask" not in rngs:
            raise ValueError("apply draws the masked positions: pass rngs={'mask': key}")
        noise = self.sample_noise(rngs.pop("mask"), *x.shape)
        return self.loss_from_noise(
            variables,
            x,
            noise,
            only_train_generator=only_train_generator,
            only_train_critic=only_train_critic,
            generator_sample_temperature=generator_sample_temperature,
            dropout_key=rngs.get("dropout"),
            deterministic=deterministic,
            **net_kwargs,
        )

    def loss_from_noise(
        self,
        variables: dict[str, Any],
        x: Array,
        noise: MaskingNoise,
        *,
        only_train_generator: bool = False,
        only_train_critic: bool = False,
        generator_sample_temperature: float | None = None,
        dropout_key: Array | None = None,
        deterministic: bool = True,
        **net_kwargs: Any,
    ) -> NonAutoregressiveLosses:
        """``apply`` with its randomness given: the same losses for the same ``noise``."""
        x = self._check_tokens(x)
        params = variables["params"]
        B, N = x.shape
        if only_train_critic and only_train_generator:
            raise ValueError("only_train_generator and only_train_critic exclude each other")
        if not deterministic and dropout_key is None:
            raise ValueError("deterministic=False samples dropout: pass rngs={'dropout': key}")
        dropout_keys = list(jax.random.split(dropout_key, 3)) if dropout_key is not None else []
        run_kwargs = dict(net_kwargs, deterministic=deterministic)

        def run(module, p, tokens, **kwargs):
            rngs = {"dropout": dropout_keys.pop()} if dropout_keys else None
            return module.apply({"params": p}, tokens, rngs=rngs, **kwargs)

        masked, mask = corrupt(self, x, noise)  # mask: the positions scored by the loss
        embeds = None
        if self.self_cond:
            null = params["null_embed"]  # [E]

            def first_pass():
                embeds = run(self.net, params["net"], masked, return_embeddings=True, **run_kwargs)
                return jax.lax.stop_gradient(embeds).astype(null.dtype)  # [B, N, E]

            embeds = jax.lax.cond(
                noise.self_cond, first_pass, lambda: jnp.broadcast_to(null, (B, N, null.shape[0]))
            )
        logits = self._generator(params, masked, embeds, run, **run_kwargs)  # [B, N, V]
        if only_train_critic:
            logits = jax.lax.stop_gradient(logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), x)
        if self.use_simple_mdlm_loss_weight:
            value, grad = jax.vmap(jax.value_and_grad(self.schedule_fn))(noise.times)
            ce = ce * (grad / (1.0 - value))[:, None]  # [B, N] * [B, 1]
        loss = jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.sum(mask)
        if not self.has_critic or only_train_generator:
            return NonAutoregressiveLosses(loss, loss, None)
        if noise.gumbel is None:
            raise ValueError("the critic's samples need noise.gumbel [B, N, V], got None")

        temperature = generator_sample_temperature
        if temperature is None:
            temperature = noise.sample_temperature
        scaled = jax.lax.stop_gradient(logits) / jnp.maximum(temperature, 1e-10)
        sampled = jnp.argmax(scaled + noise.gumbel, axis=-1).astype(x.dtype)  # [B, N]
        generated = jnp.where(mask, sampled, x)
        critic_logits = self._critic_scores(params, generated, run)  # [B, N]
        labels = (sampled != x).astype(jnp.float32)
        critic_loss = jnp.mean(optax.sigmoid_binary_cross_entropy(critic_logits, labels))
        if only_train_critic:
            return NonAutoregressiveLosses(critic_loss, None, critic_loss)
        return NonAutoregressiveLosses(
            loss + critic_loss * self.critic_loss_weight, loss, critic_loss
        )

    def _generator(
        self, params: dict, tokens: Array, self_cond_embeds: Array | None, run: Callable, **kwargs
    ) -> Any:
        """The generator's output on ``tokens`` ``[B, N]``; with ``self_cond``, conditioned
        on ``self_cond_embeds`` ``[B, N, E]`` (its earlier hiddens, or ``null_embed``)."""
        if not self.self_cond:
            return run(self.net, params["net"], tokens, **kwargs)
        with _add_to_token_embeddings(self_cond_embeds @ params["to_self_cond"]["kernel"]):
            return run(self.net, params["net"], tokens, **kwargs)

    def _critic_scores(self, params: dict, tokens: Array, run: Callable) -> Array:
        """The critic's logit per position ``[B, N]`` (high: likely not from the data)."""
        if self.token_critic is not None:
            scores = run(self.token_critic, params["token_critic"], tokens)  # [B, N, 1]
        else:
            head = params["critic_head"]
            embeds = run(self.net, params["net"], tokens, return_embeddings=True)  # [B, N, D]
            scores = embeds @ head["kernel"] + head["bias"]
        return scores[..., 0].astype(jnp.float32)

    # -- sampling ------------------------------------------------------------------------

    def generate(
        self,
        variables: dict[str, Any],
        *,
        key: Array,
        batch_size: int | None = None,
        seq_len: int | None = None,
        start_temperature: float = 1.0,
        filter_thres: float | None = 0.7,
        noise_level_scale: float = 1.0,
        **net_kwargs: Any,
    ) -> Array:
        """MaskGIT sampling: ``steps`` rounds of unmasking, in one compiled loop.

        Round i (of S = ``steps``) samples every hidden position from the top-k filtered
        logits with Gumbel noise at temperature ``max(start_temperature * (S-1-i) / S,
        1e-3)``, then hides again the ``int(schedule((i+1) / S) * N)`` positions with the
        highest score: ``1 - p(sampled token)``, or the critic's logit plus Gumbel noise
        scaled by ``noise_level_scale * (S-1-i) / S``.

        Randomness: round i takes ``jax.random.split(key, S)[i]`` and splits it in two,
        the first for the tokens' uniforms ``[B, N, V]``, the second for the critic's
        ``[B, N]``; Gumbel noise is ``gumbel_from_uniform`` of them.

        Args:
          variables: the wrapper's variables.
          key: PRNG key.
          batch_size: B; None samples one sequence and returns ``[N]``.
          seq_len: N (default: the network's ``max_seq_len``, as x-transformers).
          start_temperature: temperature of the first round, annealed to 0.
          filter_thres: keep the ``ceil((1 - filter_thres) * V)`` largest logits; None
            keeps all.
          noise_level_scale: scale of the noise added to the critic's scores.
          **net_kwargs: arrays passed to the generator every round (e.g. ``context``).

        Returns:
          ``[B, N]`` int32 tokens (``[N]`` when ``batch_size`` is None).
        """
        static, tables = prepare_unmasking(
            self, batch_size, seq_len, start_temperature, filter_thres, noise_level_scale
        )
        build = functools.partial(unmasking_program, self)
        out = compiled_program(self._compiled, static, build)(variables, key, *tables, net_kwargs)
        return out[0] if batch_size is None else out

    def _check_tokens(self, x: Any) -> Array:
        x = jnp.asarray(x)
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"x must be int tokens [B, N], got {x.dtype} {x.shape}")
        return x

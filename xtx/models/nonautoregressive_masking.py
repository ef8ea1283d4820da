"""The masking process of ``NonAutoregressiveWrapper``: how training hides tokens and how
MaskGIT sampling reveals them again.

Training (Mask-Predict 1904.09324, as x-transformers 2.31): ``draw_noise`` draws every
random number of one step (a ``MaskingNoise``), and ``corrupt`` turns them into the
network's input: each row hides ``max(schedule(t) * N, 1)`` random positions; of those,
one batch in two keeps ``no_replace_prob`` of them unchanged and one in two swaps
``random_token_prob`` for random tokens (BERT's recipe), the rest become ``mask_id``.

Sampling (MaskGIT 2202.04200): ``unmasking_program`` runs ``steps`` rounds in one compiled
``lax.fori_loop``: sample every hidden position (top-k filter, Gumbel noise with an
annealed temperature), then hide again the ``schedule(t_i) * N`` least confident ones;
``prepare_unmasking`` checks the options and computes the per-round counts, temperatures
and noise scales once, outside the trace, so that new temperatures reuse the compiled
program.

The functions take the wrapper whose options (``schedule_fn``, ``mask_id``, the
probabilities, ``steps``) they follow and whose generator and critic they run.

Shapes: tokens ``[B, N]``, logits ``[B, N, V]``, per-round tables ``[S]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xtx.models.wrapper_common import check_count, check_prob
from xtx.ops.sampling import top_k

if TYPE_CHECKING:
    from xtx.models.nonautoregressive import NonAutoregressiveWrapper

Array = jax.Array

SCHEDULES: dict[str, Callable[[Array], Array]] = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: jnp.cos(t * jnp.pi / 2),  # 2202.04200
}


def resolve_schedule(schedule: Any) -> Callable[[Array], Array]:
    """``"linear"``, ``"cosine"`` or a callable -> the masked fraction as a function of t."""
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {sorted(SCHEDULES)} or a callable, got {schedule!r}"
            )
        return SCHEDULES[schedule]
    if callable(schedule):
        return schedule
    raise TypeError(f"schedule must be a name or a callable, got {schedule!r}")


class MaskingNoise(NamedTuple):
    """Every random draw of one training step (``NonAutoregressiveWrapper.sample_noise``).

    Attributes:
      times: ``[B]`` in [0, 1): each row's time, ``schedule(t)`` its masked fraction.
      mask_order: ``[B, N]`` uniform: its argsort is the row's random permutation.
      no_replace: bool ``[]``: this batch keeps ``no_replace_prob`` of the masked tokens.
      no_replace_order: ``[B, N]`` uniform ranking the tokens kept.
      random_token: bool ``[]``: this batch swaps ``random_token_prob`` for random tokens.
      random_token_order: ``[B, N]`` uniform ranking the tokens swapped.
      random_tokens: ``[B, N]`` int in ``[0, num_tokens)``.
      self_cond: bool ``[]``: condition on a first pass (else on ``null_embed``).
      sample_temperature: ``[]`` in [0, 1): the critic's sampling temperature.
      gumbel: ``[B, N, V]`` Gumbel noise for the critic's samples, or None.
    """

    times: Array
    mask_order: Array
    no_replace: Array
    no_replace_order: Array
    random_token: Array
    random_token_order: Array
    random_tokens: Array
    self_cond: Array
    sample_temperature: Array
    gumbel: Array | None


def gumbel_from_uniform(u: Array) -> Array:
    """x-transformers' Gumbel noise ``-log(-log(u + 1e-10) + 1e-10)``."""
    return -jnp.log(-jnp.log(u + 1e-10) + 1e-10)


def draw_noise(wrapper: NonAutoregressiveWrapper, key: Array, B: int, N: int) -> MaskingNoise:
    """Draws the randomness of one training step on ``[B, N]`` tokens from ``key``."""
    keys = jax.random.split(key, 9)
    uniform = lambda k, shape=(B, N): jax.random.uniform(k, shape)  # noqa: E731
    gumbel = None
    if wrapper.has_critic:
        V = wrapper.net.config.logits_dim or wrapper.num_tokens
        gumbel = gumbel_from_uniform(uniform(keys[8], (B, N, V)))
    return MaskingNoise(
        times=uniform(keys[0], (B,)),
        mask_order=uniform(keys[1]),
        no_replace=jax.random.bernoulli(keys[2]),
        no_replace_order=uniform(keys[3]),
        random_token=jax.random.bernoulli(keys[4]),
        random_token_order=uniform(keys[5]),
        random_tokens=jax.random.randint(keys[6], (B, N), 0, wrapper.num_tokens),
        self_cond=jax.random.bernoulli(keys[7], wrapper.self_cond_train_prob),
        sample_temperature=uniform(jax.random.fold_in(keys[7], 1), ()),
        gumbel=gumbel,
    )


def _mask_subset(mask: Array, prob: Array, order: Array) -> Array:
    """``prob`` of each row's True positions of ``mask`` ``[B, N]`` (rounded up), picked in
    the order of ``order``: x-transformers' ``get_mask_subset_prob``."""
    num_to_mask = jnp.sum(mask, axis=-1, keepdims=True) * prob  # [B, 1]
    ranks = jnp.argsort(jnp.argsort(jnp.where(mask, order, -1.0), axis=-1), axis=-1)
    # Positions outside the mask rank first (-1); count the ranks after them.
    ranks = ranks - jnp.sum(~mask, axis=-1, keepdims=True)
    return (ranks < num_to_mask) & mask


def corrupt(
    wrapper: NonAutoregressiveWrapper, x: Array, noise: MaskingNoise
) -> tuple[Array, Array]:
    """Tokens ``x`` ``[B, N]`` -> (the network's input ``[B, N]``, bool ``[B, N]``: the
    hidden positions, which the loss scores)."""
    N = x.shape[1]
    rand_probs = wrapper.schedule_fn(noise.times)  # [B]
    num_tokens_mask = jnp.maximum(rand_probs * N, 1.0)
    order = jnp.argsort(noise.mask_order, axis=-1).astype(jnp.float32)  # [B, N]
    mask = order < num_tokens_mask[:, None]  # [B, N]
    replace = mask
    random_prob = wrapper.random_token_prob
    if wrapper.no_replace_prob > 0:
        kept = _mask_subset(mask, wrapper.no_replace_prob, noise.no_replace_order)
        replace = replace & ~(kept & noise.no_replace)
        # Python floats, as x-transformers computes them, then float32.
        random_prob = jnp.where(
            noise.no_replace,
            np.float32(wrapper.random_token_prob * (1.0 - wrapper.no_replace_prob)),
            np.float32(wrapper.random_token_prob),
        )
    if wrapper.random_token_prob > 0:
        swapped = _mask_subset(replace, random_prob, noise.random_token_order)
        swapped = swapped & noise.random_token
        x_in = jnp.where(swapped, noise.random_tokens.astype(x.dtype), x)
        replace = replace & ~swapped
    else:
        x_in = x
    return jnp.where(replace, wrapper.mask_id, x_in), mask


def prepare_unmasking(
    wrapper: NonAutoregressiveWrapper,
    batch_size: Any,
    seq_len: Any,
    start_temperature: Any,
    filter_thres: Any,
    noise_level_scale: Any,
) -> tuple[tuple[int, int, int | None], tuple[np.ndarray, ...]]:
    """Checks the options of ``NonAutoregressiveWrapper.generate`` -> (the static options
    ``(B, N, k)``, k the top-k filter's size or None; the per-round tables).

    The tables, for S = ``steps`` rounds, computed as x-transformers does (float32 times,
    Python floats): the positions hidden again after round i, ``int(schedule((i+1) / S) *
    N)`` (int32); the temperature ``max(start_temperature * (S-1-i) / S, 1e-3)`` and the
    critic's noise scale ``noise_level_scale * (S-1-i) / S`` (float32).
    """
    B = 1 if batch_size is None else batch_size
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    cfg = wrapper.net.config
    N = cfg.max_seq_len if seq_len is None else seq_len
    check_count("seq_len", N)
    if cfg.has_abs_pos_emb and N > cfg.max_seq_len:
        raise ValueError(
            f"seq_len must be <= max_seq_len = {cfg.max_seq_len} of the absolute "
            f"positional embedding, got {N}"
        )
    for name, value in (
        ("start_temperature", start_temperature),
        ("noise_level_scale", noise_level_scale),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    V = cfg.logits_dim or cfg.num_tokens
    k = None
    if filter_thres is not None:
        check_prob("filter_thres", filter_thres)
        k = math.ceil((1 - filter_thres) * V)
    S = wrapper.steps
    times = np.linspace(0.0, 1.0, S + 1, dtype=np.float32)[1:]
    with jax.ensure_compile_time_eval():  # concrete even when traced from outside
        counts = np.asarray(wrapper.schedule_fn(jnp.asarray(times)) * N).astype(np.int32)
    if counts.shape != (S,) or (counts < 0).any() or (counts > N).any():
        raise ValueError(
            f"schedule must map times in [0, 1] to fractions in [0, 1], got counts "
            f"{counts.tolist()} of N = {N} positions"
        )
    anneal = [(S - 1 - i) / S for i in range(S)]
    temperatures = np.asarray([max(start_temperature * a, 1e-3) for a in anneal], np.float32)
    noise_scales = np.asarray([noise_level_scale * a for a in anneal], np.float32)
    return (B, N, k), (counts, temperatures, noise_scales)


def unmasking_program(wrapper: NonAutoregressiveWrapper, B: int, N: int, k: int | None) -> Callable:
    """The sampling program ``(variables, key, counts [S], temperatures [S],
    noise_scales [S], net_kwargs) -> [B, N]``; ``k``: the top-k filter (None: none)."""
    mask_id, steps = wrapper.mask_id, wrapper.steps

    def run(module, p, tokens, **kwargs):
        return module.apply({"params": p}, tokens, **kwargs)

    def program(variables, key, counts, temperatures, noise_scales, net_kwargs):
        params = variables["params"]
        step_keys = jax.random.split(key, steps)

        def round_(i, carry):
            seq, mask, last_embeds = carry
            k_tokens, k_critic = jax.random.split(step_keys[i])
            if wrapper.self_cond:
                logits, embeds = wrapper._generator(
                    params, seq, last_embeds, run, return_logits_and_embeddings=True, **net_kwargs
                )
                last_embeds = embeds.astype(last_embeds.dtype)
            else:
                logits = wrapper._generator(params, seq, None, run, **net_kwargs)  # [B, N, V]
            logits = logits.astype(jnp.float32)
            if k is not None:
                logits = top_k(logits, k=k)
            gumbel = gumbel_from_uniform(jax.random.uniform(k_tokens, logits.shape))
            sampled = jnp.argmax(logits / temperatures[i] + gumbel, axis=-1).astype(jnp.int32)
            seq = jnp.where(mask, sampled, seq)
            if wrapper.has_critic:
                scores = wrapper._critic_scores(params, seq, run)  # [B, N]
                noise = gumbel_from_uniform(jax.random.uniform(k_critic, (B, N)))
                scores = scores + noise * noise_scales[i]
            else:
                probs = jax.nn.softmax(logits, axis=-1)
                scores = 1.0 - jnp.take_along_axis(probs, sampled[..., None], -1)[..., 0]
            if not wrapper.can_mask_prev_unmasked:
                scores = jnp.where(mask, scores, -jnp.finfo(scores.dtype).max)
            # Hide again the counts[i] highest scores (x-transformers' topk).
            ranks = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
            mask = ranks < counts[i]
            return jnp.where(mask, mask_id, seq), mask, last_embeds

        seq = jnp.full((B, N), mask_id, jnp.int32)
        mask = jnp.ones((B, N), bool)
        last_embeds = None
        if wrapper.self_cond:
            null = params["null_embed"]
            last_embeds = jnp.broadcast_to(null, (B, N, null.shape[0]))
        seq, _, _ = jax.lax.fori_loop(0, steps, round_, (seq, mask, last_embeds))
        return seq

    return program

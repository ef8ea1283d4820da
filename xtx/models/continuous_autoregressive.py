"""``ContinuousAutoregressiveWrapper``: next-frame loss and rollout for continuous sequences.

As x-transformers 2.31's ``ContinuousAutoregressiveWrapper`` around a causal
``ContinuousTransformerWrapper``: ``wrapper.apply(variables, x)`` runs the network on
``x[:, :-1]`` and scores its output against ``x[:, 1:]`` with an elementwise loss (mean
squared error, L1, or the Gaussian negative log-likelihood of a ``probabilistic``
network), averaged over the frames the mask keeps, or per sequence first with
``equal_loss_weight_batch``. ``wrapper.generate(variables, start_tokens, seq_len)``
feeds each predicted frame (a sample of the Gaussian when probabilistic) back in, as one
compiled ``lax.fori_loop`` over a KV cache, or over a fixed-size frame buffer with
``cache_kv=False`` (causality hides the frames not yet written).

Left out: x-transformers' ``rollout_steps > 1`` training (``forward_rollout``): in
2.31.10 it reads an undefined ``inp`` when ``lens`` is given, drops the context after its
first step (the cache it builds is never fed back) and selects rows with data-dependent
shapes. Differences in ``generate``: the sequence is never cut to the last
``max_seq_len`` frames (a model with absolute positions raises instead), and a network
that cannot cache raises rather than silently running uncached.

Shapes: frames ``[B, T, D]``, mask ``[B, T]``, prompts ``[B, P, D]``, output
``[B, seq_len, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xtx.models.continuous import ContinuousTransformerWrapper
from xtx.models.decoding import Stepper
from xtx.models.wrapper_common import check_count, check_instance, compiled_program

Array = jax.Array

__all__ = ["CONTINUOUS_LOSSES", "ContinuousAutoregressiveWrapper", "gaussian_nll"]


def gaussian_nll(pred: Array, target: Array, eps: float = 1e-6) -> Array:
    """``torch.nn.functional.gaussian_nll_loss(reduction='none')``: ``0.5 * (log v +
    (mean - target)**2 / v)`` with ``pred = stack(mean, v)`` ``[2, ...]`` and ``v`` clamped
    to ``eps`` in value only (the gradient passes as if unclamped, as in torch)."""
    mean, var = pred[0], pred[1]
    var = var + jax.lax.stop_gradient(jnp.maximum(var, eps) - var)
    return 0.5 * (jnp.log(var) + (mean - target) ** 2 / var)


CONTINUOUS_LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "mse": lambda pred, target: (pred - target) ** 2,
    "l1": lambda pred, target: jnp.abs(pred - target),
    "gaussian_nll": gaussian_nll,
}


class ContinuousAutoregressiveWrapper:
    """Next-frame training loss and generation around a ``ContinuousTransformerWrapper``.

    The variables are the network's: ``wrapper.init(key, x)`` equals ``net.init(key, x)``.

    Attributes (x-transformers' keywords):
      net: the causal ``ContinuousTransformerWrapper``.
      loss_fn: ``"mse"``, ``"l1"``, ``"gaussian_nll"`` or an elementwise function
        ``(pred, target) -> loss`` (pred ``[2, B, T, D]`` when probabilistic). Default:
        ``"gaussian_nll"`` for a probabilistic network, else ``"l1"`` with
        ``use_l1_loss``, else ``"mse"``.
      equal_loss_weight_batch: with a mask, average each sequence first, so that every
        sequence weighs the same whatever its length.
    """

    def __init__(
        self,
        net: ContinuousTransformerWrapper,
        loss_fn: str | Callable[[Array, Array], Array] | None = None,
        use_l1_loss: bool = False,
        equal_loss_weight_batch: bool = False,
    ):
        check_instance("net", net, ContinuousTransformerWrapper)
        cfg = net.config
        if cfg.average_pool_embed:
            raise ValueError("net must predict a frame per position, got average_pool_embed")
        self.probabilistic = cfg.probabilistic
        if loss_fn is None:
            loss_fn = "gaussian_nll" if self.probabilistic else ("l1" if use_l1_loss else "mse")
        if isinstance(loss_fn, str):
            if loss_fn not in CONTINUOUS_LOSSES:
                raise ValueError(
                    f"loss_fn must be one of {sorted(CONTINUOUS_LOSSES)} or a callable, "
                    f"got {loss_fn!r}"
                )
            if (loss_fn == "gaussian_nll") != self.probabilistic:
                raise ValueError(
                    f"loss_fn={loss_fn!r} does not fit a network with "
                    f"probabilistic={self.probabilistic}: gaussian_nll goes with "
                    "probabilistic=True and only with it"
                )
        elif not callable(loss_fn):
            raise TypeError(f"loss_fn must be a name or a callable, got {loss_fn!r}")
        self.net = net
        self.loss_fn = loss_fn
        self.loss = CONTINUOUS_LOSSES[loss_fn] if isinstance(loss_fn, str) else loss_fn
        self.equal_loss_weight_batch = bool(equal_loss_weight_batch)
        self.max_seq_len = cfg.max_seq_len
        self._compiled: dict[tuple, Callable] = {}

    def init(self, rngs: Any, x: Array, **net_kwargs: Any) -> dict[str, Any]:
        """The network's variables, initialised on frames ``x`` ``[B, T, D]``."""
        return self.net.init(rngs, jnp.asarray(x), **net_kwargs)

    def apply(
        self,
        variables: dict[str, Any],
        x: Array,
        *,
        mask: Array | None = None,
        lens: Array | None = None,
        rngs: dict[str, Array] | None = None,
        deterministic: bool = True,
        **net_kwargs: Any,
    ) -> Array:
        """The next-frame loss of x-transformers' wrapper.

        Args:
          variables: the network's variables.
          x: ``[B, T, D]`` frames; the network reads ``x[:, :-1]``, the loss scores
            ``x[:, 1:]``.
          mask: ``[B, T]`` or ``[B, T - 1]`` bool, False at padding (a ``[B, T]`` mask
            loses its last column, as in x-transformers).
          lens: ``[B]`` lengths of the input ``x[:, :-1]`` (instead of ``mask``).
          rngs: ``{"dropout": key}`` when ``deterministic=False``.
          deterministic: disable dropout.
          **net_kwargs: passed on to the network (e.g. ``context``).

        Returns:
          The scalar mean loss.
        """
        x = jnp.asarray(x)
        if x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be float frames [B, T, D], got {x.dtype} {x.shape}")
        B, T, _ = x.shape
        if T < 2:
            raise ValueError(f"x needs at least 2 frames to predict one, got shape {x.shape}")
        inp, target = x[:, :-1], x[:, 1:]
        if lens is not None:
            if mask is not None:
                raise ValueError("pass either mask or lens, not both")
            lens = jnp.asarray(lens)
            if lens.shape != (B,):
                raise ValueError(f"lens must have shape [B] = ({B},), got {lens.shape}")
            mask = jnp.arange(T - 1) < lens[:, None]
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape == (B, T):
                mask = mask[:, :-1]
            if mask.shape != (B, T - 1):
                raise ValueError(
                    f"mask must have shape [B, T] = {(B, T)} or [B, T - 1], got {mask.shape}"
                )
        out = self.net.apply(
            variables, inp, mask=mask, rngs=rngs, deterministic=deterministic, **net_kwargs
        )
        loss = self.loss(out, target)
        if mask is None:
            return jnp.mean(loss)
        if loss.shape[:2] != (B, T - 1):
            raise ValueError(
                f"with a mask, loss_fn must return elementwise losses [B, T - 1, ...], got "
                f"shape {loss.shape}"
            )
        keep = mask.reshape(mask.shape + (1,) * (loss.ndim - 2))
        loss = jnp.where(keep, loss, 0.0)
        if self.equal_loss_weight_batch:
            # x-transformers' batch_masked_mean: sum over frames and features / frames.
            per_row = jnp.sum(loss.reshape(B, -1), axis=1) / jnp.maximum(jnp.sum(mask, 1), 1)
            return jnp.mean(per_row)
        per_frame = loss[0, 0].size
        return jnp.sum(loss) / (jnp.sum(mask) * per_frame)

    def generate(
        self,
        variables: dict[str, Any],
        start_tokens: Array,
        seq_len: int,
        *,
        key: Array | None = None,
        temperature: float = 1.0,
        cache_kv: bool = True,
        **net_kwargs: Any,
    ) -> Array:
        """Predicts ``seq_len`` frames after the prompt, each fed back in, in one compiled loop.

        Args:
          variables: the network's variables.
          start_tokens: ``[B, P, D]`` prompt frames (``[P, D]`` for one prompt).
          seq_len: frames to generate (>= 1).
          key: PRNG key, for a probabilistic network with ``temperature > 0``; step i
            samples with ``jax.random.fold_in(key, i)``.
          temperature: scales the standard deviation of the sampled frames (0: the mean).
          cache_kv: decode with a KV cache (False: rerun the network over all frames).
          **net_kwargs: arrays passed to the network at every step (e.g. ``context``).

        Returns:
          ``[B, seq_len, D]`` float32 frames (``[seq_len, D]`` for a 2-D prompt).
        """
        cfg = self.net.config
        if not cfg.attn_layers.causal:
            raise ValueError("generate needs a causal network (attn_layers=Decoder(...))")
        start_tokens = jnp.asarray(start_tokens)
        unbatched = start_tokens.ndim == 2
        if unbatched:
            start_tokens = start_tokens[None]
        d_in = cfg.dim_in if cfg.has_project_in else cfg.attn_layers.dim
        d_out = cfg.dim_out if cfg.has_project_out else cfg.attn_layers.dim
        if d_out != d_in:
            raise ValueError(
                f"generate feeds outputs back as inputs: needs dim_out == dim_in, got "
                f"{d_out} and {d_in}"
            )
        if start_tokens.ndim != 3 or start_tokens.shape[-1] != d_in or start_tokens.shape[1] < 1:
            raise ValueError(
                f"start_tokens must be frames [B, P, {d_in}] with P >= 1, got {start_tokens.shape}"
            )
        check_count("seq_len", seq_len)
        P = start_tokens.shape[1]
        if cfg.has_abs_pos_emb and P + seq_len - 1 > cfg.max_seq_len:
            raise ValueError(
                f"a prompt of {P} frames plus seq_len={seq_len} needs {P + seq_len - 1} "
                f"positions, more than max_seq_len={cfg.max_seq_len} of the absolute "
                "positional embedding"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        sample = self.probabilistic and temperature > 0
        if sample and key is None:
            raise ValueError(
                f"a probabilistic network samples at temperature={temperature}: pass "
                "key=jax.random.key(..)"
            )
        if cache_kv:
            try:
                self.net.init_cache(start_tokens.shape[0], P + seq_len - 1)
            except ValueError as e:
                raise ValueError(f"cache_kv=True: {e}; pass cache_kv=False") from e
        if key is None:
            key = jax.random.key(0)  # unused without sampling
        static = (seq_len, sample, bool(cache_kv))
        program = compiled_program(self._compiled, static, self._generate_fn)
        out = program(variables, start_tokens.astype(jnp.float32), key, temperature, net_kwargs)
        return out[0] if unbatched else out

    def _generate_fn(self, seq_len: int, sample: bool, cache_kv: bool) -> Callable:
        """The program ``(variables, prompts, key, temperature, net_kwargs) -> [B, seq_len, D]``."""
        net, probabilistic = self.net, self.probabilistic

        def next_frame(out, key, temperature, i):  # [B, D] or [2, B, D] -> [B, D]
            if not probabilistic:
                return out
            mean, var = out[0], out[1]
            if not sample:
                return mean
            std = jnp.sqrt(jnp.maximum(var, 1e-5)) * temperature
            return mean + std * jax.random.normal(jax.random.fold_in(key, i), mean.shape)

        def program(variables, prompts, key, temperature, net_kwargs):
            B, P, D = prompts.shape
            # A KV cache, or a frame buffer of every frame ever fed to the network.
            stepper = Stepper(net, variables, net_kwargs, cache_kv, P + seq_len - 1)
            out, state = stepper.prefill(prompts)
            first = next_frame(out, key, temperature, 0)
            frames = jnp.zeros((B, seq_len, D)).at[:, 0].set(first)

            def step(i, carry):
                frames, state = carry
                out, state = stepper.step(state, frames[:, i - 1], P + i - 1)
                frame = next_frame(out, key, temperature, i)
                return frames.at[:, i].set(frame), state

            frames, _ = jax.lax.fori_loop(1, seq_len, step, (frames, state))
            return frames

        return program

"""Pieces shared by the training and generation wrappers (``AutoregressiveWrapper``, its
Transformer-XL, continuous and non-autoregressive siblings): one wording for the checks
of their arguments, and the cache of their compiled programs.

Every wrapper keeps a dict ``_compiled`` from a tuple of static options (hashable: the
filter function, sorted keyword items, Python numbers) to the jitted program built for
them; ``jax.jit`` then keeps one executable per shape, so a second call with the same
options and shapes compiles nothing.

Shapes: prompts ``[B, P]`` int tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def check_instance(name: str, value: Any, cls: type) -> None:
    """Raises TypeError unless ``value`` is a ``cls``, naming ``name``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def check_count(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is an int >= 1 (a bool is not), naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_prob(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a number in ``[0, 1)`` (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def check_eos_token(eos_token: Any, num_tokens: int) -> None:
    """Raises ValueError unless ``eos_token`` is None or a token id in ``[0, num_tokens)``."""
    if eos_token is not None and not (isinstance(eos_token, int) and 0 <= eos_token < num_tokens):
        raise ValueError(f"eos_token must be a token id in [0, {num_tokens}), got {eos_token!r}")


def training_tokens(x: Any) -> Array:
    """Checks next-token training input ``x`` ``[B, T]`` of int tokens, ``T >= 2`` (one
    token to predict at least) -> ``x`` as an array."""
    x = jnp.asarray(x)
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"x must be int tokens [B, T], got {x.dtype} {x.shape}")
    if x.shape[1] < 2:
        raise ValueError(f"x needs at least 2 tokens to predict one, got shape {x.shape}")
    return x


def token_prompts(prompts: Any) -> tuple[Array, bool]:
    """Checks prompts ``[B, P]`` (or ``[P]``) of int tokens, ``P >= 1`` -> (``[B, P]``,
    whether a batch axis was added)."""
    prompts = jnp.asarray(prompts)
    unbatched = prompts.ndim == 1
    if unbatched:
        prompts = prompts[None]
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be int tokens [B, P], got {prompts.dtype} {prompts.shape}")
    if prompts.shape[1] < 1:
        raise ValueError(f"prompts must hold at least one token, got shape {prompts.shape}")
    return prompts, unbatched


def sampling_key(
    key: Array | None,
    temperature: float,
    filter_fn: Callable[..., Array],
    filter_kwargs: dict[str, Any],
    num_tokens: int,
) -> Array:
    """The PRNG key of token sampling, after checking that sampling has one and that the
    filter accepts its keywords (on a ``[1, num_tokens]`` probe, before any trace)."""
    if temperature == 0:
        return jax.random.key(0) if key is None else key  # unused by greedy decoding
    if key is None:
        raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(..)")
    # Raise on bad thresholds now, not inside the trace.
    filter_fn(jnp.zeros((1, num_tokens)), **filter_kwargs)
    return key


def sampling_options(
    seq_len: int,
    temperature: float,
    filter_fn: Callable[..., Array],
    filter_kwargs: dict[str, Any],
    eos_token: int | None,
) -> tuple:
    """The static options of token sampling as a hashable tuple ``(seq_len, temperature,
    filter_fn, filter_items, eos_token)``, the order the program builders take them in."""
    filter_items = tuple(sorted(filter_kwargs.items()))
    return seq_len, float(temperature), filter_fn, filter_items, eos_token


def compiled_program(
    compiled: dict[tuple, Callable], static: tuple, build: Callable[..., Callable]
) -> Callable:
    """``jax.jit(build(*static))``, built once per ``compiled`` cache (a wrapper's) and
    set of ``static`` options."""
    program = compiled.get(static)
    if program is None:
        program = jax.jit(build(*static))
        compiled[static] = program
    return program

"""Pieces shared by the long-context gallery models (one contract, one set of checks)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xtx.config import Config, field_names, unknown_keyword_error
from xtx.layers.base import EMBED, VOCAB

Array = jax.Array


def config_from_keywords(owner: str, config_cls: type[Config], kwargs: dict[str, Any]) -> Any:
    """``config_cls(**kwargs)``, naming an unknown keyword (with the nearest valid one)."""
    names = field_names(config_cls)
    for key in kwargs:
        if key not in names:
            raise unknown_keyword_error(owner, key, names)
    return config_cls(**kwargs)


def check_batch_size(batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def check_tokens(tokens: Array, limit: int, limit_name: str) -> tuple[int, int]:
    """``(B, T)`` of int ``[B, T]`` tokens with ``T <= limit``."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be int [B, T], got {tokens.dtype} {tokens.shape}")
    B, T = tokens.shape
    if T > limit:
        raise ValueError(
            f"tokens has {T} positions, more than {limit_name}={limit}; "
            f"split the sequence into segments"
        )
    return B, T


def check_reset(reset: Any, B: int) -> None:
    if reset is not None and tuple(jnp.shape(reset)) != (B,):
        raise ValueError(f"reset must be bool [B] = ({B},), got shape {tuple(jnp.shape(reset))}")


def token_embedding(module: nn.Module, num_tokens: int, dim: int, std: float = 1.0) -> Array:
    """The ``[num_tokens, dim]`` embedding table ``token_emb``, N(0, ``std``) initialised."""
    return module.param(
        "token_emb",
        nn.with_logical_partitioning(nn.initializers.normal(std), (VOCAB, EMBED)),
        (num_tokens, dim),
    )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A config option that must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


ABSOLUTE_POSITIONS = ("sinusoidal", "rotary")


def check_absolute_recipe(position: Any, emb_std: Any) -> None:
    """``position`` and ``emb_std`` of the models whose papers add absolute sinusoidal
    positions to the embeddings (Longformer, RMT)."""
    check_choice("position", position, ABSOLUTE_POSITIONS)
    if not isinstance(emb_std, int | float) or not emb_std > 0:
        raise ValueError(f"emb_std must be a number > 0, got {emb_std!r}")

"""The optimiser: AdamW, warmup + cosine schedule, clipping, decay mask, accumulation.

Weight decay applies to weight matrices only: parameters with two or more axes that
are not embeddings (token/position tables, memory tokens). Norm scales, biases and
gates are never decayed (``OptimConfig.decay_all`` turns the mask off). Gradient
accumulation is ``optax.MultiSteps``: each loop step feeds one micro-batch and every
``grad_accum``-th step applies the mean gradient, so recurrent models keep streaming
their state from one micro-batch to the next.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimConfig

# Path components naming embedding tables (xtx: token_emb, pos_emb, memory_tokens,
# mem_k/mem_v, gallery read/write positions).
_EMBEDDING_NAMES = (
    "emb",
    "memory_tokens",
    "mem_k",
    "mem_v",
    "memory_init",
    "read_pos",
    "write_pos",
)


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to."""

    def decays(path, x) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if x.ndim < 2:
            return False
        return not any(e in n for n in names for e in _EMBEDDING_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain for ``total_steps`` updates."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=None if cfg.decay_all else decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx

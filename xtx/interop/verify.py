"""Checking a conversion: run both models on a small random input."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from xtx.models.continuous import ContinuousConfig
from xtx.models.transformer_wrapper import TransformerWrapperConfig
from xtx.models.vit import ViTConfig
from xtx.models.xtransformer import XTransformerConfig

# ---------------------------------------------------------------------------
# Verification.


def example_inputs(config: Any, *, batch: int = 2, length: int = 8, seed: int = 0) -> dict:
    """Small random inputs for a config: numpy arrays keyed by call argument."""
    rng = np.random.default_rng(seed)

    def tokens(cfg: TransformerWrapperConfig, n: int) -> np.ndarray:
        n = min(n, cfg.max_seq_len) if cfg.has_abs_pos_emb else n
        return rng.integers(0, cfg.num_tokens, (batch, n)).astype(np.int64)

    if isinstance(config, TransformerWrapperConfig):
        out = {"x": tokens(config, length)}
        if config.attn_layers.cross_attend:
            dc = config.attn_layers.cross_attn_config.dim_context or config.dim
            out["context"] = rng.standard_normal((batch, 5, dc)).astype(np.float32)
        return out
    if isinstance(config, XTransformerConfig):
        return {"src": tokens(config.enc, length), "tgt": tokens(config.dec, length)}
    if isinstance(config, ViTConfig):
        s = config.image_size
        return {"img": rng.standard_normal((batch, config.channels, s, s)).astype(np.float32)}
    if isinstance(config, ContinuousConfig):
        n = min(length, config.max_seq_len) if config.has_abs_pos_emb else length
        d = config.dim_in or config.attn_layers.dim
        out = {"x": rng.standard_normal((batch, n, d)).astype(np.float32)}
        if config.attn_layers.cross_attend:
            out["context"] = rng.standard_normal((batch, 5, config.attn_layers.dim)).astype(
                np.float32
            )
        return out
    raise TypeError(type(config).__name__)


def verify_against(torch_model: Any, module: nn.Module, variables: Any, *, atol: float) -> None:
    """Raises ``AssertionError`` if the two models disagree on a random input."""
    import torch

    inputs = example_inputs(module.config)
    names = list(inputs)
    n_positional = 2 if isinstance(module.config, XTransformerConfig) else 1
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            t_in = [torch.from_numpy(inputs[k]) for k in names]
            expected = torch_model(
                *t_in[:n_positional],
                **dict(zip(names[n_positional:], t_in[n_positional:], strict=True)),
            )
    finally:
        torch_model.train(was_training)
    j_in = [jnp.asarray(inputs[k]) for k in names]
    got = module.apply(
        variables,
        *j_in[:n_positional],
        **dict(zip(names[n_positional:], j_in[n_positional:], strict=True)),
    )
    expected = expected.detach().float().numpy()
    got = np.asarray(got)
    if expected.shape != got.shape or not np.allclose(got, expected, atol=atol, rtol=0):
        diff = np.abs(got - expected).max() if expected.shape == got.shape else "shape"
        raise AssertionError(
            f"converted model disagrees with x-transformers (max abs diff {diff}); "
            "please report the configuration"
        )

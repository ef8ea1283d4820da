"""Shared harness of the parity tests: build in x-transformers, convert, compare.

``assert_parity`` converts a PyTorch x-transformers model with
``from_x_transformers(verify=False)`` (so the comparison here is independent of the
converter's own check) and compares outputs at every position, float32, atol 1e-4.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import x_transformers as xt

from xtx import interop

ATOL = 1e-4
V, L, D, HEADS = 64, 16, 32, 4


def _is_constant_init(p: torch.Tensor) -> bool:
    """Tensors initialised to constants or 0/1 patterns (zeros, ones, identity, one-hot):
    a wrong layout could hide behind them."""
    values = torch.unique(p.detach())
    return (
        p.numel() == 1
        or values.numel() == 1
        or bool(torch.isin(values, torch.tensor([0.0, 1.0])).all())
    )


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves every constant-initialised weight (norm gains, gates, scales, identity
    talking heads, one-hot stream mixes) off its init, then switches the model to eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if _is_constant_init(p):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tokens(seed: int, batch: int = 2, length: int = 10, vocab: int = V) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int64)


def _ragged_mask(lengths, total) -> np.ndarray:
    return np.arange(total)[None, :] < np.asarray(lengths)[:, None]


def _torch_call(model, args, kwargs):
    conv = lambda v: torch.from_numpy(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    with torch.no_grad():
        out = model(*[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()})
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def _jax_call(module, variables, args, kwargs):
    conv = lambda v: jnp.asarray(v) if isinstance(v, np.ndarray) else v  # noqa: E731
    out = module.apply(
        variables, *[conv(a) for a in args], **{k: conv(v) for k, v in kwargs.items()}
    )
    if isinstance(out, tuple):
        return tuple(np.asarray(o) for o in out)
    return np.asarray(out)


def assert_parity(model, args, kwargs=None, *, seed=0):
    """Converts ``model`` and checks xtx == x-transformers on ``model(*args, **kwargs)``."""
    kwargs = kwargs or {}
    model = _perturb(model, seed)
    module, variables = interop.from_x_transformers(model, verify=False)
    expected = _torch_call(model, args, kwargs)
    got = _jax_call(module, variables, args, kwargs)
    for e, g in zip(
        expected if isinstance(expected, tuple) else (expected,),
        got if isinstance(got, tuple) else (got,),
        strict=True,
    ):
        assert e.shape == g.shape
        np.testing.assert_allclose(g, e, atol=ATOL, rtol=0)
    return module, variables


def wrapper(attn_layers, **kw):
    return xt.TransformerWrapper(num_tokens=V, max_seq_len=L, attn_layers=attn_layers, **kw)

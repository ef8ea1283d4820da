"""The blockwise (flash-style) kernel equals the einsum reference: values and gradients."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, attention, reference_attention
from xtx.ops.blockwise import blockwise_attention

# Lengths that are not multiples of the blocks, keys longer than queries, GQA heads.
B, T, S, N, K, H = 2, 37, 53, 4, 2, 8


@pytest.fixture(scope="module")
def inputs():
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k = jax.random.normal(ks[1], (B, S, K, H))
    v = jax.random.normal(ks[2], (B, S, K, H))
    bias = jax.random.normal(ks[3], (1, N, T, S))
    padding = jax.random.bernoulli(ks[4], 0.8, (B, S)).at[1, :].set(False)  # row 1: no key
    cotangent = jax.random.normal(ks[5], (B, T, N, H))
    return q, k, v, bias, padding, cotangent


def _cases(bias, padding):
    return {
        "dense": (None, None),
        "causal-offset-right-aligned": (AttentionMask(causal=True), None),
        "causal-padding-bias": (AttentionMask(causal=True, key_padding=padding), bias),
        "sliding-window": (AttentionMask(causal=True, window=(9, None)), None),
        "two-sided-window-head-bias": (AttentionMask(window=(5, 5)), bias[:, :1]),
    }


CASE_NAMES = [
    "dense",
    "causal-offset-right-aligned",
    "causal-padding-bias",
    "sliding-window",
    "two-sided-window-head-bias",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_values_and_gradients(inputs, case):
    q, k, v, bias, padding, ct = inputs
    mask, b = _cases(bias, padding)[case]

    def loss(fn, *args):
        return (fn(*args) * ct).sum()

    ref = lambda q, k, v, b: reference_attention(q, k, v, mask=mask, bias=b)  # noqa: E731
    blk = lambda q, k, v, b: blockwise_attention(  # noqa: E731
        q, k, v, mask=mask, bias=b, block_q=16, block_k=8
    )
    argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)
    np.testing.assert_allclose(
        np.asarray(jax.jit(blk)(q, k, v, b)), np.asarray(ref(q, k, v, b)), atol=1e-5
    )
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=argnums)(q, k, v, b)
    g_blk = jax.jit(jax.grad(lambda *a: loss(blk, *a), argnums=argnums))(q, k, v, b)
    for gr, gb in zip(g_ref, g_blk, strict=True):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(gr), atol=1e-5)


def test_dispatch_and_unsupported(inputs):
    q, k, v, *_ = inputs
    mask = AttentionMask(causal=True)
    out = attention(q, k, v, mask=mask, implementation="blockwise")
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(reference_attention(q, k, v, mask=mask)), atol=1e-5
    )
    with pytest.raises(ValueError, match="explicit"):
        blockwise_attention(q, k, v, mask=AttentionMask(explicit=jnp.ones((T, S), bool)))
    with pytest.raises(ValueError, match="dropout"):
        blockwise_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0))


def test_auto_picks_blockwise_for_long_sequences_on_cpu(monkeypatch):
    """``implementation="auto"``: blockwise from BLOCKWISE_MIN_LENGTH keys on CPU, the
    reference below it or when the call needs what the kernel lacks."""
    attention_module = sys.modules["xtx.ops.attention"]  # the package re-exports the function

    calls = []
    for name in ("reference", "blockwise"):
        real = attention_module._BACKENDS[name]
        monkeypatch.setitem(
            attention_module._BACKENDS,
            name,
            lambda *a, _n=name, _f=real, **kw: calls.append(_n) or _f(*a, **kw),
        )
    n = attention_module.BLOCKWISE_MIN_LENGTH
    long_q = jnp.zeros((1, n, 2, 4))
    short_q = jnp.zeros((1, n - 1, 2, 4))
    attention(long_q, long_q, long_q, mask=AttentionMask(causal=True))
    attention(short_q, short_q, short_q, mask=AttentionMask(causal=True))
    attention(long_q, long_q, long_q, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    explicit = AttentionMask(explicit=jnp.ones((n, n), bool))
    attention(long_q, long_q, long_q, mask=explicit)
    assert calls == ["blockwise", "reference", "reference", "reference"]

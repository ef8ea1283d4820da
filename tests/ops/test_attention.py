"""xtx.ops.attention and AttentionMask against a naive per-query loop in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, attention, available_backends, register_backend

B, T, S, N, H = 2, 5, 7, 4, 8


def naive_attention(q, k, v, allowed, bias=None, scale=None):
    """One query at a time, float64; ``allowed[b, n, t, s]`` bool; GQA by ``n % K``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_, t_, n_, h_ = q.shape
    kv = k.shape[2]
    scale = h_**-0.5 if scale is None else scale
    out = np.zeros_like(q)
    for b in range(b_):
        for n in range(n_):
            for t in range(t_):
                keys = [s for s in range(k.shape[1]) if allowed[b, n, t, s]]
                if not keys:
                    continue  # a query with no visible key outputs zeros
                logits = np.array(
                    [
                        q[b, t, n] @ k[b, s, n % kv] * scale
                        + (0 if bias is None else bias[b, n, t, s])
                        for s in keys
                    ]
                )
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, t, n] = sum(pi * v[b, s, n % kv] for pi, s in zip(p, keys, strict=True))
    return out


def allowed_from_rules(
    causal=False,
    offset=None,
    window=(None, None),
    key_padding=None,
    segments=None,
    explicit=None,
    t=T,
    s=S,
):
    """Hand-written rules for which (query, key) pairs may attend; float of the docstring."""
    allowed = np.ones((B, N, t, s), bool)
    offsets = [
        s - t if offset is None else (offset[b] if np.ndim(offset) else offset) for b in range(B)
    ]
    for b in range(B):
        for qi in range(t):
            p = offsets[b] + qi
            for kj in range(s):
                ok = True
                if causal and kj > p:
                    ok = False
                if window[0] is not None and kj < p - window[0]:
                    ok = False
                if window[1] is not None and kj > p + window[1]:
                    ok = False
                if key_padding is not None and not key_padding[b, kj]:
                    ok = False
                if segments is not None and segments[0][b, qi] != segments[1][b, kj]:
                    ok = False
                allowed[b, :, qi, kj] &= ok
    if explicit is not None:
        allowed &= np.broadcast_to(explicit, allowed.shape)
    return allowed


@pytest.fixture(scope="module")
def qkv():
    # numpy draws: with jax.random every new shape would compile its own sampler.
    rng = np.random.default_rng(0)
    shapes = ((B, T, N, H), (B, S, N, H), (B, S, N, H))
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


key_padding = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 1]], bool)
segments = (
    np.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 2]]),
    np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 2]]),
)

CASES = {
    "none": ({}, {}),
    "causal-right-aligned": ({"causal": True}, {"causal": True}),
    "causal-offset-0": ({"causal": True, "q_offset": 0}, {"causal": True, "offset": 0}),
    "causal-offset-per-row": (
        {"causal": True, "q_offset": jnp.array([1, 2])},
        {"causal": True, "offset": np.array([1, 2])},
    ),
    "window-left-2": ({"causal": True, "window": (2, None)}, {"causal": True, "window": (2, None)}),
    "window-two-sided": ({"window": (1, 1)}, {"window": (1, 1)}),
    "key-padding": ({"key_padding": jnp.asarray(key_padding)}, {"key_padding": key_padding}),
    "causal-padding": (
        {"causal": True, "key_padding": jnp.asarray(key_padding)},
        {"causal": True, "key_padding": key_padding},
    ),
    "segments": (
        {"q_segment_ids": jnp.asarray(segments[0]), "kv_segment_ids": jnp.asarray(segments[1])},
        {"segments": segments},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_masks_match_naive(qkv, case):
    q, k, v = qkv
    mask_kwargs, rules = CASES[case]
    mask = AttentionMask(**mask_kwargs) if mask_kwargs else None
    got = attention(q, k, v, mask=mask)
    expected = naive_attention(q, k, v, allowed_from_rules(**rules))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_explicit_mask_and_bias(qkv):
    q, k, v = qkv
    rng = np.random.default_rng(1)
    explicit = rng.random((N, T, S)) > 0.3
    bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    got = attention(
        q, k, v, mask=AttentionMask(explicit=jnp.asarray(explicit)), bias=jnp.asarray(bias)
    )
    expected = naive_attention(q, k, v, allowed_from_rules(explicit=explicit), bias=bias)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_fully_masked_query_outputs_zero(qkv):
    q, k, v = qkv
    padding = np.ones((B, S), bool)
    padding[1] = False  # row 1 sees no key at all
    got = np.asarray(attention(q, k, v, mask=AttentionMask(key_padding=jnp.asarray(padding))))
    assert np.all(got[1] == 0)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_tile(qkv, kv_heads):
    """Query head n reads kv head n mod K (x-transformers' tiling)."""
    q, k, v = qkv
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    got = attention(q, k, v, mask=AttentionMask(causal=True))
    expected = naive_attention(q, k, v, allowed_from_rules(causal=True))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    # Same as repeating the kv heads by tiling, never by consecutive grouping.
    tiled = attention(
        q,
        jnp.tile(k, (1, 1, N // kv_heads, 1)),
        jnp.tile(v, (1, 1, N // kv_heads, 1)),
        mask=AttentionMask(causal=True),
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(tiled), atol=1e-6)


def test_scale_and_jit_and_grad(qkv):
    q, k, v = qkv
    f = jax.jit(lambda q, k, v: attention(q, k, v, mask=AttentionMask(causal=True), scale=0.3))
    got = f(q, k, v)
    expected = naive_attention(q, k, v, allowed_from_rules(causal=True), scale=0.3)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    g = jax.grad(lambda q: f(q, k, v).sum())(q)
    assert g.shape == q.shape and bool(jnp.all(jnp.isfinite(g)))


def test_dropout_rescales_and_needs_key(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="dropout_rng"):
        attention(q, k, v, dropout_rate=0.5)
    a = attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    b = attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(2))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # The expectation over dropout masks is the undropped output: average many keys.
    outs = jax.vmap(lambda key: attention(q, k, v, dropout_rate=0.5, dropout_rng=key))(
        jax.random.split(jax.random.key(3), 2000)
    )
    np.testing.assert_allclose(np.asarray(outs.mean(0)), np.asarray(attention(q, k, v)), atol=0.08)


def test_bad_shapes_and_backend(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match=r"q \[B, T, N, H\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention(q, k, v, implementation="nope")
    with pytest.raises(TypeError, match="AttentionMask"):
        attention(q, k, v, mask=jnp.ones((B, S), bool))
    with pytest.raises(ValueError, match="window left"):
        AttentionMask(window=(-1, None))


def test_registered_backend_is_dispatched(qkv):
    q, k, v = qkv
    calls = []

    def fake(q, k, v, **kwargs):
        calls.append(kwargs["mask"])
        return jnp.zeros_like(q)

    register_backend("test-fake", fake)
    assert "test-fake" in available_backends()
    out = attention(q, k, v, implementation="test-fake")
    assert calls == [None] and float(jnp.abs(out).sum()) == 0.0


def test_mask_is_a_pytree_that_jit_carries():
    mask = AttentionMask(causal=True, q_offset=jnp.array(3), key_padding=jnp.ones((B, S), bool))
    leaves = jax.tree.leaves(mask)
    assert len(leaves) == 2  # offset and padding; causal/window are static

    @jax.jit
    def dense(m):
        return m.dense(T, S)

    out = dense(mask)
    assert out.shape == (B, 1, T, S)
    expected = allowed_from_rules(causal=True, offset=3)[:, :1]
    np.testing.assert_array_equal(np.asarray(out), expected)

"""The Pallas splash backend (interpret mode on CPU) equals the reference: values and
q/k/v gradients for every mask it takes, tiled grouped-query heads, padded lengths,
queries without keys; unsupported calls raise with the reason."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, reference_attention
from xtx.ops.splash import (
    BlockSizes,
    _splash_kernel,
    splash_attention,
    splash_unsupported_reason,
)

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8  # N = 2 * K: query head i reads kv head i mod K
BLOCK_128 = BlockSizes(
    block_q=128,
    block_kv=128,
    block_q_dkv=128,
    block_kv_dkv=128,
    block_q_dq=128,
    block_kv_dq=128,
)


def _inputs(seed, T, S, N, K):
    """q, k, v and an output cotangent; numpy draws, as jax.random would compile a
    sampler for every new shape."""
    rng = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, K, H), (B, S, K, H), (B, T, N, H))
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def _value_and_grads(fn, mask, q, k, v, cotangent):
    """Output and d<out, cotangent>/d(q, k, v), compiled once per backend and mask."""

    def loss(q, k, v):
        out = fn(q, k, v, mask=mask)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_matches_reference(mask, inputs, **splash_kwargs):
    got, got_grads = _value_and_grads(
        lambda *a, **kw: splash_attention(*a, **kw, **splash_kwargs), mask, *inputs
    )
    ref, ref_grads = _value_and_grads(reference_attention, mask, *inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    for name, g, r in zip("qkv", got_grads, ref_grads, strict=True):
        assert np.all(np.isfinite(np.asarray(g))), f"d{name} is not finite"
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, err_msg=f"d{name}")
    return ref


@pytest.fixture(scope="module")
def inputs():
    return _inputs(0, T, S, N, K)


PADDING = jnp.ones((B, S), bool).at[0, 1].set(False).at[0, 5].set(False).at[1].set(False)

CASES = {
    "no-mask": AttentionMask(),
    "causal-right-aligned": AttentionMask(causal=True),  # T < S: query 0 at key S - T
    "causal-q-offset-1": AttentionMask(causal=True, q_offset=1),
    "causal-q-offset-negative": AttentionMask(causal=True, q_offset=-2),  # rows 0, 1: no key
    "window-left": AttentionMask(window=(2, None)),
    "window-left-right": AttentionMask(window=(2, 1)),
    "key-padding": AttentionMask(key_padding=PADDING),  # batch row 1 sees no key
    "causal-segments-padding": AttentionMask(
        causal=True,
        key_padding=PADDING.at[1].set(True).at[1, 4].set(False),
        q_segment_ids=jnp.array([[0, 0, 1, 1, 1], [3, 3, 3, 5, 5]]),
        kv_segment_ids=jnp.array([[0, 0, 0, 0, 1, 1, 1], [3, 3, 3, 3, 3, 5, 4]]),
    ),
}


EMPTY_ROWS = {"causal-q-offset-negative": np.s_[:, :2], "key-padding": np.s_[1]}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(inputs, case):
    ref = _assert_matches_reference(CASES[case], inputs)
    if case in EMPTY_ROWS:  # the case does exercise queries without keys
        assert np.all(np.asarray(ref)[EMPTY_ROWS[case]] == 0)


def test_multi_head_without_grouping():
    _assert_matches_reference(AttentionMask(causal=True), _inputs(1, T, S, N, N))


def test_several_blocks_with_skipped_blocks():
    """T = 200, S = 300 in 128-blocks, padded on both axes. Queries sit at 100..299 with a
    causal window of 40: query block 0 skips key block 2, query block 1 skips key block 0."""
    mask = AttentionMask(causal=True, window=(40, None))
    _assert_matches_reference(mask, _inputs(2, 200, 300, 2, 1), block_sizes=BLOCK_128)


def test_query_block_without_any_key():
    """Queries at -128..1: the kernel visits no key block for query block 0 (it divides
    by zero there); those rows must come out zero with finite gradients."""
    mask = AttentionMask(causal=True, q_offset=-128)
    ref = _assert_matches_reference(mask, _inputs(3, 130, 100, 2, 1), block_sizes=BLOCK_128)
    assert np.all(np.asarray(ref)[:, :128] == 0)


def test_kernel_is_built_once_per_configuration(inputs):
    q, k, v, _ = inputs
    mask = AttentionMask(causal=True)
    jax.eval_shape(lambda q: splash_attention(q, k, v, mask=mask), q)
    before = _splash_kernel.cache_info()
    jax.eval_shape(lambda q: splash_attention(q * 2.0, k, v, mask=mask), q)
    after = _splash_kernel.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias=jnp.zeros((N, T, S))), "no additive bias"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "no dropout"),
        (dict(mask=AttentionMask(explicit=jnp.ones((T, S), bool))), "explicit dense mask"),
        (dict(mask=AttentionMask(causal=True, q_offset=jnp.array([0, 1]))), "Python int"),
    ],
)
def test_unsupported_calls_raise_the_reason(inputs, kwargs, match):
    q, k, v, _ = inputs
    reason = splash_unsupported_reason(
        q, k, kwargs.get("mask"), kwargs.get("bias"), kwargs.get("dropout_rate", 0.0)
    )
    assert reason is not None and match in reason
    with pytest.raises(ValueError, match=match):
        splash_attention(q, k, v, **kwargs)


def test_traced_q_offset_is_unsupported(inputs):
    q, k, v, _ = inputs

    @jax.jit
    def call(mask):
        return splash_attention(q, k, v, mask=mask)

    with pytest.raises(ValueError, match="Python int"):
        call(AttentionMask(causal=True, q_offset=1))  # q_offset is a pytree leaf: traced


def test_supported_calls_have_no_reason(inputs):
    q, k, *_ = inputs
    assert splash_unsupported_reason(q, k, None, None, 0.0) is None
    for mask in CASES.values():
        assert splash_unsupported_reason(q, k, mask, None, 0.0) is None
    array_offset_no_causal = AttentionMask(q_offset=jnp.array([0, 1]), window=(None, None))
    assert splash_unsupported_reason(q, k, array_offset_no_causal, None, 0.0) is None


def test_bad_shapes_and_block_sizes_raise(inputs):
    q, k, v, _ = inputs
    with pytest.raises(ValueError, match="N % K == 0"):
        splash_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match=r"mask.key_padding must have shape \(2, 7\)"):
        splash_attention(q, k, v, mask=AttentionMask(key_padding=jnp.ones((B, T), bool)))
    bad = BlockSizes(block_q=64, block_kv=128, block_q_dkv=64, block_kv_dkv=128,
                     block_q_dq=64, block_kv_dq=128)  # fmt: skip
    with pytest.raises(ValueError, match="block_q must be a multiple of 128, got 64"):
        splash_attention(q, k, v, block_sizes=bad)


def test_auto_picks_splash_on_tpu_and_says_why_it_falls_back(monkeypatch, caplog):
    attention_module = importlib.import_module("xtx.ops.attention")
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(attention_module, "_logged_fallbacks", set())
    q = jnp.zeros((1, 8, 2, 16))
    k = jnp.zeros((1, 8, 2, 16))
    causal = AttentionMask(causal=True)
    pick = attention_module._auto_backend
    assert pick(q, k, causal, None, 0.0) == "splash"
    with caplog.at_level("INFO", logger="xtx"):
        assert pick(q, k, causal, None, 0.1) == "blockwise"
        explicit = AttentionMask(explicit=jnp.ones((8, 8), bool))
        assert pick(q, k, explicit, None, 0.0) == "reference"
    assert "dropout" in caplog.text and "explicit" in caplog.text

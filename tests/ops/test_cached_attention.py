"""xtx.ops.cached_attention against writing the cache first and calling ``attention``.

The oracle writes the new tokens' keys/values into the cache with numpy and runs the
reference backend (itself tested against a float64 numpy attention) on the written
cache. cached_attention must give the same output, logits and cache, for single-token
decoding and multi-token chunks, grouped-query heads, masks with a query offset, dense
and relative biases, every logit/probability extra and dropout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, RelativeBias, alibi_slopes, attention, cached_attention

B, N, K, H, L = 2, 4, 2, 8, 10


def _cached(q, k, v, keys, values, index, mask, arrays, static):
    return cached_attention(q, k, v, keys, values, index, mask=mask, **arrays, **dict(static))


def _oracle(q, k, v, keys, values, index, mask, arrays, static):
    start = (0, 0, index, 0)
    keys = jax.lax.dynamic_update_slice(keys, jnp.swapaxes(k, 1, 2).astype(keys.dtype), start)
    values = jax.lax.dynamic_update_slice(values, jnp.swapaxes(v, 1, 2).astype(values.dtype), start)
    kw = dict(static, implementation="reference")
    k_all, v_all = (jnp.swapaxes(c, 1, 2).astype(q.dtype) for c in (keys, values))
    return attention(q, k_all, v_all, mask=mask, **arrays, **kw), keys, values


# Arrays (biases, PRNG keys, head mixes) are traced; numbers and names are static.
cached = jax.jit(_cached, static_argnames=("static",))
oracle = jax.jit(_oracle, static_argnames=("static",))


def _inputs(T, index, cache_dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    # Slots before index hold earlier tokens; the rest hold leftovers that must not leak.
    keys = jnp.asarray(rng.standard_normal((B, K, L, H)), cache_dtype)
    values = jnp.asarray(rng.standard_normal((B, K, L, H)), cache_dtype)
    padding = np.ones((B, L), bool)
    padding[1, :2] = False  # row 1 is left-padded
    mask = AttentionMask(causal=True, q_offset=jnp.int32(index), key_padding=jnp.asarray(padding))
    return q, k, v, keys, values, jnp.int32(index), mask


def _compare(T, index, kw, cache_dtype=jnp.float32, atol=1e-5):
    args = _inputs(T, index, cache_dtype)
    arrays = {n: x for n, x in kw.items() if isinstance(x, (jax.Array, RelativeBias))}
    static = tuple(sorted((n, x) for n, x in kw.items() if n not in arrays))
    got, got_keys, got_values = cached(*args, arrays, static)
    want, want_keys, want_values = oracle(*args, arrays, static)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol)
    np.testing.assert_array_equal(np.asarray(got_keys), np.asarray(want_keys))
    np.testing.assert_array_equal(np.asarray(got_values), np.asarray(want_values))
    # The slots the new tokens did not touch keep their old contents.
    old_keys = np.asarray(args[3])
    untouched = np.ones(L, bool)
    untouched[index : index + T] = False
    np.testing.assert_array_equal(np.asarray(got_keys)[:, :, untouched], old_keys[:, :, untouched])
    return got


@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_one_token_step_equals_writing_first(implementation):
    _compare(T=1, index=4, kw={"implementation": implementation})


def test_chunk_of_tokens_with_dense_bias():
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, N, 3, L)), jnp.float32)
    _compare(T=3, index=2, kw={"bias": bias})


def test_relative_bias_over_the_cache():
    # ALiBi over the cache slots; the queries sit at slots index.. index + T - 1.
    bias = RelativeBias.alibi(alibi_slopes(N), L, q_offset=jnp.int32(5))
    _compare(T=2, index=5, kw={"bias": bias})


def test_every_extra_and_dropout():
    rng = np.random.default_rng(4)
    kw = {
        "prev_logits": jnp.asarray(rng.standard_normal((B, N, 2, L)), jnp.float32),
        "pre_talking_heads": jnp.asarray(np.eye(N) + 0.1 * rng.normal(size=(N, N)), jnp.float32),
        "post_talking_heads": jnp.asarray(np.eye(N) + 0.1 * rng.normal(size=(N, N)), jnp.float32),
        "logit_softclamp": 5.0,
        "return_logits": True,
        "dropout_rate": 0.25,
        "dropout_rng": jax.random.key(0),
    }
    out, logits = _compare(T=2, index=3, kw=kw)
    assert logits.shape == (B, N, 2, L)


@pytest.mark.parametrize("normalizer", ["entmax15", "hard"])
def test_sparse_normalizers(normalizer):
    topk = 3 if normalizer == "entmax15" else None
    _compare(T=1, index=6, kw={"normalizer": normalizer, "sparse_topk": topk})


def test_blockwise_backend_gets_the_written_cache():
    _compare(T=1, index=4, kw={"implementation": "blockwise"})


def test_lower_precision_cache():
    # New keys/values are rounded to the cache dtype before anyone reads them.
    _compare(T=1, index=4, kw={}, cache_dtype=jnp.bfloat16, atol=1e-5)


def test_cache_write_is_bit_exact_for_signed_zeros():
    q, k, v, keys, values, index, mask = _inputs(1, 4)
    k = k.at[0, 0, 0, 0].set(-0.0)
    _, new_keys, _ = cached(q, k, v, keys, values, index, mask, {}, ())
    assert np.signbit(np.asarray(new_keys)[0, 0, 4, 0])


def test_bad_arguments_are_named():
    q, k, v, keys, values, index, mask = _inputs(1, 4)
    with pytest.raises(ValueError, match="k_new and v_new must have shape"):
        cached_attention(q, k[:, :, :1], v, keys, values, index)
    with pytest.raises(ValueError, match="keys and values must have shape"):
        cached_attention(q, k, v, keys, values[:, :, :5], index)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['talking'\\]"):
        cached_attention(q, k, v, keys, values, index, talking=None)


def _with_memory(T, index, M, mem_batch, kw, seed=5):
    """cached_attention with memory key/values vs writing the cache, prepending the
    memory to it and calling the reference (what the attention layer did before)."""
    q, k, v, keys, values, index, _ = _inputs(T, int(index))
    rng = np.random.default_rng(seed)
    mem_k, mem_v = (
        jnp.asarray(rng.standard_normal((mem_batch, M, K, H)), jnp.float32) for _ in range(2)
    )
    padding = np.ones((B, M + L), bool)
    padding[1, M : M + 2] = False  # row 1 is left-padded behind the memory
    mask = AttentionMask(causal=True, q_offset=index + M, key_padding=jnp.asarray(padding))

    @jax.jit
    def run(q, k, v, keys, values, index, mem_k, mem_v, mask):
        got = cached_attention(q, k, v, keys, values, index, mask=mask, prefix=(mem_k, mem_v), **kw)
        start = (0, 0, index, 0)
        wk = jax.lax.dynamic_update_slice(keys, jnp.swapaxes(k, 1, 2), start)
        wv = jax.lax.dynamic_update_slice(values, jnp.swapaxes(v, 1, 2), start)

        def prepend(m, cache):
            m = jnp.broadcast_to(m, (B, M, K, H))
            return jnp.concatenate([m, jnp.swapaxes(cache, 1, 2)], axis=1)

        ref_kw = dict(kw, implementation="reference")
        want = attention(q, prepend(mem_k, wk), prepend(mem_v, wv), mask=mask, **ref_kw)
        return got, (want, wk, wv)

    (got, got_keys, got_values), (want, want_keys, want_values) = run(
        q, k, v, keys, values, index, mem_k, mem_v, mask
    )
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_keys), np.asarray(want_keys))
    np.testing.assert_array_equal(np.asarray(got_values), np.asarray(want_values))


def test_memory_key_values_scored_apart_from_the_cache():
    # Shared memory, ALiBi over the positioned keys only, logits returned (dense path).
    bias = RelativeBias.alibi(alibi_slopes(N), L, q_offset=jnp.int32(4))
    bias = dataclasses.replace(bias, prefix=3)  # the memory leads the keys, unpositioned
    _with_memory(T=1, index=4, M=3, mem_batch=1, kw={"bias": bias, "return_logits": True})
    # Per-row memory, a chunk of tokens, the blockwise backend (write, then attend).
    _with_memory(T=2, index=3, M=2, mem_batch=B, kw={"implementation": "blockwise"})
    _with_memory(T=2, index=3, M=2, mem_batch=B, kw={})


def test_bad_memory_key_values_are_named():
    q, k, v, keys, values, index, mask = _inputs(1, 4)
    bad = jnp.zeros((B, 2, K + 1, H))
    with pytest.raises(ValueError, match=r"prefix k must have shape \[B\|1, M, K, H\]"):
        cached_attention(q, k, v, keys, values, index, prefix=(bad, bad))

"""``xtx.ops.sampling``: filters, the sampling step, contrastive decoding, beam pruning and
the decode loop, against numpy re-implementations and x-transformers 2.31's functions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers.autoregressive_wrapper import contrastive_decode_fn

from xtx.models.autoregressive import top_k as reexported_top_k
from xtx.ops.sampling import (
    beam_candidates,
    contrastive_decode,
    decode_loop,
    min_p,
    resolve_filter,
    sample_tokens,
    select_beams,
    top_a,
    top_k,
    top_p,
)

V = 20


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 2


def test_top_k(logits):
    assert reexported_top_k is top_k  # the old import path still works
    for kwargs, k in (({"k": 4}, 4), ({"frac_num_tokens": 0.25}, 5), ({}, 2)):
        expected = np.full_like(logits, -np.inf)
        for r in range(3):
            keep = np.argsort(-logits[r])[:k]
            expected[r, keep] = logits[r, keep]
        np.testing.assert_array_equal(top_k(jnp.asarray(logits), **kwargs), expected)


def test_top_p(logits):
    for thres in (0.5, 0.9):
        expected = np.full_like(logits, -np.inf)
        probs = _np_softmax(logits)
        for r in range(3):
            total = 0.0
            for j in np.argsort(-logits[r]):  # keep until the mass before j exceeds thres
                if total > thres:
                    break
                expected[r, j] = logits[r, j]
                total += probs[r, j]
        np.testing.assert_array_equal(top_p(jnp.asarray(logits), thres=thres), expected)


def test_top_a_and_min_p(logits):
    probs = _np_softmax(logits)
    best = probs.max(-1, keepdims=True)
    expected = np.where(probs < best**2.0 * 0.3, -np.inf, logits)
    np.testing.assert_array_equal(top_a(jnp.asarray(logits), min_p_ratio=0.3), expected)
    expected = np.where(probs < 0.2 * best, -np.inf, logits)
    np.testing.assert_array_equal(min_p(jnp.asarray(logits), min_p=0.2), expected)


def test_contrastive_decode_matches_x_transformers(logits):
    amateur = np.random.default_rng(1).normal(size=logits.shape).astype(np.float32)
    for kwargs in ({}, {"alpha": 0.3, "beta": 1.5}):
        expected = contrastive_decode_fn(
            torch.from_numpy(logits), torch.from_numpy(amateur), **kwargs
        ).numpy()
        got = contrastive_decode(jnp.asarray(logits), jnp.asarray(amateur), **kwargs)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # By hand: alpha=0.3 keeps the tokens with probability >= 0.3 * the best.
    alpha, beta = 0.3, 1.5
    kept = _np_softmax(logits) >= alpha * _np_softmax(logits).max(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(got) > -1e30, kept)
    contrast = (1 + beta) * logits - beta * amateur
    np.testing.assert_allclose(np.asarray(got)[kept], contrast[kept], atol=1e-5, rtol=0)


def test_sample_tokens(logits):
    x = jnp.asarray(logits)
    np.testing.assert_array_equal(sample_tokens(x, None, temperature=0.0), logits.argmax(-1))
    # Every draw stays inside the filter's support.
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    keys = jax.random.split(jax.random.key(0, impl="rbg"), 64)
    draws = jax.jit(
        jax.vmap(
            lambda k: sample_tokens(x, k, temperature=2.0, filter_fn=top_k, filter_kwargs={"k": 3})
        )
    )(keys)  # [64, 3]
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    for r in range(3):
        assert set(np.asarray(draws[:, r]).tolist()) <= set(top3[r].tolist())


def test_select_beams_is_brute_force(logits):
    rng = np.random.default_rng(2)
    B, K = 2, 3
    scores = rng.normal(size=(B, K)).astype(np.float32)
    log_probs = _np_log_softmax(rng.normal(size=(B, K, V)).astype(np.float32))
    candidates = np.stack([rng.permutation(V)[:K] for _ in range(B * K)]).reshape(B, K, K)
    new_scores, parents, tokens = select_beams(
        jnp.asarray(scores), jnp.asarray(log_probs), jnp.asarray(candidates), K
    )
    for b in range(B):
        ext = [
            (scores[b, k] + log_probs[b, k, candidates[b, k, c]], k, candidates[b, k, c])
            for k, c in itertools.product(range(K), range(K))
        ]
        best = sorted(ext, key=lambda e: -e[0])[:K]
        np.testing.assert_allclose(new_scores[b], [e[0] for e in best], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(parents[b], [e[1] for e in best])
        np.testing.assert_array_equal(tokens[b], [e[2] for e in best])


def test_beam_candidates(logits):
    x = jnp.asarray(logits).reshape(1, 3, V)  # one row, three beams
    done = jnp.asarray([[False, True, False]])
    log_probs, cands = jax.jit(beam_candidates, static_argnums=3, static_argnames="pad_value")(
        x, done, None, 4, pad_value=7
    )
    expected = _np_log_softmax(logits)
    np.testing.assert_allclose(log_probs[0, 0], expected[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cands[0, 0], np.argsort(-logits[0])[:4])
    # The finished beam continues with pad_value alone at log-probability 0.
    np.testing.assert_array_equal(cands[0, 1], [7, 8, 9, 10])
    assert log_probs[0, 1, 7] == 0 and np.all(np.isneginf(np.delete(log_probs[0, 1], 7)))
    # Stochastic candidates are distinct and drawn from the filter's support.
    stochastic = jax.jit(
        lambda key: beam_candidates(
            x, done, key, 3, temperature=1.0, filter_fn=top_k, filter_kwargs={"k": 3}
        )
    )
    _, cands = stochastic(jax.random.key(3, impl="rbg"))
    for k in (0, 2):
        assert sorted(cands[0, k].tolist()) == sorted(np.argsort(-logits[k])[:3].tolist())


def test_decode_loop_stops_at_eos_and_pads():
    def step(state, prev, i):  # token i = (token i-1 + 1) % 7
        return (prev + 1) % 7, state

    first = jnp.asarray([0, 3], jnp.int32)
    out = decode_loop(step, jnp.int32(0), first, 8, eos_token=5, pad_value=9)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3, 4, 5, 9, 9], [3, 4, 5, 9, 9, 9, 9, 9]])
    out = decode_loop(step, jnp.int32(0), first, 4)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3], [3, 4, 5, 6]])
    # start=0: the given token precedes the output (an EOS there does not stop it).
    out = decode_loop(step, jnp.int32(0), jnp.asarray([5, 3]), 4, start=0, eos_token=5)
    np.testing.assert_array_equal(out, [[6, 0, 1, 2], [4, 5, 0, 0]])


def test_bad_input(logits):
    x = jnp.asarray(logits)
    with pytest.raises(ValueError, match="filter_kwargs thres must be a number in \\[0.0, 1.0\\]"):
        top_p(x, thres=1.5)
    with pytest.raises(ValueError, match="filter_kwargs k must be an int >= 1, got 0"):
        top_k(x, k=0)
    with pytest.raises(ValueError, match="filter_kwargs min_p must be"):
        min_p(x, min_p=-0.1)
    with pytest.raises(ValueError, match="filter_logits_fn must be one of"):
        resolve_filter("top_z")
    with pytest.raises(TypeError, match="filter_logits_fn must be a name or a callable"):
        resolve_filter(3)
    with pytest.raises(ValueError, match="contrastive_decode_kwargs alpha must be"):
        contrastive_decode(x, x, alpha=0.0)
    with pytest.raises(ValueError, match="contrastive_decode_kwargs beta must be"):
        contrastive_decode(x, x, beta=-1.0)
    with pytest.raises(ValueError, match="the same shape"):
        contrastive_decode(x, x[:, :5])

"""The logit / probability extras of xtx.ops.attention against a naive numpy version.

The naive version walks the x-transformers 2.31 order by hand in float64: scaled logits,
``+ prev``, ``S + W_pre·S``, ``+ bias``, softclamp, masks, top-k, normaliser (softmax,
1.5-entmax by bisection, or one-hot), ``W_post·A``, ``A·V``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, mask_value, register_backend
from xtx.ops import attention as attention_eager

B, T, S, N, K, H = 2, 4, 6, 4, 2, 8

# One compilation per configuration instead of one per primitive in eager mode.
attention = jax.jit(
    attention_eager,
    static_argnames=(
        "scale",
        "dropout_rate",
        "implementation",
        "logit_softclamp",
        "sparse_topk",
        "sparse_topk_straight_through",
        "normalizer",
        "return_logits",
    ),
)


def entmax15_bisect(row: np.ndarray) -> np.ndarray:
    z = row / 2
    lo, hi = z.max() - 1.0, z.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        lo, hi = (tau, hi) if np.sum(np.maximum(z - tau, 0.0) ** 2) > 1.0 else (lo, tau)
    p = np.maximum(z - (lo + hi) / 2, 0.0) ** 2
    return p / p.sum()


def naive(
    q,
    k,
    v,
    allowed,
    *,
    bias=None,
    prev=None,
    pre=None,
    post=None,
    clamp=None,
    topk=None,
    normalizer="softmax",
):
    """Returns (output [B, T, N, H], masked logits [B, N, T, S]) in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    kv = k.shape[2]
    logits = np.zeros((B, N, T, S))
    for b, n, t, s in np.ndindex(B, N, T, S):
        logits[b, n, t, s] = q[b, t, n] @ k[b, s, n % kv] * H**-0.5
    if prev is not None:
        logits = logits + prev
    if pre is not None:
        mixed = np.zeros_like(logits)
        for g in range(N):
            mixed[:, g] = sum(pre[h, g] * logits[:, h] for h in range(N))
        logits = logits + mixed
    if bias is not None:
        logits = logits + bias
    if clamp is not None:
        logits = np.tanh(logits / clamp) * clamp
    fill = float(np.finfo(np.float32).min)
    logits = np.where(allowed, logits, fill)
    probs = np.zeros_like(logits)
    for b, n, t in np.ndindex(B, N, T):
        keys = [s for s in range(S) if allowed[b, n, t, s]]
        if not keys:
            continue
        vals = logits[b, n, t, keys]
        if topk is not None and topk < len(keys):
            kth = np.sort(vals)[::-1][topk - 1]
            keys = [s for s, x in zip(keys, vals, strict=True) if x >= kth]
            vals = logits[b, n, t, keys]
        if normalizer == "softmax":
            p = np.exp(vals - vals.max())
            p /= p.sum()
        elif normalizer == "entmax15":
            p = entmax15_bisect(vals)
        else:
            p = np.zeros(len(keys))
            p[np.argmax(vals)] = 1.0
        probs[b, n, t, keys] = p
    if post is not None:
        mixed = np.zeros_like(probs)
        for g in range(N):
            mixed[:, g] = sum(post[h, g] * probs[:, h] for h in range(N))
        probs = mixed
    out = np.zeros((B, T, N, H))
    for b, n, t in np.ndindex(B, N, T):
        if allowed[b, n, t].any():
            out[b, t, n] = sum(probs[b, n, t, s] * v[b, s, n % kv] for s in range(S))
    return out, logits


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    padding = np.ones((B, S), bool)
    padding[1, :3] = False  # batch 1: the first three keys are padding
    mask = AttentionMask(causal=True, key_padding=jnp.asarray(padding))
    allowed = np.broadcast_to(np.asarray(mask.dense(T, S)), (B, N, T, S))
    return dict(
        q=2.0 * normal(B, T, N, H),
        k=normal(B, S, K, H),
        v=normal(B, S, K, H),
        bias=normal(1, N, T, S),
        prev=normal(B, N, T, S),
        pre=jnp.eye(N) + 0.3 * normal(N, N),
        post=jnp.eye(N) + 0.3 * normal(N, N),
        mask=mask,
        allowed=allowed,
    )


CASES = {
    "prev_logits": dict(prev_logits="prev"),
    "pre_talking_heads": dict(pre_talking_heads="pre"),
    "post_talking_heads": dict(post_talking_heads="post"),
    "softclamp": dict(logit_softclamp=0.7),
    "sparse_topk": dict(sparse_topk=2),
    "entmax15": dict(normalizer="entmax15"),
    "hard": dict(normalizer="hard"),
    "entmax15_topk": dict(normalizer="entmax15", sparse_topk=3),
    "all_together": dict(
        prev_logits="prev",
        pre_talking_heads="pre",
        post_talking_heads="post",
        logit_softclamp=1.5,
        sparse_topk=3,
    ),
}
NAIVE_NAMES = {
    "prev_logits": "prev",
    "pre_talking_heads": "pre",
    "post_talking_heads": "post",
    "logit_softclamp": "clamp",
    "sparse_topk": "topk",
    "normalizer": "normalizer",
}


@pytest.mark.parametrize("case", list(CASES))
def test_extra_matches_naive(inputs, case):
    kwargs = {
        k: inputs[v] if isinstance(v, str) and v in inputs else v for k, v in CASES[case].items()
    }
    out, logits = attention(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        mask=inputs["mask"],
        bias=inputs["bias"],
        return_logits=True,
        **kwargs,
    )
    expected, expected_logits = naive(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        inputs["allowed"],
        bias=np.asarray(inputs["bias"]),
        **{
            NAIVE_NAMES[k]: np.asarray(v) if isinstance(v, jax.Array) else v
            for k, v in kwargs.items()
        },
    )
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), expected_logits, atol=1e-5, rtol=1e-6)
    plain = attention(
        inputs["q"], inputs["k"], inputs["v"], mask=inputs["mask"], bias=inputs["bias"]
    )
    assert np.abs(np.asarray(plain) - np.asarray(out)).max() > 1e-2  # the extra matters


def test_logits_are_the_masked_pre_topk_logits(inputs):
    _, logits = attention(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        mask=inputs["mask"],
        sparse_topk=1,
        return_logits=True,
    )
    logits = np.asarray(logits)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits[~inputs["allowed"]], float(mask_value(jnp.float32)))
    # Top-k acts inside the normaliser: the returned logits keep every visible key.
    assert (logits[inputs["allowed"]] > -1e30).all()


@pytest.mark.parametrize("k", [S, S + 3])
def test_sparse_topk_of_all_keys_is_plain_attention(inputs, k):
    """k >= number of keys keeps every key (x-transformers 2.31 raises here)."""
    args = (inputs["q"], inputs["k"], inputs["v"])
    got = attention(*args, mask=inputs["mask"], sparse_topk=k)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(attention(*args, mask=inputs["mask"]))
    )


def test_sparse_topk_keeps_ties():
    q = jnp.ones((1, 1, 1, 2))
    k = jnp.array([[3.0, 0], [1, 0], [1, 0], [0, 0]]).reshape(1, 4, 1, 2)
    v = jnp.eye(4)[None, :, None, :]  # output = the probabilities themselves
    out = np.asarray(attention(q, k, v, scale=1.0, sparse_topk=2))[0, 0, 0]
    # Logits [3, 1, 1, 0]: the second largest value is tied, so three keys stay.
    e = np.exp([3.0, 1.0, 1.0])
    np.testing.assert_allclose(out, [*(e / e.sum()), 0.0], atol=1e-6)


def _value_and_grad_wrt_q(inputs, **kwargs):
    w = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, N, H)), jnp.float32)

    def loss(q):
        out = attention_eager(q, inputs["k"], inputs["v"], mask=inputs["mask"], **kwargs)
        return jnp.sum(w * out)

    value, grad = jax.jit(jax.value_and_grad(loss))(inputs["q"])
    return float(value), np.asarray(grad)


@pytest.fixture(scope="module")
def dense_softmax(inputs):
    return _value_and_grad_wrt_q(inputs)


def test_sparse_topk_straight_through_gradient(inputs, dense_softmax):
    """Forward of top-k attention, gradient of dense softmax attention."""
    st_value, st_grad = _value_and_grad_wrt_q(
        inputs, sparse_topk=2, sparse_topk_straight_through=True
    )
    topk_value, topk_grad = _value_and_grad_wrt_q(inputs, sparse_topk=2)
    dense_value, dense_grad = dense_softmax
    assert st_value == pytest.approx(topk_value, abs=1e-5)
    assert abs(topk_value - dense_value) > 1e-2
    np.testing.assert_allclose(st_grad, dense_grad, atol=1e-5, rtol=0)
    assert np.abs(topk_grad - dense_grad).max() > 1e-2


def test_hard_attention_gradient_is_the_softmax_gradient(inputs, dense_softmax):
    _, grad = _value_and_grad_wrt_q(inputs, normalizer="hard")
    np.testing.assert_allclose(grad, dense_softmax[1], atol=1e-5, rtol=0)


def test_post_talking_heads_mix_after_dropout(inputs):
    """Dropout acts on each head's own probabilities, then the heads are mixed.

    Mixing with a permutation that swaps heads sharing a key/value head (h and h + K)
    must give the unmixed dropout output with its heads swapped.
    """
    args = (inputs["q"], inputs["k"], inputs["v"])
    perm = (np.arange(N) + K) % N
    swap = jnp.asarray(np.eye(N)[perm].T)  # out[:, g] = probs[:, perm[g]]
    # rbg keys compile much faster than threefry on CPU; any key type works.
    drop = dict(dropout_rate=0.5, dropout_rng=jax.random.key(4, impl="rbg"))
    drop["implementation"] = "reference"  # both draw the dropout mask the same way
    mixed = np.asarray(attention(*args, post_talking_heads=swap, **drop))
    plain = np.asarray(attention(*args, **drop))
    np.testing.assert_allclose(mixed, plain[:, :, perm], atol=1e-6, rtol=0)


def _fake(q, k, v, **kwargs):
    return jnp.zeros_like(q)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(normalizer="sparsemax"), "normalizer must be one of"),
        (dict(sparse_topk=0), "sparse_topk must be a positive int"),
        (dict(sparse_topk=True), "sparse_topk must be a positive int"),
        (dict(sparse_topk=2, normalizer="hard"), "sparse_topk and normalizer='hard'"),
        (dict(sparse_topk_straight_through=True), "needs sparse_topk"),
        (dict(logit_softclamp=0.0), "logit_softclamp must be > 0"),
        (dict(pre_talking_heads=jnp.eye(3)), r"pre_talking_heads must have shape \[N, N\]"),
        (dict(post_talking_heads=jnp.eye(N)[:2]), r"post_talking_heads must have shape"),
        (dict(prev_logits=jnp.zeros((B, N, T, S + 1))), "prev_logits must broadcast"),
        (dict(sparse_topk=2, implementation="test-extras-fake"), "does not support"),
    ],
)
def test_bad_extras_raise(inputs, kwargs, message):
    register_backend("test-extras-fake", _fake)
    with pytest.raises(ValueError, match=message):
        attention(inputs["q"], inputs["k"], inputs["v"], **kwargs)

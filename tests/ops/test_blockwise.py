"""The blockwise (flash-style) kernel equals the einsum reference: values and gradients."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import (
    AttentionMask,
    attention,
    attention_logits,
    attention_output,
    reference_attention,
)
from xtx.ops.blockwise import blockwise_attention

# Lengths that are not multiples of the blocks, keys longer than queries, GQA heads.
B, T, S, N, K, H = 2, 37, 53, 4, 2, 8


@pytest.fixture(scope="module")
def inputs():
    # numpy draws: with jax.random every new shape would compile its own sampler.
    rng = np.random.default_rng(0)
    q, k, v, bias, cotangent = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H), (1, N, T, S), (B, T, N, H))
    )
    padding = rng.random((B, S)) < 0.8
    padding[1, :] = False  # row 1: no key
    return q, k, v, bias, jnp.asarray(padding), cotangent


def _cases(bias, padding):
    return {
        "dense": (None, None),
        "causal-offset-right-aligned": (AttentionMask(causal=True), None),
        "causal-padding-bias": (AttentionMask(causal=True, key_padding=padding), bias),
        "sliding-window": (AttentionMask(causal=True, window=(9, None)), None),
        "two-sided-window-head-bias": (AttentionMask(window=(5, 5)), bias[:, :1]),
        "int-offset-asymmetric-window": (AttentionMask(window=(6, 3), q_offset=10), None),
        "prefix-keys-causal-window-padding": (
            AttentionMask(causal=True, window=(4, None), prefix=11, key_padding=padding),
            None,
        ),
    }


CASE_NAMES = [
    "dense",
    "causal-offset-right-aligned",
    "causal-padding-bias",
    "sliding-window",
    "two-sided-window-head-bias",
    "int-offset-asymmetric-window",
    "prefix-keys-causal-window-padding",
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

    def loss_and_out(*args):
        out = blk(*args)
        return (out * ct).sum(), out

    # The kernel's values come from its gradient program: one compilation, not two.
    (_, out), g_blk = jax.jit(jax.value_and_grad(loss_and_out, argnums, has_aux=True))(q, k, v, b)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref(q, k, v, b)), atol=1e-5)
    g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=argnums)(q, k, v, b)
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
    with pytest.raises(ValueError, match="dropout_rng"):
        blockwise_attention(q, k, v, dropout_rate=0.1)


def test_auto_picks_blockwise_for_long_sequences_on_cpu(monkeypatch):
    """``implementation="auto"``: blockwise once the score matrix reaches
    BLOCKWISE_MIN_LENGTH ** 2 entries on CPU (with dropout too); the reference below it
    (one decoding query over as many keys included) or for a dense explicit mask."""
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
    one_q = jnp.zeros((1, 1, 2, 4))
    attention(one_q, long_q, long_q, mask=AttentionMask(causal=True, q_offset=n - 1))
    assert calls == ["blockwise", "reference", "blockwise", "reference", "reference"]


def test_dropout_is_exact_with_the_block_masks():
    """Values and gradients equal dense attention whose probabilities are dropped with
    the very masks the kernel draws: ``fold_in(rng, qi * n_kb + kj)`` per block."""
    Bd, Td, Sd, Nd, Kd, Hd, blk, rate = 2, 32, 48, 4, 2, 8, 16, 0.3
    data = np.random.default_rng(7)  # numpy: jax.random compiles a sampler per shape
    q, k, v, ct = (
        jnp.asarray(data.standard_normal(shape), jnp.float32)
        for shape in ((Bd, Td, Nd, Hd), (Bd, Sd, Kd, Hd), (Bd, Sd, Kd, Hd), (Bd, Td, Nd, Hd))
    )
    rng = jax.random.key(11)
    mask = AttentionMask(causal=True)
    n_kb, G = Sd // blk, Nd // Kd

    @jax.jit  # one program instead of many eagerly dispatched ops
    def block_keep_masks(rng):
        rows = []
        for qi in range(Td // blk):
            row = [
                jax.random.bernoulli(
                    jax.random.fold_in(rng, qi * n_kb + kj), 1.0 - rate, (Bd, Kd, G, blk, blk)
                )
                for kj in range(n_kb)
            ]
            rows.append(jnp.concatenate(row, axis=-1))
        keep = jnp.concatenate(rows, axis=-2)  # [B, K, G, T, S]
        return keep.transpose(0, 2, 1, 3, 4).reshape(Bd, Nd, Td, Sd)  # head n = g * K + k

    keep = block_keep_masks(rng)

    def dense(q, k, v):
        logits, allowed = attention_logits(q, k, mask=mask)
        probs = jax.nn.softmax(logits, axis=-1) * keep / (1.0 - rate)
        return attention_output(probs, v, allowed)

    def kernel(q, k, v):
        return blockwise_attention(
            q, k, v, mask=mask, dropout_rate=rate, dropout_rng=rng, block_q=blk, block_k=blk
        )

    jitted_kernel = jax.jit(kernel)
    out = jitted_kernel(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jax.jit(dense)(q, k, v)), atol=1e-5)
    g_dense = jax.jit(jax.grad(lambda *a: (dense(*a) * ct).sum(), argnums=(0, 1, 2)))(q, k, v)
    g_kernel = jax.jit(jax.grad(lambda *a: (kernel(*a) * ct).sum(), argnums=(0, 1, 2)))(q, k, v)
    for gd, gk in zip(g_dense, g_kernel, strict=True):
        np.testing.assert_allclose(np.asarray(gk), np.asarray(gd), atol=1e-5)
    # The same key draws the same masks (the compiled kernel, run again).
    np.testing.assert_array_equal(np.asarray(jitted_kernel(q, k, v)), np.asarray(out))


@pytest.mark.parametrize(
    "mask",
    [
        AttentionMask(causal=True),
        AttentionMask(causal=True, q_offset=5),
        AttentionMask(causal=True, window=(20, None)),
        AttentionMask(window=(7, 11)),
        AttentionMask(window=(None, 4), q_offset=-3),
        AttentionMask(),
        AttentionMask(causal=True, window=(5, None), prefix=9),
        AttentionMask(window=(3, 3), prefix=16),
        AttentionMask(causal=True, q_offset=-4, prefix=20),
    ],
)
@pytest.mark.parametrize("T, S, bq, bk", [(37, 53, 16, 8), (64, 64, 16, 16), (20, 90, 8, 32)])
def test_blocks_run_without_mask_only_where_every_real_query_sees_every_key(mask, T, S, bq, bk):
    """The kernel's unmasked interior blocks, checked against the dense mask block by block."""
    from xtx.ops.blockwise import _key_block_range, _unmasked_block_range

    dense = mask.dense(T, S)
    dense = np.ones((T, S), bool) if dense is None else np.asarray(dense[0, 0])
    for qi in range(-(-T // bq)):
        rows = dense[qi * bq : min(qi * bq + bq, T)]
        lo, hi = (int(i) for i in _key_block_range(mask, T, S, qi, bq, bk))
        full_lo, full_hi = (int(i) for i in _unmasked_block_range(mask, T, S, qi, lo, hi, bq, bk))
        assert lo <= full_lo <= full_hi <= hi
        for kj in range(-(-S // bk)):
            block = rows[:, kj * bk : kj * bk + bk]
            if full_lo <= kj < full_hi:
                assert block.shape[1] == bk and block.all(), (qi, kj)
            visited = lo <= kj < hi or kj * bk < mask.prefix
            if not visited:
                assert not block.any(), (qi, kj)  # skipped blocks hide every key
        # The interior is not needlessly small: fully visible blocks inside [lo, hi)
        # past the prefix keys (whose blocks always take the masked path) are unmasked.
        full = [
            kj
            for kj in range(lo, hi)
            if kj * bk >= mask.prefix
            and rows[:, kj * bk : kj * bk + bk].shape[1] == bk
            and rows[:, kj * bk : kj * bk + bk].all()
        ]
        if full:
            assert full_hi - full_lo == len(full), (qi, full, full_lo, full_hi)

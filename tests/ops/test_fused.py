"""The jax.nn.dot_product_attention backends (XLA here; cuDNN shares the adapter) equal
the reference: head tiling, masks, biases, empty rows, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.ops import AttentionMask, attention, reference_attention

B, T, S, N, H = 2, 5, 7, 4, 8


@pytest.fixture(scope="module")
def inputs():
    # numpy draws: with jax.random every new shape would compile its own sampler.
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, 2, H)), jnp.float32)  # 2 kv heads: tiled
    v = jnp.asarray(rng.standard_normal((B, S, 2, H)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((N, T, S)), jnp.float32)
    padding = jnp.ones((B, S), bool).at[1].set(False)  # row 1 sees no key
    return q, k, v, bias, padding


@pytest.mark.parametrize(
    "case", ["plain", "causal-right-aligned", "window-padding-bias", "segments"]
)
def test_xla_backend_matches_reference(inputs, case):
    q, k, v, bias, padding = inputs
    mask, b = {
        "plain": (None, None),
        "causal-right-aligned": (AttentionMask(causal=True), None),
        "window-padding-bias": (AttentionMask(window=(2, 1), key_padding=padding), bias),
        "segments": (
            AttentionMask(
                q_segment_ids=jnp.array([[0, 0, 1, 1, 1]] * B),
                kv_segment_ids=jnp.array([[0, 0, 0, 1, 1, 1, 1]] * B),
            ),
            None,
        ),
    }[case]
    ref = reference_attention(q, k, v, mask=mask, bias=b)
    got = attention(q, k, v, mask=mask, bias=b, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    g_ref = jax.grad(lambda q: reference_attention(q, k, v, mask=mask, bias=b).sum())(q)
    g_got = jax.grad(lambda q: attention(q, k, v, mask=mask, bias=b, implementation="xla").sum())(q)
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_ref), atol=1e-5)


def test_no_dropout(inputs):
    q, k, v, *_ = inputs
    with pytest.raises(ValueError, match="no dropout"):
        attention(q, k, v, implementation="xla", dropout_rate=0.1, dropout_rng=jax.random.key(0))

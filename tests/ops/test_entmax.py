"""xtx.ops.entmax15 against a sort-based and a bisection reference in numpy, plus its
gradient against finite differences and the closed form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from xtx.ops import entmax15 as entmax15_eager
from xtx.ops import mask_value

# One compilation per shape instead of one per primitive in eager mode.
entmax15 = jax.jit(entmax15_eager, static_argnames="axis")


def entmax15_bisect(z: np.ndarray) -> np.ndarray:
    """1.5-entmax by definition, float64: find tau with sum(max(z/2 - tau, 0)^2) = 1.

    A different algorithm from the sort-based one under test: bisection on the
    threshold, which is bracketed by [max(z)/2 - 1, max(z)/2].
    """
    z = np.asarray(z, np.float64) / 2
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        lo, hi = row.max() - 1.0, row.max()
        for _ in range(200):
            tau = (lo + hi) / 2
            if np.sum(np.maximum(row - tau, 0.0) ** 2) > 1.0:
                lo = tau
            else:
                hi = tau
        p = np.maximum(row - (lo + hi) / 2, 0.0) ** 2
        out[idx] = p / p.sum()
    return out


def entmax15_sorted(z: np.ndarray) -> np.ndarray:
    """1.5-entmax by the sort-based algorithm of Peters et al. (1905.05702), float64 loops.

    z' = (z - max z) / 2, sorted descending; for k = 1..n: mu_k = mean of the top k,
    s_k = k * (mean of squares of the top k - mu_k^2), tau_k = mu_k - sqrt(max((1 - s_k)
    / k, 0)); the support is every k with tau_k <= z'_(k); p = max(z' - tau_K, 0)^2.
    """
    z = np.asarray(z, np.float64)
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        row = (z[idx] - z[idx].max()) / 2
        srt = np.sort(row)[::-1]
        tau_star = None
        for k in range(1, len(srt) + 1):
            top = srt[:k]
            mu = top.mean()
            ss = k * ((top**2).mean() - mu**2)
            tau = mu - np.sqrt(max((1 - ss) / k, 0.0))
            if tau <= srt[k - 1]:
                tau_star = tau
        out[idx] = np.maximum(row - tau_star, 0.0) ** 2
    return out


@pytest.fixture(scope="module")
def scores():
    # numpy draws: jax.random would compile a sampler for this shape.
    return jnp.asarray(3.0 * np.random.default_rng(0).standard_normal((3, 4, 9)), jnp.float32)


def test_matches_bisection(scores):
    got = np.asarray(entmax15(scores))
    np.testing.assert_allclose(got, entmax15_bisect(np.asarray(scores)), atol=1e-6, rtol=0)


def test_matches_sort_based_reference(scores):
    got = np.asarray(entmax15(scores))
    np.testing.assert_allclose(got, entmax15_sorted(np.asarray(scores)), atol=1e-6, rtol=0)


def test_is_a_sparse_distribution(scores):
    p = np.asarray(entmax15(scores))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert (p >= 0).all()
    # Spread-out scores leave most entries at exactly zero, and the top one never.
    assert (p == 0).mean() > 0.3
    top = np.take_along_axis(p, np.asarray(scores).argmax(-1)[..., None], -1)
    assert (top > 0).all()


def test_axis_argument(scores):
    moved = np.asarray(entmax15(jnp.swapaxes(scores, 1, 2), axis=1))
    np.testing.assert_array_equal(np.swapaxes(moved, 1, 2), np.asarray(entmax15(scores)))


def test_hand_worked_values():
    # z = [2, 0]: z/2 = [1, 0]; tau = 0 gives (1 - 0)^2 + 0 = 1, so p = [1, 0].
    np.testing.assert_allclose(np.asarray(entmax15(jnp.array([2.0, 0.0]))), [1.0, 0.0])
    # Equal scores: the uniform distribution.
    np.testing.assert_allclose(np.asarray(entmax15(jnp.zeros(4))), [0.25] * 4, atol=1e-7)
    # z = [1, 0]: z/2 = [.5, 0]; (.5 - tau)^2 + tau^2 = 1 -> tau = (.5 - sqrt(1.75)) / 2.
    tau = (0.5 - np.sqrt(1.75)) / 2
    expected = [(0.5 - tau) ** 2, tau**2]
    np.testing.assert_allclose(np.asarray(entmax15(jnp.array([1.0, 0.0]))), expected, atol=1e-6)


def test_masked_entries_get_zero(scores):
    fill = mask_value(jnp.float32)
    masked = scores.at[..., ::3].set(fill)
    p = np.asarray(entmax15(masked))
    assert np.isfinite(p).all()
    assert (p[..., ::3] == 0).all()
    keep = [i for i in range(9) if i % 3]
    np.testing.assert_allclose(
        p[..., keep], entmax15_bisect(np.asarray(scores)[..., keep]), atol=1e-6, rtol=0
    )
    # A row with every entry masked is uniform (attention zeroes such rows afterwards).
    np.testing.assert_allclose(np.asarray(entmax15(jnp.full((5,), fill))), [0.2] * 5)


def test_exact_zeros_next_to_masked_entries():
    """A dominant entry gets probability exactly 1, whatever the masked entries hold."""
    fill = float(mask_value(jnp.float32))
    rng = np.random.default_rng(3)
    z = rng.standard_normal((64, 13)).astype(np.float32)
    z[:, 0] += 8.0  # alone in the support: the threshold sits exactly on the edge, -1
    z[:, 1::3] = fill
    p = np.asarray(entmax15(jnp.asarray(z)))
    np.testing.assert_array_equal(p[:, 0], 1.0)
    np.testing.assert_array_equal(p[:, 1:], 0.0)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        z = jnp.asarray(rng.standard_normal((2, 7)) * 2.0, jnp.float64)
        w = jnp.asarray(rng.standard_normal((2, 7)), jnp.float64)
        # Some entries in and some out of the support, none on its edge.
        p = np.asarray(entmax15(z))
        assert 0 < (p == 0).sum() < p.size
        check_grads(lambda x: jnp.sum(w * entmax15(x)), (z,), order=1, modes=("rev",), eps=1e-5)


def test_gradient_formula():
    """The closed form: dz = s * (g - sum(s g) / sum(s)) with s = sqrt(p)."""
    z = jnp.array([1.5, 0.3, -0.2, -3.0])
    g = jnp.array([0.7, -1.1, 0.4, 2.0])
    p = np.asarray(entmax15(z), np.float64)
    s = np.sqrt(p)
    expected = s * (np.asarray(g) - np.sum(s * np.asarray(g)) / s.sum())
    _, vjp = jax.vjp(entmax15, z)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), expected, atol=1e-6)
    assert np.asarray(vjp(g)[0])[3] == 0.0  # no gradient outside the support


def test_rejects_integer_scores():
    with pytest.raises(TypeError, match="floating-point"):
        entmax15(jnp.arange(4))

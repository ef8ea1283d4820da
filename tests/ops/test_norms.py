"""Tests for xtx.ops.norms against naive numpy, hand-worked values and x-transformers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers.x_transformers import LayerNorm, RMSNorm, ScaleNorm, SimpleRMSNorm, l2norm

from xtx.ops.norms import l2_normalize, layer_norm, rms_norm, scale_norm

ATOL = 1e-5
DIM = 8

_layer_norm = jax.jit(layer_norm, static_argnames=("eps", "unit_offset"))
_rms_norm = jax.jit(rms_norm, static_argnames=("unit_offset",))
_scale_norm = jax.jit(scale_norm, static_argnames=("unit_offset",))
_l2_normalize = jax.jit(l2_normalize, static_argnames=("groups", "eps"))


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X = _randn(2, 3, DIM)  # [B, T, D]
GAIN = _randn(DIM, seed=1)


def _torch_out(module, x=X):
    return module(torch.from_numpy(x)).detach().numpy()


def _set(param, value):
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.asarray(value, np.float32)))


def naive_layer_norm(x, gain, bias=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps) * gain
    return out if bias is None else out + bias


def naive_rms(x, gain=1.0):
    x = np.asarray(x, np.float64)
    norm = np.maximum(np.sqrt((x**2).sum(-1, keepdims=True)), 1e-12)
    return math.sqrt(x.shape[-1]) * x / norm * gain


# ---------------------------------------------------------------- LayerNorm


def test_layer_norm_hand_worked():
    # mean 2.5, biased variance 1.25.
    out = _layer_norm(jnp.array([1.0, 2.0, 3.0, 4.0]))
    expected = (np.array([1, 2, 3, 4]) - 2.5) / math.sqrt(1.25 + 1e-5)
    np.testing.assert_allclose(out, expected, atol=ATOL)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_layer_norm_matches_x_transformers(unit_offset):
    module = LayerNorm(DIM, unit_offset=unit_offset)
    _set(module.gamma, GAIN)
    ours = _layer_norm(jnp.asarray(X), jnp.asarray(GAIN), unit_offset=unit_offset)
    np.testing.assert_allclose(ours, _torch_out(module), atol=ATOL)
    np.testing.assert_allclose(ours, naive_layer_norm(X, GAIN + unit_offset), atol=ATOL)


def test_layer_norm_with_bias_matches_torch_layer_norm():
    module = torch.nn.LayerNorm(DIM)  # the 0.12 LayerNorm: affine with bias, eps 1e-5
    bias = _randn(DIM, seed=2)
    _set(module.weight, GAIN)
    _set(module.bias, bias)
    ours = _layer_norm(jnp.asarray(X), jnp.asarray(GAIN), jnp.asarray(bias))
    np.testing.assert_allclose(ours, _torch_out(module), atol=ATOL)
    np.testing.assert_allclose(ours, naive_layer_norm(X, GAIN, bias), atol=ATOL)


def test_layer_norm_eps_and_no_scale():
    # A nearly constant row shows the eps: 1e-5 (x-transformers) vs 1e-6 (Flax default).
    x = jnp.array([0.0, 0.001, 0.0, 0.001])
    np.testing.assert_allclose(_layer_norm(x), naive_layer_norm(np.asarray(x), 1.0), atol=ATOL)
    np.testing.assert_allclose(
        _layer_norm(x, eps=1e-6), naive_layer_norm(np.asarray(x), 1.0, eps=1e-6), atol=ATOL
    )
    # unit_offset without a gain has nothing to offset.
    np.testing.assert_array_equal(_layer_norm(x, unit_offset=True), _layer_norm(x))


# ---------------------------------------------------------------- RMSNorm / ScaleNorm


def test_rms_norm_hand_worked():
    # ||[3, 4]|| = 5, sqrt(2) * [0.6, 0.8].
    out = _rms_norm(jnp.array([3.0, 4.0]), jnp.array([0.0, 1.0]), unit_offset=True)
    np.testing.assert_allclose(out, [math.sqrt(2) * 0.6, 2 * math.sqrt(2) * 0.8], atol=ATOL)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_matches_x_transformers(unit_offset):
    module = RMSNorm(DIM, unit_offset=unit_offset)
    _set(module.g, GAIN)
    ours = _rms_norm(jnp.asarray(X), jnp.asarray(GAIN), unit_offset=unit_offset)
    np.testing.assert_allclose(ours, _torch_out(module), atol=ATOL)
    np.testing.assert_allclose(ours, naive_rms(X, GAIN + unit_offset), atol=ATOL)


def test_simple_rms_norm_matches_x_transformers():
    ours = _rms_norm(jnp.asarray(X))
    np.testing.assert_allclose(ours, _torch_out(SimpleRMSNorm(DIM)), atol=ATOL)
    np.testing.assert_allclose(ours, naive_rms(X), atol=ATOL)


def test_rms_norm_per_head_gain():
    x = _randn(2, 3, 4, DIM, seed=3)  # [B, T, N, H] with a gain per head, [N, H]
    gain = _randn(4, DIM, seed=4)
    ours = _rms_norm(jnp.asarray(x), jnp.asarray(gain), unit_offset=True)
    np.testing.assert_allclose(ours, naive_rms(x, gain + 1), atol=ATOL)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_scale_norm_matches_x_transformers(unit_offset):
    module = ScaleNorm(DIM, unit_offset=unit_offset)
    _set(module.g, [0.7])
    ours = _scale_norm(jnp.asarray(X), jnp.array([0.7]), unit_offset=unit_offset)
    np.testing.assert_allclose(ours, _torch_out(module), atol=ATOL)
    np.testing.assert_allclose(ours, naive_rms(X, 0.7 + unit_offset), atol=ATOL)
    # Hand-worked: D = 2, x = [3, 4], g = 0.7.
    out = _scale_norm(jnp.array([3.0, 4.0]), jnp.array([0.7]), unit_offset=unit_offset)
    gain = 0.7 + unit_offset
    np.testing.assert_allclose(
        out, [math.sqrt(2) * 0.6 * gain, math.sqrt(2) * 0.8 * gain], atol=ATOL
    )


def test_zero_vector_clamps_to_zero_with_finite_gradient():
    zero = jnp.zeros(DIM)
    np.testing.assert_array_equal(_rms_norm(zero), zero)
    grad = jax.jit(jax.grad(lambda x: rms_norm(x, jnp.ones(DIM)).sum()))(zero)
    assert np.all(np.isfinite(grad))
    # torch agrees: F.normalize divides by max(||x||, 1e-12).
    np.testing.assert_array_equal(_torch_out(SimpleRMSNorm(DIM), np.zeros(DIM, np.float32)), 0.0)


# ---------------------------------------------------------------- l2 normalisation


def test_l2_normalize_hand_worked():
    out = _l2_normalize(jnp.array([3.0, 4.0, 0.0, -2.0]), groups=2)
    np.testing.assert_allclose(out, [0.6, 0.8, 0.0, -1.0], atol=ATOL)
    # The norm is clamped at eps (F.normalize), not softened by adding eps.
    clamped = _l2_normalize(jnp.array([0.3, 0.4, 3.0, 4.0]), groups=2, eps=1.0)
    np.testing.assert_allclose(clamped, [0.3, 0.4, 0.6, 0.8], atol=ATOL)
    tiny = np.array([3e-13, 4e-13], np.float32)  # norm 5e-13, below the 1e-12 clamp
    np.testing.assert_allclose(_l2_normalize(jnp.asarray(tiny)), [0.3, 0.4], atol=ATOL)
    expected = _torch_out(SimpleRMSNorm(2), tiny)
    np.testing.assert_allclose(_rms_norm(jnp.asarray(tiny)), expected, atol=ATOL)
    np.testing.assert_allclose(expected, [0.3 * math.sqrt(2), 0.4 * math.sqrt(2)], atol=ATOL)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_l2_normalize_matches_x_transformers(groups):
    ours = _l2_normalize(jnp.asarray(X), groups=groups)
    np.testing.assert_allclose(ours, l2norm(torch.from_numpy(X), groups=groups).numpy(), atol=ATOL)
    grouped = X.reshape(2, 3, groups, DIM // groups).astype(np.float64)
    naive = grouped / np.linalg.norm(grouped, axis=-1, keepdims=True)
    np.testing.assert_allclose(ours, naive.reshape(X.shape), atol=ATOL)


# ---------------------------------------------------------------- dtypes and bad inputs


def test_low_precision_input_keeps_dtype():
    x16 = jnp.asarray(X, jnp.bfloat16)
    outputs = [
        _layer_norm(x16, jnp.asarray(GAIN), unit_offset=True),
        _rms_norm(x16, jnp.asarray(GAIN)),
        _scale_norm(x16, jnp.array([0.5])),
        _l2_normalize(x16),
    ]
    references = [
        naive_layer_norm(np.asarray(x16, np.float32), GAIN + 1),
        naive_rms(np.asarray(x16, np.float32), GAIN),
        naive_rms(np.asarray(x16, np.float32), 0.5),
        naive_rms(np.asarray(x16, np.float32)) / math.sqrt(DIM),
    ]
    for out, reference in zip(outputs, references, strict=True):
        assert out.dtype == jnp.bfloat16
        # Only the final rounding to bfloat16 (8 significand bits) is allowed: 2**-9 relative.
        np.testing.assert_allclose(out.astype(jnp.float32), reference, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: layer_norm(jnp.ones((2, 4)), jnp.ones(3)), "scale"),
        (lambda: layer_norm(jnp.ones((2, 4)), jnp.ones(4), jnp.ones(5)), "bias"),
        (lambda: layer_norm(jnp.ones((2, 4)), eps=0.0), "eps"),
        (lambda: rms_norm(jnp.ones((2, 4)), jnp.ones((4, 2))), "scale"),
        (lambda: scale_norm(jnp.ones((2, 4)), jnp.ones(4)), "scale"),
        (lambda: l2_normalize(jnp.ones((2, 6)), groups=4), "groups"),
        (lambda: l2_normalize(jnp.ones((2, 6)), eps=-1.0), "eps"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()

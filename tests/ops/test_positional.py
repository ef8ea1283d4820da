"""Tests for xtx.ops.positional against naive loops, hand-worked values and x-transformers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers.x_transformers import (
    AlibiPositionalBias,
    RelativePositionBias,
    RotaryEmbedding,
    ScaledSinusoidalEmbedding,
    apply_rotary_pos_emb,
)

from xtx.ops.positional import (
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    rotary_angles,
    rotary_inv_freq,
    sinusoidal_embedding,
    t5_position_bias,
    t5_relative_position_bucket,
    xpos_scale,
)

ATOL = 1e-5

_apply_rotary = jax.jit(
    apply_rotary,
    static_argnames=(
        "rot_dim",
        "base",
        "interleaved",
        "interpolation_factor",
        "base_rescale_factor",
    ),
)
_xpos_scale = jax.jit(xpos_scale, static_argnames=("rot_dim", "scale_base", "interleaved"))
_bucket = jax.jit(
    t5_relative_position_bucket, static_argnames=("causal", "num_buckets", "max_distance")
)
_t5_bias = jax.jit(
    t5_position_bias, static_argnames=("causal", "num_buckets", "max_distance", "scale")
)
_alibi_bias = jax.jit(alibi_bias)


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- references


def naive_rotary(
    x, positions, rot_dim, *, base=10000.0, interleaved=True, interp=1.0, rescale=1.0, scale=None
):
    """Pair-by-pair rotation in float64, straight from the RoPE definition."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    batch, seq_len, heads, _ = x.shape
    positions = np.broadcast_to(np.asarray(positions, np.float64), (batch, seq_len))
    if rescale != 1.0:
        base = base * rescale ** (rot_dim / (rot_dim - 2))
    half = rot_dim // 2
    for b in range(batch):
        for t in range(seq_len):
            for n in range(heads):
                for k in range(half):
                    phi = positions[b, t] * base ** (-2 * k / rot_dim) / interp
                    i, j = (2 * k, 2 * k + 1) if interleaved else (k, k + half)
                    s_i, s_j = (1.0, 1.0) if scale is None else (scale[b, t, i], scale[b, t, j])
                    a, c = x[b, t, n, i], x[b, t, n, j]
                    out[b, t, n, i] = (a * math.cos(phi) - c * math.sin(phi)) * s_i
                    out[b, t, n, j] = (c * math.cos(phi) + a * math.sin(phi)) * s_j
    return out


def naive_xpos_scale(positions, rot_dim, scale_base, interleaved=True):
    positions = np.asarray(positions, np.float64)
    center = (positions.max() + 1) // 2
    half = rot_dim // 2
    out = np.zeros((*positions.shape, rot_dim))
    for idx in np.ndindex(positions.shape):
        for k in range(half):
            zeta = (2 * k + 0.4 * rot_dim) / (1.4 * rot_dim)
            value = zeta ** ((positions[idx] - center) / scale_base)
            i, j = (2 * k, 2 * k + 1) if interleaved else (k, k + half)
            out[idx + (i,)] = out[idx + (j,)] = value
    return out


def naive_bucket(rel, causal, num_buckets=32, max_distance=128):
    """The T5 bucket rule for one Python int, following the T5 paper's description."""
    n = -rel
    offset = 0
    if causal:
        n = max(n, 0)
    else:
        num_buckets //= 2
        offset = num_buckets if n < 0 else 0
        n = abs(n)
    exact = num_buckets // 2
    if n < exact:
        return offset + n
    large = exact + int(
        math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    )
    return offset + min(large, num_buckets - 1)


def torch_rotary(x, positions, rot_dim, *, key=False, use_xpos=False, scale_base=512, **kwargs):
    """x-transformers 2.31 RotaryEmbedding + apply_rotary_pos_emb, on [B, T, N, H] input."""
    rotary = RotaryEmbedding(rot_dim, use_xpos=use_xpos, scale_base=scale_base, **kwargs)
    freqs, scale = rotary(torch.as_tensor(np.asarray(positions)))
    if use_xpos and key:
        scale = scale**-1.0
    t = torch.tensor(np.asarray(x)).permute(0, 2, 1, 3)  # [B, N, T, H]
    return apply_rotary_pos_emb(t, freqs, scale).permute(0, 2, 1, 3).numpy()


def half_split_to_interleaved(rot_dim):
    half = rot_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=-1).reshape(-1)


# ---------------------------------------------------------------- sinusoidal


def test_sinusoidal_hand_worked():
    # dim 4: inv_freq = [1, 10000 ** -0.5] = [1, 0.01].
    emb = np.asarray(sinusoidal_embedding(jnp.array([1]), 4))
    expected = [[math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]]
    np.testing.assert_allclose(emb, expected, atol=ATOL)


def test_sinusoidal_matches_x_transformers():
    dim, seq_len = 16, 7
    module = ScaledSinusoidalEmbedding(dim)
    with torch.no_grad():
        module.scale.fill_(1.0)
    expected = module(torch.zeros(1, seq_len, dim)).detach().numpy()
    ours = sinusoidal_embedding(jnp.arange(seq_len), dim)
    assert ours.shape == (seq_len, dim) and ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    naive = [
        [math.sin(p * 10000 ** (-i / 8)) for i in range(8)]
        + [math.cos(p * 10000 ** (-i / 8)) for i in range(8)]
        for p in range(seq_len)
    ]
    np.testing.assert_allclose(ours, naive, atol=ATOL)


# ---------------------------------------------------------------- rotary frequencies


@pytest.mark.parametrize(
    "rot_dim,base,factor", [(4, 10000.0, 1.0), (16, 10000.0, 1.0), (32, 500.0, 3.0), (8, 1e4, 2.0)]
)
def test_rotary_inv_freq_bitwise_x_transformers(rot_dim, base, factor):
    expected = RotaryEmbedding(rot_dim, base=base, base_rescale_factor=factor).inv_freq.numpy()
    ours = np.asarray(rotary_inv_freq(rot_dim, base=base, base_rescale_factor=factor))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_rotary_inv_freq_hand_worked():
    np.testing.assert_allclose(rotary_inv_freq(4), [1.0, 0.01], rtol=1e-6)
    # base' = 10000 * 4 ** (4 / 2) = 160000, so inv_freq = [1, 160000 ** -0.5].
    np.testing.assert_allclose(
        rotary_inv_freq(4, base_rescale_factor=4.0), [1.0, 1 / 400], rtol=1e-6
    )


def test_rotary_angles_hand_worked():
    angles = rotary_angles(jnp.array([0, 1, 2]), jnp.array([1.0, 0.5]), interpolation_factor=2.0)
    np.testing.assert_allclose(angles, [[0, 0], [0.5, 0.25], [1.0, 0.5]], atol=ATOL)
    batched = rotary_angles(jnp.array([[0, 1], [-3, 4]]), jnp.array([1.0, 0.5]))
    assert batched.shape == (2, 2, 2)
    np.testing.assert_allclose(batched[1], [[-3, -1.5], [4, 2]], atol=ATOL)


# ---------------------------------------------------------------- apply_rotary


def test_apply_rotary_hand_worked():
    # rot_dim 2 has inv_freq [1]: a unit vector turns by exactly `position` radians.
    x = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 1, 2)  # positions 1 and 2
    out = np.asarray(_apply_rotary(x, jnp.array([1, 2])))
    np.testing.assert_allclose(out[0, 0, 0], [math.cos(1), math.sin(1)], atol=ATOL)
    np.testing.assert_allclose(out[0, 1, 0], [-math.sin(2), math.cos(2)], atol=ATOL)
    # Position 0 is the identity.
    x0 = _randn(1, 1, 2, 6)
    np.testing.assert_allclose(_apply_rotary(x0, jnp.array([0])), x0, atol=ATOL)


ROTARY_CASES = {
    "full": dict(rot_dim=8, positions=np.arange(5)),
    "partial": dict(rot_dim=4, positions=np.arange(5)),
    "batched_positions": dict(rot_dim=4, positions=np.array([[0, 1, 2, 3, 4], [7, 3, 9, 2, 5]])),
    "negative_xl_memory": dict(rot_dim=8, positions=np.arange(-3, 2)),
    "interpolation": dict(rot_dim=6, positions=np.arange(5), interpolation_factor=2.0),
    "base_rescale": dict(rot_dim=8, positions=np.arange(5), base_rescale_factor=2.0),
}


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_apply_rotary_interleaved_matches_x_transformers(case):
    kwargs = dict(ROTARY_CASES[case])
    rot_dim, positions = kwargs.pop("rot_dim"), kwargs.pop("positions")
    x = _randn(2, 5, 3, 8)  # [B, T, N, H]
    ours = np.asarray(
        _apply_rotary(jnp.asarray(x), jnp.asarray(positions), rot_dim=rot_dim, **kwargs)
    )
    expected = torch_rotary(x, positions, rot_dim, **kwargs)
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    naive = naive_rotary(
        x,
        positions,
        rot_dim,
        interp=kwargs.get("interpolation_factor", 1.0),
        rescale=kwargs.get("base_rescale_factor", 1.0),
    )
    np.testing.assert_allclose(ours, naive, atol=ATOL)
    np.testing.assert_array_equal(ours[..., rot_dim:], x[..., rot_dim:])


@pytest.mark.parametrize("rot_dim", [4, 8])
def test_apply_rotary_half_split(rot_dim):
    x = _randn(2, 5, 3, 8, seed=1)
    positions = np.arange(-2, 3)
    ours = np.asarray(_apply_rotary(x, jnp.asarray(positions), rot_dim=rot_dim, interleaved=False))
    np.testing.assert_allclose(
        ours, naive_rotary(x, positions, rot_dim, interleaved=False), atol=ATOL
    )
    # Half-split rotation is the interleaved one conjugated by a permutation of dims,
    # so x-transformers 2.31 serves as the reference after reordering.
    perm = np.concatenate([half_split_to_interleaved(rot_dim), np.arange(rot_dim, 8)])
    expected = np.empty_like(x)
    expected[..., perm] = torch_rotary(x[..., perm], positions, rot_dim)
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    assert not np.allclose(ours, _apply_rotary(x, jnp.asarray(positions), rot_dim=rot_dim))


def test_apply_rotary_inv_freq_argument_and_dtype():
    x = _randn(1, 4, 2, 8, seed=2)
    positions = jnp.arange(4)
    inv_freq = rotary_inv_freq(4, base=500.0)
    from_buffer = _apply_rotary(jnp.asarray(x), positions, inv_freq=inv_freq)
    from_base = _apply_rotary(jnp.asarray(x), positions, rot_dim=4, base=500.0)
    np.testing.assert_array_equal(from_buffer, from_base)
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    out = _apply_rotary(x_bf16, positions, rot_dim=4)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[..., 4:], x_bf16[..., 4:])
    expected = torch_rotary(np.asarray(x_bf16.astype(jnp.float32)), np.arange(4), 4)
    # Rounding to bfloat16 (8 significand bits) moves a value by at most 2**-9 of itself.
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=2**-8, atol=1e-6)


# ---------------------------------------------------------------- xpos


def test_xpos_scale_hand_worked():
    # rot_dim 2: zeta = 0.8 / 2.8 = 2/7; centre = 4 // 2 = 2; powers -2, -1, 0, 1.
    scale = _xpos_scale(jnp.arange(4), 2, scale_base=1)
    zeta = 2 / 7
    expected = np.repeat(np.array([zeta**-2, zeta**-1, 1.0, zeta])[:, None], 2, axis=1)
    np.testing.assert_allclose(scale, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "positions",
    [np.arange(6), np.arange(-4, 2), np.array([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]])],
)
def test_xpos_scale_matches_x_transformers(positions):
    rot_dim, scale_base = 8, 4
    _, expected = RotaryEmbedding(rot_dim, use_xpos=True, scale_base=scale_base)(
        torch.as_tensor(positions)
    )
    ours = _xpos_scale(jnp.asarray(positions), rot_dim, scale_base=scale_base)
    assert ours.shape == positions.shape + (rot_dim,)
    np.testing.assert_allclose(ours, expected.numpy().reshape(ours.shape), atol=ATOL)
    np.testing.assert_allclose(ours, naive_xpos_scale(positions, rot_dim, scale_base), atol=ATOL)
    split = _xpos_scale(jnp.asarray(positions), rot_dim, scale_base=scale_base, interleaved=False)
    np.testing.assert_allclose(
        split, naive_xpos_scale(positions, rot_dim, scale_base, interleaved=False), atol=ATOL
    )


def test_xpos_scale_max_position_for_a_cached_step():
    full = _xpos_scale(jnp.arange(7), 4, scale_base=8)
    last = _xpos_scale(jnp.array([6]), 4, scale_base=8, max_position=7)
    np.testing.assert_allclose(last, full[-1:], atol=ATOL)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rotary_xpos_queries_and_keys(interleaved):
    rot_dim, scale_base = 4, 8
    x = _randn(2, 5, 2, 6, seed=3)
    positions = np.arange(-2, 3)
    scale = _xpos_scale(
        jnp.asarray(positions), rot_dim, scale_base=scale_base, interleaved=interleaved
    )
    q = np.asarray(
        _apply_rotary(
            x, jnp.asarray(positions), rot_dim=rot_dim, interleaved=interleaved, scale=scale
        )
    )
    k = np.asarray(
        _apply_rotary(
            x, jnp.asarray(positions), rot_dim=rot_dim, interleaved=interleaved, scale=1.0 / scale
        )
    )
    perm = half_split_to_interleaved(rot_dim) if not interleaved else np.arange(rot_dim)
    perm = np.concatenate([perm, np.arange(rot_dim, 6)])
    for ours, key in ((q, False), (k, True)):
        expected = np.empty_like(x)
        expected[..., perm] = torch_rotary(
            x[..., perm], positions, rot_dim, key=key, use_xpos=True, scale_base=scale_base
        )
        np.testing.assert_allclose(ours, expected, atol=ATOL)
    naive_scale = naive_xpos_scale(positions, rot_dim, scale_base, interleaved)[None]
    naive_scale = np.broadcast_to(naive_scale, (2, 5, rot_dim))
    naive = naive_rotary(x, positions, rot_dim, interleaved=interleaved, scale=naive_scale)
    np.testing.assert_allclose(q, naive, atol=ATOL)


# ---------------------------------------------------------------- T5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_t5_bucket_bitwise_x_transformers(causal, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    expected = RelativePositionBias._relative_position_bucket(
        torch.as_tensor(rel), causal=causal, num_buckets=num_buckets, max_distance=max_distance
    ).numpy()
    ours = np.asarray(
        _bucket(jnp.asarray(rel), causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    )
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)
    naive = [naive_bucket(int(r), causal, num_buckets, max_distance) for r in rel]
    np.testing.assert_array_equal(ours, naive)


def test_t5_bucket_hand_worked():
    # relative_position = k - q. Causal: future keys -> 0; distances 0..15 exact;
    # 32 -> 16 + trunc(log(2) / log(8) * 16) = 16 + 5; 128 and beyond -> 31.
    rel = jnp.array([5, 0, -1, -15, -16, -32, -127, -128, -1000])
    np.testing.assert_array_equal(_bucket(rel, causal=True), [0, 0, 1, 15, 16, 21, 31, 31, 31])
    # Bidirectional: 16 buckets per direction, +16 when the key is in the future;
    # 20 -> 8 + trunc(log(2.5) / log(16) * 8) = 10; past 128 -> 15.
    rel = jnp.array([-1, 1, -7, 7, -8, -20, 20, -200, 200])
    np.testing.assert_array_equal(_bucket(rel, causal=False), [1, 17, 7, 23, 8, 10, 26, 15, 31])


@pytest.mark.parametrize("causal", [True, False])
def test_t5_position_bias_matches_x_transformers(causal):
    heads, num_buckets, max_distance = 3, 8, 12
    seq_q, seq_k = 4, 30  # right-aligned queries, distances well past max_distance
    module = RelativePositionBias(
        scale=2.0, causal=causal, num_buckets=num_buckets, max_distance=max_distance, heads=heads
    )
    embedding = module.relative_attention_bias.weight.detach().numpy()
    expected = module(seq_q, seq_k).detach().numpy()
    q_positions = jnp.arange(seq_k - seq_q, seq_k)
    ours = _t5_bias(
        jnp.asarray(embedding),
        q_positions,
        jnp.arange(seq_k),
        causal=causal,
        num_buckets=num_buckets,
        max_distance=max_distance,
        scale=2.0,
    )
    assert ours.shape == (heads, seq_q, seq_k)
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    naive = np.zeros((heads, seq_q, seq_k), np.float32)
    for i in range(seq_q):
        for j in range(seq_k):
            bucket = naive_bucket(j - (seq_k - seq_q + i), causal, num_buckets, max_distance)
            naive[:, i, j] = embedding[bucket] * 2.0
    np.testing.assert_allclose(ours, naive, atol=ATOL)


def test_t5_position_bias_default_buckets_and_batched_positions():
    embedding = jnp.asarray(_randn(32, 2, seed=4))
    module = RelativePositionBias(scale=1.0, causal=True, heads=2)
    with torch.no_grad():
        module.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(embedding)))
    expected = module(3, 140).detach().numpy()  # distances up to 139 > 128
    ours = _t5_bias(embedding, jnp.arange(137, 140), jnp.arange(140), causal=True)
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    q = jnp.array([[137, 138, 139], [0, 1, 2]])
    k = jnp.stack([jnp.arange(140), jnp.arange(140) - 137])
    batched = _t5_bias(embedding, q, k, causal=True)
    assert batched.shape == (2, 2, 3, 140)
    np.testing.assert_allclose(batched[0], expected, atol=ATOL)
    np.testing.assert_allclose(batched[1], expected, atol=ATOL)  # shift-invariant


# ---------------------------------------------------------------- ALiBi


def test_alibi_slopes_hand_worked():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-7)
    # 6 heads: slopes(4) = 2^-2, 2^-4, 2^-6, 2^-8, then slopes(8)[0::2][:2] = 2^-1, 2^-3.
    np.testing.assert_allclose(alibi_slopes(6), [2.0**-e for e in (2, 4, 6, 8, 1, 3)], rtol=1e-7)
    np.testing.assert_allclose(
        alibi_slopes(6, total_heads=8), [2.0**-e for e in (2, 4, 6, 8, 1, 3)] + [0, 0], rtol=1e-7
    )


@pytest.mark.parametrize("heads", [1, 3, 6, 8, 12])
def test_alibi_slopes_match_x_transformers(heads):
    expected = np.asarray(AlibiPositionalBias._get_slopes(heads), np.float32)
    ours = np.asarray(alibi_slopes(heads))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("heads,total_heads", [(8, 8), (6, 6), (6, 8)])
def test_alibi_bias_matches_x_transformers(heads, total_heads):
    seq_q, seq_k = 3, 7
    module = AlibiPositionalBias(heads=heads, total_heads=total_heads)
    expected = module(seq_q, seq_k).numpy()[-total_heads:]
    slopes = alibi_slopes(heads, total_heads=total_heads)
    ours = _alibi_bias(slopes, jnp.arange(seq_k - seq_q, seq_k), jnp.arange(seq_k))
    assert ours.shape == (total_heads, seq_q, seq_k)
    np.testing.assert_allclose(ours, expected, atol=ATOL)
    assert np.all(np.asarray(ours)[heads:] == 0)
    naive = np.array(
        [
            [[-float(s) * abs(i + seq_k - seq_q - j) for j in range(seq_k)] for i in range(seq_q)]
            for s in np.asarray(slopes)
        ]
    )
    np.testing.assert_allclose(ours, naive, atol=ATOL)


def test_alibi_bias_batched_float_positions():
    module = AlibiPositionalBias(heads=4, total_heads=6)
    pos = np.array([[0.0, 1.5, 4.0, 4.5], [2.0, 0.0, 1.0, 3.0]], np.float32)
    expected = module.forward_custom_pos(torch.from_numpy(pos)).numpy()
    ours = _alibi_bias(alibi_slopes(4, total_heads=6), jnp.asarray(pos), jnp.asarray(pos))
    assert ours.shape == (2, 6, 4, 4)
    np.testing.assert_allclose(ours, expected, atol=ATOL)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sinusoidal_embedding(jnp.arange(3), 5), "dim"),
        (lambda: rotary_inv_freq(7), "rot_dim"),
        (lambda: rotary_inv_freq(2, base_rescale_factor=2.0), "rot_dim"),
        (lambda: rotary_inv_freq(8, base=-1.0), "base"),
        (lambda: rotary_angles(jnp.arange(3), jnp.ones((2, 2))), "inv_freq"),
        (
            lambda: rotary_angles(jnp.arange(3), jnp.ones(2), interpolation_factor=0.5),
            "interpolation_factor",
        ),
        (lambda: xpos_scale(jnp.arange(3), 4, scale_base=0), "scale_base"),
        (lambda: apply_rotary(jnp.ones((4, 2, 8)), jnp.arange(3)), "positions"),
        (lambda: apply_rotary(jnp.ones((1, 4, 2, 8)), jnp.zeros((1, 1, 4))), "positions"),
        (lambda: apply_rotary(jnp.ones((2, 4, 2, 8)), jnp.zeros((3, 4))), "positions"),
        (lambda: apply_rotary(jnp.ones((4, 8)), jnp.arange(4)), "x"),
        (lambda: apply_rotary(jnp.ones((1, 4, 2, 8)), jnp.arange(4), rot_dim=10), "rot_dim"),
        (lambda: apply_rotary(jnp.ones((1, 4, 2, 8)), jnp.arange(4), rot_dim=3), "rot_dim"),
        (
            lambda: apply_rotary(
                jnp.ones((1, 4, 2, 8)), jnp.arange(4), rot_dim=4, inv_freq=jnp.ones(3)
            ),
            "inv_freq",
        ),
        (
            lambda: apply_rotary(jnp.ones((1, 4, 2, 8)), jnp.arange(4), scale=jnp.ones((4, 4))),
            "scale",
        ),
        (lambda: t5_relative_position_bucket(jnp.zeros(3), causal=True), "relative_position"),
        (
            lambda: t5_relative_position_bucket(jnp.arange(3), causal=False, num_buckets=7),
            "num_buckets",
        ),
        (
            lambda: t5_relative_position_bucket(jnp.arange(3), causal=True, max_distance=16),
            "max_distance",
        ),
        (
            lambda: t5_position_bias(jnp.ones((16, 2)), jnp.arange(3), jnp.arange(3), causal=True),
            "embedding",
        ),
        (
            lambda: t5_position_bias(jnp.ones((32, 2)), jnp.zeros(3), jnp.arange(3), causal=True),
            "q_positions",
        ),
        (lambda: alibi_slopes(0), "heads"),
        (lambda: alibi_slopes(6, total_heads=4), "total_heads"),
        (lambda: alibi_bias(jnp.ones((2, 2)), jnp.arange(3), jnp.arange(3)), "slopes"),
        (lambda: alibi_bias(jnp.ones(2), jnp.array(1), jnp.arange(3)), "q_positions"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()

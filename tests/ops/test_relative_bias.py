"""RelativeBias: its dense form equals the positional functions, and the blockwise kernel,
which expands it per block, equals the einsum reference in values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.layers import Decoder, DynamicPositionBias
from xtx.ops import (
    AttentionMask,
    alibi_bias,
    alibi_slopes,
    attention,
    reference_attention,
    t5_position_bias,
)
from xtx.ops.blockwise import blockwise_attention
from xtx.ops.relative_bias import RelativeBias

# Lengths that are not multiples of the blocks, keys longer than queries, GQA heads.
B, T, S, N, K, H = 2, 13, 21, 4, 2, 8
BLOCK = 8


def _np(x):
    return np.asarray(x)


def _normal(seed, shape):
    """Standard normal test data from numpy: every new shape drawn with jax.random compiles
    its own sampler, about half a second on CPU."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _pad_prefix(bias, prefix):
    """Dense ``[..., T, S]`` bias with ``prefix`` zero columns in front (memory k/v)."""
    widths = [(0, 0)] * (bias.ndim - 1) + [(prefix, 0)]
    return np.pad(_np(bias), widths)


def _naive_dense(table, center, prefix, q_offset, T, S):
    """The defining formula, one entry at a time."""
    table = np.asarray(table)
    out = np.zeros((B, N, T, S), np.float32)
    offsets = np.broadcast_to(np.asarray(q_offset), (B,))
    R = table.shape[-1]
    for b in range(B):
        for i in range(T):
            for j in range(prefix, S):
                col = min(max((j - prefix) - (offsets[b] + i) + center, 0), R - 1)
                if table.ndim == 2:
                    out[b, :, i, j] = table[:, col]
                elif table.ndim == 3:
                    out[b, :, i, j] = table[b, :, col]
                else:
                    out[b, :, i, j] = table[b, :, i, col]
    return out


# ---------------------------------------------------------------------------------------
# The dense form


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length", [6, 21], ids=["shorter", "longer-than-max-distance"])
def test_t5_dense_equals_t5_position_bias(causal, length):
    """Every distance, also past max_distance, where the buckets saturate."""
    emb = _normal(0, (8, N))
    kw = dict(causal=causal, num_buckets=8, max_distance=10, scale=1.7)
    rel = RelativeBias.t5(emb, **kw)
    q_len = length // 2
    expected = t5_position_bias(emb, jnp.arange(length - q_len, length), jnp.arange(length), **kw)
    np.testing.assert_array_equal(_np(rel.dense(q_len, length))[0], _np(expected))


def test_t5_dense_with_prefix_and_offsets():
    emb = _normal(1, (8, N))
    kw = dict(causal=False, num_buckets=8, max_distance=5)
    prefix, positioned = 3, S - 3
    # An int offset (queries ahead of the keys here), then one offset per batch row.
    rel = RelativeBias.t5(emb, prefix=prefix, q_offset=-4, **kw)
    expected = t5_position_bias(emb, jnp.arange(T) - 4, jnp.arange(positioned), **kw)
    np.testing.assert_array_equal(_np(rel.dense(T, S))[0], _pad_prefix(expected, prefix))
    offsets = jnp.array([0, 7])
    rel = RelativeBias.t5(emb, prefix=prefix, q_offset=offsets, **kw)
    q_pos = offsets[:, None] + jnp.arange(T)  # [B, T]
    k_pos = jnp.broadcast_to(jnp.arange(positioned), (B, positioned))
    expected = t5_position_bias(emb, q_pos, k_pos, **kw)  # [B, N, T, S - prefix]
    np.testing.assert_array_equal(_np(rel.dense(T, S)), _pad_prefix(expected, prefix))


def test_alibi_dense_equals_alibi_bias():
    slopes = alibi_slopes(3, total_heads=N)
    rel = RelativeBias.alibi(slopes, S)
    expected = alibi_bias(slopes, jnp.arange(S - T, S), jnp.arange(S))
    np.testing.assert_array_equal(_np(rel.dense(T, S))[0], _np(expected))
    # Memory key/values in front: right alignment counts only the positioned keys.
    rel = RelativeBias.alibi(slopes, S - 2, prefix=2)
    expected = alibi_bias(slopes, jnp.arange(S - 2 - T, S - 2), jnp.arange(S - 2))
    np.testing.assert_array_equal(_np(rel.dense(T, S))[0], _pad_prefix(expected, 2))


@pytest.mark.parametrize(
    "shape, q_offset",
    [((N, 9), 2), ((B, N, 9), jnp.array([3, -1])), ((B, N, T, 9), jnp.array([0, 5]))],
    ids=["shared", "per-batch", "per-query"],
)
def test_dense_follows_the_formula(shape, q_offset):
    table = _normal(2, shape)
    rel = RelativeBias(table, center=4, prefix=2, q_offset=q_offset)
    dense = np.broadcast_to(_np(rel.dense(T, S)), (B, N, T, S))
    np.testing.assert_array_equal(dense, _naive_dense(table, 4, 2, q_offset, T, S))


def test_dynamic_position_bias_is_the_mlp_of_q_minus_k():
    """Depth 1, no norm: ``bias[i, j] = silu((q - k) W0 + b0) W1 + b1`` by hand."""
    module = DynamicPositionBias(width=5, heads=N, depth=1)
    params = module.init(jax.random.key(3), S)
    rel = module.apply(params, S)
    p = nn.unbox(params)["params"]
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    d = (q_pos[:, None] - k_pos[None, :]).astype(np.float32)[..., None]  # [T, S, 1]
    hidden = d * _np(p["hidden_0"]["kernel"]) + _np(p["hidden_0"]["bias"])
    hidden = hidden / (1.0 + np.exp(-hidden))
    expected = hidden @ _np(p["to_heads"]["kernel"]) + _np(p["to_heads"]["bias"])  # [T, S, N]
    np.testing.assert_allclose(
        _np(rel.dense(T, S))[0], expected.transpose(2, 0, 1), atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------
# The blockwise kernel against the reference


@pytest.fixture(scope="module")
def inputs():
    q = _normal(40, (B, T, N, H))
    k = _normal(41, (B, S, K, H))
    v = _normal(42, (B, S, K, H))
    cotangent = _normal(43, (B, T, N, H))
    return q, k, v, cotangent


def _t5(emb):
    return RelativeBias.t5(emb, causal=True, num_buckets=8, max_distance=6, scale=2.0)


def _alibi(slopes):
    return RelativeBias.alibi(slopes, S)


CASES = {
    # name: (mask, parameters of the bias, parameters -> RelativeBias)
    "t5-causal": (AttentionMask(causal=True), ("normal", (8, N)), _t5),
    "alibi-window": (AttentionMask(window=(4, 3)), ("slopes", (N,)), _alibi),
    "distance-table-prefix-offset": (
        AttentionMask(causal=True, q_offset=5),
        ("normal", (B, N, 11)),
        lambda t: RelativeBias(t, center=5, prefix=3, q_offset=2),
    ),
    "per-query-table-row-offsets": (
        AttentionMask(causal=True),
        ("normal", (B, N, T, 2 * S - 1)),
        lambda t: RelativeBias(t, center=S - 1, prefix=1, q_offset=jnp.array([4, 7])),
    ),
    "head-shared-table-row-offsets": (
        None,
        ("normal", (1, 7)),
        lambda t: RelativeBias(t, center=3, q_offset=jnp.array([2, 9])),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_equals_reference_values_and_gradients(inputs, case):
    """Values and gradients for q, k, v and the bias parameters (T5 embedding, ALiBi
    slopes, raw tables), through the table."""
    q, k, v, ct = inputs
    mask, (kind, shape), make = CASES[case]
    if kind == "slopes":
        params = alibi_slopes(N)
    else:
        params = _normal(5, shape)

    def loss(backend, q, k, v, params):
        out = backend(q, k, v, mask=mask, bias=make(params))
        return (out * ct).sum(), out

    def blockwise(q, k, v, **kw):
        return blockwise_attention(q, k, v, block_q=BLOCK, block_k=BLOCK, **kw)

    grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)
    (_, out_ref), g_ref = jax.jit(grads, static_argnums=0)(reference_attention, q, k, v, params)
    (_, out_blk), g_blk = jax.jit(grads, static_argnums=0)(blockwise, q, k, v, params)
    np.testing.assert_allclose(_np(out_blk), _np(out_ref), atol=1e-5)
    for name, gr, gb in zip(("q", "k", "v", "bias"), g_ref, g_blk, strict=True):
        np.testing.assert_allclose(_np(gb), _np(gr), atol=1e-5, err_msg=name)


def test_dynamic_bias_mlp_gradients_through_the_kernel(inputs):
    q, k, v, ct = inputs
    module = DynamicPositionBias(width=6, heads=N, depth=2, log_distance=True, norm=True)
    params = module.init(jax.random.key(6), S)
    mask = AttentionMask(causal=True)

    def loss(params, implementation):
        bias = module.apply(params, S)
        out = attention(q, k, v, mask=mask, bias=bias, implementation=implementation)
        return (out * ct).sum()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_blk = grad(params, "reference"), grad(params, "blockwise")
    for (path, gr), gb in zip(
        jax.tree_util.tree_leaves_with_path(g_ref), jax.tree_util.tree_leaves(g_blk), strict=True
    ):
        np.testing.assert_allclose(_np(gb), _np(gr), atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize(
    "scheme",
    [
        {"rel_pos_bias": True, "rel_pos_num_buckets": 8, "rel_pos_max_distance": 10},
        {"alibi_pos_bias": True},
        {"dynamic_pos_bias": True},
    ],
    ids=["t5", "alibi", "dynamic"],
)
def test_stack_with_memory_key_values_blockwise_equals_reference(scheme):
    """The stack's position biases with memory key/values (a prefix of the keys) give
    the same outputs and parameter gradients on both backends."""
    x = _normal(7, (B, T, 16))
    kw = dict(dim=16, depth=1, heads=N, attn_dim_head=H, attn_num_mem_kv=3, **scheme)
    ref = Decoder(attn_implementation="reference", **kw)
    blk = Decoder(attn_implementation="blockwise", **kw)
    # Jitted with an RBG key: eagerly, init compiles a sampler per parameter shape.
    params = jax.jit(ref.init)(jax.random.key(8, impl="rbg"), x)

    def loss(params, model):
        return (model.apply(params, x) ** 2).sum()

    # Jitted: eagerly, op by op, the gradients of a whole stack take several times longer.
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l_ref, g_ref = value_and_grad(params, ref)
    l_blk, g_blk = value_and_grad(params, blk)
    np.testing.assert_allclose(float(l_blk), float(l_ref), rtol=1e-5)
    for (path, gr), gb in zip(
        jax.tree_util.tree_leaves_with_path(g_ref), jax.tree_util.tree_leaves(g_blk), strict=True
    ):
        np.testing.assert_allclose(_np(gb), _np(gr), atol=1e-4, err_msg=str(path))


def test_fused_backend_expands_the_table(inputs):
    q, k, v, _ = inputs
    bias = RelativeBias(_normal(9, (N, 9)), center=4, prefix=2)
    mask = AttentionMask(causal=True)
    np.testing.assert_allclose(
        _np(attention(q, k, v, mask=mask, bias=bias, implementation="xla")),
        _np(reference_attention(q, k, v, mask=mask, bias=bias.dense(T, S))),
        atol=1e-5,
    )


def test_blockwise_memory_is_linear_with_a_t5_bias():
    """fwd + bwd at T = S = 2048 needs far less scratch than one dense [N, T, S] bias."""
    Bm, L, Nm, Hm = 1, 2048, 2, 16
    q = jax.ShapeDtypeStruct((Bm, L, Nm, Hm), jnp.float32)
    emb = jax.ShapeDtypeStruct((32, Nm), jnp.float32)

    def loss(q, k, v, emb):
        bias = RelativeBias.t5(emb, causal=True)
        out = blockwise_attention(q, k, v, mask=AttentionMask(causal=True), bias=bias)
        return out.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, q, q, emb).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense_bias = Nm * L * L * 4
    assert temp < dense_bias / 8, (temp, dense_bias)


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_named(inputs):
    q, k, v, _ = inputs
    table = jnp.zeros((N, 5))
    with pytest.raises(ValueError, match=r"table must be \[N, R\]"):
        RelativeBias(jnp.zeros((5,)), center=0)
    with pytest.raises(ValueError, match="center must be a table column"):
        RelativeBias(table, center=5)
    with pytest.raises(ValueError, match="prefix must be an int >= 0"):
        RelativeBias(table, center=2, prefix=-1)
    with pytest.raises(ValueError, match="odd number of columns"):
        RelativeBias.centered(jnp.zeros((N, 4)))
    with pytest.raises(ValueError, match=r"embedding must be \[num_buckets, N\]"):
        RelativeBias.t5(jnp.zeros((8, N)), causal=True, num_buckets=16)
    bad = {
        "1 or N = 4 heads": RelativeBias(jnp.zeros((3, 5)), center=2),
        "batch 1 or B = 2": RelativeBias(jnp.zeros((3, N, 5)), center=2),
        "needs T = 13 rows": RelativeBias(jnp.zeros((B, N, T + 1, 5)), center=2),
        r"q_offset must be an int or an int array \[\] or \[B\]": RelativeBias(
            table, center=2, q_offset=jnp.zeros((3,), jnp.int32)
        ),
        "prefix must be <= S": RelativeBias(table, center=2, prefix=S + 1),
        "must be a float array": RelativeBias(jnp.zeros((N, 5), jnp.int32), center=2),
    }
    for message, bias in bad.items():
        for implementation in ("reference", "blockwise"):
            with pytest.raises(ValueError, match=message):
                attention(q, k, v, bias=bias, implementation=implementation)

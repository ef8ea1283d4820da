"""Longformer: windows, dilation and global tokens equal dense attention under the same mask."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx.models.longformer import Longformer, LongformerAttention, LongformerConfig
from xtx.ops import AttentionMask, reference_attention

T, D, N = 21, 32, 4
H = D // N


def _tokens(seed, shape):
    """Token ids below 16 from numpy: ``jax.random.randint`` would compile a sampler for
    every shape, about a second each on CPU."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, 16, shape), jnp.int32)


def _dense_mask(T, window, causal, dilations, is_global):
    """[N, T, T]: query i sees key j within the head's dilated window, or any global key."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    masks = []
    for d in dilations:
        rel = j - i
        ok = (rel % d == 0) & (rel >= -window * d) & (rel <= (0 if causal else window * d))
        masks.append(ok | is_global[None, :])
    return np.stack(masks)


def _init(module, *args, **kwargs):
    """``module.init``, jitted with an RBG key: run eagerly, init compiles a sampler per
    parameter shape and dozens of small ops; one RBG program compiles several times faster."""
    return jax.jit(module.init)(jax.random.key(1, impl="rbg"), *args, **kwargs)


def _proj(p, name, x):
    return np.einsum("btd,dnh->btnh", x, np.asarray(p[name]["kernel"]))


@pytest.mark.parametrize(
    "causal, dilation, globals_, implementation",
    [
        (True, (1, 1, 1, 1), (), "blockwise"),
        (True, (1, 2, 3, 1), (), "reference"),
        (False, (1, 2, 1, 2), (0, 7, 20), "blockwise"),
    ],
)
def test_window_dilation_global_attention_equals_dense(causal, dilation, globals_, implementation):
    cfg = LongformerConfig(
        num_tokens=8,
        dim=D,
        depth=1,
        heads=N,
        window=3,
        dilation=dilation,
        causal=causal,
        max_global=4 if globals_ else 0,
        attn_implementation=implementation,
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, T, D)), jnp.float32)
    layer = LongformerAttention(cfg)
    g_idx = g_valid = None
    is_global = np.zeros(T, bool)
    if globals_:
        g_idx = jnp.asarray([list(globals_) + [0]] * 2)  # the last slot is padding
        g_valid = jnp.asarray([[True] * len(globals_) + [False]] * 2)
        is_global[list(globals_)] = True
    params = nn.meta.unbox(_init(layer, x, g_idx, g_valid))["params"]
    got = jax.jit(layer.apply)({"params": params}, x, g_idx, g_valid)

    q, k, v = (_proj(params, n, x) for n in ("to_q", "to_k", "to_v"))
    mask = _dense_mask(T, 3, causal, dilation, is_global)
    local = reference_attention(q, k, v, mask=AttentionMask(explicit=jnp.asarray(mask)[None]))
    out = np.array(local)
    if globals_:
        gq = _proj(params, "to_q_global", x)[:, list(globals_)]
        gk, gv = _proj(params, "to_k_global", x), _proj(params, "to_v_global", x)
        out[:, list(globals_)] = np.asarray(reference_attention(gq, gk, gv))
    want = np.einsum("btnh,nhd->btd", out, np.asarray(params["to_out"]["kernel"]))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.fixture(scope="module")
def encoder():
    model = Longformer(num_tokens=16, dim=D, depth=2, heads=N, window=2, causal=False)
    tokens = _tokens(0, (1, 40))
    variables = _init(model, tokens, state=model.init_state(1))
    return model, variables, tokens


def test_receptive_field_is_window_times_depth(encoder):
    model, variables, tokens = encoder
    apply = jax.jit(lambda t: model.apply(variables, t)[0])
    base = apply(tokens)
    t = 20
    moved = apply(tokens.at[0, t].set((tokens[0, t] + 1) % 16))
    changed = np.abs(np.asarray(moved - base)).max(-1)[0] > 1e-6
    reach = 2 * 2  # window x depth
    assert changed[t - reach : t + reach + 1].all()
    assert not changed[: t - reach].any() and not changed[t + reach + 1 :].any()


def test_causal_language_model_never_looks_ahead_and_trains():
    model = Longformer(num_tokens=16, dim=D, depth=2, heads=N, window=4, dilation=(1, 1, 2, 2))
    tokens = _tokens(0, (2, 33))
    state = model.init_state(2)
    variables = _init(model, tokens, state=state)
    apply = jax.jit(lambda tokens: model.apply(variables, tokens, state=state))
    logits, new_state = apply(tokens)
    assert new_state == state
    t = 17
    moved, _ = apply(tokens.at[:, t].set(0))
    np.testing.assert_allclose(moved[:, :t], logits[:, :t], atol=1e-6)

    def loss(p):
        out, _ = model.apply({"params": p}, tokens[:, :-1], state=state)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), tokens[:, 1:, None], -1))

    @jax.jit  # the update inside: eagerly it compiles a few ops for every parameter shape
    def sgd_step(params):
        value, g = jax.value_and_grad(loss)(params)
        finite = jax.tree.reduce(lambda a, x: a & jnp.isfinite(x).all(), g, jnp.bool_(True))
        return value, finite, jax.tree.map(lambda p, g: p - 0.05 * g, params, g)

    first, finite, _ = sgd_step(variables["params"])
    assert bool(finite)
    params = variables["params"]
    for _ in range(15):
        _, _, params = sgd_step(params)
    assert sgd_step(params)[0] < first


def test_global_tokens_reach_everything(encoder):
    model = Longformer(num_tokens=16, dim=D, depth=1, heads=N, window=2, causal=False, max_global=2)
    tokens = _tokens(0, (1, 40))
    gmask = jnp.zeros((1, 40), bool).at[0, 0].set(True)
    variables = _init(model, tokens, global_mask=gmask)
    apply = jax.jit(lambda tokens: model.apply(variables, tokens, global_mask=gmask))
    base, _ = apply(tokens)
    moved, _ = apply(tokens.at[0, 30].set(0))
    assert not np.allclose(moved[0, 0], base[0, 0], atol=1e-6)  # global row sees token 30
    np.testing.assert_allclose(moved[0, 10], base[0, 10], atol=1e-6)  # a local row does not


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="causal.*max_global"):
        LongformerConfig(num_tokens=8, dim=D, depth=1, heads=N, window=2, max_global=1)
    with pytest.raises(ValueError, match="dilation of layer 0 must be 4 ints"):
        LongformerConfig(num_tokens=8, dim=D, depth=1, heads=N, window=2, dilation=(1, 2))
    with pytest.raises(ValueError, match="window must be"):
        LongformerConfig(num_tokens=8, dim=D, depth=2, heads=N, window=(2,))
    model = Longformer(num_tokens=8, dim=D, depth=1, heads=N, window=2)
    tokens = jnp.zeros((1, 8), jnp.int32)
    # The checks run while tracing: shapes alone raise them, nothing is compiled.
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="max_global=0"):
        jax.eval_shape(partial(model.apply, global_mask=jnp.ones((1, 8), bool)), variables, tokens)
    with pytest.raises(ValueError, match="reset must be bool"):
        jax.eval_shape(partial(model.apply, reset=jnp.ones((2,), bool)), variables, tokens)


def test_segment_ids_keep_packed_documents_apart():
    """A token never attends across a document boundary, even inside its window; a bad
    segment_ids array, or one combined with global tokens, is refused by name."""
    model = Longformer(num_tokens=50, dim=16, depth=2, heads=2, window=6, causal=True)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 50, (1, 12)), jnp.int32)
    other = tokens.at[:, :5].set(jnp.asarray(rng.integers(0, 50, (1, 5)), jnp.int32))
    ids = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    a, _ = model.apply(params, tokens, segment_ids=ids)
    b, _ = model.apply(params, other, segment_ids=ids)
    np.testing.assert_allclose(a[:, 5:], b[:, 5:], atol=1e-6)
    # Without the boundary the change reaches them.
    c, _ = model.apply(params, tokens)
    d, _ = model.apply(params, other)
    assert not np.allclose(c[:, 5:], d[:, 5:], atol=1e-6)
    with pytest.raises(ValueError, match="segment_ids must be int"):
        model.apply(params, tokens, segment_ids=ids[:, :4])

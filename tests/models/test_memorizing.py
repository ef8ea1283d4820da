"""Memorizing Transformer: kNN memory search before insert, gating, reset, recall."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.gallery import (
    check_state_carries_and_reset_clears,
    counting_step,
    init_variables,
    random_segments,
    roll,
    train_recall,
)
from xtx.models.memorizing import (
    KNNAttention,
    KNNMemory,
    MemorizingConfig,
    MemorizingState,
    MemorizingTransformer,
)

V, SEG = 12, 8
# No XL memory: whatever crosses segments goes through the kNN memory.
KW = dict(
    num_tokens=V, dim=32, depth=2, heads=4, segment_len=SEG, mem_len=0,
    knn_layer=1, knn_memory_size=16, knn_top_k=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    model = MemorizingTransformer(**KW)
    variables = init_variables(model, jnp.zeros((2, SEG), jnp.int32))
    return model, variables, counting_step(model, variables)


def _segments(seed, n=3):
    return random_segments(seed, n, SEG, V)


def test_retrieval_with_k_equal_to_capacity_is_dense_attention_over_memory():
    cfg = MemorizingConfig(**{**KW, "knn_memory_size": 6, "knn_top_k": 6})
    layer = KNNAttention(cfg)
    B, N, C, H = 1, 4, 6, 8
    rng = np.random.default_rng(0)  # numpy: jax.random compiles a sampler per shape
    x, keys, values = (
        jnp.asarray(rng.standard_normal(shape), jnp.float32)
        for shape in ((B, 3, 32), (B, N, C, H), (B, N, C, H))
    )
    knn = KNNMemory(
        keys=keys / jnp.linalg.norm(keys, axis=-1, keepdims=True),
        values=values,
        valid=jnp.array([[True, True, False, True, True, False]]),
        pointer=jnp.array([4], jnp.int32),
    )
    mem, mem_valid = jnp.zeros((B, 0, 32)), jnp.zeros((B, 0), bool)
    params = nn.meta.unbox(layer.init(jax.random.key(3), x, mem, mem_valid, knn))["params"]
    params["gate"] = jnp.full((N,), 50.0)  # sigmoid -> 1: the memory branch alone
    out, new = layer.apply({"params": params}, x, mem, mem_valid, knn)
    # Oracle: softmax over the valid memory slots, in numpy.
    q = np.einsum("btd,dnh->btnh", np.asarray(x), np.asarray(params["to_q"]["kernel"]))
    q = (
        q
        / np.linalg.norm(q, axis=-1, keepdims=True)
        * np.exp(np.asarray(params["log_scale"]))[:, None]
    )
    s = np.einsum("btnh,bnch->bntc", q, np.asarray(knn.keys))
    s = np.where(np.asarray(knn.valid)[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bntc,bnch->btnh", p, np.asarray(knn.values))
    want = np.einsum("btnh,nhd->btd", o, np.asarray(params["to_out"]["kernel"]))
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4)
    # The 3 new keys went into slots 4, 5, 0 (the ring wraps), the others are untouched.
    np.testing.assert_array_equal(new.valid, [[True, True, False, True, True, True]])
    assert int(new.pointer[0]) == 1
    np.testing.assert_array_equal(new.keys[:, :, 1:4], knn.keys[:, :, 1:4])


def test_three_segments_compile_once_and_memory_fills(setup):
    model, _, step = setup
    before = len(step.traces)
    _, state = roll(step, model, _segments(1))
    assert len(step.traces) - before <= 1
    assert isinstance(state, MemorizingState)
    np.testing.assert_array_equal(state.knn.valid.sum(-1), [16, 16])  # 24 tokens, capacity 16
    np.testing.assert_array_equal(state.knn.pointer, [8, 8])


def test_causal_within_and_across_segments(setup):
    model, _, step = setup
    segs = _segments(2)
    base, _ = roll(step, model, segs)
    t = 3
    outs, _ = roll(step, model, segs.at[1, :, t].set((segs[1, :, t] + 1) % V))
    np.testing.assert_array_equal(outs[0], base[0])
    # Segment 2's keys enter the memory only after its queries searched it.
    np.testing.assert_allclose(outs[1][:, :t], base[1][:, :t], atol=1e-6)
    assert not np.allclose(outs[2], base[2], atol=1e-4)


def test_knn_memory_carries_information_and_reset_clears_it(setup):
    model, _, step = setup
    state = check_state_carries_and_reset_clears(step, model, _segments(3, n=2), V)
    np.testing.assert_array_equal(state.knn.valid.sum(-1), [8, 16])


def test_approximate_top_k_runs(setup):
    model = MemorizingTransformer(**{**KW, "approximate": True})
    variables = setup[1]  # the search changes no parameter
    apply = jax.jit(lambda tokens, state: model.apply(variables, tokens, state=state))
    tokens = jnp.zeros((1, SEG), jnp.int32)
    _, state = apply(tokens, model.init_state(1))
    logits, _ = apply(tokens, state)
    assert bool(jnp.isfinite(logits).all())


def test_knn_memory_beats_reset_on_a_recall_task():
    model = MemorizingTransformer(**{**KW, "depth": 1, "knn_layer": 0})
    first, with_state, without_state = train_recall(model, seg_len=SEG, vocab=V)
    assert with_state < 0.5 * first
    assert without_state > 2.0
    assert with_state < 0.5 * without_state


def test_bad_input_is_named(setup):
    model, variables, _ = setup
    with pytest.raises(ValueError, match=r"knn_memory_size \(2\) must be an int >= knn_top_k"):
        MemorizingConfig(**{**KW, "knn_memory_size": 2})
    with pytest.raises(ValueError, match="knn_layer must be in"):
        MemorizingConfig(**{**KW, "knn_layer": 5})
    other = MemorizingTransformer(**{**KW, "knn_memory_size": 8}).init_state(2)
    with pytest.raises(ValueError, match="state.knn was built for another"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=other)
    with pytest.raises(TypeError, match="MemorizingState"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=other.xl)

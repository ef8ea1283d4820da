"""Recurrent Memory Transformer: memory across segments, reset, gradient horizon, recall."""

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
from xtx.models.recurrent_memory import RecurrentMemoryTransformer, RMTState

V, SEG = 12, 8
KW = dict(num_tokens=V, dim=32, depth=2, heads=4, segment_len=SEG, num_memory=4)


@pytest.fixture(scope="module")
def setup():
    model = RecurrentMemoryTransformer(**KW)
    variables = init_variables(model, jnp.zeros((2, SEG), jnp.int32))
    return model, variables, counting_step(model, variables)


def _segments(seed, n=3):
    return random_segments(seed, n, SEG, V)


def test_three_segments_compile_once(setup):
    model, _, step = setup
    before = len(step.traces)
    outs, state = roll(step, model, _segments(1))
    assert len(step.traces) - before <= 1
    assert isinstance(state, RMTState) and state.memory.shape == (2, 4, 32)
    np.testing.assert_array_equal(state.segments, [3, 3])


def test_causal_within_and_across_segments(setup):
    model, _, step = setup
    segs = _segments(2)
    base, _ = roll(step, model, segs)
    t = 3
    outs, _ = roll(step, model, segs.at[1, :, t].set((segs[1, :, t] + 1) % V))
    np.testing.assert_array_equal(outs[0], base[0])
    np.testing.assert_allclose(outs[1][:, :t], base[1][:, :t], atol=1e-6)
    assert not np.allclose(outs[1][:, t:], base[1][:, t:], atol=1e-4)
    assert not np.allclose(outs[2], base[2], atol=1e-4)  # through the memory


def test_memory_carries_information_and_reset_clears_it(setup):
    model, _, step = setup
    check_state_carries_and_reset_clears(step, model, _segments(3, n=2), V)


@pytest.mark.parametrize("horizon, reaches", [(1, False), (2, True)])
def test_gradient_horizon(setup, horizon, reaches):
    model = RecurrentMemoryTransformer(**{**KW, "bptt_segments": horizon})
    segs = _segments(4, n=2)
    variables = nn.meta.unbox(setup[1])  # the horizon changes no parameter

    def second_segment_loss(emb):
        p = dict(variables["params"], token_emb=emb)
        _, state = model.apply({"params": p}, segs[0], state=model.init_state(2))
        # Only the first segment's tokens: a gradient must come through the memory.
        p2 = dict(p, token_emb=jax.lax.stop_gradient(emb))
        logits, _ = model.apply({"params": p2}, segs[1], state=state)
        return jnp.sum(logits**2)

    g = jax.jit(jax.grad(second_segment_loss))(variables["params"]["token_emb"])
    assert bool(jnp.any(g != 0)) == reaches


def test_state_beats_reset_on_a_recall_task():
    model = RecurrentMemoryTransformer(**{**KW, "depth": 1})
    first, with_state, without_state = train_recall(model, seg_len=SEG, vocab=V)
    assert with_state < 0.5 * first
    assert without_state > 2.0  # chance is log(10) = 2.3 nats
    assert with_state < 0.5 * without_state


def test_bad_input_is_named(setup):
    model, variables, _ = setup
    state = model.init_state(2)
    with pytest.raises(ValueError, match="more than segment_len=8"):
        model.apply(variables, jnp.zeros((2, SEG + 1), jnp.int32), state=state)
    with pytest.raises(ValueError, match=r"another batch size.*init_state\(3\)"):
        model.apply(variables, jnp.zeros((3, SEG), jnp.int32), state=state)
    with pytest.raises(ValueError, match="reset must be bool"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=state, reset=jnp.ones(3))
    with pytest.raises(TypeError, match="num_memry.*num_memory"):
        RecurrentMemoryTransformer(**{**KW, "num_memry": 3})
    with pytest.raises(ValueError, match="bptt_segments must be"):
        RecurrentMemoryTransformer(**{**KW, "bptt_segments": 0})

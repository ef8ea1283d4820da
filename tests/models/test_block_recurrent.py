"""Block-Recurrent Transformer: blocks in a scan, a gated recurrent state, reset, horizon."""

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
from xtx.models.block_recurrent import (
    BlockRecurrentConfig,
    BlockRecurrentState,
    BlockRecurrentTransformer,
)

V, SEG, W = 12, 8, 4
KW = dict(num_tokens=V, dim=32, depth=2, heads=4, segment_len=SEG, block_len=W, num_state=4)


@pytest.fixture(scope="module")
def setup():
    model = BlockRecurrentTransformer(**KW, recurrent_layer=1)
    variables = init_variables(model, jnp.zeros((2, SEG), jnp.int32))
    return model, variables, counting_step(model, variables)


@pytest.fixture(scope="module")
def stateless_window():
    """No XL window across blocks: only the recurrent state links blocks."""
    model = BlockRecurrentTransformer(**KW, mem_len=0, recurrent_layer=0)
    variables = init_variables(model, jnp.zeros((2, SEG), jnp.int32))
    return model, variables, counting_step(model, variables)


def _segments(seed, n=3):
    return random_segments(seed, n, SEG, V)


def test_three_segments_compile_once(setup):
    model, _, step = setup
    before = len(step.traces)
    outs, state = roll(step, model, _segments(1))
    assert len(step.traces) - before <= 1
    assert isinstance(state, BlockRecurrentState) and state.state.shape == (2, 4, 32)
    assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_lstm_gate_runs_and_keeps_the_state_moving():
    model = BlockRecurrentTransformer(**KW, gate="lstm", recurrent_layer=1)
    segs = _segments(7, n=2)
    variables = init_variables(model, segs[0])
    step = counting_step(model, variables)
    outs, state = roll(step, model, segs)
    assert len(step.traces) == 1
    assert all(bool(jnp.isfinite(o).all()) for o in outs)
    _, state2 = step(segs[1], state, jnp.zeros((2,), bool))
    assert not np.allclose(state2.state, state.state, atol=1e-4)


def test_causal_within_blocks_and_across_segments(setup):
    model, _, step = setup
    segs = _segments(2)
    base, _ = roll(step, model, segs)
    for t in (1, 5):  # inside the first and the second block of segment 2
        outs, _ = roll(step, model, segs.at[1, :, t].set((segs[1, :, t] + 1) % V))
        np.testing.assert_array_equal(outs[0], base[0])
        np.testing.assert_allclose(outs[1][:, :t], base[1][:, :t], atol=1e-6)
        assert not np.allclose(outs[1][:, t:], base[1][:, t:], atol=1e-4)
        assert not np.allclose(outs[2], base[2], atol=1e-4)


def test_state_carries_information_and_reset_clears_it(stateless_window):
    model, _, step = stateless_window
    check_state_carries_and_reset_clears(step, model, _segments(3, n=2), V)


@pytest.mark.parametrize("horizon, reaches", [(1, False), (None, True)])
def test_gradient_horizon_in_blocks(stateless_window, horizon, reaches):
    model = BlockRecurrentTransformer(**KW, mem_len=0, recurrent_layer=0, state_grad_blocks=horizon)
    tokens = _segments(4, n=1)[0]
    # The horizon changes no parameter: the stateless model's variables serve.
    variables = nn.meta.unbox(stateless_window[1])

    def last_block_loss(emb):
        p = dict(variables["params"], token_emb=emb)
        logits, _ = model.apply({"params": p}, tokens, state=model.init_state(2))
        return jnp.sum(logits[:, W:] ** 2)

    g = jax.jit(jax.grad(last_block_loss))(variables["params"]["token_emb"])
    first_block_tokens = np.unique(np.asarray(tokens[:, :W]))
    later_tokens = np.unique(np.asarray(tokens[:, W:]))
    only_first = np.setdiff1d(first_block_tokens, later_tokens)
    assert only_first.size, "the test needs a token that appears only in block 1"
    assert bool(jnp.any(g[only_first] != 0)) == reaches


def test_state_beats_reset_on_a_recall_task():
    model = BlockRecurrentTransformer(**{**KW, "depth": 1, "block_len": SEG}, mem_len=0)
    first, with_state, without_state = train_recall(model, seg_len=SEG, vocab=V)
    assert with_state < 0.5 * first
    assert without_state > 2.0
    assert with_state < 0.5 * without_state


def test_bad_input_is_named(stateless_window):
    model, variables, _ = stateless_window
    state = model.init_state(2)
    with pytest.raises(ValueError, match="multiple of block_len=4"):
        model.apply(variables, jnp.zeros((2, 6), jnp.int32), state=state)
    with pytest.raises(ValueError, match=r"segment_len \(6\) must be a multiple of block_len"):
        BlockRecurrentConfig(**{**KW, "segment_len": 6}, mem_len=4)
    with pytest.raises(ValueError, match="gate must be one of"):
        BlockRecurrentTransformer(**KW, gate="gru")
    with pytest.raises(ValueError, match=r"another batch size.*init_state\(3\)"):
        model.apply(variables, jnp.zeros((3, SEG), jnp.int32), state=state)
    with pytest.raises(TypeError, match="BlockRecurrentState"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=state.xl)

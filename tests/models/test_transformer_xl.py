"""Transformer-XL: the paper's relative attention, segment recurrence, reset and training."""

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
from xtx.models.transformer_xl import (
    RelativeAttention,
    TransformerXL,
    TransformerXLConfig,
    XLState,
)

V, SEG, MEM = 12, 8, 8
KW = dict(num_tokens=V, dim=32, depth=2, heads=4, segment_len=SEG, mem_len=MEM)


def _rel_shift(x):
    """The official Transformer-XL relative shift of ``[T, S]`` scores (pad and reshape)."""
    T, S = x.shape
    padded = np.concatenate([np.zeros((T, 1), x.dtype), x], axis=1)
    return padded.reshape(S + 1, T)[1:].reshape(T, S)


def _oracle_attention(p, x, mem, u, v, heads):
    """Eq. 3 of 1901.02860 computed densely in numpy with the official relative shift."""
    x, mem, u, v = (np.asarray(a, np.float64) for a in (x, mem, u, v))
    cat = np.concatenate([mem, x], axis=0)  # [S, D]
    T, S, D = x.shape[0], cat.shape[0], x.shape[1]
    q = np.einsum("td,dnh->tnh", x, p["to_q"]["kernel"])
    k = np.einsum("sd,dnh->snh", cat, p["to_k"]["kernel"])
    val = np.einsum("sd,dnh->snh", cat, p["to_v"]["kernel"])
    pos = np.arange(S - 1, -1, -1, dtype=np.float64)
    inv = 10000.0 ** -(np.arange(D // 2) / (D // 2))
    r = np.concatenate([np.sin(pos[:, None] * inv), np.cos(pos[:, None] * inv)], axis=1)
    r = np.einsum("sd,dnh->snh", r, p["to_r"]["kernel"])
    H = q.shape[-1]
    out = np.zeros((T, heads, H))
    for n in range(heads):
        ac = (q[:, n] + u[n]) @ k[:, n].T
        bd = _rel_shift((q[:, n] + v[n]) @ r[:, n].T)
        score = (ac + bd) * H**-0.5
        # The official mask: query i sees keys up to M + i.
        score = np.where(np.triu(np.ones((T, S)), 1 + mem.shape[0]) > 0, -np.inf, score)
        prob = np.exp(score - score.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        out[:, n] = prob @ val[:, n]
    return np.einsum("tnh,nhd->td", out, p["to_out"]["kernel"])


@pytest.mark.parametrize("implementation", ["reference", "blockwise"])
def test_relative_attention_equals_the_papers_relative_shift(implementation):
    cfg = TransformerXLConfig(**KW, attn_implementation=implementation)
    attn = RelativeAttention(cfg)
    rng = np.random.default_rng(0)  # numpy: jax.random compiles a sampler per shape
    x, mem, u, v = (
        jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
        for scale, shape in ((1.0, (1, 5, 32)), (1.0, (1, 7, 32)), (0.5, (4, 8)), (0.5, (4, 8)))
    )
    valid = jnp.ones((1, 7), bool)
    params = nn.meta.unbox(attn.init(jax.random.key(4), x, mem, valid, u, v))["params"]
    got = attn.apply({"params": params}, x, mem, valid, u, v)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = _oracle_attention(p, x[0], mem[0], u, v, heads=4)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=2e-5)


@pytest.fixture(scope="module")
def model_and_vars():
    model = TransformerXL(**KW)
    tokens = jnp.zeros((2, SEG), jnp.int32)
    variables = init_variables(model, tokens)
    return model, variables


@pytest.fixture(scope="module")
def run(model_and_vars):
    return counting_step(*model_and_vars)


def _segments(seed, n=3):
    return random_segments(seed, n, SEG, V)


def test_three_segments_compile_once_and_state_has_fixed_shapes(run, model_and_vars):
    model, _ = model_and_vars
    before = len(run.traces)
    outs, state = roll(run, model, _segments(1))
    assert len(run.traces) - before <= 1
    assert isinstance(state, XLState) and state.mems.shape == (2, 2, MEM, 32)
    assert bool(state.valid.all())
    assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_causal_within_and_across_segments(run, model_and_vars):
    model, _ = model_and_vars
    segs = _segments(2)
    base, _ = roll(run, model, segs)
    t = 3
    changed = segs.at[1, :, t].set((segs[1, :, t] + 1) % V)
    outs, _ = roll(run, model, changed)
    np.testing.assert_array_equal(outs[0], base[0])
    np.testing.assert_allclose(outs[1][:, :t], base[1][:, :t], atol=1e-6)
    assert not np.allclose(outs[1][:, t:], base[1][:, t:], atol=1e-4)
    assert not np.allclose(outs[2], base[2], atol=1e-4)  # through the memory


def test_memory_carries_information_and_reset_clears_it(run, model_and_vars):
    model, _ = model_and_vars
    check_state_carries_and_reset_clears(run, model, _segments(3, n=2), V)


def test_memory_length_is_independent_of_segment_length(model_and_vars):
    model = TransformerXL(**{**KW, "mem_len": 3})
    variables = model_and_vars[1]  # the memory length changes no parameter
    apply = jax.jit(lambda tokens, state: model.apply(variables, tokens, state=state))
    tokens = jnp.arange(SEG)[None] % V
    _, state = apply(tokens, model.init_state(1))
    assert state.mems.shape == (2, 1, 3, 32)
    short = tokens[:, :2]  # a shorter segment keeps the older rows of the memory
    _, state2 = apply(short, state)
    np.testing.assert_allclose(state2.mems[:, :, 0], state.mems[:, :, 2], atol=0)


def test_state_beats_reset_on_a_recall_task_and_loss_falls():
    model = TransformerXL(**{**KW, "depth": 1})
    first, with_state, without_state = train_recall(model, seg_len=SEG, vocab=V)
    assert with_state < 0.5 * first  # it learns
    # Without the state the key is unknowable: chance is log(10) = 2.3 nats.
    assert without_state > 2.0
    assert with_state < 0.5 * without_state


def test_bad_input_is_named(model_and_vars):
    model, variables = model_and_vars
    state = model.init_state(2)
    with pytest.raises(ValueError, match="more than segment_len=8"):
        model.apply(variables, jnp.zeros((2, SEG + 1), jnp.int32), state=state)
    with pytest.raises(ValueError, match=r"another batch size.*init_state\(3\)"):
        model.apply(variables, jnp.zeros((3, SEG), jnp.int32), state=state)
    other = TransformerXL(**{**KW, "mem_len": 4}).init_state(2)
    with pytest.raises(ValueError, match="another batch size or config"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=other)
    with pytest.raises(ValueError, match="reset must be bool"):
        model.apply(variables, jnp.zeros((2, SEG), jnp.int32), state=state, reset=jnp.ones(3))
    with pytest.raises(TypeError, match="mem_lenn.*mem_len"):
        TransformerXL(**{**KW, "mem_lenn": 3})
    with pytest.raises(ValueError, match="mem_len must be"):
        TransformerXLConfig(**{**KW, "mem_len": -1})


def test_empty_memory_is_plain_relative_attention(model_and_vars):
    """A fresh state (every memory row invalid) equals a model with no memory at all."""
    model, variables = model_and_vars
    tokens = _segments(5, n=1)[0]
    with_memory, _ = model.apply(variables, tokens, state=model.init_state(2))
    no_memory = TransformerXL(**{**KW, "mem_len": 0})
    plain, state = no_memory.apply(variables, tokens, state=no_memory.init_state(2))
    np.testing.assert_allclose(with_memory, plain, atol=1e-5)
    assert state.mems.shape == (2, 2, 0, 32)


def test_no_gradient_flows_into_past_segments(model_and_vars):
    """The paper's SG(memory): segment 2's loss has no gradient into segment 1's tokens."""
    model, variables = model_and_vars
    params = nn.meta.unbox(variables)["params"]
    segs = _segments(6, n=2)

    def second_segment_loss(emb):
        p = dict(params, token_emb=emb)
        _, state = model.apply({"params": p}, segs[0], state=model.init_state(2))
        p2 = dict(p, token_emb=jax.lax.stop_gradient(emb))
        logits, _ = model.apply({"params": p2}, segs[1], state=state)
        return jnp.sum(logits**2)

    g = jax.jit(jax.grad(second_segment_loss))(params["token_emb"])
    np.testing.assert_array_equal(np.asarray(g), 0.0)

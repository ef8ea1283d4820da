"""Transformer-XL memories (1901.02860) as an explicit pytree: semantics, jit, gradients.

Parity with x-transformers is in ``tests/parity/test_xl.py``; here the checks are
independent of torch: with relative positions and a causal stack, a segment read with
the full previous segment as memory must equal the same positions of one run over both
segments; a jitted step carried over segments must not retrace; fully masked memories
must equal no memories; gradients stop at the returned memories unless asked not to.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import ContinuousTransformerWrapper, Decoder, TransformerWrapper

B, T, V, D, HEADS = 2, 4, 64, 32, 4


@pytest.fixture(scope="module")
def xl_model():
    model = TransformerWrapper(
        num_tokens=V,
        max_seq_len=16,
        max_mem_len=T,
        attn_layers=Decoder(dim=D, depth=2, heads=HEADS, rotary_pos_emb=True),
    )
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, 4 * T)), jnp.int32)
    # Jitted, with an RBG key: on CPU this compiles faster than eager dispatch or threefry.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), tokens[:, :T])
    traces = []

    def counted_apply(*args, **kwargs):
        traces.append(args[1].shape)
        return model.apply(*args, **kwargs)

    apply = jax.jit(counted_apply, static_argnames=("return_mems", "detach_mems"))
    apply.traces = traces
    return apply, variables, tokens


def test_memory_equals_one_long_run(xl_model):
    """Rotary is relative and the stack causal, so segment 2 with the hiddens of segment
    1 as memory sees exactly what positions T..2T-1 see in one run over both."""
    apply, variables, tokens = xl_model
    whole = apply(variables, tokens[:, : 2 * T])
    first, mems = apply(variables, tokens[:, :T], return_mems=True)
    second, _ = apply(variables, tokens[:, T : 2 * T], mems=mems, return_mems=True)
    np.testing.assert_allclose(first, whole[:, :T], atol=1e-5, rtol=0)
    np.testing.assert_allclose(second, whole[:, T:], atol=1e-5, rtol=0)
    alone = apply(variables, tokens[:, T : 2 * T])
    assert np.abs(np.asarray(second - alone)).max() > 1e-3  # the memory was read


def test_jitted_step_does_not_retrace(xl_model):
    apply, variables, tokens = xl_model
    # The first segment (no memory) and the second have their own traces; the memory is
    # then full, so every later segment reuses the second one's.
    _, mems = apply(variables, tokens[:, :T], return_mems=True)
    _, mems = apply(variables, tokens[:, T : 2 * T], mems=mems, return_mems=True)
    traced = len(apply.traces)
    for i in range(2, 4):
        _, mems = apply(variables, tokens[:, i * T : (i + 1) * T], mems=mems, return_mems=True)
        assert isinstance(mems, tuple) and [m.shape for m in mems] == [(B, T, D)] * 2
    assert len(apply.traces) == traced


def test_fully_masked_memory_equals_no_memory(xl_model):
    apply, variables, tokens = xl_model
    _, mems = apply(variables, tokens[:, :T], return_mems=True)
    hidden = tuple(jnp.zeros((B, T), bool) for _ in mems)
    masked = apply(variables, tokens[:, T : 2 * T], mems=mems, mem_masks=hidden)
    alone = apply(variables, tokens[:, T : 2 * T])
    np.testing.assert_allclose(masked, alone, atol=1e-6, rtol=0)


def test_memories_are_detached_by_default(xl_model):
    apply, variables, tokens = xl_model

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.grad)
    def mem_grads(params, detach):
        _, new_mems = apply({"params": params}, tokens[:, :T], return_mems=True, detach_mems=detach)
        return new_mems[1].sum()

    grads = mem_grads(variables["params"], True)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    grads = mem_grads(variables["params"], False)
    layer0 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads["attn_layers"])])
    assert np.all(np.isfinite(layer0)) and np.any(layer0)


def _eval(model, *args, **kwargs):
    """Runs init + apply abstractly: shape errors raise while tracing, nothing compiles."""

    def run(x):
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, **kwargs)

    return jax.eval_shape(run, *args)


_DEC = functools.partial(
    TransformerWrapper,
    num_tokens=V,
    max_seq_len=16,
    max_mem_len=3,
    attn_layers=Decoder(dim=D, depth=2, heads=HEADS),
)
_TOKENS = jax.ShapeDtypeStruct((B, T), jnp.int32)


def _mems(*shapes):
    return tuple(jnp.zeros(s) for s in shapes)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mems": _mems((B, 3, D))}, ValueError, r"one array per self-attention layer \(2\)"),
        ({"mems": _mems((B, 3, D), (B, 3, 16))}, ValueError, r"mems\[1\] must have shape"),
        ({"mems": _mems((B, 3, D), (1, 3, D))}, ValueError, r"mems\[1\] must have shape"),
        ({"mems": _mems((B, 3, D), (B, 2, D))}, ValueError, "the same length M"),
        ({"mems": jnp.zeros((2, B, 3, D))}, TypeError, "mems must be a tuple"),
        ({"mem_masks": (None, None)}, ValueError, "mem_masks was given without mems"),
        (
            {"mems": _mems((B, 3, D), (B, 3, D)), "mem_masks": (jnp.ones((B, 2), bool), None)},
            ValueError,
            r"mem_masks\[0\] must have shape \[B, M\] = \(2, 3\)",
        ),
        (
            {"mems": _mems((B, 3, D), (B, 3, D)), "mem_masks": (None,)},
            ValueError,
            r"one \[B, M\] mask per mems entry \(2\), got 1",
        ),
    ],
    ids=["count", "width", "batch", "lengths", "array", "masks_alone", "mask_shape", "masks"],
)
def test_bad_memories_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _eval(_DEC(), _TOKENS, **kwargs)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: _DEC(max_mem_len=-1), "max_mem_len must be an int >= 0, got -1"),
        (lambda: _DEC(shift_mem_down=-2), "shift_mem_down must be an int >= 0, got -2"),
        (
            lambda: ContinuousTransformerWrapper(
                dim_in=4, max_mem_len=2.5, attn_layers=Decoder(dim=D, depth=1, heads=HEADS)
            ),
            "max_mem_len must be an int >= 0, got 2.5",
        ),
    ],
    ids=["max_mem_len", "shift_mem_down", "continuous"],
)
def test_bad_memory_options_are_named(build, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build()

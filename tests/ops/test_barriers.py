"""cotangent_barrier: an exact identity that stops XLA:CPU re-adding a residual chain."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import Decoder, TransformerWrapper
from xtx.ops.barriers import cotangent_barrier


def _bits(x):
    return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_identity_forward_and_backward_bit_for_bit(dtype):
    x = jnp.arange(8, dtype=dtype)
    # Cotangents with special values: signed zeros, infinities, NaN. (Subnormals are
    # flushed to zero by XLA:CPU in every arithmetic op, this one included.)
    g = jnp.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-3, -3.5, 7.25], dtype)
    out, vjp = jax.vjp(cotangent_barrier, x)
    (dx,) = vjp(g)
    assert out.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(_bits(out), _bits(x))
    np.testing.assert_array_equal(_bits(dx), _bits(g))
    (dx_jit,) = jax.jit(lambda g: vjp(g))(g)
    np.testing.assert_array_equal(_bits(dx_jit), _bits(g))


@functools.cache
def _stack_grad(depth):
    """The jitted training gradient of an unrolled stack, and its parameters."""
    model = TransformerWrapper(
        num_tokens=32, max_seq_len=8, attn_layers=Decoder(dim=32, depth=depth, heads=2)
    )
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    params = jax.jit(model.init)(jax.random.key(0), x)

    def loss(p):
        return jnp.sum(model.apply(p, x) ** 2)

    return jax.jit(jax.grad(loss)), params


def test_stack_gradient_unchanged(monkeypatch):
    grad, params = _stack_grad(2)
    with_barrier = grad(params)
    monkeypatch.setattr("xtx.layers.transformer.cotangent_barrier", lambda x: x)
    grad, params = _stack_grad.__wrapped__(2)  # traced anew, without the barrier
    without = grad(params)
    # The cotangents are equal bit for bit; a reduction over one (a bias gradient) may
    # sum in another order once it reads a written buffer: float32 rounding, no more.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max()),
        with_barrier,
        without,
    )


def _max_fusion_operands(depth):
    """Most operands of any fusion in the compiled training gradient of an unrolled stack."""
    grad, params = _stack_grad(depth)
    text = grad.lower(params).compile().as_text()
    counts = [
        len(re.findall(r"%[\w.-]+", m.group(1)))
        for m in re.finditer(r"= \S+ fusion\(([^)]*)\)", text)
    ]
    return max(counts)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier is placed on CPU only")
def test_residual_gradient_chain_does_not_grow_with_depth():
    # Without the barrier the fusion that consumes the residual gradient at the bottom
    # of the stack re-adds one term per sublayer above it: its operand count grows with
    # depth (83 operands at depth 4 where depth 2 needs 46). With it, it stays flat.
    assert _max_fusion_operands(4) <= _max_fusion_operands(2)

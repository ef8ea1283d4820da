"""Fusion barriers: identities that change how XLA schedules work, never the numbers.

A pre-norm stack's residual gradient is a chain of adds, one per sublayer:
``g_l = g_{l+1} + (what sublayer l's branch hands back)``. XLA:CPU fuses cheap
elementwise producers into every consumer, and nothing on that chain is ever written to
memory by itself, so each consumer of ``g_l`` (the weight-gradient transposes, the input
of the next backward matmul, the norm's backward) re-adds every term from the top of the
stack: work quadratic in depth. At depth 6, 4096 tokens on two devices this was about
0.4 s of a 4.3 s training step. ``optimization_barrier`` does not help there: XLA:CPU
expands it away before fusing.

``cotangent_barrier`` divides the cotangent by a tensor of ones that XLA cannot see to be
ones (built from the cotangent's own bits). Division is an "expensive" op that XLA does
not duplicate into several consumers, so the chain is written once per sublayer and each
consumer reads it. ``x / 1.0`` is exact in IEEE arithmetic for every ``x`` (signed zeros,
infinities and NaNs included; XLA:CPU flushes subnormals to zero here as in every other
arithmetic op), so the cotangent is unchanged bit for bit. What can change is the order
in which XLA sums a reduction over it once it reads a written buffer (a bias gradient):
float32 rounding in the last bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# The bit pattern of 1.0 in each float type, and the unsigned int type of its width.
_ONE_BITS = {
    jnp.dtype(jnp.float32): (jnp.uint32, 0x3F800000),
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x3F80),
    jnp.dtype(jnp.float16): (jnp.uint16, 0x3C00),
}


@jax.custom_vjp
def cotangent_barrier(x: Array) -> Array:
    """Identity; in the backward pass its cotangent is materialised once (see module doc).

    float32, bfloat16 and float16 cotangents go through the division; others (float64)
    pass through unchanged.
    """
    return x


def _fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _bwd(_: None, g: Array) -> tuple[Array]:
    if jnp.dtype(g.dtype) not in _ONE_BITS:
        return (g,)
    uint, one_bits = _ONE_BITS[jnp.dtype(g.dtype)]
    bits = jax.lax.bitcast_convert_type(g, uint)
    # (bits | ONE) & ONE == ONE for any bits: a tensor of exact ones, opaque to XLA's
    # algebraic simplifier (a constant 1 would be folded away, and a scalar divisor
    # turned into a cheap multiply that XLA duplicates again).
    one = jax.lax.bitcast_convert_type((bits | one_bits) & one_bits, g.dtype)
    return (g / one,)


cotangent_barrier.defvjp(_fwd, _bwd)

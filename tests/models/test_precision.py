"""Mixed precision: dtype="bfloat16" computes in bf16 with float32 parameters, float32
attention softmax and norms, and float32 logits."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import Decoder, TransformerWrapper
from xtx.ops import cross_entropy


def _init(model, x):
    """``model.init``, jitted with an RBG key: run eagerly, init compiles a sampler per
    parameter shape and dozens of small ops; one RBG program compiles several times faster."""
    return jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)


@pytest.fixture(scope="module")
def models():
    stack = Decoder(dim=32, depth=2, heads=4, rotary_pos_emb=True)
    f32 = TransformerWrapper(num_tokens=64, max_seq_len=16, attn_layers=stack)
    bf16 = TransformerWrapper(config=f32.config.replace(dtype="bfloat16"))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    variables = _init(f32, x)
    return f32, bf16, variables, x


def test_bf16_follows_float32(models):
    f32, bf16, variables, x = models
    ref = jax.jit(f32.apply)(variables, x)
    got = jax.jit(bf16.apply)(variables, x)
    assert got.dtype == jnp.float32  # logits come back in float32
    embeddings = jax.eval_shape(partial(bf16.apply, return_embeddings=True), variables, x)
    assert embeddings.dtype == jnp.bfloat16
    # bf16 keeps ~3 significant digits: compare the distributions, not the last bits.
    np.testing.assert_allclose(
        np.asarray(jax.nn.softmax(got)), np.asarray(jax.nn.softmax(ref)), atol=2e-2
    )
    assert float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1))) > 0.9


def test_parameters_and_gradients_stay_float32(models):
    _, bf16, variables, x = models
    params = nn.meta.unbox(variables["params"])

    def loss(p):
        return cross_entropy(bf16.apply({"params": p}, x)[:, :-1], x[:, 1:])

    grads = jax.jit(jax.grad(loss))(params)  # one program, not hundreds of eager ops
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bad_dtype(models):
    f32, *_ = models
    with pytest.raises(ValueError, match="dtype must be one of"):
        f32.config.replace(dtype="float8")


def test_vit_and_continuous_bf16():
    from xtx import ContinuousTransformerWrapper, Encoder, ViTransformerWrapper

    vit = ViTransformerWrapper(
        image_size=8, patch_size=4, num_classes=5, attn_layers=Encoder(dim=32, depth=1, heads=4)
    )
    rng = np.random.default_rng(2)  # numpy: jax.random compiles a sampler per shape
    img = jnp.asarray(rng.standard_normal((2, 3, 8, 8)), jnp.float32)
    cont = ContinuousTransformerWrapper(
        dim_in=6, dim_out=3, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4)
    )
    seq = jnp.asarray(rng.standard_normal((2, 9, 6)), jnp.float32)
    for model, inp in ((vit, img), (cont, seq)):
        variables = _init(model, inp)
        low = type(model)(config=model.config.replace(dtype="bfloat16"))
        ref, got = jax.jit(model.apply)(variables, inp), jax.jit(low.apply)(variables, inp)
        assert got.dtype == jnp.float32
        embeddings = jax.eval_shape(partial(low.apply, return_embeddings=True), variables, inp)
        assert embeddings.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=0.1, rtol=0.05)

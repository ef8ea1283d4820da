"""``NonAutoregressiveWrapper``: the masked-token loss against numpy, gradient routing, and
MaskGIT generation as one compiled program.

The loss oracle rebuilds the masked input in numpy from the same ``MaskingNoise`` (a
row's masked positions are those whose entry of ``argsort(mask_order)`` is below
``max(schedule(t) * N, 1)``), runs the bare network on it and takes the weighted
cross-entropy in numpy. ``apply`` is ``loss_from_noise`` on ``sample_noise(key)``. Agreement with x-transformers itself, masking variants and
critic included, is in ``tests/parity/test_wrappers.py``.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import Encoder, TransformerWrapper
from xtx.models.nonautoregressive import MaskingNoise, NonAutoregressiveWrapper

B, N, V, D = 2, 8, 12, 16
MASK_ID = V - 1


def _key(seed):
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def net():
    # logits_dim = V - 1: the network cannot predict MASK_ID, so no sample holds it.
    return TransformerWrapper(
        num_tokens=V, max_seq_len=N, logits_dim=V - 1, attn_layers=Encoder(dim=D, depth=1, heads=2)
    )


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, V - 1, (B, N)))


def random_variables(init, *args, seed=0):
    """Variables of the shapes ``init`` gives, drawn N(0, 0.5) in numpy: nothing to compile."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(init, *args))
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def full(net, tokens):
    """Self-conditioning and a self-critic: every parameter group of the wrapper."""
    wrapper = NonAutoregressiveWrapper(
        net, mask_id=MASK_ID, steps=4, self_cond=True, self_token_critic=True
    )
    return wrapper, random_variables(wrapper.init, _key(0), tokens)


@pytest.fixture(scope="module")
def self_conditioned(net, full):
    """Self-conditioning without a critic (cheaper to compile); the weights of ``full``."""
    wrapper = NonAutoregressiveWrapper(net, mask_id=MASK_ID, steps=4, self_cond=True)
    params = {k: v for k, v in full[1]["params"].items() if k != "critic_head"}
    return wrapper, {"params": params}


def _noise(times, *, self_cond=False, seed=1):
    """Masking only (no kept or random tokens)."""
    rng = np.random.default_rng(seed)
    return MaskingNoise(
        times=jnp.asarray(times, jnp.float32),
        mask_order=jnp.asarray(rng.random((B, N), dtype=np.float32)),
        no_replace=jnp.bool_(False),
        no_replace_order=jnp.zeros((B, N)),
        random_token=jnp.bool_(False),
        random_token_order=jnp.zeros((B, N)),
        random_tokens=jnp.zeros((B, N), jnp.int32),
        self_cond=jnp.bool_(self_cond),
        sample_temperature=jnp.float32(0.5),
        gumbel=None,
    )


def _norms(grads):
    return {k: float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(v)))) for k, v in grads.items()}  # fmt: skip


def test_loss_and_gradients(net, self_conditioned, tokens):
    """Self-conditioned on ``null_embed``, the network sees ``E[tok] + s`` with the constant
    ``s = null_embed @ W``: the oracle adds ``s`` to every row of the embedding table."""
    wrapper, variables = self_conditioned
    params = variables["params"]
    loss = lambda p, noise: wrapper.loss_from_noise({"params": p}, tokens, noise).loss  # noqa: E731
    loss_and_grad = jax.jit(jax.value_and_grad(loss))
    noise = _noise([0.25, 0.5])
    got, grads = loss_and_grad(params, noise)

    times, x = np.asarray(noise.times), np.asarray(tokens)
    count = np.maximum((1 - times) * N, 1)  # linear schedule
    mask = np.argsort(np.asarray(noise.mask_order), axis=-1) < count[:, None]
    assert mask.sum(1).tolist() == [6, 4]
    net_params = jax.tree.map(np.asarray, params["net"])
    s = np.asarray(params["null_embed"]) @ np.asarray(params["to_self_cond"]["kernel"])
    net_params["token_emb"]["embedding"] = net_params["token_emb"]["embedding"] + s
    logits = np.asarray(jax.jit(net.apply)({"params": net_params}, np.where(mask, MASK_ID, x)))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, x[..., None], -1)[..., 0]
    weight = -1.0 / (1.0 - (1.0 - times))  # d/dt (1 - t) / (1 - (1 - t))
    np.testing.assert_allclose(got, (ce * weight[:, None])[mask].mean(), rtol=1e-5)

    # Conditioned on null_embed: every parameter group learns.
    assert all(v > 0 for v in _norms(grads).values()), _norms(grads)
    # Conditioned on a first pass: that pass is gradient-stopped, null_embed unused.
    g = _norms(loss_and_grad(params, _noise([0.3, 0.6], self_cond=True))[1])
    assert g["null_embed"] == 0 and g["to_self_cond"] > 0 and g["net"] > 0, g


def test_apply_returns_the_losses(full, tokens):
    wrapper, variables = full
    # Traced only (the losses' values are checked above and against x-transformers).
    losses = jax.eval_shape(
        lambda v, k: wrapper.apply(v, tokens, rngs={"mask": k}), variables, _key(2)
    )
    assert all(loss.shape == () and loss.dtype == jnp.float32 for loss in losses)
    generator_only = jax.eval_shape(
        lambda v, k: wrapper.apply(v, tokens, rngs={"mask": k}, only_train_generator=True),
        variables,
        _key(2),
    )
    assert generator_only.critic_loss is None


def test_generate_is_one_compiled_program(self_conditioned):
    wrapper, variables = self_conditioned
    out = wrapper.generate(variables, key=_key(4), batch_size=B)
    again = wrapper.generate(variables, key=_key(4), batch_size=B, start_temperature=1.0)
    other = wrapper.generate(variables, key=_key(5), batch_size=B, start_temperature=0.5)
    assert out.shape == (B, N) and out.dtype == jnp.int32
    assert not (np.asarray(out) == MASK_ID).any()
    assert ((np.asarray(out) >= 0) & (np.asarray(out) < V - 1)).all()
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)
    # Three calls, new keys and temperatures: one trace, one executable.
    (program,) = wrapper._compiled.values()
    assert program._cache_size() == 1
    # Without batch_size: one sequence [N] (shapes only, nothing compiled).
    one = jax.eval_shape(lambda v: wrapper.generate(v, key=_key(6)), variables)
    assert one.shape == (N,)


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=re.escape(pattern)):
        fn(*args, **kwargs)


def test_bad_input_names_the_argument(net, full, tokens):
    wrapper, variables = full
    make = NonAutoregressiveWrapper
    _raises(ValueError, "mask_id must be a token id in [0, 12), got 12", make, net, mask_id=V)
    _raises(ValueError, "steps must be an int >= 1, got 0", make, net, mask_id=1, steps=0)
    _raises(ValueError, "no_replace_prob must be a number in [0, 1), got 1.5", make, net,
            mask_id=1, no_replace_prob=1.5)  # fmt: skip
    _raises(ValueError, "schedule must be one of ['cosine', 'linear']", make, net, mask_id=1,
            schedule="square")  # fmt: skip
    _raises(TypeError, "token_critic must be a TransformerWrapper", make, net, mask_id=1,
            token_critic=object())  # fmt: skip
    _raises(ValueError, "token_critic must output one logit per position", make, net,
            mask_id=1, token_critic=net)  # fmt: skip
    _raises(TypeError, "net must be a TransformerWrapper", make, object(), mask_id=1)
    _raises(ValueError, "pass rngs={'mask': key}", wrapper.apply, variables, tokens)
    _raises(ValueError, "x must be int tokens [B, N], got float32 (2, 8)", wrapper.apply,
            variables, jnp.zeros((B, N)), rngs={"mask": _key(0)})  # fmt: skip
    _raises(ValueError, "batch_size must be an int >= 1 or None, got 0", wrapper.generate,
            variables, key=_key(0), batch_size=0)  # fmt: skip
    _raises(ValueError, "seq_len must be <= max_seq_len = 8", wrapper.generate, variables,
            key=_key(0), seq_len=9)  # fmt: skip
    _raises(ValueError, "filter_thres must be a number in [0, 1), got 1.0", wrapper.generate,
            variables, key=_key(0), filter_thres=1.0)  # fmt: skip
    _raises(ValueError, "start_temperature must be a number >= 0, got -1", wrapper.generate,
            variables, key=_key(0), start_temperature=-1)  # fmt: skip

"""``ContinuousAutoregressiveWrapper``: losses against numpy, generation against a
step-by-step rollout.

Oracles: the losses are recomputed in numpy from the bare network's output on
``x[:, :-1]`` (x-transformers' formulas: masked mean, per-sequence mean, torch's
``gaussian_nll_loss``); generation is checked against a Python loop that reruns the
network, uncached, on the growing sequence and appends its last frame (the mean plus
``sqrt(max(var, 1e-5)) * temperature`` times the documented normal draw when
probabilistic). The cached program, the uncached one and the loop must agree. Agreement
with x-transformers itself is in ``tests/parity/test_wrappers.py``.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import ContinuousTransformerWrapper, Decoder, Encoder
from xtx.models.continuous_autoregressive import ContinuousAutoregressiveWrapper

B, T, F, D = 2, 8, 3, 16  # F: frame features (dim_in = dim_out)
PROMPT, NEW = 4, 4  # PROMPT + NEW - 1 = T - 1: the rollout reuses the loss program
ATOL = 1e-5


def _key(seed):
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    return jax.random.key(seed, impl="rbg")


def _net(probabilistic=False):
    return ContinuousTransformerWrapper(
        dim_in=F,
        dim_out=F,
        max_seq_len=T,
        probabilistic=probabilistic,
        attn_layers=Decoder(dim=D, depth=1, heads=2),
    )


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(0).standard_normal((B, T, F)).astype(np.float32)


def random_variables(init, *args, seed=0):
    """Variables of the shapes ``init`` gives, drawn N(0, 0.5) in numpy: nothing to compile."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(init, *args))
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module", params=[False, True], ids=["mean", "probabilistic"])
def model(request, frames):
    net = _net(request.param)
    variables = random_variables(net.init, _key(0), frames)
    names = ["gaussian_nll"] if net.config.probabilistic else ["mse", "l1"]
    plain = {n: ContinuousAutoregressiveWrapper(net, loss_fn=n) for n in names}
    equal = {n: ContinuousAutoregressiveWrapper(net, loss_fn=n, equal_loss_weight_batch=True) for n in names}  # fmt: skip

    @jax.jit  # one compile: XLA shares the network's forward pass between the outputs
    def run(x, mask):
        """The network on ``x[:, :-1]`` and the wrappers' losses on ``x``."""
        full_mask = jnp.concatenate([mask, jnp.ones((B, 1), bool)], axis=1)
        losses = {
            n: (
                plain[n].apply(variables, x),
                plain[n].apply(variables, x, mask=full_mask),  # loses its last column
                plain[n].apply(variables, x, lens=mask.sum(1)),
                equal[n].apply(variables, x, mask=mask),
            )
            for n in names
        }
        return net.apply(variables, x[:, :-1]), losses

    return net, variables, run


MASK = np.arange(T - 1)[None] < np.array([[T - 1], [4]])  # [B, T - 1]


def test_losses_match_numpy(model, frames):
    net, _, run = model
    out, losses = jax.tree.map(np.asarray, run(frames, MASK))  # out: [(2,) B, T - 1, F]
    target = frames[:, 1:]
    if net.config.probabilistic:
        var = np.maximum(out[1], 1e-6)
        elementwise = {"gaussian_nll": 0.5 * (np.log(var) + (out[0] - target) ** 2 / var)}
    else:
        elementwise = {"mse": (out - target) ** 2, "l1": np.abs(out - target)}
    for name, loss in elementwise.items():
        # Every sequence weighs the same: sum over its frames and features / its frames.
        per_row = (loss * MASK[..., None]).sum((1, 2)) / MASK.sum(1)
        expected = (loss.mean(), loss[MASK].mean(), loss[MASK].mean(), per_row.mean())
        np.testing.assert_allclose(losses[name], expected, atol=ATOL, rtol=0)


def _rollout(net, run, prompt, normal_draws=None, temperature=0.0):
    """Reruns the network, uncached, for each new frame. The frames not yet generated are
    random garbage (generate's uncached path writes zeros): only causality hides them.
    ``run`` reads ``T`` frames and feeds the first ``T - 1 = PROMPT + NEW - 1`` on."""
    rng = np.random.default_rng(1)
    seq = np.concatenate([prompt, rng.standard_normal((B, NEW, F)).astype(np.float32)], 1)
    frames = []
    for i in range(NEW):
        last = np.asarray(run(seq, MASK)[0])[..., PROMPT + i - 1, :]
        if net.config.probabilistic:
            mean, var = last
            last = mean + np.sqrt(np.maximum(var, 1e-5)) * temperature * normal_draws[i]
        frames.append(last)
        seq[:, PROMPT + i] = last
    return np.stack(frames, axis=1)


def test_generate_equals_uncached_rollout(model, frames):
    net, variables, run = model
    wrapper = ContinuousAutoregressiveWrapper(net)
    prompt = frames[:, :PROMPT]
    key, temperature, draws = _key(1), 0.7, None
    if net.config.probabilistic:
        # generate's documented draw for step i: normal(fold_in(key, i), [B, F]).

        def normal(k):
            return jnp.stack(
                [jax.random.normal(jax.random.fold_in(k, i), (B, F)) for i in range(NEW)]
            )

        draws = np.asarray(jax.jit(normal)(key))
    expected = _rollout(net, run, prompt, draws, temperature)
    cached = wrapper.generate(variables, prompt, NEW, key=key, temperature=temperature)
    assert cached.shape == (B, NEW, F) and cached.dtype == jnp.float32
    np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=0)
    # Another prompt and temperature reuse the compiled program.
    again = wrapper.generate(variables, frames[:, 1 : PROMPT + 1], NEW, key=key, temperature=0.3)
    assert not np.allclose(again, cached)
    (program,) = wrapper._compiled.values()
    assert program._cache_size() == 1
    if not net.config.probabilistic:
        uncached = wrapper.generate(variables, prompt, NEW, cache_kv=False)
        np.testing.assert_allclose(uncached, expected, atol=1e-4, rtol=0)
        # One [P, F] prompt gives [NEW, F] (shapes only: nothing compiled).
        one = jax.eval_shape(lambda v, p: wrapper.generate(v, p, NEW), variables, prompt[0])
        assert one.shape == (NEW, F)


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=re.escape(pattern)):
        fn(*args, **kwargs)


def test_bad_input_names_the_argument(model, frames):
    net, variables, _ = model
    wrapper = ContinuousAutoregressiveWrapper(net)
    make = ContinuousAutoregressiveWrapper
    _raises(TypeError, "net must be a ContinuousTransformerWrapper, got str", make, "net")
    _raises(ValueError, "loss_fn must be one of ['gaussian_nll', 'l1', 'mse']", make, net,
            loss_fn="huber")  # fmt: skip
    if net.config.probabilistic:
        _raises(ValueError, "loss_fn='mse' does not fit a network with probabilistic=True",
                make, net, loss_fn="mse")  # fmt: skip
        _raises(ValueError, "pass key=jax.random.key(..)", wrapper.generate, variables,
                frames[:, :PROMPT], NEW)  # fmt: skip
        return
    _raises(ValueError, "x must be float frames [B, T, D], got int32 (2, 8)", wrapper.apply,
            variables, jnp.zeros((B, T), jnp.int32))  # fmt: skip
    _raises(ValueError, "mask must have shape [B, T] = (2, 8) or [B, T - 1], got (2, 5)",
            wrapper.apply, variables, frames, mask=np.ones((B, 5), bool))  # fmt: skip
    _raises(ValueError, "pass either mask or lens, not both", wrapper.apply, variables, frames,
            mask=np.ones((B, T), bool), lens=np.full((B,), 3))  # fmt: skip
    _raises(ValueError, "start_tokens must be frames [B, P, 3] with P >= 1, got (2, 4, 4)",
            wrapper.generate, variables, np.zeros((B, PROMPT, 4)), NEW)  # fmt: skip
    _raises(ValueError, "seq_len must be an int >= 1, got 0", wrapper.generate, variables,
            frames[:, :PROMPT], 0)  # fmt: skip
    _raises(ValueError, "needs 11 positions, more than max_seq_len=8", wrapper.generate,
            variables, frames[:, :PROMPT], T)  # fmt: skip
    _raises(ValueError, "temperature must be >= 0, got -1.0", wrapper.generate, variables,
            frames[:, :PROMPT], NEW, temperature=-1.0)  # fmt: skip
    encoder = ContinuousTransformerWrapper(
        dim_in=F, dim_out=F, max_seq_len=T, attn_layers=Encoder(dim=D, depth=1, heads=2)
    )
    _raises(ValueError, "generate needs a causal network", make(encoder).generate, variables,
            frames[:, :PROMPT], NEW)  # fmt: skip
    pooled = ContinuousTransformerWrapper(
        dim_in=F, max_seq_len=T, average_pool_embed=True, attn_layers=Decoder(dim=D, depth=1)
    )
    _raises(ValueError, "average_pool_embed", make, pooled)

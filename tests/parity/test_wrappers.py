"""The training wrappers against x-transformers 2.31: converted with ``from_x_transformers``.

The wrappers draw random numbers, so both sides are given the same ones. xtx's
``NonAutoregressiveWrapper.loss_from_noise`` takes every draw of a training step as a
``MaskingNoise``; the torch wrapper gets the same values by swapping, inside its module
only, ``torch`` for a proxy whose ``rand`` / ``randint`` / ``empty(..).uniform_`` return
them in the order x-transformers draws them, ``random`` (its coin flips, ``random() <
p``) for a queue of 0.0 (heads) or 0.99 (tails), and ``gumbel_noise`` for the given
noise. Generation draws, in xtx, round i's uniforms from ``split(split(key, S)[i])``
(documented in ``generate``); the test draws the same uniforms and hands their Gumbel
noise to the torch sampler through ``gumbel_noise``, so both must pick the same tokens.
The continuous wrapper's loss is deterministic; its generation is checked against a
step-by-step rollout in ``tests/models/test_continuous_autoregressive.py``.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import x_transformers as xt
from x_transformers import nonautoregressive_wrapper as torch_nar

from xtx import AutoregressiveWrapper
from xtx.interop import UnsupportedOption, from_x_transformers
from xtx.models.continuous_autoregressive import ContinuousAutoregressiveWrapper
from xtx.models.nonautoregressive import MaskingNoise, NonAutoregressiveWrapper, gumbel_from_uniform
from xtx.models.xl_autoregressive import XLAutoregressiveWrapper

B, N, V, D, HEADS = 2, 8, 12, 16, 2
ATOL = 1e-4


def _encoder_net(seed, **kwargs):
    torch.manual_seed(seed)
    return xt.TransformerWrapper(
        num_tokens=V, max_seq_len=N, attn_layers=xt.Encoder(dim=D, depth=1, heads=HEADS), **kwargs
    )


@contextlib.contextmanager
def _torch_draws(noise: MaskingNoise, coin_flips: list[float]):
    """Makes the torch wrapper's forward draw the values of ``noise``."""
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    rands = [t(noise.mask_order), t(noise.no_replace_order), t(noise.random_token_order)]

    class Uniform:
        def uniform_(self, *args):
            return t(noise.times)

    class Torch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def rand(self, *args, **kwargs):
            return rands.pop(0)

        def randint(self, *args, **kwargs):
            return t(noise.random_tokens)

        def empty(self, *args, **kwargs):
            return Uniform()

    flips = list(coin_flips)
    saved = torch_nar.torch, torch_nar.random, torch_nar.gumbel_noise
    torch_nar.torch, torch_nar.random = Torch(), lambda: flips.pop(0)
    torch_nar.gumbel_noise = lambda _: t(noise.gumbel)
    try:
        yield
    finally:
        torch_nar.torch, torch_nar.random, torch_nar.gumbel_noise = saved


def _noise(seed, *, flips: bool, times=(0.3, 0.8)) -> MaskingNoise:
    rng = np.random.default_rng(seed)
    uniform = lambda *shape: rng.random(shape, dtype=np.float32)  # noqa: E731
    return MaskingNoise(
        times=np.asarray(times, np.float32),
        mask_order=uniform(B, N),
        no_replace=np.bool_(flips),
        no_replace_order=uniform(B, N),
        random_token=np.bool_(flips),
        random_token_order=uniform(B, N),
        random_tokens=rng.integers(0, V, (B, N)),
        self_cond=np.bool_(flips),
        sample_temperature=np.float32(0.6),
        gumbel=np.asarray(gumbel_from_uniform(uniform(B, N, V))),
    )


NAR_CONFIGS = {
    # self-conditioning, a separate critic network, the MDLM loss weight.
    "self_cond_critic": dict(self_cond=True, critic=True),
    # the self-critic head, cosine schedule, plain cross-entropy, remasking allowed.
    "self_critic_cosine": dict(
        self_token_critic=True,
        schedule="cosine",
        use_simple_mdlm_loss_weight=False,
        can_mask_prev_unmasked=True,
    ),
}


@pytest.fixture(scope="module", params=list(NAR_CONFIGS))
def nar(request):
    options = dict(NAR_CONFIGS[request.param])
    critic = _encoder_net(1, logits_dim=1) if options.pop("critic", False) else None
    torch_wrapper = torch_nar.NonAutoregressiveWrapper(
        _encoder_net(0), mask_id=V - 1, steps=4, token_critic=critic, **options
    ).eval()
    wrapper, variables = from_x_transformers(torch_wrapper, verify=False)
    loss_fn = jax.jit(lambda v, x, noise: wrapper.loss_from_noise(v, x, noise))
    return torch_wrapper, wrapper, variables, loss_fn


def test_options_are_carried_over(nar):
    torch_wrapper, wrapper, _, _ = nar
    assert isinstance(wrapper, NonAutoregressiveWrapper)
    for name in ("mask_id", "steps", "self_cond", "no_replace_prob", "random_token_prob"):
        assert getattr(wrapper, name) == getattr(torch_wrapper, name)
    assert wrapper.can_mask_prev_unmasked == torch_wrapper.can_mask_prev_unmasked
    assert wrapper.use_simple_mdlm_loss_weight == (torch_wrapper.loss_weight_fn is not None)
    assert wrapper.has_critic


@pytest.mark.parametrize("flips", [True, False])
def test_losses_match_x_transformers(nar, flips):
    torch_wrapper, wrapper, variables, loss_fn = nar
    noise = _noise(3, flips=flips)
    x = np.random.default_rng(4).integers(0, V - 1, (B, N))
    # x-transformers' random() calls: two coin flips, the self-conditioning draw (when
    # self_cond), the critic's sampling temperature.
    heads = 0.0 if flips else 0.99
    coin_flips = [heads, heads] + ([heads] if wrapper.self_cond else [])
    coin_flips.append(float(noise.sample_temperature))
    with _torch_draws(noise, coin_flips), torch.no_grad():
        expected = torch_wrapper(torch.from_numpy(x))
    got = loss_fn(variables, jnp.asarray(x), jax.tree.map(jnp.asarray, noise))
    for name in ("loss", "generator_loss", "critic_loss"):
        np.testing.assert_allclose(
            getattr(got, name), float(getattr(expected, name)), atol=ATOL, rtol=0
        )


def test_generate_matches_x_transformers(nar):
    torch_wrapper, wrapper, variables, _ = nar
    key, batch = jax.random.key(5, impl="rbg"), 3
    draws = []
    for step_key in jax.random.split(key, wrapper.steps):
        k_tokens, k_critic = jax.random.split(step_key)
        draws.append(gumbel_from_uniform(jax.random.uniform(k_tokens, (batch, N, V))))
        draws.append(gumbel_from_uniform(jax.random.uniform(k_critic, (batch, N))))
    saved = torch_nar.gumbel_noise
    torch_nar.gumbel_noise = lambda _: torch.from_numpy(np.array(draws.pop(0)))
    try:
        expected = torch_wrapper.generate(batch_size=batch)
    finally:
        torch_nar.gumbel_noise = saved
    got = wrapper.generate(variables, key=key, batch_size=batch)
    np.testing.assert_array_equal(got, expected.numpy())


@pytest.mark.parametrize("xl", [False, True], ids=["plain", "xl"])
def test_autoregressive_wrappers(xl):
    torch.manual_seed(2)
    net = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=N,
        max_mem_len=N if xl else 0,
        attn_layers=xt.Decoder(dim=D, depth=1, heads=HEADS, rel_pos_bias=xl),
    )
    if xl:
        torch_wrapper = xt.XLAutoregressiveWrapper(net, ignore_index=3, pad_value=1)
        expected_type, options = XLAutoregressiveWrapper, (3, 1)
    else:
        torch_wrapper = xt.AutoregressiveWrapper(net, ignore_index=3, pad_value=1, mask_prob=0.2)
        expected_type, options = AutoregressiveWrapper, (3, 1, 0.2)
    wrapper, variables = from_x_transformers(torch_wrapper, verify=False)
    assert type(wrapper) is expected_type
    names = ("ignore_index", "pad_value", "mask_prob")[: len(options)]
    assert tuple(getattr(wrapper, name) for name in names) == options
    # The variables are the network's (whose conversion has its own parity tests).
    module, expected = from_x_transformers(net, verify=False)
    assert wrapper.net.config == module.config
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


@pytest.mark.parametrize("probabilistic", [False, True])
def test_continuous_autoregressive_wrapper(probabilistic):
    torch.manual_seed(3)
    net = xt.ContinuousTransformerWrapper(
        dim_in=3,
        dim_out=3,
        max_seq_len=N,
        probabilistic=probabilistic,
        attn_layers=xt.Decoder(dim=D, depth=1, heads=HEADS),
    )
    torch_wrapper = xt.ContinuousAutoregressiveWrapper(net, equal_loss_weight_batch=True).eval()
    wrapper, variables = from_x_transformers(torch_wrapper, verify=False)
    assert isinstance(wrapper, ContinuousAutoregressiveWrapper)
    assert wrapper.loss_fn == ("gaussian_nll" if probabilistic else "mse")
    assert wrapper.equal_loss_weight_batch
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, N, 3)).astype(np.float32)
    mask = np.arange(N)[None] < np.array([[N], [5]])
    with torch.no_grad():
        expected = float(torch_wrapper(torch.from_numpy(x), mask=torch.from_numpy(mask)))
    got = jax.jit(wrapper.apply)(variables, jnp.asarray(x), mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_unsupported_wrapper_options_raise():
    net = _encoder_net(0)
    custom = torch_nar.NonAutoregressiveWrapper(net, mask_id=V - 1, schedule=lambda t: 1 - t**2)
    with pytest.raises(UnsupportedOption, match="custom schedule"):
        from_x_transformers(custom, verify=False)
    z_loss = xt.AutoregressiveWrapper(net, add_attn_z_loss=True)
    with pytest.raises(UnsupportedOption, match="add_attn_z_loss"):
        from_x_transformers(z_loss, verify=False)

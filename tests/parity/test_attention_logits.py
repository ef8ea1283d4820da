"""Attention-logit features against x-transformers 2.31.10 on converted weights.

Talking heads (2003.02436), explicit sparse top-k attention (1912.11637), hard attention,
logit softclamp, residual attention (RealFormer, 2012.11747) and, through
``attn_custom_attn_fn``, 1.5-entmax (1909.00015, removed from x-transformers after the
seed). Float32, atol 1e-4, every position compared. Each case also checks that the
feature changes the output, so that parity cannot hold by accident.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import x_transformers as xt

from tests.parity.harness import (
    ATOL,
    HEADS,
    D,
    L,
    V,
    _jax_call,
    _ragged_mask,
    _tokens,
    assert_parity,
    wrapper,
)
from xtx import interop
from xtx.layers.attention import AttentionConfig
from xtx.layers.transformer import AttentionLayersConfig
from xtx.models.transformer_wrapper import TransformerWrapperConfig

X = _tokens(7)
MASK = _ragged_mask([10, 6], 10)


def _mix_talking_heads(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Moves the identity-initialised head-mixing weights somewhere generic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "talking_heads" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def _check(model, kwargs=None, *, stack=None, attn=None, args=(X,)):
    """Parity with x-transformers, and a visible change when the feature is switched off.

    ``stack`` / ``attn`` are the ``AttentionLayersConfig`` / ``AttentionConfig`` fields
    that switch the feature off.
    """
    kwargs = kwargs or {}
    module, variables = assert_parity(model, args, kwargs)
    al = module.config.attn_layers
    if attn:
        al = dataclasses.replace(al, attn=dataclasses.replace(al.attn, **attn))
    if stack:
        al = dataclasses.replace(al, **stack)
    plain = type(module)(config=dataclasses.replace(module.config, attn_layers=al))
    with_feature = _jax_call(module, variables, args, kwargs)
    without = _jax_call(plain, variables, args, kwargs)
    assert np.abs(with_feature - without).max() > 10 * ATOL
    return module, variables


# ----------------------------------------------------------------------------
# Talking heads.


@pytest.mark.parametrize("option", ["attn_pre_talking_heads", "attn_post_talking_heads", "both"])
def test_talking_heads(option):
    torch.manual_seed(10)
    kw = (
        {"attn_pre_talking_heads": True, "attn_post_talking_heads": True}
        if option == "both"
        else {option: True}
    )
    model = _mix_talking_heads(wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, **kw)), 10)
    off = {k.removeprefix("attn_"): False for k in kw}
    module, _ = _check(model, {"mask": MASK}, attn=off)
    if option == "both":
        assert module.config.attn_layers.attn == AttentionConfig(
            dim_head=module.config.attn_layers.attn.dim_head, talking_heads=True
        )


def test_seed_talking_heads_keyword_means_pre_and_post():
    cfg = AttentionConfig(talking_heads=True)
    assert cfg.pre_talking_heads and cfg.post_talking_heads and not cfg.talking_heads
    assert cfg == AttentionConfig(pre_talking_heads=True, post_talking_heads=True)
    stack = AttentionLayersConfig.from_flat(dim=D, depth=1, attn_talking_heads=True)
    assert stack.attn.pre_talking_heads and stack.attn.post_talking_heads


# ----------------------------------------------------------------------------
# Sparse top-k, hard attention, softclamp.


def test_sparse_topk():
    torch.manual_seed(11)
    model = wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS, attn_sparse_topk=3))
    _check(model, attn={"sparse_topk": None})


def test_sparse_topk_straight_through_forward():
    torch.manual_seed(12)
    model = wrapper(
        xt.Encoder(
            dim=D, depth=2, heads=HEADS, attn_sparse_topk=3, attn_sparse_topk_straight_through=True
        )
    )
    module, _ = _check(model, attn={"sparse_topk": None, "sparse_topk_straight_through": False})
    assert module.config.attn_layers.attn.sparse_topk_straight_through


def test_sparse_topk_causal_with_padding():
    torch.manual_seed(13)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, attn_sparse_topk=2))
    _check(model, {"mask": MASK}, attn={"sparse_topk": None})


def test_sparse_topk_of_every_key_is_plain_attention():
    """k >= the number of keys keeps them all (x-transformers 2.31 raises instead)."""
    torch.manual_seed(14)
    module, variables = interop.from_x_transformers(
        wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS)), verify=False
    )
    al = module.config.attn_layers
    topk = dataclasses.replace(al, attn=dataclasses.replace(al.attn, sparse_topk=X.shape[1]))
    sparse = type(module)(config=dataclasses.replace(module.config, attn_layers=topk))
    np.testing.assert_array_equal(
        _jax_call(sparse, variables, (X,), {}), _jax_call(module, variables, (X,), {})
    )


def test_hard_attention():
    torch.manual_seed(15)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, attn_hard=True))
    _check(model, {"mask": MASK}, attn={"hard": False})


def test_softclamp_logits():
    torch.manual_seed(16)
    model = wrapper(
        xt.Decoder(
            dim=D,
            depth=2,
            heads=HEADS,
            attn_softclamp_logits=True,
            attn_logit_softclamp_value=1.0,
        )
    )
    module, _ = _check(model, {"mask": MASK}, attn={"softclamp_logits": False})
    assert module.config.attn_layers.attn.logit_softclamp_value == 1.0


# ----------------------------------------------------------------------------
# Residual attention.


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_norm", "post_norm"])
def test_residual_attn(pre_norm):
    torch.manual_seed(17)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, residual_attn=True, pre_norm=pre_norm))
    _check(model, {"mask": MASK}, stack={"residual_attn": False})


def test_residual_attn_accumulates_t5_bias():
    torch.manual_seed(18)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, residual_attn=True, rel_pos_bias=True))
    _check(model, {"mask": MASK}, stack={"residual_attn": False})


def test_post_norm_residual_attn_with_memory_tokens():
    torch.manual_seed(19)
    model = wrapper(
        xt.Decoder(dim=D, depth=2, heads=HEADS, residual_attn=True, pre_norm=False),
        num_memory_tokens=2,
    )
    _check(model, {"mask": MASK}, stack={"residual_attn": False})


def test_cross_residual_attn_keeps_its_own_chain():
    torch.manual_seed(20)
    context = np.random.default_rng(20).standard_normal((2, 7, D)).astype(np.float32)
    kwargs = {"context": context, "context_mask": _ragged_mask([7, 3], 7), "mask": MASK}
    model = wrapper(
        xt.Decoder(
            dim=D,
            depth=2,
            heads=HEADS,
            cross_attend=True,
            residual_attn=True,
            cross_residual_attn=True,
        )
    )
    _check(model, kwargs, stack={"cross_residual_attn": False})


# ----------------------------------------------------------------------------
# 1.5-entmax: seed-only, checked through x-transformers' custom_attn_fn hook with an
# independent torch entmax (bisection on the threshold, float64).


def torch_entmax15(sim: torch.Tensor) -> torch.Tensor:
    z = sim.double() / 2
    z = z - z.amax(dim=-1, keepdim=True)
    lo, hi = torch.full_like(z[..., :1], -1.0), torch.zeros_like(z[..., :1])
    for _ in range(80):
        tau = (lo + hi) / 2
        over = (z - tau).clamp(min=0).pow(2).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(over, tau, lo), torch.where(over, hi, tau)
    p = (z - (lo + hi) / 2).clamp(min=0).pow(2)
    return (p / p.sum(-1, keepdim=True)).to(sim.dtype)


def test_entmax15_attention():
    torch.manual_seed(21)
    plain = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS))
    config = interop.config_from_x_transformers(plain)
    al = config.attn_layers
    config = dataclasses.replace(
        config, attn_layers=dataclasses.replace(al, attn=al.attn.replace(use_entmax15=True))
    )
    torch.manual_seed(21)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, attn_custom_attn_fn=torch_entmax15))
    model.eval()
    variables = {"params": interop.params_from_state_dict(config, model.state_dict())}
    module = interop.module_for_config(config)
    with torch.no_grad():
        expected = model(torch.from_numpy(X), mask=torch.from_numpy(MASK)).numpy()
        softmax_out = plain.eval()(torch.from_numpy(X), mask=torch.from_numpy(MASK)).numpy()
    got = _jax_call(module, variables, (X,), {"mask": MASK})
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    assert np.abs(got - softmax_out).max() > 1e-2


# ----------------------------------------------------------------------------
# Conversion both ways, and bad configurations.


def test_round_trip_through_torch():
    config = AttentionLayersConfig.from_flat(
        dim=D,
        depth=2,
        heads=HEADS,
        causal=True,
        residual_attn=True,
        attn_talking_heads=True,
        attn_sparse_topk=4,
        attn_sparse_topk_straight_through=True,
        attn_softclamp_logits=True,
        attn_logit_softclamp_value=5.0,
    )
    wrapper_config = TransformerWrapperConfig(num_tokens=V, max_seq_len=L, attn_layers=config)
    torch.manual_seed(22)
    model = _mix_talking_heads(interop.torch_model_from_config(wrapper_config), 22)
    module, variables = assert_parity(model, (X,), {"mask": MASK})
    assert module.config == wrapper_config
    state_dict = interop.to_x_transformers(module, variables)
    rebuilt = interop.torch_model_from_config(module.config)
    rebuilt.load_state_dict(state_dict, strict=True)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(state_dict[key].numpy(), value.numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hard=True, use_entmax15=True), "attn_hard=True and attn_use_entmax15=True"),
        (dict(hard=True, sparse_topk=2), "attn_hard=True and attn_sparse_topk=2"),
        (dict(sparse_topk=0), "attn_sparse_topk must be a positive int"),
        (dict(sparse_topk=1.5), "attn_sparse_topk must be a positive int"),
        (dict(sparse_topk_straight_through=True), "needs attn_sparse_topk"),
        (
            dict(softclamp_logits=True, logit_softclamp_value=0.0),
            "attn_logit_softclamp_value must be > 0",
        ),
    ],
)
def test_bad_logit_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**kwargs)


def test_entmax15_has_no_torch_2_31_model():
    config = AttentionLayersConfig.from_flat(dim=D, depth=1, attn_use_entmax15=True)
    wrapper_config = TransformerWrapperConfig(num_tokens=V, max_seq_len=L, attn_layers=config)
    with pytest.raises(ValueError, match="attn_use_entmax15"):
        interop.torch_model_from_config(wrapper_config)

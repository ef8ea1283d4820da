"""Projection-side attention options: parity with x-transformers 2.31.10.

Covers qk-norm (grouped, custom scale, per-dim scale), qk-RMSNorm, value gates, head
scale, attention on attention, xPos, dynamic position bias and value residuals, alone and
in the combinations most likely to interact (rotary + grouped key/values + qk-norm,
memory key/values + qk-norm, xPos with padding). Each case converts a torch model with
``from_x_transformers(verify=False)`` and compares every position at atol 1e-4.

Parameters that x-transformers initialises to a constant (norm gains, head scales, the
zero-initialised value gate, qk-norm gains) are perturbed first, so that a wrong weight
layout cannot hide behind a symmetric initial value.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import x_transformers as xt
from flax import traverse_util

from tests.parity.harness import (
    ATOL,
    HEADS,
    D,
    V,
    _perturb,
    _ragged_mask,
    _tokens,
    assert_parity,
    wrapper,
)
from xtx import Decoder, Encoder, interop
from xtx.layers.attention import Attention, AttentionConfig

ALONE = {
    "qk_norm": {"attn_qk_norm": True},
    "qk_norm_groups_scale": {
        "attn_qk_norm": True,
        "attn_qk_norm_groups": 4,
        "attn_qk_norm_scale": 5,
    },
    "qk_norm_dim_scale": {"attn_qk_norm": True, "attn_qk_norm_dim_scale": True},
    "qk_rmsnorm": {"attn_qk_rmsnorm": True},
    "gate_values": {"attn_gate_values": True},
    "head_scale": {"attn_head_scale": True},
    "on_attn": {"attn_on_attn": True},
    "rotary_xpos": {"rotary_xpos": True, "rotary_xpos_scale_base": 64},
    "dynamic_pos_bias": {"dynamic_pos_bias": True},
    "value_residual": {"add_value_residual": True},
    "value_residual_fixed_mix": {"add_value_residual": True, "learned_value_residual_mix": False},
    # Combinations whose parts touch the same tensors.
    "rotary_gqa_qk_norm": {"rotary_pos_emb": True, "attn_kv_heads": 2, "attn_qk_norm": True},
    "mem_kv_qk_norm": {"attn_num_mem_kv": 3, "attn_qk_norm": True},
    "dynamic_log_distance_norm": {
        "dynamic_pos_bias": True,
        "dynamic_pos_bias_log_distance": True,
        "dynamic_pos_bias_norm": True,
        "dynamic_pos_bias_mlp_depth": 3,
    },
    "gate_head_scale_on_attn": {
        "attn_gate_values": True,
        "attn_head_scale": True,
        "attn_on_attn": True,
    },
}


@pytest.mark.parametrize("kw", ALONE.values(), ids=ALONE.keys())
def test_decoder_with_padding(kw):
    """Decoder with a padding mask (xPos here is the 'xpos decoder with padding' case).

    Value residuals get two self-attention layers: the mix is learned on the second.
    """
    torch.manual_seed(40)
    depth = 2 if kw.get("add_value_residual") else 1
    model = wrapper(xt.Decoder(dim=D, depth=depth, heads=HEADS, **kw))
    module, _ = assert_parity(model, (_tokens(40),), {"mask": _ragged_mask([10, 6], 10)})
    for name, value in kw.items():
        if name.startswith("attn_"):
            assert getattr(module.config.attn_layers.attn, name[len("attn_") :]) == value
        else:
            assert getattr(module.config.attn_layers, name) == value


def test_encoder_with_padding():
    """Bidirectional: the dynamic bias sees future distances too; the memory keys get the
    qk-norm gains of the keys."""
    torch.manual_seed(41)
    kw = {
        "dynamic_pos_bias": True,
        "dynamic_pos_bias_log_distance": True,
        "attn_qk_norm": True,
        "attn_qk_norm_dim_scale": True,
        "attn_num_mem_kv": 2,
    }
    model = wrapper(xt.Encoder(dim=D, depth=1, heads=HEADS, **kw))
    assert_parity(model, (_tokens(41, length=12),), {"mask": _ragged_mask([12, 5], 12)})


def test_cross_attention_value_residual_and_projection_options():
    """Cross-attention chains its own first values, always mixed 1/2."""
    torch.manual_seed(42)
    model = wrapper(
        xt.Decoder(
            dim=D,
            depth=2,
            heads=HEADS,
            cross_attend=True,
            add_value_residual=True,
            attn_qk_norm=True,
            attn_on_attn=True,
        )
    )
    context = np.random.default_rng(42).standard_normal((2, 7, D)).astype(np.float32)
    assert_parity(
        model,
        (_tokens(42),),
        {"context": context, "context_mask": _ragged_mask([7, 3], 7)},
    )


@pytest.mark.parametrize(
    "kw",
    [
        {
            "dynamic_pos_bias": True,
            "dynamic_pos_bias_log_distance": True,
            "attn_qk_norm": True,
            "attn_num_mem_kv": 2,
        },
        {"rotary_xpos": True, "add_value_residual": True, "learned_value_residual_mix": False},
    ],
    ids=["dynamic_qk_norm_mem_kv", "xpos_value_residual"],
)
def test_xl_memories(kw):
    """With XL memories the keys outnumber the queries: the dynamic-bias grid and the xPos
    centre span memory and tokens (memory at negative positions)."""
    torch.manual_seed(45)
    model = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=8,
        max_mem_len=6,
        attn_layers=xt.Decoder(dim=D, depth=2, heads=HEADS, **kw),
    )
    model = _perturb(model, 45)
    module, variables = interop.from_x_transformers(model, verify=False)
    rng = np.random.default_rng(45)
    x = rng.integers(0, V, (2, 5))
    mems = [rng.standard_normal((2, 3, D)).astype(np.float32) for _ in range(2)]
    with torch.no_grad():
        expected = model(torch.from_numpy(x), mems=[torch.from_numpy(m) for m in mems])
    got = module.apply(variables, jnp.asarray(x), mems=tuple(jnp.asarray(m) for m in mems))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=ATOL, rtol=0)


def test_round_trip_torch_jax_torch():
    """Weights moved off their values in xtx -> strict torch state_dict -> same outputs and,
    read back, the same config and params."""
    torch.manual_seed(43)
    model = wrapper(
        xt.Decoder(
            dim=D,
            depth=2,
            heads=HEADS,
            dynamic_pos_bias=True,
            dynamic_pos_bias_norm=True,
            add_value_residual=True,
            attn_qk_norm=True,
            attn_qk_norm_dim_scale=True,
            attn_qk_rmsnorm=True,
            attn_gate_values=True,
            attn_head_scale=True,
            attn_on_attn=True,
        )
    )
    module, variables = interop.from_x_transformers(model.eval(), verify=False)
    rng = np.random.default_rng(1)
    variables = {
        "params": jax.tree.map(
            lambda p: jnp.asarray(p + 0.1 * rng.standard_normal(p.shape), jnp.float32),
            variables["params"],
        )
    }

    state_dict = interop.to_x_transformers(module, variables)
    torch_model = interop.torch_model_from_config(module.config)
    torch_model.load_state_dict(state_dict, strict=True)
    torch_model.eval()
    x = _tokens(43)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    got = np.asarray(module.apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)

    module2, variables2 = interop.from_x_transformers(torch_model, verify=False)
    assert module2.config == module.config
    flat1 = traverse_util.flatten_dict(variables["params"])
    flat2 = traverse_util.flatten_dict(variables2["params"])
    assert flat1.keys() == flat2.keys()
    for path in flat1:
        np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(flat1[path]))


def test_initial_values_match_x_transformers():
    """Zero value gate (gate 1/2), unit head scale, qk gains dh^1/4, RMSNorm gammas 0."""
    D, H = 16, 8
    cfg = AttentionConfig(
        dim_head=H,
        qk_norm=True,
        qk_norm_dim_scale=True,
        qk_rmsnorm=True,
        gate_values=True,
        head_scale=True,
        on_attn=True,
    )
    init = jax.jit(Attention(cfg, D, HEADS).init)  # one compilation, not one per initializer
    params = nn.meta.unbox(init(jax.random.key(0), jnp.ones((2, 6, D)))["params"])
    np.testing.assert_array_equal(params["to_v_gate"]["kernel"], np.zeros((D, HEADS, H)))
    np.testing.assert_array_equal(params["head_scale"], np.ones(HEADS))
    np.testing.assert_allclose(params["qk_norm_q_scale"], np.full((HEADS, H), H**0.25))
    np.testing.assert_allclose(params["qk_norm_k_scale"], np.full((HEADS, H), H**0.25))
    np.testing.assert_array_equal(params["q_rmsnorm"], np.zeros((HEADS, H)))
    assert params["to_out"]["kernel"].shape == (HEADS, H, 2 * D)


def test_xpos_and_dynamic_bias_turn_off_or_keep_absolute_positions():
    """As x-transformers: xPos (rotary) drops the absolute embedding, dynamic bias keeps it."""
    assert Decoder(dim=D, depth=1, rotary_xpos=True).config.abs_pos_emb_disabled
    assert not Decoder(dim=D, depth=1, dynamic_pos_bias=True).config.abs_pos_emb_disabled


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Encoder(dim=D, depth=1, rotary_xpos=True), "rotary_xpos=True needs causal"),
        (
            lambda: Decoder(dim=D, depth=1, dynamic_pos_bias=True, alibi_pos_bias=True),
            "exclude each other",
        ),
        (
            lambda: Decoder(dim=D, depth=1, dynamic_pos_bias=True, dynamic_pos_bias_mlp_depth=0),
            "dynamic_pos_bias_mlp_depth must be an int >= 1, got 0",
        ),
        (
            lambda: Decoder(dim=D, depth=1, attn_qk_norm=True, attn_qk_norm_groups=3),
            "attn_qk_norm_groups must be an int >= 1 dividing attn_dim_head",
        ),
        (
            lambda: Decoder(
                dim=D, depth=1, attn_dim_head=8, attn_qk_norm=True, attn_qk_norm_groups=4
            ),
            "2 dims per group",
        ),
        (
            lambda: Decoder(dim=D, depth=1, attn_qk_norm_dim_scale=True),
            "attn_qk_norm_dim_scale=True needs attn_qk_norm=True",
        ),
        (
            lambda: Decoder(dim=D, depth=2, heads=HEADS, attn_kv_heads=2, add_value_residual=True),
            "learned_value_residual_mix=False",
        ),
    ],
    ids=[
        "xpos_encoder",
        "two_biases",
        "mlp_depth",
        "groups",
        "group_width",
        "dim_scale",
        "gqa_mix",
    ],
)
def test_bad_options_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_learned_value_mix_needs_keys_equal_to_queries():
    """With XL memories the keys outnumber the queries: the per-query mix is undefined."""
    attn = Attention(AttentionConfig(dim_head=8), D, HEADS, learned_value_residual_mix=True)
    x, mem = jnp.ones((1, 3, D)), jnp.ones((1, 2, D))
    first_values = jnp.ones((1, 5, HEADS, 8))
    with pytest.raises(ValueError, match="learned value residual mix needs one key per query"):
        jax.eval_shape(attn.init, jax.random.key(0), x, mem=mem, value_residual=first_values)


def test_unsupported_torch_variants_are_named():
    torch.manual_seed(44)
    model = wrapper(
        xt.Decoder(dim=D, depth=1, heads=HEADS, attn_gate_values=True, attn_gate_values_rank=4)
    )
    with pytest.raises(interop.UnsupportedOption, match="attn_gate_values_rank"):
        interop.from_x_transformers(model)

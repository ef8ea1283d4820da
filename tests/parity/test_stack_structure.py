"""Residual variants, token shift, norm placement and layer order: parity with x-transformers.

Covers gate_residual (GTrXL GRU gating), scale_residual and ff_post_act_ln (Normformer),
use_layerscale (CaiT), shift_tokens, weight_tie_layers (ALBERT), layers_execute_order
and num_residual_streams (hyper-connections), alone and in combination, against
x-transformers 2.31.10 on converted weights (float32, atol 1e-4, every position).
Parameters that start at a constant (gains, residual scales, the hyper-connection
mixing weights, stream embeddings) are moved off their init first, so the conversion
of each is exercised.
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
    _jax_call,
    _ragged_mask,
    _tokens,
    _torch_call,
    assert_parity,
    wrapper,
)
from xtx import Decoder, Encoder, TransformerWrapper, interop
from xtx.layers.transformer import AttentionLayersConfig
from xtx.ops import layer_norm

SINGLE = {
    "gate_residual": dict(gate_residual=True),
    "scale_residual": dict(scale_residual=True),
    "layerscale": dict(use_layerscale=True, layerscale_init_value=0.1),
    "layerscale_no_unit_offset": dict(use_layerscale=True, norm_add_unit_offset=False),
    "ff_post_act_ln": dict(ff_post_act_ln=True),
    "ff_post_act_ln_glu": dict(ff_post_act_ln=True, ff_glu=True),
    "shift_tokens": dict(shift_tokens=1),
    "shift_tokens_per_layer": dict(shift_tokens=(2, 0, 0, 1)),
    "weight_tie_layers": dict(weight_tie_layers=True),
    "layers_execute_order": dict(layers_execute_order=(0, 1, 0, 1, 2, 3)),
    "hyper_connections": dict(num_residual_streams=4),
    "hyper_connections_sinkhorn_iters": dict(num_residual_streams=2, hyper_conn_sinkhorn_iters=2),
}


@pytest.mark.parametrize("kwargs", SINGLE.values(), ids=SINGLE.keys())
def test_single_feature_decoder(kwargs):
    torch.manual_seed(11)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, **kwargs))
    module, _ = assert_parity(model, (_tokens(11),))
    for key, value in kwargs.items():
        if key.startswith("ff_"):
            assert getattr(module.config.attn_layers.ff, key[3:]) == value
        elif key != "layerscale_init_value":  # an init value: not in the weights
            assert getattr(module.config.attn_layers, key) == value


COMBINED = {
    "gate_residual_post_norm": dict(gate_residual=True, pre_norm=False),
    "gate_and_scale_residual": dict(gate_residual=True, scale_residual=True),
    "weight_tie_rotary": dict(weight_tie_layers=True, rotary_pos_emb=True, depth=3),
    "hyper_connections_layer_order": dict(
        num_residual_streams=4, layers_execute_order=(1, 0, 3, 2, 1, 2)
    ),
    "hyper_connections_post_norm": dict(num_residual_streams=3, pre_norm=False),
    "layerscale_sandwich_norm": dict(use_layerscale=True, sandwich_norm=True),
    "scale_residual_ff_post_act_ln": dict(scale_residual=True, ff_post_act_ln=True),
    "macaron_layerscale_shift": dict(macaron=True, use_layerscale=True, shift_tokens=1),
    "weight_tie_macaron_shift": dict(weight_tie_layers=True, macaron=True, shift_tokens=2),
}


@pytest.mark.parametrize("kwargs", COMBINED.values(), ids=COMBINED.keys())
def test_combination_decoder(kwargs):
    torch.manual_seed(12)
    kwargs = {"depth": 2, **kwargs}
    assert_parity(wrapper(xt.Decoder(dim=D, heads=HEADS, **kwargs)), (_tokens(12),))


def test_shift_tokens_encoder_with_padding_mask():
    # -2..2 on an encoder: five chunks of 6 features plus 2 unshifted; padding is
    # zeroed before it moves in attention layers only.
    torch.manual_seed(13)
    x = _tokens(13, batch=3)
    mask = _ragged_mask([10, 6, 2], 10)
    model = wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS, shift_tokens=2))
    assert_parity(model, (x,), {"mask": mask})


def test_shift_tokens_cross_attention_with_masks():
    torch.manual_seed(14)
    x = _tokens(14)
    mask = _ragged_mask([10, 7], 10)
    context = np.random.default_rng(14).standard_normal((2, 5, D)).astype(np.float32)
    context_mask = _ragged_mask([5, 3], 5)
    model = wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS, cross_attend=True, shift_tokens=1))
    assert_parity(model, (x,), {"mask": mask, "context": context, "context_mask": context_mask})


def test_hyper_connections_encoder_with_padding_mask():
    torch.manual_seed(15)
    x = _tokens(15)
    mask = _ragged_mask([10, 4], 10)
    model = wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS, num_residual_streams=2))
    assert_parity(model, (x,), {"mask": mask})


# ---------------------------------------------------------------------------
# One xtx-initialised stack: causality, parameter tree, layer dropout.


@pytest.fixture(scope="module")
def tied_stream_decoder():
    """A weight-tied, token-shifting, two-stream decoder with (training-only) layer dropout."""
    model = Decoder(
        dim=D,
        depth=2,
        heads=HEADS,
        weight_tie_layers=True,
        num_residual_streams=2,
        shift_tokens=2,
        layer_dropout=0.999999,
    )
    rng = np.random.default_rng(0)  # numpy: jax.random compiles a sampler per shape
    x = jnp.asarray(rng.standard_normal((2, 8, D)), jnp.float32)
    # Jitted with an RBG key: eagerly, init compiles a sampler per parameter shape.
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1, impl="rbg"), x))["params"]
    # The stream embeddings start at zero; move them so that they matter.
    params = dict(params, stream_emb=jnp.asarray(rng.standard_normal((2, D)), jnp.float32))
    return model, {"params": params}, x


def test_shifted_decoder_stays_causal(tied_stream_decoder):
    """Changing token t moves no output before t (shifts only look back)."""
    model, variables, x = tied_stream_decoder
    out = model.apply(variables, x)
    t = 5
    # A random change: adding a constant would vanish in the norms.
    change = np.random.default_rng(3).standard_normal(D).astype(np.float32)
    moved = model.apply(variables, x.at[:, t].add(change))
    np.testing.assert_allclose(np.asarray(moved[:, :t]), np.asarray(out[:, :t]), atol=1e-6)
    assert not np.allclose(np.asarray(moved[:, t:]), np.asarray(out[:, t:]), atol=1e-3)


def test_weight_tied_stack_has_one_block_of_parameters(tied_stream_decoder):
    model, variables, _ = tied_stream_decoder
    assert _layer_names(variables["params"]) == ["layers_0", "layers_1"]
    assert model.config.execute_order == (0, 1, 0, 1)


def test_layer_dropout_skips_whole_sublayers(tied_stream_decoder):
    """With every sublayer dropped, only the stream sum and the final norm remain."""
    model, variables, x = tied_stream_decoder
    params = variables["params"]
    out = model.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    streams = x[:, :, None, :] + params["stream_emb"]  # [B, T, S, D]
    expected = layer_norm(streams.sum(axis=2), params["final_norm"]["scale"], unit_offset=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
    assert not np.allclose(np.asarray(model.apply(variables, x)), np.asarray(expected), atol=1e-3)


def test_hyper_connections_refuse_xl_memories(tied_stream_decoder):
    model, variables, x = tied_stream_decoder
    with pytest.raises(ValueError, match="num_residual_streams"):
        model.apply(variables, x, return_hiddens=True)
    with pytest.raises(ValueError, match="num_residual_streams"):
        model.apply(variables, x, mems=(x, x))


# ---------------------------------------------------------------------------
# Parameter trees and reading the config back.


def _layer_names(stack_params):
    return sorted(k for k in stack_params if k.startswith("layers_"))


def test_layers_left_out_of_the_order_still_have_parameters():
    torch.manual_seed(16)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, layers_execute_order=(2, 3)))
    module, variables = assert_parity(model, (_tokens(16),))
    assert module.config.attn_layers.layers_execute_order == (2, 3)
    names = _layer_names(variables["params"]["attn_layers"])
    assert names == [f"layers_{i}" for i in range(4)]


def test_weight_tying_reads_back_as_weight_tie_layers():
    model = wrapper(xt.Encoder(dim=D, depth=3, heads=HEADS, weight_tie_layers=True))
    cfg = interop.config_from_x_transformers(model).attn_layers
    assert (cfg.weight_tie_layers, cfg.depth, cfg.layer_types) == (True, 3, ("a", "f"))
    assert set(model.state_dict()) >= {"attn_layers.layers.1.1.ff.0.0.weight"}
    assert not any(k.startswith("attn_layers.layers.2.") for k in model.state_dict())


def test_xtx_weights_round_trip_through_torch():
    """xtx init -> torch state_dict (strict load) -> same outputs -> same xtx weights."""
    cfg = dict(
        weight_tie_layers=True,
        num_residual_streams=2,
        use_layerscale=True,
        shift_tokens=1,
        ff_post_act_ln=True,
    )
    module = TransformerWrapper(
        num_tokens=64, max_seq_len=16, attn_layers=Decoder(dim=D, depth=2, heads=HEADS, **cfg)
    )
    x = _tokens(17)
    variables = jax.jit(module.init)(jax.random.key(17, impl="rbg"), jnp.asarray(x))
    # Move the constant-initialised weights so that the round trip is not trivial.
    rng = np.random.default_rng(18)
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables["params"]))
    flat = {p: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for p, v in flat.items()}
    variables = {"params": traverse_util.unflatten_dict(flat)}
    torch_model = interop.torch_model_from_config(module.config)
    torch_model.load_state_dict(interop.to_x_transformers(module, variables), strict=True)
    torch_model.eval()
    expected = _torch_call(torch_model, (x,), {})
    np.testing.assert_allclose(_jax_call(module, variables, (x,), {}), expected, atol=ATOL)
    module2, variables2 = interop.from_x_transformers(torch_model, verify=False)
    assert module2.config == module.config
    flat2 = traverse_util.flatten_dict(variables2["params"])
    assert flat2.keys() == flat.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(value))


# ---------------------------------------------------------------------------
# Bad combinations and values.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gate_residual=True, num_residual_streams=2), "gate_residual.*num_residual_streams"),
        (dict(scale_residual=True, num_residual_streams=2), "scale_residual.*num_residual_streams"),
        (dict(num_residual_streams=0), "num_residual_streams"),
        (dict(weight_tie_layers=True, sandwich_coef=1), "weight_tie_layers and sandwich_coef"),
        (
            dict(weight_tie_layers=True, layers_execute_order=(0, 1)),
            "weight_tie_layers and layers_execute_order",
        ),
        (dict(layers_execute_order=(0, 4)), r"layers_execute_order.*\[0, 4\)"),
        (dict(layers_execute_order=()), "layers_execute_order"),
        (dict(shift_tokens=(1, 0)), "one entry per layer"),
        (dict(shift_tokens=-1), "shift_tokens must be ints >= 0"),
        (dict(shift_tokens=40), "shift_tokens=40.*dim=32"),
        (dict(use_rezero=True, sandwich_norm=True), "use_rezero.*sandwich_norm"),
        (dict(hyper_conn_sinkhorn_iters=-1), "hyper_conn_sinkhorn_iters"),
    ],
)
def test_bad_structure_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionLayersConfig(dim=D, depth=2, heads=HEADS, **kwargs)


def test_custom_layers_with_depth_and_order_raise():
    with pytest.raises(ValueError, match="depth or custom_layers"):
        AttentionLayersConfig(dim=D, depth=2, custom_layers=("a", "f"), layers_execute_order=(0, 1))


def test_weight_tie_layers_with_custom_layers_raises():
    with pytest.raises(ValueError, match="weight_tie_layers and custom_layers"):
        Encoder(dim=D, heads=HEADS, custom_layers=("a", "f"), weight_tie_layers=True)

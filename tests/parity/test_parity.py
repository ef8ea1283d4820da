"""Parity with x-transformers 2.31.10 on converted weights (float32, atol 1e-4).

Each case builds a PyTorch x-transformers model with random weights (norm gains are
perturbed away from their init so that unit-offset storage is exercised), converts it
with ``xtx.interop.from_x_transformers(verify=False)`` and compares outputs on inputs
chosen here, at every position, masked ones included.
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
    L,
    V,
    _ragged_mask,
    _tokens,
    _torch_call,
    assert_parity,
    wrapper,
)
from xtx import interop

# ----------------------------------------------------------------------------
# The twelve configurations the core promises, plus the positional schemes and
# norms the core already carries.


def test_decoder():
    torch.manual_seed(1)
    assert_parity(wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS)), (_tokens(1),))


def test_encoder_ragged_padding_mask():
    torch.manual_seed(2)
    x = _tokens(2, batch=3)
    mask = _ragged_mask([10, 6, 1], 10)
    assert_parity(wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS)), (x,), {"mask": mask})


def test_decoder_padding_mask_and_embeddings():
    torch.manual_seed(3)
    x = _tokens(3)
    mask = _ragged_mask([10, 4], 10)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS))
    assert_parity(model, (x,), {"mask": mask, "return_logits_and_embeddings": True})


def test_cross_attending_decoder_with_context_mask():
    torch.manual_seed(4)
    x = _tokens(4)
    context = np.random.default_rng(4).standard_normal((2, 7, D)).astype(np.float32)
    context_mask = _ragged_mask([7, 3], 7)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, cross_attend=True))
    assert_parity(model, (x,), {"context": context, "context_mask": context_mask})


def test_cross_attention_with_other_context_width():
    torch.manual_seed(5)
    x = _tokens(5)
    context = np.random.default_rng(5).standard_normal((2, 7, 24)).astype(np.float32)
    model = wrapper(
        xt.Decoder(dim=D, depth=1, heads=HEADS, cross_attend=True, cross_attn_dim_context=24)
    )
    assert_parity(model, (x,), {"context": context})


def test_cross_attender():
    torch.manual_seed(6)
    x = np.random.default_rng(6).standard_normal((2, 9, D)).astype(np.float32)
    context = np.random.default_rng(7).standard_normal((2, 5, D)).astype(np.float32)
    model = xt.ContinuousTransformerWrapper(
        max_seq_len=L, attn_layers=xt.CrossAttender(dim=D, depth=2, heads=HEADS)
    )
    assert_parity(model, (x,), {"context": context, "mask": _ragged_mask([9, 5], 9)})


def test_encoder_decoder_loss_tied_embeddings():
    torch.manual_seed(8)
    model = xt.XTransformer(
        dim=D,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=HEADS,
        enc_max_seq_len=L,
        dec_num_tokens=V,
        dec_depth=2,
        dec_heads=HEADS,
        dec_max_seq_len=L,
        tie_token_emb=True,
    )
    src, tgt = _tokens(8, length=12), _tokens(9, length=9)
    tgt[1, 6:] = -100  # ignored targets
    module, _ = assert_parity(model, (src, tgt), {"mask": _ragged_mask([12, 7], 12)})
    assert module.config.tie_token_emb


def test_vit_classification_and_embeddings():
    torch.manual_seed(10)
    model = xt.ViTransformerWrapper(
        image_size=16,
        patch_size=4,
        num_classes=7,
        num_register_tokens=2,
        attn_layers=xt.Encoder(dim=D, depth=2, heads=HEADS),
    )
    img = np.random.default_rng(10).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert_parity(model, (img,))
    assert_parity(model, (img,), {"return_embeddings": True})


def test_continuous_wrapper_with_mask():
    torch.manual_seed(11)
    model = xt.ContinuousTransformerWrapper(
        dim_in=5, dim_out=3, max_seq_len=L, attn_layers=xt.Decoder(dim=D, depth=2, heads=HEADS)
    )
    x = np.random.default_rng(11).standard_normal((2, 9, 5)).astype(np.float32)
    assert_parity(model, (x,), {"mask": _ragged_mask([9, 4], 9)})


def test_continuous_probabilistic_memory_tokens():
    torch.manual_seed(12)
    model = xt.ContinuousTransformerWrapper(
        dim_in=5,
        dim_out=3,
        max_seq_len=L,
        probabilistic=True,
        num_memory_tokens=2,
        attn_layers=xt.Encoder(dim=D, depth=1, heads=HEADS),
    )
    x = np.random.default_rng(12).standard_normal((2, 9, 5)).astype(np.float32)
    assert_parity(model, (x,), {"mask": _ragged_mask([9, 4], 9)})


def test_dim_head_not_dim_over_heads():
    torch.manual_seed(13)
    assert_parity(
        wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, attn_dim_head=12)), (_tokens(13),)
    )


@pytest.mark.parametrize("kv", [{"attn_kv_heads": 2}, {"attn_one_kv_head": True}])
def test_fewer_kv_heads(kv):
    torch.manual_seed(14)
    assert_parity(wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, **kv)), (_tokens(14),))


def test_tied_embedding():
    torch.manual_seed(15)
    module, _ = assert_parity(
        wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS), tie_embedding=True), (_tokens(15),)
    )
    assert module.config.tie_embedding


def test_memory_tokens_with_mask():
    torch.manual_seed(16)
    model = wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS), num_memory_tokens=3)
    assert_parity(model, (_tokens(16),), {"mask": _ragged_mask([10, 5], 10)})


def test_post_norm():
    torch.manual_seed(17)
    assert_parity(wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, pre_norm=False)), (_tokens(17),))


def test_memory_key_values_with_mask():
    torch.manual_seed(18)
    model = wrapper(xt.Encoder(dim=D, depth=2, heads=HEADS, attn_num_mem_kv=3))
    assert_parity(model, (_tokens(18),), {"mask": _ragged_mask([10, 2], 10)})


def test_emb_dim_and_logits_dim():
    torch.manual_seed(19)
    model = wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS), emb_dim=24, logits_dim=11)
    assert_parity(model, (_tokens(19),))


@pytest.mark.parametrize(
    "kw",
    [
        {"rotary_pos_emb": True},
        {
            "rotary_pos_emb": True,
            "rotary_emb_dim": 16,
            "rotary_base_rescale_factor": 2.0,
            "rotary_interpolation_factor": 2.0,
        },
        {"rel_pos_bias": True},
        {"rel_pos_bias": True, "rel_pos_num_buckets": 8, "rel_pos_max_distance": 10},
        {"alibi_pos_bias": True},
        {"alibi_pos_bias": True, "alibi_num_heads": 2},
    ],
    ids=["rotary", "rotary-partial-rescaled", "t5", "t5-few-buckets", "alibi", "alibi-2-heads"],
)
@pytest.mark.parametrize("stack", [xt.Decoder, xt.Encoder], ids=["dec", "enc"])
def test_positional_schemes(stack, kw):
    torch.manual_seed(20)
    x = _tokens(20, length=14)
    mask = _ragged_mask([14, 9], 14)
    assert_parity(wrapper(stack(dim=D, depth=2, heads=HEADS, **kw)), (x,), {"mask": mask})


def test_t5_with_memory_key_values():
    torch.manual_seed(21)
    model = wrapper(xt.Decoder(dim=D, depth=2, heads=HEADS, rel_pos_bias=True, attn_num_mem_kv=2))
    assert_parity(model, (_tokens(21),))


@pytest.mark.parametrize(
    "kw",
    [
        {"use_rmsnorm": True},
        {"use_scalenorm": True},
        {"use_simple_rmsnorm": True},
        {"norm_add_unit_offset": False},
        {"ff_glu": True},
        {"ff_glu": True, "ff_swish": True},
        {"ff_relu_squared": True, "ff_no_bias": True},
        {"ff_mult": 2},
        {"macaron": True},
        {"sandwich_coef": 2},
        {"sandwich_norm": True},
    ],
    ids=lambda kw: "-".join(kw),
)
def test_stack_options(kw):
    torch.manual_seed(22)
    assert_parity(wrapper(xt.Decoder(dim=D, depth=3, heads=HEADS, **kw)), (_tokens(22),))


@pytest.mark.parametrize(
    "kw",
    [
        {"post_emb_norm": True},
        {"scaled_sinu_pos_emb": True},
        {"l2norm_embed": True},
        {"use_abs_pos_emb": False},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_embedding_options(kw):
    torch.manual_seed(23)
    assert_parity(wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS), **kw), (_tokens(23),))


# ----------------------------------------------------------------------------
# JAX -> torch and back.


def test_round_trip_jax_torch_jax():
    """xtx-initialised weights -> torch state_dict (strict) -> same outputs -> same params."""
    from xtx import Decoder, TransformerWrapper

    module = TransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        num_memory_tokens=2,
        attn_layers=Decoder(
            dim=D, depth=2, heads=HEADS, attn_kv_heads=2, rotary_pos_emb=True, ff_glu=True
        ),
    )
    x = _tokens(30)
    # Jitted with an RBG key: eagerly, init compiles a sampler per parameter shape.
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), jnp.asarray(x))["params"]
    params = nn.meta.unbox(params)
    # Move every weight off its init (norm gains included) so the round trip sees real values.
    # numpy draws: jax.random would compile a sampler for every parameter shape.
    rng = np.random.default_rng(1)
    variables = {
        "params": jax.tree.map(
            lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), jnp.float32), params
        )
    }

    state_dict = interop.to_x_transformers(module, variables)
    torch_model = interop.torch_model_from_config(module.config)
    torch_model.load_state_dict(state_dict, strict=True)
    torch_model.eval()
    expected = np.asarray(module.apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(_torch_call(torch_model, (x,), {}), expected, atol=ATOL, rtol=0)

    module2, variables2 = interop.from_x_transformers(torch_model)
    assert module2.config == module.config
    flat1 = traverse_util.flatten_dict(variables["params"])
    flat2 = traverse_util.flatten_dict(variables2["params"])
    assert flat1.keys() == flat2.keys()
    for path in flat1:
        np.testing.assert_array_equal(np.asarray(flat2[path]), np.asarray(flat1[path]))


@pytest.mark.parametrize(
    "build, option",
    [
        (
            lambda: wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS, attn_value_rmsnorm=True)),
            "attn_value_rmsnorm",
        ),
        (
            lambda: wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS, orthog_residual=True)),
            "orthog_residual",
        ),
        (
            lambda: wrapper(
                xt.Decoder(dim=D, depth=1, heads=HEADS, attn_pre_scale_post_talking_heads=True)
            ),
            "attn_pre_scale_post_talking_heads",
        ),
        (
            lambda: wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS), emb_frac_gradient=0.5),
            "emb_frac_gradient",
        ),
        (
            lambda: wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS, attn_sigmoid=True)),
            "attn_sigmoid",
        ),
        (
            lambda: wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS, attn_k_rmsnorm=True)),
            "attn_k_rmsnorm",
        ),
    ],
    ids=[
        "value_rmsnorm",
        "orthog_residual",
        "pre_scale_talking_heads",
        "frac_gradient",
        "sigmoid",
        "k_rmsnorm",
    ],
)
def test_unsupported_option_is_named(build, option):
    with pytest.raises(interop.UnsupportedOption, match=option):
        interop.from_x_transformers(build())


def test_verify_catches_a_silent_mismatch(monkeypatch):
    """If the layout table were wrong, verification must refuse the conversion."""
    torch.manual_seed(31)
    model = wrapper(xt.Decoder(dim=D, depth=1, heads=HEADS))
    real = interop.params_from_state_dict

    def broken(config, state_dict):
        params = real(config, state_dict)
        params["to_logits"]["kernel"] = params["to_logits"]["kernel"] * 1.01
        return params

    monkeypatch.setattr(interop, "params_from_state_dict", broken)
    with pytest.raises(AssertionError, match="disagrees"):
        interop.from_x_transformers(model)


def test_flash_flag_and_custom_layers():
    """attn_flash=True selects torch's fused kernel; xtx accepts it and gives the same
    numbers. custom_layers lays out the sublayers by hand."""
    torch.manual_seed(24)
    model = wrapper(
        xt.Decoder(
            dim=D, heads=HEADS, attn_flash=True, custom_layers=("a", "a", "f", "a", "f", "f")
        )
    )
    module, _ = assert_parity(model, (_tokens(24),), {"mask": _ragged_mask([10, 7], 10)})
    assert module.config.attn_layers.attn.flash
    assert module.config.attn_layers.layer_types == ("a", "a", "f", "a", "f", "f")

"""Bad input fails early, with an error that names the argument at fault.

Shape and keyword errors are raised while tracing, so most cases run under
``jax.eval_shape`` (nothing is compiled); the token-id check is the one that needs
real arrays, eagerly and under ``jax.jit``.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from xtx import (
    ContinuousTransformerWrapper,
    CrossAttender,
    Decoder,
    Encoder,
    TransformerWrapper,
    ViTransformerWrapper,
    XTransformer,
)

B, T, V, D, HEADS = 2, 16, 64, 32, 4
IMAGE, PATCH = 16, 4
KEY = jax.random.key(0)


def _key(seed):
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    return jax.random.key(seed, impl="rbg")


def _ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _floats(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _bools(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.bool_)


def _trace(model, *args, **kwargs):
    """Initialises and runs ``model`` on abstract inputs: all the checks, no compiling."""
    return jax.eval_shape(model.init, KEY, *args, **kwargs)


def _lm(**kwargs):
    return TransformerWrapper(
        num_tokens=V, max_seq_len=T, attn_layers=Decoder(dim=D, depth=1, heads=HEADS), **kwargs
    )


def _xtransformer_kwargs(**changes):
    kwargs = dict(
        dim=D,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=HEADS,
        enc_max_seq_len=T,
        dec_num_tokens=V,
        dec_depth=1,
        dec_heads=HEADS,
        dec_max_seq_len=T,
    )
    kwargs.update(changes)
    return {k: v for k, v in kwargs.items() if v is not None}


def test_valid_inputs_trace():
    """The baseline that every case below breaks in exactly one way."""
    assert _trace(_lm(), _ints(B, T), mask=_bools(B, T))["params"]


def test_sequence_longer_than_max_seq_len():
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_seq_len=16"):
        _trace(_lm(), _ints(B, T + 1))
    continuous = ContinuousTransformerWrapper(
        dim_in=8, max_seq_len=T, attn_layers=Decoder(dim=D, depth=1, heads=HEADS)
    )
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_seq_len=16"):
        _trace(continuous, _floats(B, T + 1, 8))


def test_mask_shape_must_match_x():
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(2, 16\)"):
        _trace(_lm(), _ints(B, T), mask=_bools(B, T - 1))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\]"):
        _trace(Encoder(dim=D, depth=1, heads=HEADS), _floats(B, T, D), mask=_bools(T))
    continuous = ContinuousTransformerWrapper(
        dim_in=8, max_seq_len=T, attn_layers=Encoder(dim=D, depth=1, heads=HEADS)
    )
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\]"):
        _trace(continuous, _floats(B, T, 8), mask=_bools(B, T + 1))
    cross = CrossAttender(dim=D, depth=1, heads=HEADS)
    with pytest.raises(ValueError, match=r"context_mask must have shape \[B, S\]"):
        _trace(cross, _floats(B, T, D), context=_floats(B, 5, D), context_mask=_bools(B, 4))


def test_context_required_by_cross_attention():
    decoder = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, cross_attend=True),
    )
    with pytest.raises(ValueError, match="cross_attend=True.*pass `context`"):
        _trace(decoder, _ints(B, T))
    with pytest.raises(ValueError, match="pass `context`"):
        _trace(CrossAttender(dim=D, depth=1, heads=HEADS), _floats(B, T, D))
    # And refused by a stack that does not cross-attend.
    with pytest.raises(
        ValueError, match="`context` was given but the stack has cross_attend=False"
    ):
        _trace(_lm(), _ints(B, T), context=_floats(B, 5, D))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Decoder(dim=D, depth=1, heads=4, attn_kv_heads=3),
            r"heads \(4\) must be divisible by the number of key/value heads \(3\)",
        ),
        (
            lambda: ViTransformerWrapper(
                image_size=18, patch_size=PATCH, attn_layers=Encoder(dim=D, depth=1)
            ),
            r"image_size \(18\) must be divisible by patch_size \(4\)",
        ),
        (
            lambda: Decoder(
                dim=D, depth=1, attn_dim_head=8, rotary_pos_emb=True, rotary_emb_dim=16
            ),
            r"rotary_emb_dim \(16\) must be <= attn_dim_head \(8\)",
        ),
        (
            lambda: TransformerWrapper(
                num_tokens=V,
                max_seq_len=T,
                emb_dim=33,
                scaled_sinu_pos_emb=True,
                attn_layers=Decoder(dim=D, depth=1),
            ),
            r"scaled_sinu_pos_emb needs an even emb_dim, got 33",
        ),
    ],
    ids=["kv_heads", "patch_size", "rotary_dim", "sinusoidal_dim"],
)
def test_sizes_that_must_divide(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: Decoder(dim=D, depth=1, rel_pos_bias=True, alibi_pos_bias=True),
            "rel_pos_bias and alibi_pos_bias exclude each other",
        ),
        (
            lambda: Decoder(dim=D, depth=1, use_scalenorm=True, use_rmsnorm=True),
            "use_scalenorm, use_rmsnorm and use_simple_rmsnorm exclude each other",
        ),
        (
            lambda: Decoder(dim=D, depth=1, attn_one_kv_head=True, attn_kv_heads=2),
            "attn_one_kv_head=True means one key/value head, but attn_kv_heads=2",
        ),
        (
            lambda: _lm(emb_dim=16, tie_embedding=True),
            "tie_embedding=True needs emb_dim == dim",
        ),
    ],
    ids=["rel_pos_alibi", "two_norms", "kv_heads_one_kv_head", "tie_embedding_emb_dim"],
)
def test_colliding_options_name_both(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


UNKNOWN_KEYWORDS = [
    (Decoder, dict(dim=D, depth=1), "attn_dim_heads", "attn_dim_head"),
    (Decoder, dict(dim=D, depth=1), "rotary_pos_embed", "rotary_pos_emb"),
    (Encoder, dict(dim=D, depth=1), "ff_mults", "ff_mult"),
    (CrossAttender, dict(dim=D, depth=1), "cross_attn_dim_heads", "cross_attn_dim_head"),
    (TransformerWrapper, dict(num_tokens=V), "max_seq_length", "max_seq_len"),
    (TransformerWrapper, dict(num_tokens=V), "num_memory_token", "num_memory_tokens"),
    (
        XTransformer,
        _xtransformer_kwargs(enc_max_seq_len=None),
        "enc_max_seq_length",
        "enc_max_seq_len",
    ),
    (XTransformer, _xtransformer_kwargs(), "dec_attn_dim_heads", "dec_attn_dim_head"),
    (XTransformer, _xtransformer_kwargs(), "tie_token_embedding", "tie_token_emb"),
    (ViTransformerWrapper, dict(image_size=IMAGE), "patch_sizes", "patch_size"),
    (ContinuousTransformerWrapper, dict(dim_out=4), "max_seq_length", "max_seq_len"),
    (ContinuousTransformerWrapper, dict(dim_out=4), "dim_inn", "dim_in"),
]


@pytest.mark.parametrize(
    ("ctor", "kwargs", "bad", "good"),
    UNKNOWN_KEYWORDS,
    ids=[f"{c.__name__}-{bad}" for c, _, bad, _ in UNKNOWN_KEYWORDS],
)
def test_unknown_keyword_suggests_closest(ctor, kwargs, bad, good):
    with pytest.raises(TypeError, match=rf"'{bad}' \(did you mean '{good}'\?\)"):
        ctor(**kwargs, **{bad: 16})


def test_xtransformer_needs_enc_num_tokens():
    with pytest.raises(TypeError, match="XTransformer needs enc_num_tokens"):
        XTransformer(**_xtransformer_kwargs(enc_num_tokens=None))


def test_vit_wrong_image_shape():
    vit = ViTransformerWrapper(
        image_size=IMAGE, patch_size=PATCH, attn_layers=Encoder(dim=D, depth=1, heads=HEADS)
    )
    expected = re.escape("img must have shape [B, C, H, W] = [B, *(3, 16, 16)]")
    with pytest.raises(ValueError, match=expected + r", got \(2, 3, 16, 8\)"):
        _trace(vit, _floats(B, 3, IMAGE, IMAGE // 2))
    with pytest.raises(ValueError, match=expected + r", got \(2, 16, 16, 3\)"):
        _trace(vit, _floats(B, IMAGE, IMAGE, 3))  # channels last without channels_last=True
    with pytest.raises(ValueError, match=expected + r", got \(3, 16, 16\)"):
        _trace(vit, _floats(3, IMAGE, IMAGE))  # no batch axis


@pytest.fixture(scope="module")
def checked_lm():
    model = _lm(check_token_ids=True)
    tokens = jax.random.randint(_key(1), (B, T), 0, V)
    return model, jax.jit(model.init)(_key(2), tokens), tokens  # jitted: compiles faster


@pytest.mark.parametrize("bad_id", [V, -1])
def test_token_id_outside_vocabulary_eager(checked_lm, bad_id):
    model, variables, tokens = checked_lm
    with pytest.raises(ValueError, match=rf"token id {bad_id} in x is outside the vocabulary"):
        model.apply(variables, tokens.at[1, 5].set(bad_id))


def test_token_id_outside_vocabulary_under_jit(checked_lm):
    model, variables, tokens = checked_lm
    apply = jax.jit(model.apply)
    assert apply(variables, tokens).shape == (B, T, V)  # valid ids pass the check
    # Under jit the check runs with the computation, so the error surfaces on the call
    # or when the result is awaited, whichever the runtime gets to first.
    with pytest.raises(Exception, match="outside the vocabulary"):
        jax.block_until_ready(apply(variables, tokens.at[0, 3].set(V)))

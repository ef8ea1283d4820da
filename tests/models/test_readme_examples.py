"""The usage examples of the seed x-transformers README, ported to xtx at toy size.

Each example keeps the README's structure and keywords but runs at dim 32, 4 heads,
depth 1-2, 16 tokens and 16x16 images (16 patches); the asserted shapes are the README
comments scaled to those sizes. Beyond shape and finiteness, each test checks the
property its example is about against an independent computation: a hand-counted
parameter total, a hand-written loss, or a perturbation.

Compiling dominates the run time on CPU, so every model shares the same widths (one
compiled kernel per parameter and activation shape serves them all) and runs eagerly.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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
DIM_HEAD = 64  # the x-transformers default, independent of D
IMAGE, PATCH, CHANNELS = 16, 4, 3
NUM_PATCHES = (IMAGE // PATCH) ** 2


def _key(seed):
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU,
    # and compiling is most of this file's run time.
    return jax.random.key(seed, impl="rbg")


def _tokens(seed=0):
    return jax.random.randint(_key(seed), (B, T), 0, V)


def _finite(x):
    return bool(jnp.isfinite(x).all())


def _params(variables):
    return nn.meta.unbox(variables["params"])


def test_full_encoder_decoder_with_tied_embeddings():
    model = XTransformer(
        dim=D,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=HEADS,
        enc_max_seq_len=T,
        dec_num_tokens=V,
        dec_depth=1,
        dec_heads=HEADS,
        dec_max_seq_len=T,
        tie_token_emb=True,
    )
    src, tgt = _tokens(0), _tokens(1)
    src_mask = jnp.ones_like(src, bool)
    variables = model.init(_key(2), src, tgt, mask=src_mask)
    loss = model.apply(variables, src, tgt, mask=src_mask)
    # The README comment says (1, 1024, 512); the model returns the scalar loss.
    assert loss.shape == ()
    assert _finite(loss)

    # One embedding table, shared by both halves.
    params = _params(variables)
    assert params["shared_token_emb"]["embedding"].shape == (V, D)
    assert "token_emb" not in params["encoder"] and "token_emb" not in params["decoder"]

    # The loss is the next-token cross-entropy of the decoder's logits.
    def decoder_logits(module, src, tgt):
        return module.decode(tgt, module.encode(src, mask=src_mask), mask=src_mask)

    logits = model.apply(variables, src, tgt, method=decoder_logits)
    assert logits.shape == (B, T, V)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    expected = -jnp.take_along_axis(logp, tgt[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_decoder_only_is_causal():
    model = TransformerWrapper(
        num_tokens=V, max_seq_len=T, attn_layers=Decoder(dim=D, depth=2, heads=HEADS)
    )
    x = _tokens()
    variables = model.init(_key(1), x)
    logits = model.apply(variables, x)
    assert logits.shape == (B, T, V)
    assert _finite(logits)
    # Changing token t moves no logit before t, and moves the logits from t on.
    t = 9
    moved = model.apply(variables, x.at[:, t].set((x[:, t] + 1) % V))
    np.testing.assert_array_equal(moved[:, :t], logits[:, :t])
    assert not np.allclose(moved[:, t:], logits[:, t:])


def _gpt_param_count(num_tokens, max_seq_len, dim, depth, heads, dim_head):
    """Hand count of a TransformerWrapper(Decoder) with untied, bias-free logits."""
    attn = 4 * dim * heads * dim_head  # q, k, v, out projections, no biases
    ff = 2 * dim * 4 * dim + 4 * dim + dim  # two matrices and their biases
    norms = 2 * dim  # one pre-norm gain per sublayer
    embeddings = num_tokens * dim + max_seq_len * dim  # tokens + absolute positions
    head = dim + dim * num_tokens  # final norm gain + logits
    return depth * (attn + ff + norms) + embeddings + head


def test_gpt3_config_builds_and_has_175b_params():
    gpt3 = TransformerWrapper(
        num_tokens=50000,
        max_seq_len=2048,
        attn_layers=Decoder(dim=12288, depth=96, heads=96, attn_dim_head=128),
    )
    cfg = gpt3.config
    assert (cfg.num_tokens, cfg.max_seq_len) == (50000, 2048)
    assert (cfg.attn_layers.dim, cfg.attn_layers.depth, cfg.attn_layers.heads) == (12288, 96, 96)
    assert cfg.attn_layers.attn.dim_head == 128 and cfg.attn_layers.causal
    # Shapes only: eval_shape traces init without allocating or computing anything.
    shapes = jax.eval_shape(gpt3.init, _key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(shapes))
    count = sum(math.prod(leaf.shape) for leaf in leaves)
    assert count == _gpt_param_count(50000, 2048, 12288, 96, 96, 128)
    # The "175B" of GPT-3; x-transformers 2.31.10 built on torch's meta device counts
    # exactly the same.
    assert count == 175_208_411_136


def test_encoder_only_with_mask():
    model = TransformerWrapper(
        num_tokens=V, max_seq_len=T, attn_layers=Encoder(dim=D, depth=2, heads=HEADS)
    )
    x = _tokens()
    mask = jnp.ones_like(x, bool)
    variables = model.init(_key(1), x, mask=mask)
    logits = model.apply(variables, x, mask=mask)
    assert logits.shape == (B, T, V)
    assert _finite(logits)
    # An all-true mask is no mask.
    np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-5, atol=1e-5)
    # Padding is invisible: changing padded tokens leaves every unpadded output as it
    # was, although the encoder is bidirectional.
    keep = 11
    mask = jnp.broadcast_to(jnp.arange(T) < keep, (B, T))
    padded = model.apply(variables, x, mask=mask)
    changed = model.apply(variables, x.at[:, keep:].set((x[:, keep:] + 7) % V), mask=mask)
    np.testing.assert_allclose(changed[:, :keep], padded[:, :keep], rtol=1e-5, atol=1e-5)
    assert not np.allclose(padded[:, :keep], logits[:, :keep])


@pytest.fixture(scope="module")
def images():
    return jax.random.normal(_key(5), (B, CHANNELS, IMAGE, IMAGE))


def test_vit_image_classification(images):
    model = ViTransformerWrapper(
        image_size=IMAGE,
        patch_size=PATCH,
        num_classes=10,
        attn_layers=Encoder(dim=D, depth=1, heads=HEADS),
    )
    variables = model.init(_key(1), images)
    logits = model.apply(variables, images)
    assert logits.shape == (B, 10)
    assert _finite(logits)
    params = _params(variables)
    assert params["pos_embedding"].shape == (NUM_PATCHES, D)
    assert params["patch_proj"]["kernel"].shape == (PATCH * PATCH * CHANNELS, D)


def test_image_to_caption(images):
    encoder = ViTransformerWrapper(
        image_size=IMAGE,
        patch_size=PATCH,
        attn_layers=Encoder(dim=D, depth=1, heads=HEADS),
    )
    decoder = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, cross_attend=True),
    )
    caption = _tokens(3)
    encoded = encoder.apply(encoder.init(_key(1), images), images, return_embeddings=True)
    assert encoded.shape == (B, NUM_PATCHES, D)
    dec_vars = decoder.init(_key(2), caption, context=encoded)
    logits = decoder.apply(dec_vars, caption, context=encoded)
    assert logits.shape == (B, T, V)
    assert _finite(logits)
    # The caption reads the image: give each caption the other image and its logits move.
    swapped = decoder.apply(dec_vars, caption, context=encoded[::-1])
    assert not np.allclose(swapped, logits)


def test_dropouts():
    model = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        emb_dropout=0.1,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, attn_dropout=0.1, ff_dropout=0.1),
    )
    cfg = model.config
    assert cfg.emb_dropout == 0.1
    assert cfg.attn_layers.attn.dropout == 0.1 and cfg.attn_layers.ff.dropout == 0.1
    x = _tokens()
    variables = model.init(_key(1), x)

    def train(key):
        return model.apply(variables, x, deterministic=False, rngs={"dropout": key})

    eval_a = model.apply(variables, x, deterministic=True)
    eval_b = model.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a, train_a_again, train_b = train(_key(10)), train(_key(10)), train(_key(11))
    assert train_a.shape == (B, T, V)
    assert _finite(train_a) and _finite(train_b)
    np.testing.assert_array_equal(train_a, train_a_again)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a)
    with pytest.raises(ValueError, match=r"pass rngs=\{'dropout': key\}"):
        model.apply(variables, x, deterministic=False)  # no dropout key


def test_memory_key_values():
    enc = Encoder(dim=D, depth=1, heads=HEADS, attn_num_mem_kv=16)
    assert enc.config.attn.num_mem_kv == 16
    x = jax.random.normal(_key(0), (B, T, D))
    variables = enc.init(_key(1), x)
    out = enc.apply(variables, x)
    assert out.shape == (B, T, D)
    assert _finite(out)
    attn = _params(variables)["layers_0"]["attn"]
    assert attn["mem_k"].shape == attn["mem_v"].shape == (HEADS, 16, DIM_HEAD)
    # The memories are attended to: moving them moves the output.
    moved = jax.tree_util.tree_map(lambda p: p, variables)
    moved["params"]["layers_0"]["attn"]["mem_v"] = jax.tree_util.tree_map(
        lambda p: p + 1.0, variables["params"]["layers_0"]["attn"]["mem_v"]
    )
    assert not np.allclose(enc.apply(moved, x), out)


def test_memory_tokens():
    model = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        num_memory_tokens=20,
        attn_layers=Encoder(dim=D, depth=1, heads=HEADS),
    )
    x = _tokens()
    variables = model.init(_key(1), x)
    logits = model.apply(variables, x)
    # Memory tokens take part in attention but are not returned.
    assert logits.shape == (B, T, V)
    assert _finite(logits)
    assert _params(variables)["memory_tokens"].shape == (20, D)
    memory = jax.tree_util.tree_map(lambda p: p + 1.0, variables["params"]["memory_tokens"])
    moved = {"params": {**variables["params"], "memory_tokens": memory}}
    assert not np.allclose(model.apply(moved, x), logits)


# README feature sections whose keyword xtx has: keywords of a depth-2 Decoder, the
# expected sublayer order (or None), parameter shapes that must exist (path -> shape),
# and a wrapper parameter that must not (absolute positions, for relative schemes).
STACK_FEATURES = {
    "use_scalenorm": ({"use_scalenorm": True}, None, {"final_norm/scale": (1,)}, None),
    "use_rmsnorm": ({"use_rmsnorm": True}, None, {"final_norm/scale": (D,)}, None),
    "ff_glu": ({"ff_glu": True}, None, {"layers_1/ff/proj_in/kernel": (D, 2 * 4 * D)}, None),
    "sandwich_coef": ({"sandwich_coef": 2}, ("a", "a", "f", "f"), {}, None),
    "macaron": ({"macaron": True}, ("f", "a", "f") * 2, {}, None),
    "rel_pos_bias": ({"rel_pos_bias": True}, None, {"rel_pos": (32, HEADS)}, "pos_emb"),
    "rotary_pos_emb": ({"rotary_pos_emb": True}, None, {}, "pos_emb"),
    "alibi_pos_bias": ({"alibi_pos_bias": True}, None, {}, None),
}


@pytest.mark.parametrize("feature", list(STACK_FEATURES))
def test_stack_feature_examples(feature):
    kwargs, layer_types, shapes, absent = STACK_FEATURES[feature]
    model = TransformerWrapper(
        num_tokens=V,
        max_seq_len=T,
        attn_layers=Decoder(dim=D, depth=2, heads=HEADS, **kwargs),
    )
    stack_cfg = model.config.attn_layers
    for name, value in kwargs.items():
        owner = stack_cfg.ff if name.startswith("ff_") else stack_cfg
        assert getattr(owner, name.removeprefix("ff_")) == value
    x = _tokens()
    variables = model.init(_key(1), x)
    logits = model.apply(variables, x)
    assert logits.shape == (B, T, V)
    assert _finite(logits)
    params = _params(variables)
    stack = params["attn_layers"]
    for path, shape in shapes.items():
        node = stack
        for name in path.split("/"):
            node = node[name]
        assert node.shape == shape, path
    if layer_types is not None:
        assert stack_cfg.layer_types == layer_types
        kinds = tuple("f" if "ff" in stack[f"layers_{i}"] else "a" for i in range(len(layer_types)))
        assert kinds == layer_types
        assert f"layers_{len(layer_types)}" not in stack
    if absent is not None:
        assert absent not in params


def test_cross_attender():
    # The README attends from 1 node to 5 neighbours; T of each here reuses the kernels
    # compiled for the other tests (compiling is what costs time on CPU).
    enc = Encoder(dim=D, depth=1, heads=HEADS)
    model = CrossAttender(dim=D, depth=1, heads=HEADS)
    nodes = jax.random.normal(_key(0), (B, T, D))
    node_masks = jnp.ones((B, T), bool)
    neighbors = jax.random.normal(_key(1), (B, T, D))
    neighbor_masks = jnp.ones((B, T), bool)

    encoded_neighbors = enc.apply(
        enc.init(_key(2), neighbors, mask=neighbor_masks), neighbors, mask=neighbor_masks
    )
    assert encoded_neighbors.shape == (B, T, D)

    def run(variables, context, context_mask):
        return model.apply(
            variables, nodes, context=context, mask=node_masks, context_mask=context_mask
        )

    variables = model.init(
        _key(3), nodes, context=encoded_neighbors, mask=node_masks, context_mask=neighbor_masks
    )
    out = run(variables, encoded_neighbors, neighbor_masks)
    assert out.shape == (B, T, D)
    assert _finite(out)
    assert model.config.layer_types == ("c", "f")
    assert "layers_2" not in _params(variables)
    # A masked-out neighbour is invisible: changing it moves nothing.
    masked = neighbor_masks.at[:, -3:].set(False)
    before = run(variables, encoded_neighbors, masked)
    after = run(variables, encoded_neighbors.at[:, -3:].add(1.0), masked)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, out)


def test_continuous_wrapper_with_mask():
    model = ContinuousTransformerWrapper(
        dim_in=32,
        dim_out=100,
        max_seq_len=T,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS),
    )
    x = jax.random.normal(_key(0), (B, T, 32))
    mask = jnp.ones((B, T), bool)
    variables = model.init(_key(1), x, mask=mask)
    out = model.apply(variables, x, mask=mask)
    assert out.shape == (B, T, 100)
    assert _finite(out)
    # Masked-out leading frames are invisible to the later frames that would see them.
    mask = mask.at[:, :4].set(False)
    a = model.apply(variables, x, mask=mask)
    b = model.apply(variables, x.at[:, :4].add(3.0), mask=mask)
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 4:], out[:, 4:])

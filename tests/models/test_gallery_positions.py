"""The gallery models' block-recipe options: rotary positions, GELU, unscaled embeddings.

Rotary positions are relative, so each test checks an invariance that the paper's
absolute (or learned-bias) scheme does not give, or that the recipe is the one named.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xtx

ROTARY = dict(position="rotary", ff_activation="gelu", emb_scale=False, pre_norm=True)


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 50, shape), jnp.int32)


def test_rotary_xl_two_segments_with_memory_equal_one_long_segment():
    """With mem_len = segment_len, segment 2 read after segment 1 attends to exactly the
    keys a single causal pass over both segments gives it (every layer's memory is that
    layer's input, computed causally), and rotary scores depend only on offsets."""
    S = 8
    kw = dict(num_tokens=50, dim=32, depth=2, heads=4, **ROTARY)
    seg = xtx.TransformerXL(segment_len=S, mem_len=S, **kw)
    whole = xtx.TransformerXL(segment_len=2 * S, mem_len=0, **kw)
    tokens = _tokens((2, 2 * S))
    params = seg.init(jax.random.key(0), tokens[:, :S], state=seg.init_state(2))
    _, state = seg.apply(params, tokens[:, :S], state=seg.init_state(2))
    second, _ = seg.apply(params, tokens[:, S:], state=state)
    want, _ = whole.apply(params, tokens, state=whole.init_state(2))
    np.testing.assert_allclose(second, want[:, S:], atol=2e-5)


def test_rotary_recipe_has_no_relative_position_parameters():
    m = xtx.TransformerXL(
        num_tokens=50, dim=32, depth=1, heads=4, segment_len=8, mem_len=8, **ROTARY
    )
    params = nn.unbox(m.init(jax.random.key(0), _tokens((1, 8)), state=m.init_state(1)))["params"]
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any("r_w_bias" in n or "r_r_bias" in n or "to_r" in n for n in names)
    # The unscaled embedding table is drawn with std sqrt(2 / dim) (x-transformers').
    assert abs(float(np.std(params["token_emb"])) - (2 / 32) ** 0.5) < 0.03


@pytest.mark.parametrize(
    "cls, extra",
    [
        (xtx.MemorizingTransformer, dict(knn_memory_size=32, knn_top_k=4)),
        (xtx.BlockRecurrentTransformer, dict(num_state=4, block_len=8)),
    ],
)
def test_rotary_recipe_runs_on_the_xl_family(cls, extra):
    m = cls(num_tokens=50, dim=32, depth=2, heads=4, segment_len=8, mem_len=8, **ROTARY, **extra)
    state = m.init_state(2)
    params = m.init(jax.random.key(0), _tokens((2, 8)), state=state)
    _, state = m.apply(params, _tokens((2, 8), 1), state=state)
    logits, _ = m.apply(params, _tokens((2, 8), 2), state=state)
    assert logits.shape == (2, 8, 50) and bool(jnp.isfinite(logits).all())
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    names = {jax.tree_util.keystr(p) for p, _ in flat}
    assert not any("'rel_pos'" in n or "r_w_bias" in n for n in names), sorted(names)


def test_rotary_longformer_is_shift_invariant_where_the_window_is_full():
    """Depth 1, window w: a token's logits depend on the w tokens before it and, with
    rotary positions, not on where they sit; prepending k tokens shifts the logits."""
    w, k, T = 4, 3, 16
    kw = dict(num_tokens=50, dim=32, depth=1, heads=4, window=w, causal=True)
    tokens = _tokens((1, T))
    shifted = jnp.concatenate([_tokens((1, k), 5), tokens], axis=1)
    for position, invariant in (("rotary", True), ("sinusoidal", False)):
        m = xtx.Longformer(**kw, position=position)
        params = m.init(jax.random.key(0), tokens)
        a, _ = m.apply(params, tokens)
        b, _ = m.apply(params, shifted)
        close = np.allclose(a[:, w:], b[:, k + w :], atol=1e-5)
        assert close == invariant, position


def test_rotary_rmt_drops_the_sinusoid_and_keeps_the_parameters():
    kw = dict(num_tokens=50, dim=32, depth=1, heads=4, segment_len=8, num_memory=2)
    tokens = _tokens((2, 8))
    outs = {}
    for position in ("sinusoidal", "rotary"):
        m = xtx.RecurrentMemoryTransformer(**kw, position=position)
        params = m.init(jax.random.key(0), tokens, state=m.init_state(2))
        outs[position] = (params, m.apply(params, tokens, state=m.init_state(2))[0])
    shapes = jax.tree.map(jnp.shape, outs["rotary"][0])
    assert shapes == jax.tree.map(jnp.shape, outs["sinusoidal"][0])
    assert not np.allclose(outs["rotary"][1], outs["sinusoidal"][1])


@pytest.mark.parametrize(
    "cls, kw, field",
    [
        (xtx.TransformerXL, dict(segment_len=8, mem_len=8, position="alibi"), "position"),
        (xtx.TransformerXL, dict(segment_len=8, mem_len=8, ff_activation="swish"), "ff_activation"),
        (xtx.Longformer, dict(window=4, position="relative"), "position"),
        (xtx.RecurrentMemoryTransformer, dict(segment_len=8, position="rope"), "position"),
        (xtx.RecurrentMemoryTransformer, dict(segment_len=8, emb_std=0.0), "emb_std"),
    ],
)
def test_bad_recipe_options_are_named(cls, kw, field):
    with pytest.raises(ValueError, match=field):
        cls(num_tokens=50, dim=32, depth=1, heads=4, **kw).config  # noqa: B018

"""XTransformer masks: the seed README's src_mask / tgt_mask spellings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import XTransformer


@pytest.fixture(scope="module")
def model_and_vars():
    model = XTransformer(
        dim=32,
        enc_num_tokens=64,
        enc_depth=1,
        enc_heads=4,
        enc_max_seq_len=16,
        dec_num_tokens=64,
        dec_depth=1,
        dec_heads=4,
        dec_max_seq_len=16,
    )
    key = jax.random.key(0, impl="rbg")
    src = jax.random.randint(key, (2, 16), 0, 64)
    tgt = jax.random.randint(jax.random.fold_in(key, 1), (2, 16), 0, 64)
    return model, model.init(key, src, tgt), src, tgt


def test_src_mask_is_mask(model_and_vars):
    model, variables, src, tgt = model_and_vars
    mask = jnp.arange(16)[None] < jnp.array([[16], [9]])
    a = model.apply(variables, src, tgt, mask=mask)
    b = model.apply(variables, src, tgt, src_mask=mask)
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="src_mask"):
        model.apply(variables, src, tgt, mask=mask, src_mask=mask)


def test_trailing_tgt_mask_equals_ignored_targets(model_and_vars):
    """Padded targets do not count: same loss as marking them ignore_index by hand."""
    model, variables, src, tgt = model_and_vars
    tgt_mask = jnp.arange(16)[None] < jnp.array([[16], [7]])
    by_mask = model.apply(variables, src, tgt, tgt_mask=tgt_mask)
    by_hand = model.apply(variables, src, jnp.where(tgt_mask, tgt, -100))
    np.testing.assert_allclose(float(by_mask), float(by_hand), atol=1e-6)
    with pytest.raises(ValueError, match="tgt_mask"):
        model.apply(variables, src, tgt, tgt_mask=tgt_mask[:, :5])

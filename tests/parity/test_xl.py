"""Transformer-XL recurrence: parity with x-transformers 2.31.10 over successive segments.

Each case converts a torch model with ``from_x_transformers(verify=False)`` and runs
two or three segments through both, each fed its own returned memories, comparing the
output and every returned memory at atol 1e-4. Segments are shorter than
``max_mem_len`` at first, so memories grow and keys are longer than queries: this pins
the right-aligned causal mask and T5 / ALiBi grids, and rotary positions ``-M..-1`` on
the memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import x_transformers as xt

from tests.parity.harness import _perturb
from xtx import interop

ATOL = 1e-4
V, L, D, HEADS = 64, 16, 32, 4


def _check_segments(model, segments, *, seed=0, masks=None, mem_masks=None):
    """Runs ``segments`` through torch and xtx, carrying each side's own memories."""
    torch.manual_seed(seed)
    model = _perturb(model, seed)
    module, variables = interop.from_x_transformers(model, verify=False)
    # One compile per input shape beats eager dispatch of every op at every new shape.
    step = jax.jit(functools.partial(module.apply, return_mems=True))
    mems_t = mems_j = None
    for i, seg in enumerate(segments):
        kw_t, kw_j = {}, {}
        if masks is not None and masks[i] is not None:
            kw_t["mask"], kw_j["mask"] = torch.from_numpy(masks[i]), jnp.asarray(masks[i])
        if mem_masks is not None and mems_t is not None:
            kw_t["mem_masks"] = [torch.from_numpy(m) for m in mem_masks[i]]
            kw_j["mem_masks"] = tuple(jnp.asarray(m) for m in mem_masks[i])
        with torch.no_grad():
            out_t, mems_t = model(torch.from_numpy(seg), mems=mems_t, return_mems=True, **kw_t)
        mems_t = list(mems_t)  # Continuous returns a tuple it cannot read back
        out_j, mems_j = step(variables, jnp.asarray(seg), mems=mems_j, **kw_j)
        np.testing.assert_allclose(np.asarray(out_j), out_t.numpy(), atol=ATOL, rtol=0)
        assert isinstance(mems_j, tuple) and len(mems_j) == len(mems_t)
        for m_j, m_t in zip(mems_j, mems_t, strict=True):
            assert m_j.shape == tuple(m_t.shape)
            np.testing.assert_allclose(np.asarray(m_j), m_t.numpy(), atol=ATOL, rtol=0)
    return mems_j


def _token_segments(lengths, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, (batch, n)).astype(np.int64) for n in lengths]


@pytest.mark.parametrize(
    "stack, kw",
    [
        (xt.Decoder, {"depth": 2, "rotary_pos_emb": True}),
        (xt.Decoder, {"rel_pos_bias": True}),
        (xt.Decoder, {"alibi_pos_bias": True, "pre_norm": False}),
        (xt.Encoder, {"rotary_pos_emb": True, "attn_num_mem_kv": 2}),
    ],
    ids=["rotary", "t5_causal", "alibi_post_norm", "enc_rotary_mem_kv"],
)
def test_segments(stack, kw):
    # Segments of 4, 3, 3 against max_mem_len=4: 7 keys for 3 queries, truncated to 4.
    model = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        max_mem_len=4,
        attn_layers=stack(**{"dim": D, "depth": 1, "heads": HEADS, **kw}),
    )
    mems = _check_segments(model, _token_segments([4, 3, 3]))
    assert [m.shape for m in mems] == [(2, 4, D)] * kw.get("depth", 1)


def test_shift_mem_down():
    model = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        max_mem_len=4,
        shift_mem_down=1,
        attn_layers=xt.Decoder(dim=D, depth=3, heads=HEADS, rotary_pos_emb=True),
    )
    _check_segments(model, _token_segments([4, 3, 3], seed=1), seed=1)


def test_padding_mask_and_memory_tokens():
    # The mask is padded with True over the memory, the memory tokens sit after it.
    model = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        max_mem_len=7,
        num_memory_tokens=2,
        attn_layers=xt.Decoder(dim=D, depth=1, heads=HEADS, rel_pos_bias=True),
    )
    lengths = [5, 4]
    masks = [np.arange(n)[None, :] < np.array([[n], [n - 2]]) for n in lengths]
    _check_segments(model, _token_segments(lengths, seed=2), seed=2, masks=masks)


def test_mem_masks():
    model = xt.TransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        max_mem_len=4,
        attn_layers=xt.Encoder(dim=D, depth=2, heads=HEADS, rel_pos_bias=True),
    )
    # Per-layer memory masks; segment 2 has no token mask (the memory mask is padded with
    # True over the tokens), segment 3 has both.
    lengths = [4, 4, 4]
    hide_first = np.array([[False, True, True, True], [True, True, False, False]])
    mem_masks = [None, (hide_first, ~hide_first), (hide_first, hide_first)]
    last_padded = np.array([[True] * 4, [True] * 3 + [False]])
    masks = [None, None, last_padded]
    _check_segments(
        model, _token_segments(lengths, seed=3), seed=3, masks=masks, mem_masks=mem_masks
    )


def test_zero_max_mem_len_returns_empty_memories():
    model = xt.TransformerWrapper(
        num_tokens=V, max_seq_len=L, attn_layers=xt.Decoder(dim=D, depth=1, heads=HEADS)
    )
    mems = _check_segments(model, _token_segments([4, 3], seed=4), seed=4)
    assert [m.shape for m in mems] == [(2, 0, D)]


def test_continuous_with_memories():
    # x-transformers keeps only this segment's hiddens here: 3 rows, not 3 + 3.
    model = xt.ContinuousTransformerWrapper(
        dim_in=5,
        dim_out=3,
        max_seq_len=L,
        max_mem_len=6,
        attn_layers=xt.Decoder(dim=D, depth=2, heads=HEADS, rotary_pos_emb=True),
    )
    rng = np.random.default_rng(5)
    segments = [rng.standard_normal((2, n, 5)).astype(np.float32) for n in (3, 3)]
    mems = _check_segments(model, segments, seed=5)
    assert [m.shape for m in mems] == [(2, 3, D)] * 2

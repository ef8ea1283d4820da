"""Seed-only attention options (x-transformers 0.12, removed from 2.31): collaborative
heads (2006.16362) and position-infused attention (Shortformer, 2012.15832).

There is no x-transformers 2.31 model to compare with, so each is checked against a
naive NumPy implementation of the seed's math written here, on the xtx parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import Decoder, TransformerWrapper, interop
from xtx.layers.attention import Attention, AttentionConfig, RotarySettings

B, T, D, N, H = 2, 6, 16, 4, 8


def _softmax_attend(logits, mask, v, w_out):
    """``logits [B, N, T, S]``, bool ``mask`` (True = attend), ``v [B, S, N, H]``."""
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs, v)
    return np.einsum("btnh,nhd->btd", out, w_out)


def _rotate_pairs(x, positions, rot_dim):
    """Interleaved RoPE on the first ``rot_dim`` dims: pairs (2k, 2k+1), base 10000."""
    theta = 10000.0 ** (-np.arange(0, rot_dim, 2) / rot_dim)  # [rot_dim / 2]
    angle = positions[:, None] * theta  # [T, rot_dim / 2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]  # [T, 1, rot_dim / 2]
    a, b = x[..., 0:rot_dim:2], x[..., 1:rot_dim:2]
    out = x.copy()
    out[..., 0:rot_dim:2] = a * cos - b * sin
    out[..., 1:rot_dim:2] = b * cos + a * sin
    return out


def _params(module, *args, **kwargs):
    """Random parameters of the module's shapes (NumPy: no initializer to compile), as
    ``(variables for apply, float64 NumPy copies for the naive reference)``."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: 0.3 * rng.standard_normal(s.shape), nn.meta.unbox(shapes["params"])
    )
    variables = {"params": jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)}
    return variables, jax.tree.map(lambda p: np.asarray(p, np.float32).astype(np.float64), params)


@pytest.mark.parametrize("rot_dim", [None, 4], ids=["plain", "rotary"])
def test_collab_heads_match_naive(rot_dim):
    """``S_h = sum_c q_c m_{h,c} k_c / sqrt(H)`` with shared q/k of width int(c N H)."""
    cfg = AttentionConfig(dim_head=H, collab_heads=True, collab_compression=0.5)
    rotary = None if rot_dim is None else RotarySettings(dim=rot_dim)
    attn = Attention(cfg, D, N, causal=True, rotary=rotary)
    x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
    key_mask = np.arange(T)[None] < np.array([T, 4])[:, None]
    pos = jnp.arange(T) if rotary else None
    variables, p = _params(attn, jnp.asarray(x), key_mask=jnp.asarray(key_mask), rotary_pos=pos)
    assert p["to_q"]["kernel"].shape == (D, int(0.5 * N * H))

    x64 = x.astype(np.float64)
    q = x64 @ p["to_q"]["kernel"]  # [B, T, C]
    k = x64 @ p["to_k"]["kernel"]
    v = np.einsum("btd,dnh->btnh", x64, p["to_v"]["kernel"])
    q = q[:, :, None, :] * p["collab_mixing"]  # [B, T, N, C]: mixed, then rotated
    if rot_dim:
        q = _rotate_pairs(q, np.arange(T), rot_dim)
        k = _rotate_pairs(k[:, :, None, :], np.arange(T), rot_dim)[:, :, 0]
    logits = np.einsum("btnc,bsc->bnts", q, k) * H**-0.5
    mask = np.tril(np.ones((T, T), bool))[None, None] & key_mask[:, None, None, :]
    expected = _softmax_attend(logits, mask, v, p["to_out"]["kernel"])

    got, _ = attn.apply(variables, jnp.asarray(x), key_mask=jnp.asarray(key_mask), rotary_pos=pos)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_collab_cross_attention_matches_naive():
    """Cross-attention: the shared key projection reads the context (its own width)."""
    Dc, S = 12, 5
    cfg = AttentionConfig(dim_head=H, collab_heads=True, collab_compression=0.25)
    attn = Attention(cfg, D, N, is_cross=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    ctx = rng.standard_normal((B, S, Dc)).astype(np.float32)
    variables, p = _params(attn, jnp.asarray(x), jnp.asarray(ctx))

    q = x.astype(np.float64) @ p["to_q"]["kernel"]
    k = ctx.astype(np.float64) @ p["to_k"]["kernel"]
    v = np.einsum("bsd,dnh->bsnh", ctx.astype(np.float64), p["to_v"]["kernel"])
    logits = np.einsum("btc,nc,bsc->bnts", q, p["collab_mixing"], k) * H**-0.5
    expected = _softmax_attend(logits, np.ones((1, 1, T, S), bool), v, p["to_out"]["kernel"])

    got, _ = attn.apply(variables, jnp.asarray(x), jnp.asarray(ctx))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def _sinusoid(positions, dim):
    """The seed's FixedPositionalEmbedding: [sin, cos] halves, 10000^(-2k/dim)."""
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)
    angle = positions[:, None] * inv_freq
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)


def test_position_infused_attention_matches_naive_with_memory():
    """Queries and keys (not values) get the sinusoid; queries are right-aligned after the
    M memory rows, so the T queries sit at positions M..M+T-1."""
    M = 3
    attn = Attention(AttentionConfig(dim_head=H), D, N, causal=True, position_infused=True)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    mem = rng.standard_normal((B, M, D)).astype(np.float32)
    variables, p = _params(attn, jnp.asarray(x), mem=jnp.asarray(mem))

    kv = np.concatenate([mem, x], axis=1).astype(np.float64)  # [B, S, D]
    S = M + T
    q_in = x + _sinusoid(np.arange(M, S), D)
    k_in = kv + _sinusoid(np.arange(S), D)
    q = np.einsum("btd,dnh->btnh", q_in, p["to_q"]["kernel"])
    k = np.einsum("bsd,dnh->bsnh", k_in, p["to_k"]["kernel"])
    v = np.einsum("bsd,dnh->bsnh", kv, p["to_v"]["kernel"])
    logits = np.einsum("btnh,bsnh->bnts", q, k) * H**-0.5
    mask = (np.arange(S)[None, :] <= np.arange(M, S)[:, None])[None, None]
    expected = _softmax_attend(logits, mask, v, p["to_out"]["kernel"])

    got, _ = attn.apply(variables, jnp.asarray(x), mem=jnp.asarray(mem))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_position_infused_attention_replaces_absolute_positions():
    """As the seed: the wrapper drops its absolute embedding, and the stack hands the
    option to its self-attention layers (the same weights without it differ)."""

    def wrapper(**kw):
        stack = Decoder(dim=D, depth=1, heads=N, attn_dim_head=H, **kw)
        return TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=stack)

    model = wrapper(position_infused_attn=True)
    assert not model.config.has_abs_pos_emb
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 20, (B, T)))
    variables, _ = _params(model, tokens)
    assert "pos_emb" not in variables["params"]
    with_pia = np.asarray(model.apply(variables, tokens))
    without = np.asarray(wrapper(disable_abs_pos_emb=True).apply(variables, tokens))
    # Position 0 attends only to itself: no weights to move.
    np.testing.assert_allclose(with_pia[:, 0], without[:, 0], atol=1e-5)
    assert not np.allclose(with_pia[:, 1:], without[:, 1:], atol=1e-3)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Decoder(dim=D, depth=1, position_infused_attn=True),
        lambda: Decoder(dim=D, depth=1, attn_collab_heads=True),
        lambda: Decoder(dim=D, depth=1, cross_attend=True, cross_attn_collab_heads=True),
    ],
    ids=["position_infused", "collab", "cross_collab"],
)
def test_seed_only_options_do_not_convert_to_torch(build):
    config = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=build()).config
    with pytest.raises(ValueError, match="collab_heads|position_infused_attn"):
        interop.torch_model_from_config(config)
    module = TransformerWrapper(config=config)
    with pytest.raises(ValueError, match="collab_heads|position_infused_attn"):
        interop.to_x_transformers(module, {"params": {}})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attn_collab_heads": True, "attn_num_mem_kv": 2}, "excludes attn_num_mem_kv"),
        ({"attn_collab_heads": True, "attn_kv_heads": 2}, "excludes attn_kv_heads"),
        ({"attn_collab_heads": True, "attn_qk_norm": True}, "excludes attn_qk_norm"),
        ({"attn_collab_heads": True, "attn_collab_compression": 0.0}, "must be > 0"),
        ({"attn_collab_heads": True, "attn_collab_compression": 0.001}, "must be >= 1"),
        (
            {"attn_collab_heads": True, "attn_collab_compression": 0.1, "rotary_pos_emb": True},
            "shared query/key width",
        ),
        ({"dim": 15, "position_infused_attn": True}, "even dim"),
    ],
    ids=["mem_kv", "kv_heads", "qk_norm", "zero", "too_small", "rotary_too_wide", "odd_dim"],
)
def test_bad_seed_options_raise(kwargs, message):
    kwargs = {"dim": D, "depth": 1, "heads": N, "attn_dim_head": H, **kwargs}
    with pytest.raises(ValueError, match=message):
        Decoder(**kwargs)

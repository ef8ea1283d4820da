"""The KV cache for every decoder configuration, cached cross-attention, XTransformer.generate.

Oracles: the uncached forward pass over the whole sequence (a prefill then single-token
cached steps must give the same logits, to 1e-5) for a decoder with cross-attention, xPos
and memory tokens, unrolled and scanned; x-transformers 2.31's greedy ``generate`` on the
same converted weights for an encoder-decoder and an xPos decoder, cache on and off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers import AutoregressiveWrapper as TorchAutoregressiveWrapper
from x_transformers import Decoder as TorchDecoder
from x_transformers import TransformerWrapper as TorchTransformerWrapper
from x_transformers import XTransformer as TorchXTransformer

from xtx import AutoregressiveWrapper
from xtx.interop import from_x_transformers

B, V, D, S, MAX_LEN = 2, 20, 32, 3, 16
PROMPT, TOTAL, NEW = 5, 9, 6

MEMORY_TOKENS = 2


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def decoded(request):
    """A decoder with every configuration that once could not cache (cross-attention,
    xPos, memory tokens; scanned layers in the second run), its full pass and the same
    tokens decoded through the cache (prefill, then one token a step)."""
    torch.manual_seed(2)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        num_memory_tokens=MEMORY_TOKENS,
        attn_layers=TorchDecoder(
            dim=D, depth=2, heads=2, attn_kv_heads=1, cross_attend=True, rotary_xpos=True
        ),
    )
    # Converted weights: no init program to compile.
    module, variables = from_x_transformers(torch_model, verify=False, scan_layers=request.param)
    rng = np.random.default_rng(1)  # numpy: jax.random compiles a sampler per shape
    tokens = jnp.asarray(rng.integers(0, V, (B, TOTAL)), jnp.int32)
    ctx = {
        # Row 1 is left-padded: its first two keys are hidden and its positions start at 2.
        "seq_start_pos": jnp.array([0, 2]),
        "context": jnp.asarray(rng.standard_normal((B, S, D)), jnp.float32),
        "context_mask": jnp.array([[True, True, False], [True, True, True]]),
    }
    full = jax.jit(module.apply)
    step = jax.jit(lambda v, t, c, ctx: module.apply(v, t, cache=c, **ctx))
    fresh = module.init_cache(B, 12)
    logits, prefilled = step(variables, tokens[:, :PROMPT], fresh, ctx)
    pieces, cache = [logits], prefilled
    for t in range(PROMPT, TOTAL):
        logits, cache = step(variables, tokens[:, t : t + 1], cache, ctx)
        pieces.append(logits)
    return {
        "module": module,
        "variables": variables,
        "tokens": tokens,
        "ctx": ctx,
        "full": full,
        "step": step,
        "fresh": fresh,
        "prefilled": prefilled,
        "cache": cache,
        "cached_logits": jnp.concatenate(pieces, axis=1),
    }


def test_prefill_then_steps_equal_one_forward(decoded):
    d = decoded
    expected = d["full"](d["variables"], d["tokens"], **d["ctx"])  # [B, TOTAL, V]
    np.testing.assert_allclose(d["cached_logits"][0], expected[0], atol=1e-5, rtol=0)
    # The left padding's own queries (no real token to attend to) are not compared.
    np.testing.assert_allclose(d["cached_logits"][1, 2:], expected[1, 2:], atol=1e-5, rtol=0)
    assert d["fresh"].length is None
    assert int(d["cache"].length) == MEMORY_TOKENS + TOTAL  # memory tokens take slots too


def test_cross_keys_values_are_cached_at_the_prefill(decoded):
    d = decoded
    stack = d["module"].config.attn_layers
    K, H = stack.attn.num_kv_heads(stack.heads), stack.attn.dim_head
    shape = (stack.depth, B, K, S, H) if stack.scan_layers else (B, K, S, H)  # heads-major
    assert d["fresh"].cross and all(c is None for c in d["fresh"].cross)
    for entry in d["prefilled"].cross:
        assert entry.keys.shape == entry.values.shape == shape
    # A step given another context reads the cached keys/values: same logits, while the
    # uncached model does depend on the context.
    other = dict(d["ctx"], context=d["ctx"]["context"] * 3.0 + 1.0)
    nxt = d["tokens"][:, PROMPT : PROMPT + 1]
    same, _ = d["step"](d["variables"], nxt, d["prefilled"], d["ctx"])
    got, _ = d["step"](d["variables"], nxt, d["prefilled"], other)
    np.testing.assert_array_equal(got, same)
    np.testing.assert_allclose(same, d["cached_logits"][:, PROMPT : PROMPT + 1], atol=1e-5)
    moved = d["full"](d["variables"], d["tokens"], **other)
    assert np.abs(np.asarray(moved) - np.asarray(d["cached_logits"])).max() > 1e-3
    short = dict(
        d["ctx"], context=d["ctx"]["context"][:, :2], context_mask=d["ctx"]["context_mask"][:, :2]
    )
    with pytest.raises(ValueError, match="cached context (keys|values) must have the shape"):
        jax.jit(d["step"])(d["variables"], nxt, d["prefilled"], short)


def test_cache_checks_its_structure(decoded):
    d = decoded
    fresh = d["fresh"]
    bad = fresh._replace(layers=fresh.layers[:-1])
    with pytest.raises(ValueError, match="cache.layers must hold one LayerKVCache"):
        d["step"](d["variables"], d["tokens"][:, :2], bad, d["ctx"])


@pytest.fixture(scope="module")
def xtransformer():
    """A converted encoder-decoder (tied embeddings, padded source) and its greedy tokens."""
    torch.manual_seed(0)
    torch_model = TorchXTransformer(
        dim=D,
        tie_token_emb=True,
        enc_num_tokens=V,
        enc_depth=1,
        enc_heads=2,
        enc_max_seq_len=MAX_LEN,
        dec_num_tokens=V,
        dec_depth=1,
        dec_heads=2,
        dec_max_seq_len=MAX_LEN,
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    src = torch.randint(0, V, (B, 7))
    src_mask = torch.ones(B, 7, dtype=torch.bool)
    src_mask[1, 5:] = False
    start = torch.randint(0, V, (B, 1))
    expected = torch_model.generate(src, start, NEW, mask=src_mask, temperature=0.0)
    as_jax = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    return module, variables, as_jax(src), as_jax(src_mask), as_jax(start), expected.numpy()


@pytest.mark.parametrize("cache_kv", [True, False])
def test_xtransformer_generate_matches_x_transformers(xtransformer, cache_kv):
    module, variables, src, src_mask, start, expected = xtransformer
    got = module.generate(
        variables, src, start, NEW, src_mask=src_mask, temperature=0.0, cache_kv=cache_kv
    )
    np.testing.assert_array_equal(got, expected)


def test_xtransformer_generate_rejects_context(xtransformer):
    module, variables, src, _, start, _ = xtransformer
    with pytest.raises(TypeError, match="sets context itself"):
        module.generate(variables, src, start, NEW, temperature=0.0, context=src)


@pytest.fixture(scope="module")
def xpos_decoder():
    torch.manual_seed(1)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=1, heads=2, rotary_xpos=True),
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    assert module.config.attn_layers.rotary_xpos
    prompt = torch.randint(0, V, (B, 4))
    expected = TorchAutoregressiveWrapper(torch_model).generate(prompt, NEW, temperature=0.0)
    return module, variables, jnp.asarray(prompt.numpy()), expected.numpy()


@pytest.mark.parametrize("cache_kv", [True, False])
def test_xpos_generate_matches_x_transformers(xpos_decoder, cache_kv):
    module, variables, prompt, expected = xpos_decoder
    wrapper = AutoregressiveWrapper(module)
    got = wrapper.generate(variables, prompt, NEW, temperature=0.0, cache_kv=cache_kv)
    np.testing.assert_array_equal(got, expected)

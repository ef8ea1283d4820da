"""KV-cache decoding and ``AutoregressiveWrapper``: against x-transformers and uncached passes.

Oracles: an uncached forward pass over the whole sequence (a prefill then single-token
cached steps must give the same logits), x-transformers 2.31's ``AutoregressiveWrapper``
on the same converted weights (greedy tokens, loss). The sampling filters are tested in
``tests/ops/test_sampling.py``, beam search and contrastive decoding in
``tests/models/test_beam_contrastive.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers import AutoregressiveWrapper as TorchAutoregressiveWrapper
from x_transformers import Decoder as TorchDecoder
from x_transformers import TransformerWrapper as TorchTransformerWrapper

from xtx import AutoregressiveWrapper, Decoder, TransformerWrapper
from xtx.interop import from_x_transformers
from xtx.models.autoregressive import forgetful_causal_mask, top_k

B, V, D, DEPTH, HEADS, MAX_LEN = 2, 20, 32, 2, 4, 16
PROMPT, NEW = 4, 8


def _tokens(seed, shape):
    """Random token ids from numpy: ``jax.random.randint`` would compile a sampler for
    every shape, about a second each on CPU."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


CONFIGS = {
    "absolute": {},
    "rotary": {"rotary_pos_emb": True},
    "alibi": {"alibi_pos_bias": True},
    "t5": {"rel_pos_bias": True},
    "gqa_mem_kv": {"attn_kv_heads": 2, "attn_num_mem_kv": 2},
    "dynamic_bias": {"dynamic_pos_bias": True},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request):
    torch.manual_seed(0)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=DEPTH, heads=HEADS, **CONFIGS[request.param]),
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    prompt = torch.randint(0, V, (B, PROMPT))
    return torch_model, module, variables, prompt


def test_prefill_then_steps_equal_one_forward(converted):
    _, module, variables, _ = converted
    tokens = _tokens(1, (B, 9))
    full = jax.jit(module.apply)(variables, tokens)  # [B, 9, V]
    step = jax.jit(lambda v, t, c: module.apply(v, t, cache=c))
    logits, cache = step(variables, tokens[:, :5], module.init_cache(B, 12))
    pieces = [logits]
    for t in range(5, 9):
        logits, cache = step(variables, tokens[:, t : t + 1], cache)
        pieces.append(logits)
    assert int(cache.length) == 9
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_greedy_generate_matches_x_transformers(converted):
    torch_model, module, variables, prompt = converted
    expected = TorchAutoregressiveWrapper(torch_model).generate(prompt, NEW, temperature=0.0)
    wrapper = AutoregressiveWrapper(module)
    prompts = jnp.asarray(prompt.numpy())
    cached = wrapper.generate(variables, prompts, NEW, temperature=0.0)
    uncached = wrapper.generate(variables, prompts, NEW, temperature=0.0, cache_kv=False)
    np.testing.assert_array_equal(cached, expected.numpy())
    np.testing.assert_array_equal(uncached, expected.numpy())


@pytest.fixture(scope="module")
def rotary_model():
    torch.manual_seed(1)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=DEPTH, heads=HEADS, rotary_pos_emb=True),
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    return torch_model, module, variables


def test_loss_matches_x_transformers(rotary_model):
    torch_model, module, variables = rotary_model
    x = torch.randint(0, V, (B, 10))
    x[0, 7:] = -100  # ignored targets (and fed as pad_value)
    lens = torch.tensor([10, 6])
    expected = TorchAutoregressiveWrapper(torch_model)(x).item()
    expected_lens = TorchAutoregressiveWrapper(torch_model)(x, lens=lens).item()
    wrapper = AutoregressiveWrapper(module)
    loss = wrapper.apply(variables, jnp.asarray(x.numpy()))
    loss_lens = wrapper.apply(variables, jnp.asarray(x.numpy()), lens=jnp.asarray(lens.numpy()))
    np.testing.assert_allclose(loss, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(loss_lens, expected_lens, atol=1e-4, rtol=0)


def test_forgetful_causal_mask(rotary_model):
    _, module, variables = rotary_model
    mask = np.asarray(forgetful_causal_mask(jax.random.key(3), 4, 10, 0.35))
    assert mask[:, 0].all()  # the first key is never hidden
    np.testing.assert_array_equal((~mask).sum(1), [3, 3, 3, 3])  # int(10 * 0.35)
    x = _tokens(4, (B, 10))
    plain = AutoregressiveWrapper(module).apply(variables, x)
    masked = AutoregressiveWrapper(module, mask_prob=0.35)
    loss = masked.apply(variables, x, rngs={"mask": jax.random.key(5)})
    assert np.isfinite(loss) and abs(float(loss) - float(plain)) > 1e-4
    with pytest.raises(ValueError, match="rngs=\\{'mask'"):
        masked.apply(variables, x)


def test_sampling_cached_equals_uncached_and_reuses_program(rotary_model):
    _, module, variables = rotary_model
    wrapper = AutoregressiveWrapper(module)
    prompts = _tokens(6, (B, PROMPT))
    kwargs = dict(key=jax.random.key(7), filter_kwargs={"k": 5})
    cached = wrapper.generate(variables, prompts, NEW, **kwargs)
    uncached = wrapper.generate(variables, prompts, NEW, cache_kv=False, **kwargs)
    np.testing.assert_array_equal(cached, uncached)
    other = wrapper.generate(variables, prompts + 1, NEW, **kwargs)  # same shapes
    assert other.shape == (B, NEW)
    decode = next(f for s, f in wrapper._compiled.items() if s[-1])  # the cached program
    assert len(wrapper._compiled) == 2 and decode._cache_size() == 1
    # Sampling from a callable top-1 filter is greedy decoding.
    top_1 = wrapper.generate(
        variables, prompts, NEW, key=jax.random.key(9), filter_logits_fn=lambda x: top_k(x, k=1)
    )
    greedy = wrapper.generate(variables, prompts, NEW, temperature=0.0)
    np.testing.assert_array_equal(top_1, greedy)


def test_eos_stops_rows_and_pads(rotary_model):
    _, module, variables = rotary_model
    wrapper = AutoregressiveWrapper(module, pad_value=V - 1)
    prompts = _tokens(8, (B, PROMPT))
    greedy = np.asarray(wrapper.generate(variables, prompts, NEW, temperature=0.0))
    eos = int(greedy[0, 2])
    out = np.asarray(wrapper.generate(variables, prompts, NEW, temperature=0.0, eos_token=eos))
    for row, full in zip(out, greedy, strict=True):
        hits = np.flatnonzero(full == eos)
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(row[:stop], full[:stop])
        assert (row[stop:] == V - 1).all()


def test_bad_input(rotary_model):
    _, module, variables = rotary_model
    wrapper = AutoregressiveWrapper(module)
    prompts = jnp.zeros((B, PROMPT), jnp.int32)
    greedy = dict(temperature=0.0)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        wrapper.generate(variables, prompts, 0, **greedy)
    with pytest.raises(ValueError, match="temperature must be"):
        wrapper.generate(variables, prompts, NEW, temperature=-1.0)
    with pytest.raises(ValueError, match=f"eos_token must be a token id in \\[0, {V}\\)"):
        wrapper.generate(variables, prompts, NEW, eos_token=V, **greedy)
    with pytest.raises(ValueError, match="filter_kwargs thres"):
        wrapper.generate(variables, prompts, NEW, key=jax.random.key(0),
                         filter_logits_fn="top_p", filter_kwargs={"thres": 1.5})  # fmt: skip
    with pytest.raises(ValueError, match="filter_logits_fn must be one of"):
        wrapper.generate(variables, prompts, NEW, filter_logits_fn="top_z", **greedy)
    with pytest.raises(ValueError, match="pass key="):
        wrapper.generate(variables, prompts, NEW)
    with pytest.raises(ValueError, match="mask_prob must be in"):
        AutoregressiveWrapper(module, mask_prob=1.0)
    absolute = TransformerWrapper(
        num_tokens=V, max_seq_len=8, attn_layers=Decoder(dim=D, depth=1, heads=2)
    )
    with pytest.raises(ValueError, match="max_seq_len=8 of the absolute"):
        AutoregressiveWrapper(absolute).generate({}, jnp.zeros((1, 6), jnp.int32), 4, **greedy)
    with pytest.raises(ValueError, match="max_len must be <= max_seq_len"):
        absolute.init_cache(1, 9)


@pytest.mark.parametrize("name", ["absolute", "rotary"])
def test_variable_length_prompts_match_x_transformers(name):
    torch.manual_seed(2)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=1, heads=HEADS, **CONFIGS[name]),
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    rows = [torch.randint(0, V, (n,)) for n in (5, 2, 4)]
    expected = TorchAutoregressiveWrapper(torch_model).generate(rows, NEW, temperature=0.0)
    wrapper = AutoregressiveWrapper(module)
    got = wrapper.generate(variables, [r.numpy() for r in rows], NEW, temperature=0.0)
    np.testing.assert_array_equal(got, expected.numpy())
    padded = jnp.asarray(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).numpy())
    lens = jnp.asarray([5, 2, 4])
    uncached = wrapper.generate(
        variables, padded, NEW, prompt_lens=lens, temperature=0.0, cache_kv=False
    )
    np.testing.assert_array_equal(uncached, expected.numpy())
    with pytest.raises(ValueError, match="prompt_lens must be int \\[B\\]"):
        wrapper.generate(variables, padded, NEW, prompt_lens=lens[:2], temperature=0.0)


def test_cross_attending_decoder_matches_x_transformers():
    """Context is passed on at every step (recomputed: its keys/values are not cached)."""
    torch.manual_seed(3)
    torch_model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=1, heads=HEADS, cross_attend=True),
    ).eval()
    module, variables = from_x_transformers(torch_model, verify=False)
    prompt = torch.randint(0, V, (B, PROMPT))
    context = torch.randn(B, 3, D)
    wrapper = AutoregressiveWrapper(module)
    expected = TorchAutoregressiveWrapper(torch_model).generate(
        prompt, NEW, temperature=0.0, context=context
    )
    got = wrapper.generate(
        variables,
        jnp.asarray(prompt.numpy()),
        NEW,
        temperature=0.0,
        context=jnp.asarray(context.numpy()),
    )
    np.testing.assert_array_equal(got, expected.numpy())

"""``AutoregressiveWrapper.beam_search`` and contrastive decoding (2210.15097).

Oracles: x-transformers 2.31's ``beam_search`` and ``generate(amateur_model=...)`` on the
same converted weights (beams, scores to 1e-4, tokens), and one torch forward pass over
each returned beam: its score must be the sum of the log-softmax of its tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers import AutoregressiveWrapper as TorchAutoregressiveWrapper
from x_transformers import Decoder as TorchDecoder
from x_transformers import TransformerWrapper as TorchTransformerWrapper

from xtx import AutoregressiveWrapper
from xtx.interop import from_x_transformers

B, V, D, MAX_LEN, PROMPT, NEW, BEAMS = 2, 20, 32, 16, 4, 6, 3


def _torch_decoder(depth, heads, seed, **kwargs):
    torch.manual_seed(seed)
    model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=MAX_LEN,
        attn_layers=TorchDecoder(dim=D, depth=depth, heads=heads, **kwargs),
    ).eval()
    with torch.no_grad():  # sharper logits: greedy and beam choices then vary by step
        model.to_logits.weight.mul_(4.0)
    return model


@pytest.fixture(scope="module")
def models():
    """Torch expert and amateur, a prompt, and the converted expert in one wrapper (its
    compiled programs are shared by the tests)."""
    expert = _torch_decoder(1, 4, 0, rotary_pos_emb=True)
    amateur = _torch_decoder(1, 2, 1)
    prompt = torch.randint(0, V, (B, PROMPT))
    module, variables = from_x_transformers(expert, verify=False)
    wrapper = AutoregressiveWrapper(module, pad_value=V - 1)
    return expert, amateur, prompt, wrapper, variables


def _torch_log_probs(model, prompt, tokens, **kwargs):
    """``[K, B, n]`` beams -> ``[K, B, n]`` log-probability of each token, one forward
    over the ``K * B`` rows (beam-major, as ``prompt.repeat``)."""
    K = tokens.shape[0]
    seq = torch.cat([prompt.repeat(K, 1), torch.from_numpy(np.array(tokens).reshape(K * B, -1))], 1)
    with torch.no_grad():
        log_probs = model(seq, **kwargs).log_softmax(-1)[:, PROMPT - 1 : -1]
    picked = log_probs.gather(-1, seq[:, PROMPT:, None].long())[..., 0]
    return picked.numpy().reshape(tokens.shape)


def test_beam_search_matches_x_transformers(models):
    expert, _, prompt, wrapper, variables = models
    expected, expected_scores = TorchAutoregressiveWrapper(expert).beam_search(
        prompt, NEW, beams=BEAMS, return_beams_and_scores=True, temperature=0.0
    )
    prompts = jnp.asarray(prompt.numpy())
    out, scores = wrapper.beam_search(
        variables, prompts, NEW, beams=BEAMS, return_beams_and_scores=True
    )
    np.testing.assert_array_equal(out, expected.numpy())
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-4, rtol=0)
    assert len({tuple(r) for r in np.asarray(out).reshape(-1, NEW)}) == BEAMS * B
    best = wrapper.beam_search(variables, prompts, NEW, beams=BEAMS)
    np.testing.assert_array_equal(best, expected.numpy()[0])


def test_stochastic_beam_search_with_eos_scores(models):
    """Gumbel-perturbed candidates, decoded without a KV cache (the token buffer is what
    is reordered): each beam's score is its tokens' log-probability (up to and including
    EOS; then pad_value), beams are sorted and the key decides."""
    expert, _, prompt, wrapper, variables = models
    prompts = jnp.asarray(prompt.numpy())
    greedy = TorchAutoregressiveWrapper(expert).generate(prompt, NEW, temperature=0.0)
    eos = int(greedy[0, 2])
    search = dict(
        beams=BEAMS, return_beams_and_scores=True, temperature=1.5, eos_token=eos, cache_kv=False
    )
    # RBG keys: their sampling kernels compile about 3x faster than threefry's on CPU.
    keys = [jax.random.key(seed, impl="rbg") for seed in range(2)]
    out, scores = wrapper.beam_search(variables, prompts, NEW, key=keys[0], **search)
    out, scores = np.asarray(out), np.asarray(scores)
    log_probs = _torch_log_probs(expert, prompt, out)
    is_eos = out == eos
    counted = np.cumsum(is_eos, -1) - is_eos == 0  # tokens up to the first EOS
    np.testing.assert_allclose(scores, np.where(counted, log_probs, 0).sum(-1), atol=1e-4)
    assert np.all(np.where(counted, True, out == V - 1))
    assert is_eos.any() and np.all(np.diff(scores, axis=0) <= 0)
    again, _ = wrapper.beam_search(variables, prompts, NEW, key=keys[0], **search)
    other, _ = wrapper.beam_search(variables, prompts, NEW, key=keys[1], **search)
    np.testing.assert_array_equal(again, out)
    assert not np.array_equal(other, out)


def test_beam_search_with_context(models):
    """x-transformers' beam search does not repeat the context per beam; here it is
    repeated and the cached cross-attention keys/values are reordered with the beams."""
    model = _torch_decoder(1, 4, 4, cross_attend=True, attn_kv_heads=2)
    module, variables = from_x_transformers(model, verify=False)
    _, _, prompt, *_ = models
    context = torch.randn(B, 3, D)
    out, scores = AutoregressiveWrapper(module).beam_search(
        variables,
        jnp.asarray(prompt.numpy()),
        NEW,
        beams=BEAMS,
        return_beams_and_scores=True,
        context=jnp.asarray(context.numpy()),
    )
    out = np.asarray(out)
    log_probs = _torch_log_probs(model, prompt, out, context=context.repeat(BEAMS, 1, 1))
    np.testing.assert_allclose(scores, log_probs.sum(-1), atol=1e-4, rtol=0)
    assert np.all(np.diff(scores, axis=0) <= 0)
    assert len({tuple(r) for r in out.reshape(-1, NEW)}) == BEAMS * B


def test_contrastive_greedy_matches_x_transformers(models):
    expert, amateur, prompt, wrapper, variables = models
    kwargs = {"alpha": 0.2, "beta": 1.0}
    expected = TorchAutoregressiveWrapper(expert).generate(
        prompt, NEW, temperature=0.0, amateur_model=amateur, contrastive_decode_kwargs=kwargs
    )
    amateur_module, amateur_variables = from_x_transformers(amateur, verify=False)
    prompts = jnp.asarray(prompt.numpy())
    got = wrapper.generate(
        variables,
        prompts,
        NEW,
        temperature=0.0,
        amateur=(amateur_module, amateur_variables),
        contrastive_decode_kwargs=kwargs,
    )
    np.testing.assert_array_equal(got, expected.numpy())
    plain = TorchAutoregressiveWrapper(expert).generate(prompt, NEW, temperature=0.0)
    assert not np.array_equal(plain.numpy(), got)  # the amateur changed the choice


def test_bad_input(models):
    _, amateur, _, wrapper, variables = models
    prompts = jnp.zeros((B, PROMPT), jnp.int32)
    with pytest.raises(ValueError, match=f"beams must be an int in \\[1, {V}\\]"):
        wrapper.beam_search(variables, prompts, NEW, beams=V + 1)
    with pytest.raises(ValueError, match="temperature=1.0 samples: pass key="):
        wrapper.beam_search(variables, prompts, NEW, temperature=1.0)
    with pytest.raises(ValueError, match="contrastive_decode_kwargs needs amateur"):
        wrapper.generate(variables, prompts, NEW, contrastive_decode_kwargs={"alpha": 0.1})
    with pytest.raises(TypeError, match="amateur must be a pair"):
        wrapper.generate(variables, prompts, NEW, temperature=0.0, amateur=wrapper.net)
    small = TorchTransformerWrapper(
        num_tokens=V + 1, max_seq_len=MAX_LEN, attn_layers=TorchDecoder(dim=D, depth=1, heads=2)
    )
    pair = from_x_transformers(small, verify=False)
    with pytest.raises(ValueError, match=f"the expert's {V} tokens, got {V + 1}"):
        wrapper.generate(variables, prompts, NEW, temperature=0.0, amateur=pair)
    amateur_pair = from_x_transformers(amateur, verify=False)
    with pytest.raises(TypeError, match="gamma"):
        wrapper.generate(
            variables,
            prompts,
            NEW,
            temperature=0.0,
            amateur=amateur_pair,
            contrastive_decode_kwargs={"gamma": 1.0},
        )

"""``XLAutoregressiveWrapper``: the segment-recurrent loss, truncated backprop, generation.

Oracles: x-transformers 2.31's ``XLAutoregressiveWrapper`` on the same converted weights
(loss over three segments, the last ragged; greedy tokens up to the first segment
boundary that decoding itself crosses, where x-transformers rebuilds the segment on
memories that already hold its own tokens), the torch network fed segment after segment
with its own memories (returned memories; greedy tokens across boundaries, each step
recomputed from scratch), and perturbation of the initial memories for the gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from x_transformers import Decoder as TorchDecoder
from x_transformers import TransformerWrapper as TorchTransformerWrapper
from x_transformers.xl_autoregressive_wrapper import (
    XLAutoregressiveWrapper as TorchXLAutoregressiveWrapper,
)

from xtx import Decoder, Encoder, TransformerWrapper
from xtx.interop import from_x_transformers
from xtx.models.xl_autoregressive import XLAutoregressiveWrapper

# L: segment length (max_seq_len). Memories span two segments, so the first ones are
# partly empty (masked rows) and memories reach gradients back over two hops directly.
B, V, D, L, MEM = 2, 20, 32, 4, 8


@pytest.fixture(scope="module")
def xl():
    torch.manual_seed(0)
    model = TorchTransformerWrapper(
        num_tokens=V,
        max_seq_len=L,
        max_mem_len=MEM,
        attn_layers=TorchDecoder(dim=D, depth=2, heads=4, rotary_pos_emb=True),
    ).eval()
    with torch.no_grad():  # sharper logits: greedy choices then vary by step
        model.to_logits.weight.mul_(4.0)
    module, variables = from_x_transformers(model, verify=False)
    wrapper = XLAutoregressiveWrapper(module)

    @jax.jit
    def loss_mems_grad(x, mems0, bptt):
        """Loss and memories after x, and how much gradient reaches the initial memories
        (one compiled program serves every test: bptt is traced)."""

        def loss(m):
            return wrapper.apply(variables, x, mems=m, return_mems=True, bptt_segments=bptt)

        (value, mems), grads = jax.value_and_grad(loss, has_aux=True)(mems0)
        return value, mems, sum(jnp.abs(g).sum() for g in grads)

    return model, wrapper, variables, loss_mems_grad


def _torch_segments(model, x, mems=None):
    """Memories after feeding ``x`` segment by segment to the torch network."""
    with torch.no_grad():
        for s in range(0, x.shape[1], L):
            _, mems = model(x[:, s : s + L], mems=mems, return_mems=True)
    return mems


X_LEN = 3 * L  # 3L - 1 targets: segments of 4, 4 and a ragged 3


def _initial_mems():
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.normal(size=(B, MEM, D)).astype(np.float32)) for _ in range(2)]


def test_loss_matches_x_transformers(xl):
    model, _, _, loss_mems_grad = xl
    x = torch.randint(0, V, (B, X_LEN))
    x[0, -1] = -100  # an ignored target (x-transformers cannot feed -100 as input)
    mems0 = _initial_mems()
    with torch.no_grad():
        expected = TorchXLAutoregressiveWrapper(model)(x, mems=mems0).item()
    loss, mems, _ = loss_mems_grad(
        jnp.asarray(x.numpy()), tuple(jnp.asarray(m.numpy()) for m in mems0), jnp.int32(0)
    )
    np.testing.assert_allclose(loss, expected, atol=1e-4, rtol=0)
    expected_mems = _torch_segments(model, x[:, :-1], mems0)
    assert len(mems) == len(expected_mems) == 2
    for m, e in zip(mems, expected_mems, strict=True):
        np.testing.assert_allclose(m, e.numpy(), atol=1e-4, rtol=0)


def test_bptt_segments_stop_gradients(xl):
    """Only the targets of one segment count; the gradient of the loss with respect to the
    initial memories must pass through the memories carried to that segment unless they
    were detached: those leaving segment i when (i + 1) % N == 0."""
    *_, loss_mems_grad = xl
    mems0 = tuple(jnp.asarray(m.numpy()) for m in _initial_mems())
    x = np.random.default_rng(5).integers(0, V, (B, X_LEN)).astype(np.int32)

    def reaches(x, bptt):  # bptt 0: None, every memory kept
        return float(loss_mems_grad(jnp.asarray(x), mems0, jnp.int32(bptt))[2]) > 1e-6

    for segment, expected in ((1, {0: True, 1: False, 2: True}), (2, {0: True, 2: False, 3: True})):
        scored = np.full_like(x, -100)  # ignored targets everywhere but one segment
        scored[:, 0] = x[:, 0]
        span = slice(1 + segment * L, 1 + (segment + 1) * L)
        scored[:, span] = x[:, span]
        assert {n: reaches(scored, n) for n in expected} == expected, segment
    assert reaches(x, 1)  # segment 0 reads the initial memories


def _oracle_greedy(model, prompt, steps):
    """Greedy decoding, each token from a fresh pass: the whole segments before the one
    holding the last token build memories, that segment reads them."""
    out = prompt
    with torch.no_grad():
        for _ in range(steps):
            whole = (out.shape[1] - 1) // L
            mems = _torch_segments(model, out[:, : whole * L]) if whole else None
            logits = model(out[:, whole * L :], mems=mems)
            out = torch.cat([out, logits[:, -1:].argmax(-1)], 1)
    return out[:, prompt.shape[1] :].numpy()


def test_greedy_generate_across_segments(xl):
    """A prompt of two segments and one token; decoding crosses two more boundaries."""
    model, wrapper, variables, _ = xl
    prompt = torch.randint(0, V, (B, 2 * L + 1))
    new = 2 * L + 3
    got = np.asarray(wrapper.generate(variables, jnp.asarray(prompt.numpy()), new, temperature=0.0))
    np.testing.assert_array_equal(got, _oracle_greedy(model, prompt, new))
    assert len(np.unique(got)) > 3
    with torch.no_grad():  # x-transformers agrees until decoding reaches a boundary
        expected = TorchXLAutoregressiveWrapper(model).generate(prompt, L - 1, temperature=0.0)
    np.testing.assert_array_equal(got[:, : L - 1], expected.numpy())


def test_bad_input(xl):
    _, wrapper, variables, _ = xl
    x = jnp.zeros((B, 6), jnp.int32)
    with pytest.raises(ValueError, match="bptt_segments must be an int >= 1 or None, got 0"):
        wrapper.apply(variables, x, bptt_segments=0)
    too_long = tuple(jnp.zeros((B, MEM + 1, D)) for _ in range(2))
    with pytest.raises(ValueError, match="one M <= max_mem_len = 8"):
        wrapper.apply(variables, x, mems=too_long)
    with pytest.raises(ValueError, match="x needs at least 2 tokens"):
        wrapper.apply(variables, x[:, :1])
    with pytest.raises(ValueError, match="pass key="):
        wrapper.generate(variables, x, 3)
    with pytest.raises(ValueError, match="max_mem_len >= 1, got 0"):
        XLAutoregressiveWrapper(
            TransformerWrapper(num_tokens=V, max_seq_len=L, attn_layers=Decoder(dim=D, depth=1))
        )
    with pytest.raises(ValueError, match="needs a causal net"):
        XLAutoregressiveWrapper(
            TransformerWrapper(
                num_tokens=V, max_seq_len=L, max_mem_len=2, attn_layers=Encoder(dim=D, depth=1)
            )
        )

"""The dropout contract: ``emb_dropout``, ``attn_dropout``, ``ff_dropout``, ``layer_dropout``.

With ``deterministic=False`` and ``rngs={"dropout": key}`` the same key gives the same
output and different keys different outputs; ``deterministic=True`` (the default) is
bit-identical to the model without dropout on the same variables; a missing key is a
ValueError naming the rates. The embedding dropout rate and scaling are checked on a
large tensor, stochastic depth (1603.09382) by matching each sample against the two
outcomes computed independently (every sublayer skipped: the final norm of the input
embedding; none skipped: the deterministic output), and gradients flow through it all.

Everything is jitted with RBG keys and compared on final-normed embeddings
(``return_embeddings=True``): on CPU one compile per shape beats eager dispatch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import ContinuousTransformerWrapper, Decoder, TransformerWrapper

B, T, V, D, HEADS = 2, 8, 64, 32, 4
P = 0.3


def _key(seed):
    return jax.random.key(seed, impl="rbg")


def _model(emb_dropout=0.0, **stack):
    return TransformerWrapper(
        num_tokens=V,
        max_seq_len=16,
        emb_dropout=emb_dropout,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, **stack),
    )


def _sample(model, variables, x, seeds):
    """Embeddings ``[K, B, T, D]``, one sample per dropout key seed (one compile)."""
    run = jax.jit(
        lambda k: model.apply(
            variables, x, return_embeddings=True, deterministic=False, rngs={"dropout": k}
        )
    )
    # A loop, not vmap: batched RBG keys need not draw what each key draws alone.
    return np.stack([np.asarray(run(_key(s))) for s in seeds])


def _embeddings(model, variables, x):
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, return_embeddings=True))(variables, x))


@pytest.fixture(scope="module")
def base():
    """A model without dropout, its variables (shared by every variant) and its output."""
    model = _model()
    x = jax.random.randint(_key(1), (B, T), 0, V)
    variables = jax.jit(model.init)(_key(0), x)
    return variables, x, _embeddings(model, variables, x)


KINDS = {
    "emb_dropout": {"emb_dropout": P},
    "attn_dropout": {"attn_dropout": P},
    "ff_dropout": {"ff_dropout": P},
    "layer_dropout": {"layer_dropout": P},
}


@pytest.mark.parametrize("kind", KINDS)
def test_keys_drive_the_sample(base, kind):
    variables, x, reference = base
    out = _sample(_model(**KINDS[kind]), variables, x, [2, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(out[0], out[1])
    differs = [np.abs(out[i] - out[j]).max() > 1e-3 for i in range(1, 6) for j in range(i + 1, 6)]
    differs_from_eval = [np.abs(o - reference).max() > 1e-3 for o in out]
    if kind == "layer_dropout":
        # Two sublayers: only four outcomes, so some keys may share one.
        assert any(differs) and any(differs_from_eval)
    else:
        assert all(differs) and all(differs_from_eval)


def test_deterministic_is_the_model_without_dropout(base):
    variables, x, reference = base
    model = _model(**{k: v for kind in KINDS.values() for k, v in kind.items()})
    np.testing.assert_array_equal(_embeddings(model, variables, x), reference)


@pytest.mark.parametrize(
    "model",
    [
        _model(attn_dropout=P),
        ContinuousTransformerWrapper(
            dim_in=4, emb_dropout=P, attn_layers=Decoder(dim=D, depth=1, heads=HEADS)
        ),
    ],
    ids=["tokens", "continuous"],
)
def test_missing_dropout_key_is_named(model):
    shape = (B, T) if isinstance(model, TransformerWrapper) else (B, T, 4)
    x = jnp.zeros(shape, jnp.int32 if len(shape) == 2 else jnp.float32)

    def run(x):
        return model.apply(model.init(_key(0), x), x, deterministic=False)

    with pytest.raises(ValueError, match=r"dropout=0\.3\): pass rngs=\{'dropout': key\}"):
        jax.eval_shape(run, x)


def test_embedding_dropout_rate_and_scale(base):
    variables, _, _ = base
    model = _model(emb_dropout=0.25)
    x = jax.random.randint(_key(7), (64, 16), 0, V)  # 64 * 16 * 32 = 32768 entries
    embed = jax.jit(
        lambda x, key: model.apply(
            variables,
            x,
            deterministic=key is None,
            rngs=None if key is None else {"dropout": key},
            method="embed",
        )
    )
    kept = np.asarray(embed(x, None))
    dropped = np.asarray(embed(x, _key(8)))
    assert np.all(kept != 0)
    zero = dropped == 0
    # Binomial standard deviation sqrt(0.25 * 0.75 / 32768) = 0.0024: 6 of them.
    assert abs(zero.mean() - 0.25) < 0.015
    np.testing.assert_allclose(dropped[~zero], kept[~zero] / 0.75, rtol=1e-6)


def _final_norm(variables, h):
    """The stack's final LayerNorm, written out: unit-offset gain, no bias, eps 1e-5."""
    gain = 1.0 + np.asarray(nn.unbox(variables)["params"]["attn_layers"]["final_norm"]["scale"])
    h = np.asarray(h, np.float64)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-5) * gain


@pytest.mark.parametrize("rate", [0.3, 0.99])
def test_layer_dropout_skips_sublayers(base, rate):
    """Each sample must be one of the outcomes; the all-skipped fraction is rate**2 (two
    sublayers, attention and feedforward) and the none-skipped one (1 - rate)**2."""
    variables, x, reference = base
    model = _model(layer_dropout=rate)
    embedding = model.apply(variables, x, method="embed")
    all_skipped = _final_norm(variables, embedding)
    assert np.abs(all_skipped - reference).max() > 1e-2
    n = 512
    out = _sample(model, variables, x, range(n))
    is_skipped = np.abs(out - all_skipped).max(axis=(1, 2, 3)) < 1e-5
    is_full = np.abs(out - reference).max(axis=(1, 2, 3)) < 1e-5
    # Binomial standard deviations are at most sqrt(0.25 / 512) = 0.022.
    assert abs(is_skipped.mean() - rate**2) < 0.07
    assert abs(is_full.mean() - (1 - rate) ** 2) < 0.07
    if rate == 0.99:
        assert is_skipped.mean() > 0.95


def test_gradients_flow_through_dropout(base):
    variables, x, _ = base
    model = _model(emb_dropout=0.1, attn_dropout=0.1, ff_dropout=0.1)
    targets = jax.random.randint(_key(9), (B, T), 0, V)

    @jax.jit
    def grads(params, key):
        def loss(params):
            logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

        return jax.grad(loss)(params)

    g1 = jax.tree.leaves(grads(variables["params"], _key(10)))
    g2 = jax.tree.leaves(grads(variables["params"], _key(11)))
    for a in g1:
        assert np.all(np.isfinite(a)) and np.any(a)
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(g1, g2, strict=True))

"""ReZero (arXiv:2003.04887) as the seed x-transformers 0.12 ran it, against a naive stack.

Seed semantics: every block norm is the identity, each attention branch (self and
cross) is multiplied by a learned scalar ``g`` (init 0) before the residual add, the
feedforward branches are not gated, and the final norm is kept. x-transformers 2.31
removed the option, so the reference is written out here in numpy.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtx import Decoder, TransformerWrapper, interop

D, HEADS, DIM_HEAD = 32, 4, 8
LAYER_TYPES = ("a", "c", "f") * 2


def _naive_rezero_stack(params, x, context):
    """The seed ReZero decoder, in float64 numpy, from the xtx parameter tree."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    context = np.asarray(context, np.float64)
    gelu = np.vectorize(lambda t: 0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))))
    T = x.shape[1]
    for i, kind in enumerate(LAYER_TYPES):
        layer = p[f"layers_{i}"]
        if kind == "f":
            ff = layer["ff"]
            hidden = gelu(x @ ff["proj_in"]["kernel"] + ff["proj_in"]["bias"])
            x = x + hidden @ ff["proj_out"]["kernel"] + ff["proj_out"]["bias"]
            continue
        attn = layer["attn"]
        source = x if kind == "a" else context
        q = np.einsum("btd,dnh->bnth", x, attn["to_q"]["kernel"])
        k = np.einsum("bsd,dnh->bnsh", source, attn["to_k"]["kernel"])
        v = np.einsum("bsd,dnh->bnsh", source, attn["to_v"]["kernel"])
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(DIM_HEAD)
        if kind == "a":
            scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bnts,bnsh,nhd->btd", weights, v, attn["to_out"]["kernel"])
        x = x + layer["rezero_gate"][0] * out
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * (p["final_norm"]["scale"] + 1.0)


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_norm", "post_norm"])
def test_rezero_matches_naive_seed_stack(pre_norm):
    model = Decoder(
        dim=D,
        depth=2,
        heads=HEADS,
        attn_dim_head=DIM_HEAD,
        cross_attend=True,
        use_rezero=True,
        pre_norm=pre_norm,
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, D)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
    params = nn.meta.unbox(model.init(jax.random.key(0), x, context=context))["params"]

    gated = [i for i, kind in enumerate(LAYER_TYPES) if kind != "f"]
    for i, kind in enumerate(LAYER_TYPES):
        names = set(params[f"layers_{i}"])
        # No block norms at all, whatever pre_norm says; gates on attention only.
        assert names == ({"attn", "rezero_gate"} if kind != "f" else {"ff"}), names
    assert "final_norm" in params
    # The gates start at zero (attention branches off); open them to test the math.
    gates = dict(zip(gated, (0.7, -0.4, 1.3, 0.25), strict=True))
    for i, g in gates.items():
        np.testing.assert_array_equal(np.asarray(params[f"layers_{i}"]["rezero_gate"]), [0.0])
        params[f"layers_{i}"] = dict(params[f"layers_{i}"], rezero_gate=jnp.array([g]))
    params["final_norm"] = {"scale": jnp.asarray(0.3 * rng.standard_normal(D), jnp.float32)}

    got = model.apply({"params": params}, x, context=context)
    expected = _naive_rezero_stack(params, x, context)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_rezero_has_no_torch_counterpart():
    module = TransformerWrapper(
        num_tokens=16,
        max_seq_len=8,
        attn_layers=Decoder(dim=D, depth=1, heads=HEADS, use_rezero=True),
    )
    with pytest.raises(ValueError, match="use_rezero"):
        interop.torch_model_from_config(module.config)
    with pytest.raises(interop.UnsupportedOption, match="use_rezero"):
        interop.state_dict_from_params(module.config, {})

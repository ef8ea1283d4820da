"""Scan over layers and rematerialisation change how a stack runs, never what it computes.

The oracle is the same stack run unrolled without remat (itself tested against
x-transformers in tests/parity), fed the same weights through ``stack_layer_params``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from xtx import CrossAttender, Decoder, TransformerWrapper
from xtx.layers import AttentionLayersConfig
from xtx.layers.transformer import stack_layer_params, unstack_layer_params

VOCAB, T = 48, 12


def _wrapper(**stack):
    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=16,
        max_mem_len=4,
        attn_layers=Decoder(dim=32, depth=3, heads=4, attn_kv_heads=2, **stack),
    )


def _init(module, *args, **kwargs):
    """``module.init``, jitted with an RBG key: run eagerly, init compiles a sampler per
    parameter shape and dozens of small ops; one RBG program compiles several times faster."""
    return jax.jit(module.init)(jax.random.key(0, impl="rbg"), *args, **kwargs)


def _scanned_params(module, params):
    params = dict(nn.meta.unbox(params))
    params["attn_layers"] = stack_layer_params(params["attn_layers"], module.config.attn_layers)
    return params


@pytest.fixture(scope="module")
def tokens():
    # numpy draws here and below: jax.random would compile a sampler for every shape.
    return jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, T)), jnp.int32)


@pytest.fixture(scope="module")
def unrolled(tokens):
    module = _wrapper(rotary_pos_emb=True, macaron=True)
    params = nn.meta.unbox(_init(module, tokens)["params"])
    return module, params


def _loss_and_grads(module, params, tokens, mems):
    """Loss, (logits, new memories) and parameter gradients, as one jitted program: run
    eagerly, op by op, the same computation takes longer."""

    def loss(p, tokens, mems):
        logits, new_mems = module.apply({"params": p}, tokens, mems=mems, return_mems=True)
        return jnp.mean(logits**2) + sum(jnp.mean(m) for m in new_mems), (logits, new_mems)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, tokens, mems)


@pytest.fixture(scope="module")
def mems():
    rng = np.random.default_rng(2)
    return tuple(jnp.asarray(rng.standard_normal((2, 4, 32)), jnp.float32) for _ in range(3))


@pytest.fixture(scope="module")
def unrolled_result(unrolled, tokens, mems):
    """The oracle's loss, (logits, new memories) and gradients, computed once."""
    module, params = unrolled
    return _loss_and_grads(module, params, tokens, mems)


def _assert_same_result(got, want, atol, rtol):
    """Logits, new memories and gradients within ``atol`` (gradients also ``rtol``)."""
    (loss, (logits, new_mems)), grads = want
    (got_loss, (got_logits, got_new_mems)), got_grads = got
    np.testing.assert_allclose(got_logits, logits, atol=atol)
    for a, b in zip(got_new_mems, new_mems, strict=True):
        np.testing.assert_allclose(a, b, atol=atol)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    for (path, g), s in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(got_grads), strict=True
    ):
        np.testing.assert_allclose(s, g, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("policy", ["dots_no_batch"])
def test_scanned_stack_equals_unrolled(unrolled, unrolled_result, tokens, mems, policy):
    _, params = unrolled
    scanned = _wrapper(rotary_pos_emb=True, macaron=True, scan_layers=True, remat_policy=policy)
    init_shapes = jax.eval_shape(scanned.init, jax.random.key(0), tokens)["params"]
    sparams = _scanned_params(scanned, params)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(init_shapes)) == jax.tree.map(jnp.shape, sparams)
    loss_and_aux, sgrads = _loss_and_grads(scanned, sparams, tokens, mems)
    sgrads = dict(sgrads)
    sgrads["attn_layers"] = unstack_layer_params(sgrads["attn_layers"], scanned.config.attn_layers)
    _assert_same_result((loss_and_aux, sgrads), unrolled_result, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["full"])
def test_remat_on_unrolled_stack_keeps_gradients(unrolled, unrolled_result, tokens, mems, policy):
    _, params = unrolled
    remat = _wrapper(rotary_pos_emb=True, macaron=True, remat_policy=policy)
    got = _loss_and_grads(remat, params, tokens, mems)
    _assert_same_result(got, unrolled_result, atol=1e-6, rtol=1e-7)


def test_scanned_rematerialised_cross_attender_with_masks_and_dropout():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 7, 16)), jnp.float32)
    mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    context_mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
    kwargs = dict(dim=16, depth=2, heads=2, attn_dropout=0.1, layer_dropout=0.2)
    plain = CrossAttender(**kwargs)
    scanned = CrossAttender(**kwargs, scan_layers=True, remat_policy="dots")
    params = nn.meta.unbox(_init(plain, x, context=context)["params"])
    sparams = stack_layer_params(params, scanned.config)
    call = dict(context=context, mask=mask, context_mask=context_mask)
    # Jitted: eagerly, op by op, these calls take longer.
    np.testing.assert_allclose(
        jax.jit(scanned.apply)({"params": sparams}, x, **call),
        jax.jit(plain.apply)({"params": params}, x, **call),
        atol=1e-5,
    )
    # Training mode: each scanned layer draws its own dropout masks from a split key.
    train = jax.jit(lambda p, key: scanned.apply(p, x, **call, deterministic=False, rngs=key))
    out = train({"params": sparams}, {"dropout": jax.random.key(3)})
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_scanned_params_carry_a_layers_axis_and_shard(tokens):
    module = _wrapper(scan_layers=True)
    variables = _init(module, tokens)
    boxed = variables["params"]["attn_layers"]["blocks"]["layers_0"]["attn"]["to_q"]["kernel"]
    assert boxed.names == ("layers", "embed", "heads", "kv")
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = (
        ("layers", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("kv", None),
        ("norm", None),
    )
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
    params = jax.device_put(nn.meta.unbox(variables), shardings)
    q = params["params"]["attn_layers"]["blocks"]["layers_0"]["attn"]["to_q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    apply = jax.jit(module.apply)
    np.testing.assert_allclose(
        apply(params, tokens),
        apply(nn.meta.unbox(variables), tokens),  # unsharded
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "option",
    [
        dict(residual_attn=True),
        dict(add_value_residual=True),
        dict(sandwich_coef=1),
        dict(weight_tie_layers=True),
        dict(layers_execute_order=(0, 1, 0, 1)),
        dict(num_residual_streams=2),
    ],
)
def test_scan_rejects_layers_that_differ_or_talk(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"scan_layers=True.*{name}"):
        AttentionLayersConfig(dim=16, depth=2, scan_layers=True, **option)


def test_unknown_remat_policy_is_named():
    with pytest.raises(ValueError, match="remat_policy must be one of .*'dots'.*got 'dot'"):
        AttentionLayersConfig(dim=16, depth=2, remat_policy="dot")


def test_stack_layer_params_names_missing_layers():
    cfg = AttentionLayersConfig(dim=16, depth=2, scan_layers=True)
    with pytest.raises(ValueError, match="lack.*layers_2"):
        stack_layer_params({"layers_0": {}, "layers_1": {}}, cfg)

"""Every parameter carries logical axis names, and rules map them onto a device mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from xtx import Decoder, TransformerWrapper

KNOWN = {"embed", "mlp", "heads", "kv_heads", "kv", "vocab", "norm", None}
RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
)


@pytest.fixture(scope="module")
def model_and_vars():
    model = TransformerWrapper(
        num_tokens=64,
        max_seq_len=16,
        num_memory_tokens=2,
        attn_layers=Decoder(
            dim=32, depth=2, heads=4, attn_kv_heads=2, attn_num_mem_kv=2, rel_pos_bias=True
        ),
    )
    x = jnp.zeros((8, 16), jnp.int32)
    # Jitted with an RBG key: eagerly, init compiles a sampler per parameter shape.
    return model, jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)


def test_every_param_is_named(model_and_vars):
    _, variables = model_and_vars
    boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
    for b in boxed:
        assert len(b.names) == b.value.ndim
        assert set(b.names) <= KNOWN, b.names


def test_sharded_forward_equals_unsharded(model_and_vars):
    model, variables = model_and_vars
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    specs = nn.get_partition_spec(variables)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
    params = nn.meta.unbox(variables)
    sharded = jax.device_put(params, shardings)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 16)), jnp.int32)
    x_sharded = jax.device_put(x, NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    expected = model.apply(params, x)
    got = jax.jit(model.apply)(sharded, x_sharded)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    kernel = sharded["params"]["attn_layers"]["layers_0"]["attn"]["to_q"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


SEQUENCE_RULES = (
    ("batch", "data"),
    ("length", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
)


def test_sequence_parallel_forward_equals_unsharded():
    """Rules that map ``act_heads`` split each sequence's tokens over ``tensor`` and
    reshard q/k/v to heads around attention (all-to-alls), here with grouped-query
    heads, memory key/values, a T5 bias and residual attention (logits handed on)."""
    model = TransformerWrapper(
        num_tokens=64,
        max_seq_len=16,
        attn_layers=Decoder(
            dim=32,
            depth=2,
            heads=4,
            attn_kv_heads=2,
            attn_num_mem_kv=2,
            rel_pos_bias=True,
            residual_attn=True,
            rotary_pos_emb=True,
        ),
    )
    x = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 16)), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    params = nn.meta.unbox(variables)
    expected = jax.jit(model.apply)(params, x)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)

    def apply(params, x):
        with nn.logical_axis_rules(SEQUENCE_RULES):
            return model.apply(params, x)

    with jax.set_mesh(mesh):
        sharded_apply = jax.jit(apply)
        got = sharded_apply(params, x)
        hlo = sharded_apply.lower(params, x).compile().as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    assert " all-to-all(" in hlo

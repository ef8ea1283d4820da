"""Device mesh, logical-axis rule sets, and the shardings of a training state.

xtx names every parameter axis logically (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``kv``, ``vocab``, ``norm``, ``layers``) and constrains activations with ``batch``,
``length`` and ``act_embed`` (around attention also ``act_heads`` and ``act_kv_heads``).
A rule set maps those names onto the mesh axes ``data``, ``fsdp`` and ``tensor``;
swapping the rule set turns the same model from data parallel into FSDP, tensor
parallel, both, or sequence parallel:

=============  ==========================================================
``data``       parameters replicated; the batch split over data and fsdp
``fsdp``       the ``embed`` axis of every weight split over fsdp (ZeRO-3)
``tensor``     heads, MLP and vocabulary split over tensor (Megatron style)
``fsdp_tensor`` both
``sequence``   parameters replicated; each sequence's tokens split over tensor,
               attention split over heads (Ulysses, 2309.14509: all-to-alls
               move q/k/v and the attention output between the two)
=============  ==========================================================

The batch always splits over ``("data", "fsdp")``. Optimiser moments take the
sharding of the parameter they belong to (matched by tree path). Recurrent state
(XL memories, kNN memory, ...) splits along its batch axis, found by comparing the
state's shapes at two batch sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from train.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_TENSOR = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_ACTIVATIONS = (("batch", BATCH_AXES), ("length", None), ("act_embed", None))
# Listed before _ACTIVATIONS: flax takes the first rule for a name.
_SEQUENCE = (("length", "tensor"), ("act_heads", "tensor"), ("act_kv_heads", "tensor"))
RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    "data": _ACTIVATIONS,
    "sequence": _SEQUENCE + _ACTIVATIONS,
    "fsdp": (("embed", "fsdp"),) + _ACTIVATIONS,
    "tensor": _TENSOR + _ACTIVATIONS,
    "fsdp_tensor": (("embed", "fsdp"),) + _TENSOR + _ACTIVATIONS,
}


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolves the ``-1`` axis and checks the product against ``device_count``."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ConfigError(f"mesh.{name} must be an int >= 1 or -1, got {size!r}")
    given = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {given}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if device_count % known:
            raise ConfigError(f"mesh {given} does not divide the {device_count} devices")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(
            f"mesh data x fsdp x tensor = {' x '.join(map(str, sizes))} = {math.prod(sizes)} "
            f"devices, but {device_count} are available (set one axis to -1 to fill)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types over all (or the given)
    devices."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rule_set(cfg: MeshConfig, mesh: jax.sharding.Mesh) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules named by ``cfg.rules`` (``auto`` picks from the mesh)."""
    name = cfg.rules
    if name == "auto":
        fsdp, tensor = mesh.shape["fsdp"] > 1, mesh.shape["tensor"] > 1
        name = (
            "fsdp_tensor" if fsdp and tensor else "fsdp" if fsdp else "tensor" if tensor else "data"
        )
    return RULES[name]


def check_sequence(cfg: MeshConfig, mesh: jax.sharding.Mesh, seq_len: int, heads: int) -> None:
    """The ``sequence`` rule set splits each segment's tokens and the attention heads over
    the tensor axis: both must split evenly."""
    n = mesh.shape["tensor"]
    if cfg.rules != "sequence" or n == 1:
        return
    for name, size in (("model.seq_len", seq_len), ("model.heads", heads)):
        if size % n:
            raise ConfigError(
                f"mesh.rules=sequence splits {name} over the tensor axis ({n}), "
                f"but {name}={size} is not divisible by it"
            )


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly over the batch axes and the hosts."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % rows:
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the data x fsdp mesh axes ({rows})"
        )
    if batch_size % jax.process_count():
        raise ConfigError(
            f"batch_size={batch_size} is not divisible by the {jax.process_count()} processes"
        )


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_shardings(boxed_variables: Any, mesh: jax.sharding.Mesh, rules) -> Any:
    """Shardings of the (unboxed) variables from their logical names.

    A mesh axis that does not divide the dimension it would split is dropped for that
    parameter (a 4-head layer on an 8-way tensor axis stays replicated) rather than
    failing deep inside XLA.
    """
    specs = nn.get_partition_spec(boxed_variables)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = nn.meta.unbox(boxed_variables)
    return jax.tree.map(
        lambda s, x: _fit(s, x.shape, mesh),
        shardings,
        shapes,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def _fit(sharding: NamedSharding, shape: tuple[int, ...], mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[i] % math.prod(mesh.shape[a] for a in names):
            spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def like_params(tree: Any, params: Any, shardings: Any, mesh) -> Any:
    """Shardings for ``tree`` (an optimiser state): a leaf whose tree path ends with a
    parameter's path and has its shape takes that parameter's sharding; every other
    leaf (counts, scalars) is replicated."""
    by_path = {}
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings), strict=True
    ):
        by_path[_keys(path)] = (tuple(x.shape), s)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, x in flat:
        keys, found = _keys(path), replicated(mesh)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(x.shape):
                found = hit[1]
                break
        out.append(found)
    return jax.tree_util.tree_unflatten(treedef, out)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(init_state: Callable[[int], Any], batch_size: int, mesh) -> Any:
    """Shardings of a recurrent state: each leaf split along its batch axis.

    The batch axis of a leaf is the one that changes between ``init_state(batch_size)``
    and ``init_state(2 * batch_size)``; leaves without one are replicated.
    """
    small = jax.eval_shape(lambda: init_state(batch_size))
    large = jax.eval_shape(lambda: init_state(2 * batch_size))

    def spec(a, b):
        axes = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]
        if not axes:
            return replicated(mesh)
        parts = [None] * len(a.shape)
        parts[axes[0]] = BATCH_AXES
        return NamedSharding(mesh, PartitionSpec(*parts))

    return jax.tree.map(spec, small, large)


def describe(mesh: jax.sharding.Mesh, rules) -> str:
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    mapped = ", ".join(f"{k}->{v}" for k, v in rules if v is not None and k != "batch")
    devices = int(np.prod(list(mesh.shape.values())))
    return f"mesh {sizes} ({devices} devices); rules: {mapped or 'replicated'}"

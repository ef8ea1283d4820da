"""Every rule set trains like one device, and shards the parameters as the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train import sharding as shd
from train.config import ConfigError, MeshConfig, ModelConfig, OptimConfig, RunConfig
from train.loop import Run, Trainer
from train.optim import make_optimizer
from train.tasks import build_task

B, T, V = 8, 16, 64
MODEL = ModelConfig(dim=32, depth=1, heads=4, seq_len=T, options={"rotary_pos_emb": True})
MESHES = {
    "data": MeshConfig(data=8, rules="data"),
    "fsdp": MeshConfig(data=2, fsdp=4, rules="fsdp"),
    "tensor": MeshConfig(data=2, tensor=4, rules="tensor"),
    "fsdp_tensor": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tensor"),
    "sequence": MeshConfig(data=2, tensor=4, rules="sequence"),
}
# What each rule set must do to these parameters, written from the rules' definition:
# fsdp splits the embed axis, tensor splits heads / kv_heads / mlp / vocab, sequence
# splits activations only.
GOLDEN = {
    "data": {"to_q": P(), "ff_in": P(), "token_emb": P(), "to_logits": P()},
    "fsdp": {
        "to_q": P("fsdp", None, None),
        "ff_in": P("fsdp", None),
        "token_emb": P(None, "fsdp"),
        "to_logits": P("fsdp", None),
    },
    "tensor": {
        "to_q": P(None, "tensor", None),
        "ff_in": P(None, "tensor"),
        "token_emb": P("tensor", None),
        "to_logits": P(None, "tensor"),
    },
    "fsdp_tensor": {
        "to_q": P("fsdp", "tensor", None),
        "ff_in": P("fsdp", "tensor"),
        "token_emb": P("tensor", "fsdp"),
        "to_logits": P("fsdp", "tensor"),
    },
    "sequence": {"to_q": P(), "ff_in": P(), "token_emb": P(), "to_logits": P()},
}


def _trainer(mesh_cfg: MeshConfig, devices) -> Trainer:
    config = RunConfig(model=MODEL, mesh=mesh_cfg, batch_size=B, optim=OptimConfig(lr=1e-2))
    task = build_task(MODEL, V)
    mesh = shd.make_mesh(mesh_cfg, devices)
    tx = make_optimizer(config.optim, 10)
    return Trainer(Run(config, None, task, mesh, shd.rule_set(mesh_cfg, mesh), None, tx))


def _batches():
    rng = np.random.default_rng(0)
    return [
        {
            "tokens": rng.integers(0, V, (B, T + 1)).astype(np.int32),
            "loss_mask": np.ones((B, T), bool),
            "reset": np.ones((B,), bool),
        }
        for _ in range(3)
    ]


def _train(trainer: Trainer):
    ts = trainer.init(0)
    losses = []
    for batch in _batches():
        ts, metrics = trainer.step(ts, batch)
        losses.append(float(metrics["loss"]))
    return ts, losses


@pytest.fixture(scope="module")
def single():
    ts, losses = _train(_trainer(MeshConfig(data=1), jax.devices()[:1]))
    return jax.device_get(ts["params"]), losses


@pytest.mark.parametrize("rules", list(MESHES))
def test_rule_set_matches_one_device_and_golden_table(single, rules):
    ref_params, ref_losses = single
    trainer = _trainer(MESHES[rules], jax.devices())
    ts, losses = _train(trainer)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5),
        ts["params"],
        ref_params,
    )
    p = ts["params"]
    layer = p["attn_layers"]
    got = {
        "to_q": layer["layers_0"]["attn"]["to_q"]["kernel"].sharding.spec,
        "ff_in": layer["layers_1"]["ff"]["proj_in"]["kernel"].sharding.spec,
        "token_emb": p["token_emb"]["embedding"].sharding.spec,
        "to_logits": p["to_logits"]["kernel"].sharding.spec,
    }
    for name, spec in GOLDEN[rules].items():
        assert _normal(got[name]) == _normal(spec), (rules, name, got[name])
    # Adam's moments live where their parameters do.
    mu = ts["opt_state"][1][0].mu["attn_layers"]["layers_0"]["attn"]["to_q"]["kernel"]
    assert _normal(mu.sharding.spec) == _normal(GOLDEN[rules]["to_q"])
    if rules == "sequence":
        # The tokens really are split: attention reshards q/k/v with all-to-alls.
        with trainer.context():
            batch = trainer.global_batch(_batches()[0])
            hlo = trainer._train_step.lower(ts, batch).compile().as_text()
        assert " all-to-all(" in hlo
        # Nothing is gathered: no device computes another's tokens or heads (the
        # attention output once dragged the length split into the kernel's loop and
        # gathered every block's heads).
        assert " all-gather(" not in hlo


def _normal(spec: P) -> tuple:
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


def test_recurrent_state_splits_along_batch():
    mesh = shd.make_mesh(MeshConfig(data=8), jax.devices())
    task = build_task(ModelConfig(family="transformer_xl", dim=16, depth=1, heads=2, seq_len=8), V)
    shardings = shd.state_shardings(task.init_state, B, mesh)
    # XLState: mems [L, B, M, D], valid [B, M].
    assert _normal(shardings.mems.spec) == (None, ("data", "fsdp"))
    assert _normal(shardings.valid.spec) == (("data", "fsdp"),)


@pytest.mark.parametrize(
    "mesh_cfg, message",
    [
        (MeshConfig(data=3), "= 3 devices, but 8 are available"),
        (MeshConfig(data=-1, fsdp=-1), "at most one mesh axis"),
        (MeshConfig(data=-1, tensor=3), "does not divide"),
    ],
)
def test_bad_mesh_is_named(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        shd.make_mesh(mesh_cfg, jax.devices())


def test_batch_not_divisible_by_data_axes():
    mesh = shd.make_mesh(MeshConfig(data=4, fsdp=2), jax.devices())
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the data x fsdp"):
        shd.check_batch(6, mesh)


def test_sequence_rules_need_even_token_and_head_splits():
    cfg = MeshConfig(data=2, tensor=4, rules="sequence")
    mesh = shd.make_mesh(cfg, jax.devices())
    shd.check_sequence(cfg, mesh, seq_len=16, heads=4)  # both split over 4
    with pytest.raises(ConfigError, match="model.seq_len=18 is not divisible"):
        shd.check_sequence(cfg, mesh, seq_len=18, heads=4)
    with pytest.raises(ConfigError, match="model.heads=6 is not divisible"):
        shd.check_sequence(cfg, mesh, seq_len=16, heads=6)
    # Other rule sets do not split the tokens.
    shd.check_sequence(MeshConfig(data=2, tensor=4, rules="tensor"), mesh, seq_len=18, heads=6)

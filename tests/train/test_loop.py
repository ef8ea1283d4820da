"""The training loop end to end: resume is exact, accumulation is exact, every family
trains, SIGTERM saves, and bad input fails before compiling."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train import sharding as shd
from train.__main__ import parse_args, resolve
from train.config import (
    PRESETS,
    ConfigError,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    apply_overrides,
)
from train.data import DataConfig
from train.loop import Run, Trainer, load_run_config, prepare, train
from train.metrics import read_metrics
from train.optim import make_optimizer
from train.tasks import build_task, family_keywords

TINY = {"dim": 16, "depth": 1, "heads": 2, "seq_len": 16}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Twelve small text files: enough documents for streaming and a validation split."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n"]
    for i in range(12):
        text = " ".join(rng.choice(words, 300))
        (root / f"doc{i:02d}.txt").write_text(text)
    return root


def _config(corpus_dir, **changes) -> RunConfig:
    base = RunConfig(
        model=ModelConfig(**TINY),
        data=DataConfig(source=str(corpus_dir), val_fraction=0.2),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        mesh=MeshConfig(data=1),
        steps=6,
        batch_size=4,
        log_every=1,
        eval_every=0,
        save_every=0,
        eval_batches=1,
        samples=0,
    )
    return dataclasses.replace(base, **changes)


def _losses(records):
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_stopped_and_resumed_run_equals_uninterrupted(corpus_dir, tmp_path):
    # A Transformer-XL decoder: the resumed run must restore parameters, optimiser,
    # RNG, the data position and the recurrent memories to replay the same losses.
    model = ModelConfig(**TINY, options={"max_mem_len": 16})
    config = _config(corpus_dir, model=model, mesh=MeshConfig(data=4, tensor=2))
    whole = _losses(train(config, tmp_path / "whole", progress=False, plot=False))
    first = train(config, tmp_path / "cut", progress=False, plot=False, stop_after=3)
    assert _losses(first) == whole[:3]
    saved = load_run_config(tmp_path / "cut")
    assert saved == config
    rest = train(saved, tmp_path / "cut", resume=True, progress=False, plot=False)
    resumed = _losses(rest)
    assert [s for s, _ in resumed] == [4, 5, 6]
    np.testing.assert_array_equal([v for _, v in resumed], [v for _, v in whole[3:]])
    # The metrics file reads as one run and the final evaluation happened.
    logged = read_metrics(tmp_path / "cut")
    assert [s for s, _ in _losses(logged)] == [1, 2, 3, 4, 5, 6]
    assert any("val/bpb" in r for r in logged)
    assert (tmp_path / "cut" / "loss_curves.png").exists() is False  # plot=False


def test_gradient_accumulation_equals_one_big_batch():
    # Two micro-batches of 4 rows with grad_accum=2 must give the update of one batch
    # of 8 rows (equal token counts, so the mean gradients agree).
    V, T = 32, 16
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (8, T + 1)).astype(np.int32)

    def batch(rows):
        return {
            "tokens": tokens[rows],
            "loss_mask": np.ones((len(tokens[rows]), T), bool),
            "reset": np.ones((len(tokens[rows]),), bool),
        }

    def trainer(batch_size, accum):
        cfg = RunConfig(
            model=ModelConfig(**TINY),
            batch_size=batch_size,
            optim=OptimConfig(lr=1e-2, warmup_steps=0, grad_accum=accum),
        )
        mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
        run = Run(
            cfg,
            None,
            build_task(cfg.model, V),
            mesh,
            shd.RULES["data"],
            None,
            make_optimizer(cfg.optim, 4),
        )
        return Trainer(run)

    small = trainer(4, 2)
    ts = small.init(0)
    ts, _ = small.step(ts, batch(slice(0, 4)))
    ts, _ = small.step(ts, batch(slice(4, 8)))
    big = trainer(8, 1)
    ref = big.init(0)
    ref, _ = big.step(ref, batch(slice(0, 8)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
        ts["params"],
        ref["params"],
    )


FAMILIES = {
    "decoder": {},
    "encoder_decoder": {},
    "nonautoregressive": {},
    "transformer_xl": {"mem_len": 8},
    "memorizing": {"mem_len": 8, "knn_memory_size": 64, "knn_top_k": 4},
    "block_recurrent": {"block_len": 8, "num_state": 4, "mem_len": 8},
    "longformer": {"window": 4},
    "rmt": {"num_memory": 2},
    "continuous": {"dim_in": 4},
    "vit": {},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_learns_a_repeated_batch(family):
    V, T = 24, 16
    model = ModelConfig(family=family, **{**TINY, "seq_len": T}, options=FAMILIES[family])
    cfg = RunConfig(model=model, batch_size=2, optim=OptimConfig(lr=1e-2, warmup_steps=0))
    mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    task = build_task(model, V)
    run = Run(cfg, None, task, mesh, shd.RULES["data"], None, make_optimizer(cfg.optim, 100))
    trainer = Trainer(run)
    ts = trainer.init(0)
    rng = np.random.default_rng(2)
    batch = {
        "tokens": rng.integers(0, V, (2, T + 1)).astype(np.int32),
        "loss_mask": np.ones((2, T), bool),
        "reset": np.ones((2,), bool),  # a fresh document every step: the same problem
    }
    losses = []
    for _ in range(12):
        ts, metrics = trainer.step(ts, batch)
        losses.append(float(metrics["loss"]))
    # Every task's loss is a cross-entropy or a distance: positive, and falling.
    assert np.all(np.isfinite(losses)) and min(losses) > 0, losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_sigterm_saves_a_checkpoint_and_exits(corpus_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--no-progress",
        f"--out={out}",
        f"--data.source={corpus_dir}",
        "--data.val_fraction=0.2",
        "--model.dim=16",
        "--model.depth=1",
        "--model.heads=2",
        "--model.seq_len=16",
        "--batch_size=2",
        "--steps=100000",
        "--log_every=1",
        "--eval_every=0",
        "--save_every=0",
        "--samples=0",
        "--model.rotary_pos_emb=false",
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    # Wait for the first logged step: training is under way, inside the guard.
    while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.exists() and metrics.read_text(), proc.communicate(timeout=5)[0]
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "checkpoint saved" in output
    steps = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 1
    # The saved config names the overrides, so --resume needs no flags.
    assert load_run_config(out).model.options == {"rotary_pos_emb": False}


def test_unknown_field_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"'optim.lrr' \(did you mean 'lr'\?\)"):
        apply_overrides(PRESETS["default"], {"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match=r"did you mean 'rotary_pos_emb'"):
        apply_overrides(
            PRESETS["default"], {"model.rotary_pos_em": True}, family_keywords("decoder")
        )
    with pytest.raises(ConfigError, match="model.depth expects int, got 'deep'"):
        apply_overrides(PRESETS["default"], {"model.depth": "deep"})


def test_family_keywords_route_into_options():
    config = apply_overrides(
        PRESETS["default"], {"model.ff_glu": True, "model.depth": 2}, family_keywords("decoder")
    )
    assert config.model.options["ff_glu"] is True and config.model.depth == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data": DataConfig(source="/no/such/corpus")}, "/no/such/corpus"),
        ({"mesh": MeshConfig(data=3)}, "3 devices, but 8 are available"),
        ({"batch_size": 6, "mesh": MeshConfig(data=4, fsdp=2)}, "batch_size=6 is not divisible"),
        ({"model": ModelConfig(**TINY, options={"ff_gluu": True})}, "ff_gluu"),
        ({"model": ModelConfig(family="gpt")}, "model.family must be one of"),
    ],
)
def test_bad_input_fails_before_compiling(corpus_dir, changes, message):
    config = _config(corpus_dir, **changes)
    with pytest.raises((ConfigError, FileNotFoundError, ValueError), match=message):
        prepare(config)


def test_resume_refuses_an_incompatible_change(corpus_dir, tmp_path):
    run_dir = tmp_path / "saved"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(_config(corpus_dir).to_json())
    args, overrides = parse_args(["--resume", str(run_dir), "--model.depth=3"])
    with pytest.raises(ConfigError, match="cannot change model.depth of a saved run"):
        resolve(args, overrides)
    args, overrides = parse_args(["--resume", str(run_dir), "--steps=10"])
    config, out, resume = resolve(args, overrides)
    assert resume and out == run_dir and config.steps == 10
    args, overrides = parse_args(["--out", str(run_dir)])
    with pytest.raises(ConfigError, match="already holds a run"):
        resolve(args, overrides)


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for name in PRESETS:
        assert name in text
    assert "--optim.lr=" in text and "--model.depth=" in text

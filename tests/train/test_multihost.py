"""Two processes (``--distributed``, gloo collectives on CPU) train like one process.

Each process owns two host devices and loads only its half of every batch; the run's
losses must equal those of one process holding the same global batch on its own
devices, and the checkpoint written together must restore.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from train.config import MeshConfig, ModelConfig, OptimConfig, RunConfig
from train.data import DataConfig
from train.loop import train
from train.metrics import read_metrics

ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (corpus / f"f{i}.txt").write_bytes(rng.integers(97, 123, 2000).astype(np.uint8).tobytes())
    flags = [
        f"--data.source={corpus}",
        "--data.val_fraction=0.3",
        "--model.dim=16",
        "--model.depth=1",
        "--model.heads=2",
        "--model.seq_len=16",
        "--model.max_mem_len=16",  # streamed, with recurrent state split over hosts
        "--batch_size=8",
        "--steps=3",
        "--log_every=1",
        "--eval_every=0",
        "--save_every=0",
        "--samples=0",
        "--mesh.data=4",
        "--no-progress",
    ]
    out = tmp_path / "multi"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "train",
                "--distributed",
                f"--coordinator=localhost:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                f"--out={out}",
                *flags,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text
    multi = [(r["step"], r["train/loss"]) for r in read_metrics(out) if "train/loss" in r]

    # The same run in this process: one controller, the global batch on 4 of its devices.
    config = RunConfig(
        model=ModelConfig(
            dim=16,
            depth=1,
            heads=2,
            seq_len=16,
            options={"rotary_pos_emb": True, "max_mem_len": 16},
        ),
        data=DataConfig(source=str(corpus), val_fraction=0.3),
        optim=OptimConfig(),
        mesh=MeshConfig(data=8),
        batch_size=8,
        steps=3,
        log_every=1,
        eval_every=0,
        save_every=0,
        samples=0,
    )
    single = train(config, tmp_path / "single", progress=False, plot=False)
    single = [(r["step"], r["train/loss"]) for r in single if "train/loss" in r]
    assert [s for s, _ in multi] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in multi], [v for _, v in single], rtol=1e-5)
    assert (out / "checkpoints" / "3").is_dir()

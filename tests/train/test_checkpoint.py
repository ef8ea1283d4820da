"""Tests for train/checkpoint.py: round trips, keep-N, errors, SIGKILL mid-save, preemption.

The expected values are numpy copies taken before the save (or regenerated from the same numpy
seed in another process), never values read back through orbax.

Run as a script (``python test_checkpoint.py crash|preempt DIR``), this file plays the child
process of the two subprocess tests.
"""

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from train.checkpoint import Checkpointer, PreemptionGuard

_REPO = Path(__file__).resolve().parents[2]
_BIG_LEAVES = 4  # x 1 Mi float32 = 16 MB per step: its save spends ~0.2 s in the tmp directory


def _big_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    leaves = {f"w{i}": rng.standard_normal(1 << 20, dtype=np.float32) for i in range(_BIG_LEAVES)}
    return {"params": leaves, "rng": jax.random.key(seed)}


def _abstract(tree, sharding=None):
    """Restore targets for `tree`'s leaves; numpy leaves go to device 0 unless `sharding`."""

    def leaf(x):
        where = sharding or getattr(x, "sharding", None) or SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    return jax.tree.map(leaf, tree)


def _run_child(mode: str, directory: Path, **popen_kwargs) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("XLA_FLAGS", None)  # one device is enough for the child, and starts faster
    return subprocess.Popen(
        [sys.executable, __file__, mode, str(directory)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


@pytest.fixture(scope="module", autouse=True)
def children(tmp_path_factory):
    """Starts both child processes up front: their ~3 s of importing jax overlaps other tests.

    Each child then waits for its test (at a line on stdin or a signal) before the part that
    the test observes.
    """
    started = {}
    for mode, popen_kwargs in (("crash", {}), ("preempt", {"stderr": subprocess.PIPE})):
        directory = tmp_path_factory.mktemp(mode)
        started[mode] = (_run_child(mode, directory, **popen_kwargs), directory)
    yield started
    for child, _ in started.values():
        if child.poll() is None:
            child.kill()
        child.communicate()


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_async_save_then_restore_into_new_sharding(tmp_path, mesh):
    row = NamedSharding(mesh, P("data"))
    params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), row), "b": jnp.ones((3,))}
    state = {
        "params": params,
        "opt": optax.adam(1e-3).init(params),  # NamedTuples and an EmptyState node
        "step": jnp.int32(7),
        "memory": jax.device_put(jnp.linspace(0.0, 1.0, 32).reshape(8, 4), row),
    }
    expected = jax.tree.map(np.array, state)
    meta = {"data_position": 1234, "config": {"dim": 8}, "metrics": {"loss": float("nan")}}
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(7, state, meta)
    # The loop donates the state to the next step right after save returns.
    jax.tree.map(lambda x: x.delete(), state)
    target = _abstract(expected, sharding=SingleDeviceSharding(jax.devices()[0]))
    column = NamedSharding(mesh, P(None, "data"))
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=column)
    replicated = NamedSharding(mesh, P())
    target["memory"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=replicated)
    restored, restored_meta = ckpt.restore(target)
    ckpt.close()
    assert ckpt.latest_step() == 7
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want, tgt in zip(
        jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(target), strict=True
    ):
        assert got.dtype == want.dtype and got.sharding == tgt.sharding
        np.testing.assert_array_equal(np.asarray(got), want)
    assert restored_meta["data_position"] == 1234 and restored_meta["config"] == {"dim": 8}
    assert np.isnan(restored_meta["metrics"]["loss"])


def test_typed_key_round_trip(tmp_path, mesh):
    keys = jax.device_put(jax.random.split(jax.random.key(5), 8), NamedSharding(mesh, P("data")))
    state = {"rng": jax.random.key(42, impl="rbg"), "keys": keys}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(_abstract(state))
    ckpt.close()
    for name in ("rng", "keys"):
        assert restored[name].dtype == state[name].dtype
        assert restored[name].sharding == state[name].sharding
        np.testing.assert_array_equal(
            jax.random.key_data(restored[name]), jax.random.key_data(state[name])
        )
    np.testing.assert_array_equal(
        jax.random.bits(restored["rng"], (4,)), jax.random.bits(state["rng"], (4,))
    )


def test_keep_n_existing_and_older_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step in range(1, 5):
        assert ckpt.save(step, {"x": jnp.full((2,), float(step))}, {"step": step})
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
    assert not ckpt.save(4, {"x": jnp.zeros((2,))}, {})  # never overwrites a saved step
    with pytest.raises(ValueError, match="older than the newest checkpoint"):
        ckpt.save(2, {"x": jnp.zeros((2,))}, {})
    target = {
        "x": jax.ShapeDtypeStruct(
            (2,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
        )
    }
    state, meta = ckpt.restore(target, step=3)
    np.testing.assert_array_equal(np.asarray(state["x"]), [3.0, 3.0])
    assert meta == {"step": 3}
    state, meta = ckpt.restore(target)
    np.testing.assert_array_equal(np.asarray(state["x"]), [4.0, 4.0])
    with pytest.raises(FileNotFoundError, match=r"step 1 .*saved steps: \[3, 4\]"):
        ckpt.restore(target, step=1)
    # A rewound run replaces the abandoned newer checkpoints.
    assert ckpt.save(2, {"x": jnp.full((2,), -2.0)}, {"step": 2}, force=True)
    ckpt.close()
    reopened = Checkpointer(tmp_path)
    assert reopened.all_steps() == [2] and reopened.latest_step() == 2
    state, meta = reopened.restore(target)
    reopened.close()
    np.testing.assert_array_equal(np.asarray(state["x"]), [-2.0, -2.0])


def test_clear_errors(tmp_path):
    device = SingleDeviceSharding(jax.devices()[0])
    ckpt = Checkpointer(tmp_path, async_save=False)
    target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=device)}}
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(target)
    with pytest.raises(TypeError, match="meta must be JSON-serializable"):
        ckpt.save(1, {"w": jnp.zeros(2)}, {"bad": object()})
    with pytest.raises(TypeError, match=r"state leaf 'n' must be a jax or numpy array, got int"):
        ckpt.save(1, {"n": 3}, {})
    ckpt.save(1, {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}, {})
    with pytest.raises(ValueError, match=r"leaf at 'params/b' that abstract_state lacks"):
        ckpt.restore(target)
    target["params"]["b"] = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)
    target["params"]["w"] = jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=device)
    with pytest.raises(
        ValueError, match=r"'params/w' expects shape \(2, 4\).*holds shape \(2, 3\)"
    ):
        ckpt.restore(target)
    target["params"]["w"] = jax.ShapeDtypeStruct((2, 3), jnp.float32, sharding=device)
    target["params"]["extra"] = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=device)
    with pytest.raises(
        ValueError, match=r"leaf at 'params/extra' that the checkpoint at step 1 lacks"
    ):
        ckpt.restore(target)
    del target["params"]["extra"]
    target["params"]["w"] = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"'params/w' has no sharding"):
        ckpt.restore(target)
    ckpt.close()


def test_sigkill_during_save_keeps_last_good_checkpoint(children):
    child, tmp_path = children["crash"]
    watchdog = threading.Timer(120, child.kill)  # a hung child fails the test, not the suite
    watchdog.start()
    assert child.stdout.readline().strip() == "saved 1"
    child.stdin.write("go\n")
    child.stdin.flush()
    tmp_dir = tmp_path / "2.orbax-checkpoint-tmp"
    for _ in range(120_000):  # polls for up to about a minute: a hang guard, not a timing
        if tmp_dir.exists():
            break
        assert child.poll() is None, "child exited before step 2 started writing"
        time.sleep(0.0005)
    else:
        pytest.fail("step 2 never started writing")
    child.send_signal(signal.SIGKILL)
    child.wait()
    watchdog.cancel()
    # The kill landed mid-write: the uncommitted step is still in its temporary directory.
    assert tmp_dir.exists() and not (tmp_path / "2").exists()

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    expected = _big_state(1)
    restored, meta = ckpt.restore(_abstract(expected))
    assert meta == {"step": 1}
    for got, want in zip(
        jax.tree.leaves(restored["params"]), jax.tree.leaves(expected["params"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(expected["rng"])
    )
    # Resuming writes step 2 again over the debris of the killed save.
    assert ckpt.save(2, {"x": jnp.arange(4.0)}, {"step": 2})
    restored, meta = ckpt.restore(_abstract({"x": np.zeros(4, np.float32)}))
    ckpt.close()
    assert meta == {"step": 2} and not tmp_dir.exists()
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0, dtype=np.float32))


def test_preemption_guard_saves_and_exits_cleanly(children):
    child, tmp_path = children["preempt"]
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    stopping = child.stdout.readline().split()
    assert stopping[0] == "stopping", stopping
    step = int(stopping[1])
    child.send_signal(signal.SIGINT)  # a second signal while the final save is pending
    err_lines = []
    for line in child.stderr:
        err_lines.append(line)
        if "SIGINT ignored: saving a checkpoint" in line:
            break
    out, err = child.communicate("go\n", timeout=60)
    watchdog.cancel()
    err = "".join(err_lines) + err
    assert child.returncode == 0, err
    assert "SIGTERM received: stopping after this step" in err
    assert out.split() == ["handlers", "restored"]

    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == step
    target = {
        "x": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=SingleDeviceSharding(jax.devices()[0]))
    }
    restored, meta = ckpt.restore(target)
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.full(4, step, np.int32))
    assert meta == {"step": step}


def _child_crash(directory: str) -> None:
    ckpt = Checkpointer(directory)
    ckpt.save(1, _big_state(1), {"step": 1})
    ckpt.wait()
    state = _big_state(2)
    print("saved 1", flush=True)
    sys.stdin.readline()  # the parent is now watching for the temporary directory
    ckpt.save(2, state, {"step": 2})
    ckpt.wait()
    print("saved 2", flush=True)


def _child_preempt(directory: str) -> None:
    ckpt = Checkpointer(directory)
    # Whatever was installed before (a shell's background job starts with SIGINT ignored).
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with PreemptionGuard() as guard:
        print("ready", flush=True)
        step = 0
        while True:
            step += 1
            state = {"x": jnp.full((4,), step, jnp.int32)}
            time.sleep(0.005)
            if guard.should_stop(step):
                print(f"stopping {step}", flush=True)
                # Wait for the parent's line (it sends a second signal first) without blocking
                # in read(): a signal caught by another thread would not interrupt it, and
                # Python runs handlers only when the main thread gets back to bytecode.
                while not select.select([sys.stdin], [], [], 0.01)[0]:
                    pass
                ckpt.save(step, state, {"step": step})
                ckpt.wait()
                break
    ckpt.close()
    after = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    restored = after == before
    print("handlers", "restored" if restored else "leaked", flush=True)


if __name__ == "__main__":
    {"crash": _child_crash, "preempt": _child_preempt}[sys.argv[1]](sys.argv[2])

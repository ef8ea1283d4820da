"""Checkpoints for the training program: asynchronous, crash-safe, restored into a mesh layout.

`Checkpointer` wraps an orbax `CheckpointManager` holding three items per step:

- ``state``: the training state pytree (params, optimizer state, step, PRNG key, recurrent model
  state), written with `StandardSave`. Arrays may be sharded over a mesh; each process writes
  its own shards, and a restore can re-shard onto a different layout.
- ``meta``: a JSON dict (data position, config, metrics).
- ``layout``: one ``[path, shape, dtype]`` row per leaf, written by this module. Restore compares
  it with the target before touching orbax, so a config change that alters the model fails with
  the first mismatching path instead of an error from deep inside tensorstore.

Typed PRNG keys (``jax.random.key``) cannot be serialized directly; they are saved as their
``uint32`` key data and wrapped back with the target's key dtype on restore.

Crash safety comes from orbax's commit protocol: a step is written into ``<step>.orbax-checkpoint-
tmp`` and renamed (on local disks) or marked with ``commit_success.txt`` (on object stores) only
once complete. A process killed mid-save leaves the previous steps untouched; the next
`Checkpointer` on the same directory deletes the leftover temporary directory.
``tests/train/test_checkpoint.py`` kills a saving process with SIGKILL to check this.

Saves are asynchronous by default: `save` returns once the arrays are copied off the
accelerator, so the caller may donate or delete them right away; the files are written by a
background thread. `wait` blocks until the write is committed.

`PreemptionGuard` turns SIGTERM and SIGINT into a flag that the training loop polls, so it can
save and exit cleanly when a scheduler preempts the job or a user presses Ctrl-C.

Multi-host: every process must call `save`, `restore` and `PreemptionGuard.should_stop` at the
same steps; orbax coordinates the writes and the directory must be on a shared file system.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_ITEMS = ("state", "meta", "layout")


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(_key_name(e) for e in path) or "<root>"


def _layout(tree: Any) -> list[list[Any]]:
    """Rows ``[path, shape, dtype]`` in flattening order; keys keep their key dtype and shape."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[_path_str(p), list(x.shape), str(x.dtype)] for p, x in leaves]


def _check_layout(saved: list[list[Any]], target: list[list[Any]], step: int) -> None:
    saved_by_path = {row[0]: row for row in saved}
    target_paths = {row[0] for row in target}
    for path, shape, dtype in target:
        if path not in saved_by_path:
            raise ValueError(
                f"abstract_state has a leaf at {path!r} that the checkpoint at step {step} lacks; "
                "the model or optimizer config differs from the one that wrote the checkpoint"
            )
        _, saved_shape, saved_dtype = saved_by_path[path]
        if (list(shape), dtype) != (list(saved_shape), saved_dtype):
            raise ValueError(
                f"abstract_state leaf {path!r} expects shape {tuple(shape)} dtype {dtype}, but the "
                f"checkpoint at step {step} holds shape {tuple(saved_shape)} dtype {saved_dtype}"
            )
    for path, _, _ in saved:
        if path not in target_paths:
            raise ValueError(
                f"the checkpoint at step {step} has a leaf at {path!r} that abstract_state lacks; "
                "the model or optimizer config differs from the one that wrote the checkpoint"
            )


def _to_abstract(path: Sequence[Any], x: Any) -> jax.ShapeDtypeStruct:
    """A restore target for one leaf: its shape, dtype and sharding (keys as their key data)."""
    if isinstance(x, jax.Array):
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if not isinstance(x, jax.ShapeDtypeStruct):
        raise TypeError(
            f"abstract_state leaf {_path_str(path)!r} must be a jax.ShapeDtypeStruct, "
            f"got {type(x).__name__}"
        )
    if x.sharding is None:
        raise ValueError(
            f"abstract_state leaf {_path_str(path)!r} has no sharding; build it with "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...) so the restore lands in the mesh "
            "layout"
        )
    if not _is_key(x):
        return x
    # Key data has trailing key-bit dims; a NamedSharding spec shorter than the rank leaves them
    # unsharded, which is exactly the layout jax.random.key_data gives a sharded key array.
    data = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)


def _to_saveable(path: Sequence[Any], x: Any) -> Any:
    if not isinstance(x, jax.Array | np.ndarray | np.generic):
        raise TypeError(
            f"state leaf {_path_str(path)!r} must be a jax or numpy array, got {type(x).__name__}"
        )
    return jax.random.key_data(x) if _is_key(x) else x


class Checkpointer:
    """Saves and restores the training state with orbax, keeping the newest `keep` steps.

    Example::

        ckpt = Checkpointer(run_dir / "checkpoints")
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(abstract_state)
        # (training steps)
        ckpt.save(step, state, {"data_position": pos, "config": cfg_dict})
        # (more steps, more saves)
        ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        """Opens (creating if needed) a checkpoint directory.

        Args:
            directory: where the step directories go; on a shared file system for multi-host.
            keep: how many of the newest steps to keep; older ones are deleted after each save.
            async_save: write in a background thread so that `save` returns early.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            # A save killed mid-write leaves `<step>.orbax-checkpoint-tmp`; remove it on start.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts writing `state` and `meta` as checkpoint `step`.

        Waits for a previous save still in flight, copies the arrays off the accelerator and
        returns; with ``async_save`` the files are written in the background (call `wait`). The
        caller may donate or delete the arrays of `state` as soon as this returns.

        A step that is already saved is never overwritten: the call does nothing and returns
        False (so a final save right after a periodic one at the same step is harmless).

        Args:
            step: the training step this state belongs to.
            state: pytree of jax arrays, possibly sharded; typed PRNG keys are allowed.
            meta: JSON-serializable dict (data position, config, metrics).
            force: allow a step older than the newest saved one, for a run rewound to an
                earlier checkpoint: the checkpoints newer than `step` belong to the abandoned
                run and are deleted first. Without `force` such a save raises, since a later
                resume would pick the newer, abandoned step.

        Returns:
            Whether a checkpoint was written.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as err:
            raise TypeError(f"meta must be JSON-serializable: {err}") from err
        existing = self._manager.all_steps()
        if step in existing:
            return False
        latest = max(existing, default=None)
        if latest is not None and step < latest:
            if not force:
                raise ValueError(
                    f"step {step} is older than the newest checkpoint (step {latest}) in "
                    f"{self.directory}; pass force=True to delete the newer checkpoints and "
                    "save it"
                )
            self.wait()
            for newer in sorted(s for s in existing if s > step):
                self._manager.delete(newer)
        saveable = jax.tree_util.tree_map_with_path(_to_saveable, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(saveable),
            meta=ocp.args.JsonSave(meta),
            layout=ocp.args.JsonSave(_layout(state)),
        )
        # force=True skips orbax's own interval policy, which would drop a step <= its latest.
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Reads checkpoint `step` (the newest by default) into the layout of `abstract_state`.

        Args:
            abstract_state: pytree of `jax.ShapeDtypeStruct` with ``.sharding`` (or of arrays,
                whose shape, dtype and sharding are used), e.g. from `jax.eval_shape` of the state
                initializer with the run's shardings attached. Typed PRNG keys are given by
                their key dtype.
            step: which step; None for the newest.

        Returns:
            ``(state, meta)``: arrays laid out as `abstract_state` asks, and the saved meta dict.

        Raises:
            FileNotFoundError: there is no checkpoint, or none for `step`.
            ValueError: tree paths, shapes or dtypes differ; names the first mismatching path.
        """
        self.wait()
        steps = self._manager.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}"
            )
        saved_layout = self._manager.restore(
            step, args=ocp.args.Composite(layout=ocp.args.JsonRestore())
        )["layout"]
        _check_layout(saved_layout, _layout(abstract_state), step)
        target = jax.tree_util.tree_map_with_path(_to_abstract, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )

        def rewrap(abstract: Any, x: jax.Array) -> jax.Array:
            return jax.random.wrap_key_data(x, dtype=abstract.dtype) if _is_key(abstract) else x

        state = jax.tree.map(rewrap, abstract_state, restored["state"])
        return state, restored["meta"]

    def latest_step(self) -> int | None:
        """The newest saved step (including one still being written by this process), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight is committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a flag that the training loop polls between steps.

    Example::

        with PreemptionGuard() as guard:
            for step in range(start, total):
                state = train_step(state, batch)
                if guard.should_stop(step):
                    ckpt.save(step, state, meta)
                    ckpt.wait()
                    break

    The first signal sets `requested`; later ones print a message and are ignored, so a second
    Ctrl-C cannot interrupt the final save (SIGKILL still can). Save inside the ``with`` block:
    the previous handlers come back on exit.

    Multi-host: hosts receive SIGTERM at different times, and a host that stopped on its own
    would deadlock the others in the next collective. So when `jax.distributed` is initialized
    with several processes, the guard installs no handlers and leaves SIGTERM to jax's
    preemption service; `should_stop(step)` returns True on every host at the same step, the
    one `jax.experimental.multihost_utils.reached_preemption_sync_point` agrees on. That
    function must be called at every step on every host, which `should_stop` does.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        """Prepares the guard; the handlers are installed by ``__enter__``.

        Args:
            signals: the signals that request a stop.
        """
        self.signals = tuple(signals)
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived in this process."""
        return self._requested.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and exit after `step`; call it at every step.

        On a single host this is `requested`. On several hosts it is jax's preemption sync point,
        which all hosts reach at the same step.
        """
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._requested.is_set():
            msg = (
                f"{name} ignored: saving a checkpoint before exiting "
                f"(kill -9 {os.getpid()} to abort)"
            )
        else:
            self._requested.set()
            msg = f"{name} received: stopping after this step"
        # os.write to fd 2, not print: the handler may run while the main thread is inside a
        # print to sys.stderr, and re-entering a buffered stream raises RuntimeError.
        os.write(2, f"\n{msg}\n".encode())

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered from the main thread")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

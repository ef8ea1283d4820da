"""The training loop: sharded jitted steps, validation, samples, checkpoints, metrics.

``train(config, out_dir)`` runs (or, with ``resume=True``, continues) one run:

1. Everything that can be wrong with the config, data and mesh is checked first
   (``ConfigError``), before anything compiles.
2. Parameters are created directly in their shardings (``jax.jit`` with
   ``out_shardings`` over the mesh, under the run's logical-axis rules); optimiser
   moments follow their parameters; recurrent state splits along its batch axis.
3. One jitted step (forward, backward, AdamW update) with the train state donated.
   Metrics stay on the device and are fetched only every ``log_every`` steps.
4. Batches are pure functions of the step number and the RNG is folded with it, so a
   resumed run replays exactly the batches and dropout masks of an uninterrupted one.
5. Every ``eval_every`` steps: validation loss and bits per token (per byte for byte
   data) and a few samples. Every ``save_every`` steps and at the end: an orbax
   checkpoint (asynchronous; a crash mid-write leaves the previous one). SIGTERM or
   Ctrl-C saves a checkpoint and exits.

Shapes: batches hold ``tokens [B, T+1]``, ``loss_mask [B, T]``, ``reset [B]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import sharding as shd
from train.checkpoint import Checkpointer, PreemptionGuard
from train.config import ConfigError, RunConfig, validate
from train.data import StreamBatcher, WindowBatcher, eval_batches, load_corpus
from train.metrics import METRICS_FILE, MetricsWriter, ProgressBar, read_metrics
from train.optim import make_optimizer
from train.tasks import Task, build_task

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Run:
    """Everything built from a config before the first step (no compilation yet)."""

    config: RunConfig
    corpus: Any
    task: Task
    mesh: jax.sharding.Mesh
    rules: Any
    train_batches: Any
    tx: optax.GradientTransformation


def prepare(config: RunConfig) -> Run:
    """Checks the config, loads the data and builds model, mesh and optimiser.

    Raises:
      ConfigError: any problem with the config, the data or the mesh.
    """
    validate(config)
    try:
        corpus = load_corpus(config.data)
    except (FileNotFoundError, ValueError) as e:
        hint = ""
        if "enwik8" in str(config.data.source) and isinstance(e, FileNotFoundError):
            hint = " (download http://mattmahoney.net/dc/enwik8.zip and unzip it there)"
        raise ConfigError(f"data: {e}{hint}") from e
    task = build_task(config.model, corpus.vocab_size)
    mesh = shd.make_mesh(config.mesh)
    shd.check_batch(config.batch_size, mesh)
    shd.check_sequence(config.mesh, mesh, task.seq_len, config.model.heads)
    kind = StreamBatcher if task.stateful else WindowBatcher
    extra = {} if task.stateful else {"seed": config.seed}
    train_batches = kind(
        corpus.train,
        batch_size=config.batch_size,
        seq_len=task.seq_len,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **extra,
    )
    tx = make_optimizer(config.optim, config.steps)
    return Run(config, corpus, task, mesh, shd.rule_set(config.mesh, mesh), train_batches, tx)


class Trainer:
    """Compiled init, train and eval functions for one prepared run."""

    def __init__(self, run: Run):
        self.run = run
        cfg, task, mesh = run.config, run.task, run.mesh
        B, T = cfg.batch_size, task.seq_len
        example = {
            "tokens": jnp.zeros((B, T + 1), jnp.int32),
            "loss_mask": jnp.ones((B, T), bool),
            "reset": jnp.ones((B,), bool),
        }
        self.batch_shardings = {k: shd.batch_sharding(mesh, v.ndim) for k, v in example.items()}
        with self.context():
            boxed = jax.eval_shape(task.init_fn, jax.random.key(0), example)
        if set(boxed) != {"params"}:
            raise ConfigError(f"training supports models with only params, got {sorted(boxed)}")
        params_abstract = nn.meta.unbox(boxed)["params"]
        param_sh = shd.param_shardings(boxed, mesh, run.rules)["params"]
        opt_abstract = jax.eval_shape(run.tx.init, params_abstract)
        opt_sh = shd.like_params(opt_abstract, params_abstract, param_sh, mesh)
        rep = shd.replicated(mesh)
        state_sh = shd.state_shardings(task.init_state, B, mesh) if task.stateful else None
        self.shardings = {
            "step": rep,
            "params": param_sh,
            "opt_state": opt_sh,
            "rng": rep,
            "model_state": state_sh,
        }
        self.example = example

        def init(key):
            params_key, rng = jax.random.split(key)
            params = nn.meta.unbox(task.init_fn(params_key, example))["params"]
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": params,
                "opt_state": run.tx.init(params),
                "rng": rng,
                "model_state": task.init_state(B) if task.stateful else None,
            }

        self._init = jax.jit(init, out_shardings=self.shardings)
        self.abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(init, jax.random.key(0)),
            self.shardings,
        )

        def train_step(ts, batch):
            rng = jax.random.fold_in(ts["rng"], ts["step"])

            def loss_of(params):
                total, count, new_state = task.loss_fn(
                    {"params": params}, batch, ts["model_state"], rng, True
                )
                return total / jnp.maximum(count, 1.0), (new_state, count)

            (loss, (new_state, count)), grads = jax.value_and_grad(loss_of, has_aux=True)(
                ts["params"]
            )
            updates, opt_state = run.tx.update(grads, ts["opt_state"], ts["params"])
            new = {
                "step": ts["step"] + 1,
                "params": optax.apply_updates(ts["params"], updates),
                "opt_state": opt_state,
                "rng": ts["rng"],
                "model_state": new_state,
            }
            metrics = {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}
            return new, metrics

        self._train_step = jax.jit(
            train_step,
            in_shardings=(self.shardings, self.batch_shardings),
            out_shardings=(self.shardings, rep),
            donate_argnums=0,
        )

        def eval_step(params, batch, state):
            return task.loss_fn({"params": params}, batch, state, None, False)

        self._eval_step = jax.jit(
            eval_step,
            in_shardings=(param_sh, self.batch_shardings, state_sh),
            out_shardings=(rep, rep, state_sh),
        )

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules every trace runs under."""
        with jax.set_mesh(self.run.mesh), nn.logical_axis_rules(self.run.rules):
            yield

    def init(self, seed: int) -> dict:
        with self.context():
            return self._init(jax.random.key(seed))

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(v))
            for k, v in local.items()
        }

    def step(self, ts: dict, batch: dict) -> tuple[dict, dict]:
        with self.context():
            return self._train_step(ts, self.global_batch(batch))

    def evaluate(self, params: Any, max_batches: int) -> dict[str, float]:
        """Mean validation loss (nats per token) over up to ``max_batches`` batches."""
        cfg, task = self.run.config, self.run.task
        B, T = cfg.batch_size, task.seq_len
        val = self.run.corpus.val
        if task.stateful:
            stream = StreamBatcher(val, batch_size=B, seq_len=T, loop=False)
            n = min(max_batches, stream.steps_per_epoch)
            batches = (stream.batch(i) for i in range(n))
            with self.context():
                state = jax.jit(
                    task.init_state, static_argnums=0, out_shardings=self.shardings["model_state"]
                )(B)
        else:
            batches = eval_batches(val, batch_size=B, seq_len=T, max_batches=max_batches)
            state = None
        pi, pc = jax.process_index(), jax.process_count()
        total = count = 0.0
        with self.context():
            for batch in batches:
                rows = B // pc
                local = {k: v[pi * rows : (pi + 1) * rows] for k, v in batch.items()}
                s, c, state = self._eval_step(params, self.global_batch(local), state)
                total, count = total + float(s), count + float(c)
        if count == 0:
            return {}
        loss = total / count
        if not task.bits:
            return {"val/loss": loss}
        return {"val/loss": loss, "val/bits_per_token": loss / math.log(2)}


def _bits_name(config: RunConfig) -> str:
    return (
        "val/bpb"
        if config.data.tokenizer == "bytes"
        and config.data.format
        in (
            "auto",
            "bytes",
        )
        and not str(config.data.source).endswith((".npy", ".bin"))
        else "val/bits_per_token"
    )


def train(
    config: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plot: bool = True,
    stop_after: int | None = None,
) -> list[dict]:
    """Trains (or resumes) a run into ``out_dir``.

    Args:
      config: the run's configuration (on resume: the saved one, possibly with a new
        ``steps``).
      out_dir: the run directory (config.json, metrics.jsonl, tb/, checkpoints/,
        loss_curves.png).
      resume: continue from the latest checkpoint in ``out_dir``.
      progress: show the progress bar and samples.
      plot: draw the loss curves at the end.
      stop_after: stop (with a checkpoint) after this many steps in this call, as an
        interruption would; for tests and time-boxed jobs.

    Returns:
      the metric records written in this call.
    """
    out = Path(out_dir)
    run = prepare(config)
    is_main = jax.process_index() == 0
    trainer = Trainer(run)
    ckpt = Checkpointer(out / "checkpoints", keep=config.keep, async_save=config.async_checkpoints)
    accum = config.optim.grad_accum
    total_micro = config.steps * accum
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise ConfigError(f"--resume {out}: no checkpoint in {out / 'checkpoints'}")
        with trainer.context():
            ts, meta = ckpt.restore(trainer.abstract)
        start = int(meta.get("micro_step", latest))
        if is_main:
            _forget_metrics_after(out, start // accum)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if is_main:
            (out / CONFIG_FILE).write_text(config.to_json())
        ts, start = trainer.init(config.seed), 0
    log = _Printer(progress and is_main)
    log(f"data: {run.corpus.describe()}")
    log(shd.describe(run.mesh, run.rules))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract["params"]))
    log(
        f"model: {config.model.family}, {n_params:,} parameters; "
        f"{'resuming at' if resume else 'starting at'} step {start // accum}/{config.steps}"
    )

    tokens_per_step = config.batch_size * run.task.seq_len
    writer = MetricsWriter(out) if is_main else None
    bar = (
        ProgressBar(
            config.steps, start_step=start // accum, tokens_per_step=tokens_per_step * accum
        )
        if progress and is_main
        else None
    )
    records, pending = [], []
    bits_name = _bits_name(config)
    last_time, last_micro = time.perf_counter(), start

    def save(micro: int, force: bool = False):
        meta = {"micro_step": micro, "data_step": micro, "config": config.to_dict()}
        ckpt.save(micro, ts, meta, force=force)

    def evaluate(update: int, samples: bool = True):
        metrics = trainer.evaluate(ts["params"], config.eval_batches)
        if metrics:
            shown = f"step {update}: val loss {metrics['val/loss']:.4f}"
            if "val/bits_per_token" in metrics:
                metrics[bits_name] = metrics.pop("val/bits_per_token")
                shown += f", {bits_name.split('/')[1]} {metrics[bits_name]:.4f}"
            _record(update, metrics)
            log(shown)
        # Every process takes part in sampling (the parameters span all of them); only
        # process 0 prints.
        if samples and config.samples and run.task.sample_fn is not None:
            _print_samples(run, ts["params"], update, config, log)

    def _record(update: int, metrics: dict):
        record = {"step": update, **metrics}
        records.append(record)
        if writer is not None:
            writer.write(update, metrics)

    micro, stopped = start, False
    if start == 0 and config.eval_every:
        evaluate(0, samples=False)  # the untrained baseline of the validation curve
    with PreemptionGuard() as guard:
        while micro < total_micro and not stopped:
            ts, metrics = trainer.step(ts, run.train_batches.batch(micro))
            pending.append(metrics)
            micro += 1
            update, boundary = micro // accum, micro % accum == 0
            last = micro == total_micro
            if boundary and (update % config.log_every == 0 or last):
                fetched = jax.device_get(pending)
                pending = []
                now = time.perf_counter()
                rate = (micro - last_micro) * tokens_per_step / max(now - last_time, 1e-9)
                last_time, last_micro = now, micro
                loss = float(np.mean([m["loss"] for m in fetched]))
                grad_norm = float(np.mean([m["grad_norm"] for m in fetched]))
                _record(
                    update,
                    {"train/loss": loss, "train/grad_norm": grad_norm, "train/tokens_per_s": rate},
                )
                if bar is not None:
                    # Only here: the fetch above waited for the device, so the bar's
                    # clock measures finished steps, not asynchronously dispatched ones.
                    bar.update(update, loss=loss)
            if boundary and (last or (config.eval_every and update % config.eval_every == 0)):
                evaluate(update)
            stopped = guard.should_stop(micro) or (
                stop_after is not None and micro - start >= stop_after
            )
            if (
                last
                or stopped
                or (boundary and config.save_every and update % config.save_every == 0)
            ):
                save(micro, force=last or stopped)
    ckpt.wait()
    ckpt.close()
    if stopped and micro < total_micro and is_main:
        print(
            f"stopped at step {micro // accum}: checkpoint saved, continue with --resume {out}",
            flush=True,
        )
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
        if plot:
            _plot(out, log)
    return records


def _forget_metrics_after(out: Path, update: int) -> None:
    """Drops the metric records a resumed run will write again (those logged after the
    checkpoint it resumes from), so the curves have no duplicated steps."""
    path = out / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(out) if r.get("step", 0) <= update]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _print_samples(run: Run, params: Any, update: int, config: RunConfig, log) -> None:
    corpus, task = run.corpus, run.task
    doc = corpus.val[0] if corpus.val else corpus.train[0]
    P = min(32, task.seq_len // 2, len(doc) - 1)
    for i in range(config.samples):
        start = (i * 9973) % max(len(doc) - P, 1)
        prompt = jnp.asarray(np.asarray(doc[start : start + P], np.int32))[None]
        key = jax.random.fold_in(jax.random.key(config.seed + 1), update * 31 + i)
        with jax.set_mesh(run.mesh):
            tokens = task.sample_fn({"params": params}, prompt, config.sample_len, key)
        text = corpus.decode(np.asarray(prompt[0])) + "\u2502" + corpus.decode(np.asarray(tokens))
        log(f"sample {i + 1} (step {update}):\n    " + text.replace("\n", "\n    "))


def _plot(out: Path, log) -> None:
    from train.plot import plot_runs

    try:
        path = plot_runs([out], out / "loss_curves.png")
        log(f"loss curves: {path}")
    except ValueError as e:  # too few points to draw
        log(f"no loss-curve plot: {e}")


class _Printer:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config saved in a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a run directory)")
    return RunConfig.from_dict(json.loads(path.read_text()))

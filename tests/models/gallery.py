"""Checks shared by the long-context gallery's tests (the common state contract)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def init_variables(model, tokens, seed=0):
    """``model.init`` on ``tokens [B, T]`` from a fresh state: jitted, with an RBG key.

    Run eagerly, init compiles a sampler per parameter shape and dozens of small ops; one
    program with RBG sampling compiles several times faster on CPU.
    """
    init = jax.jit(model.init)
    return init(jax.random.key(seed, impl="rbg"), tokens, state=model.init_state(tokens.shape[0]))


def random_segments(seed, n, seg_len, vocab, batch=2):
    """Token segments ``[n, batch, seg_len]`` from numpy: ``jax.random.randint`` would
    compile a sampler for every shape, about a second each on CPU."""
    tokens = np.random.default_rng(seed).integers(0, vocab, (n, batch, seg_len))
    return jnp.asarray(tokens, jnp.int32)


def counting_step(model, variables):
    """A jitted ``(tokens, state, reset) -> (logits, state)`` that counts its traces."""
    traces = []

    @jax.jit
    def step(tokens, state, reset):
        traces.append(1)
        return model.apply(variables, tokens, state=state, reset=reset)

    step.traces = traces
    return step


def roll(step, model, segments, resets=None):
    """Runs ``segments [n, B, T]`` through ``step`` from a fresh state; logits per segment."""
    state = model.init_state(segments.shape[1])
    outs = []
    for i, seg in enumerate(segments):
        reset = jnp.zeros((seg.shape[0],), bool) if resets is None else resets[i]
        logits, state = step(seg, state, reset)
        outs.append(logits)
    return outs, state


def recall_batches(seed, steps, batch, seg_len, vocab):
    """``steps`` batches of the recall task: segment 1 hides a key token among fillers (0);
    segment 2, a constant "recall" prompt of ones, must repeat it everywhere.

    Drawn with numpy, outside the training step: sampling with jax.random inside the step
    made its compilation seconds longer.

    Returns:
      ``(seg1 [steps, batch, seg_len], keys [steps, batch])`` int32 numpy arrays.
    """
    rng = np.random.default_rng(seed)
    keys = rng.integers(2, vocab, (steps, batch), dtype=np.int32)
    where = rng.integers(0, seg_len, (steps, batch))
    seg1 = np.where(np.arange(seg_len) == where[..., None], keys[..., None], 0)
    return seg1.astype(np.int32), keys


def train_recall(model, *, seg_len, vocab, steps=150, lr=1e-2, batch=16, seed=0):
    """Trains on ``recall_batches`` through two segments, with the state and reset between.

    Gradients flow through the state from segment 2 into segment 1 (where the model
    allows it). Every step's gradients must be finite. One compiled step serves both
    runs (the reset is an argument). The reset baseline cannot know the key whatever it
    trains on, so it runs a third of the steps, on the first batches of the same stream.

    Returns:
      ``(first, with_state, without_state)``: the mean loss of the first 10 steps and
      of the last 10 steps with the state and with the state reset every segment.
    """
    init = init_variables(model, jnp.zeros((batch, seg_len), jnp.int32), seed)["params"]
    opt = optax.adam(lr)
    segments, answers = recall_batches(seed, steps, batch, seg_len, vocab)

    def loss_fn(p, seg1, keys, reset_between):
        _, state = model.apply({"params": p}, seg1, state=model.init_state(batch))
        seg2 = jnp.ones((batch, seg_len), jnp.int32)
        reset = jnp.broadcast_to(reset_between, (batch,))
        logits, _ = model.apply({"params": p}, seg2, state=state, reset=reset)
        targets = jnp.broadcast_to(keys[:, None], seg2.shape)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(p, s, seg1, keys, reset_between):
        loss, g = jax.value_and_grad(loss_fn)(p, seg1, keys, reset_between)
        finite = jax.tree.reduce(lambda a, b: a & jnp.isfinite(b).all(), g, True)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss, finite

    def run(reset_between, n):
        params, opt_state = init, opt.init(init)
        losses = []
        for i in range(n):
            params, opt_state, loss, finite = step(
                params, opt_state, segments[i], answers[i], reset_between
            )
            assert bool(finite), f"non-finite gradient at step {i}"
            losses.append(float(loss))
        return np.mean(losses[:10]), np.mean(losses[-10:])

    first, with_state = run(jnp.bool_(False), steps)
    _, without_state = run(jnp.bool_(True), steps // 3)
    return first, with_state, without_state


def check_state_carries_and_reset_clears(step, model, segments, vocab):
    """Segment 1 reaches segment 2 through the state; a reset row forgets it.

    ``segments [2, 2, T]``. Row 0 is reset before segment 2 and must then match a fresh
    start; row 1 keeps its state. Returns the final state of the reset run.
    """
    other = segments.at[0].set((segments[0] + 5) % vocab)
    base, _ = roll(step, model, segments)
    outs, _ = roll(step, model, other)
    assert not np.allclose(outs[1], base[1], atol=1e-4), "segment 1 must reach segment 2"
    reset = [jnp.zeros((2,), bool), jnp.array([True, False])]
    base_r, state = roll(step, model, segments, reset)
    outs_r, _ = roll(step, model, other, reset)
    np.testing.assert_allclose(outs_r[1][0], base_r[1][0], atol=1e-6)  # row 0 forgot
    assert not np.allclose(outs_r[1][1], base_r[1][1], atol=1e-4)  # row 1 did not
    fresh, _ = step(segments[1], model.init_state(2), jnp.zeros((2,), bool))
    np.testing.assert_allclose(outs_r[1][0], fresh[0], atol=1e-6)  # reset == new document
    return state

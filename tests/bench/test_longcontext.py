"""The long-context benchmark: its tasks are solvable from history and only from history,
its masks score answers only, and a tiny run writes a deterministic report.

The oracles below read the token stream directly (no model): one sees the whole history,
one only the segment that holds the answer. The first must be perfect, the second at
chance wherever the evidence lies in an earlier segment; that is what makes a model's
accuracy beyond its window a measure of memory.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from bench.longcontext import models as M
from bench.longcontext import runner as R
from bench.longcontext import tasks as T
from bench.longcontext.__main__ import configure, parse_args, run
from bench.longcontext.presets import TINY

SIZES = T.TaskSizes(
    segments=5,
    segment_len=32,
    pairs=4,
    copy_len=3,
    chains=3,
    num_entities=48,
    distances=(0, 1, 2, 4),
    hops=(1, 2, 3),
)
ROWS = 256


def _visible(t: int, S: int, history: bool) -> int:
    """First position an oracle answering at ``t`` may read."""
    return 0 if history else (t // S) * S


def _mqar_oracle(tokens, t, lo, sizes, rng):
    key = tokens[t]
    earlier = [p for p in range(lo, t) if tokens[p] == key]
    return tokens[earlier[-1] + 1] if earlier else rng.choice(sizes.values)


def _copy_oracle(tokens, t, lo, sizes, rng):
    marker = max(p for p in range(t + 1) if tokens[p] == T.COPY)
    content = [x for x in tokens[lo:marker] if x in set(sizes.values)]
    j = t - marker
    return content[j] if len(content) == sizes.copy_len else rng.choice(sizes.values)


def _multihop_oracle(tokens, t, lo, sizes, rng):
    entities = set(sizes.entities)
    nxt = {
        tokens[p]: tokens[p + 1]
        for p in range(lo, t - 1)
        if tokens[p] in entities
        and tokens[p + 1] in entities
        and (p == 0 or tokens[p - 1] != T.QUERY)
    }
    x, steps = tokens[t], 0
    while x in nxt and steps < max(sizes.hops):
        x, steps = nxt[x], steps + 1
    return x if steps else rng.choice(sizes.entities)


ORACLES = {"mqar": _mqar_oracle, "copy": _copy_oracle, "multihop": _multihop_oracle}


def _oracle_accuracy(task, history):
    batch = T.GENERATORS[task](SIZES, 3, 0, ROWS)
    rng = np.random.default_rng(0)
    groups = R._group_count(task, SIZES)
    hits, counts = np.zeros(groups), np.zeros(groups)
    for b in range(ROWS):
        row = batch.tokens[b]
        for t in np.flatnonzero(batch.score[b]):
            lo = _visible(t, SIZES.segment_len, history)
            guess = ORACLES[task](row, t, lo, SIZES, rng)
            g = batch.group[b, t]
            hits[g] += guess == row[t + 1]
            counts[g] += 1
    assert counts.min() > 0, f"{task}: a group got no answers in {ROWS} rows"
    return hits / counts, counts


def _in_last_segment_only(task, g):
    """Whether group g's evidence all lies in the answer's own segment."""
    if task == "multihop":
        h, d = SIZES.multihop_cells()[g]
        return d == 0 and h == 1
    return SIZES.distances[g] == 0


@pytest.mark.parametrize("task", T.SYNTHETIC)
def test_a_history_oracle_is_perfect(task):
    acc, _ = _oracle_accuracy(task, history=True)
    np.testing.assert_array_equal(acc, 1.0)


@pytest.mark.parametrize("task", T.SYNTHETIC)
def test_a_current_segment_oracle_is_at_chance_beyond_the_segment(task):
    acc, counts = _oracle_accuracy(task, history=False)
    chance = SIZES.chance(task)
    for g, (a, n) in enumerate(zip(acc, counts, strict=True)):
        if _in_last_segment_only(task, g):
            assert a == 1.0, (task, g, a)
        else:
            # Four binomial standard deviations above chance.
            bound = chance + 4 * np.sqrt(chance * (1 - chance) / n)
            assert a <= bound, (task, g, a, bound)


@pytest.mark.parametrize("task", T.SYNTHETIC)
def test_only_answers_are_scored_and_every_answer_has_a_group(task):
    batch = T.GENERATORS[task](SIZES, 5, 1, 64)
    targets = batch.tokens[:, 1:]
    answers = SIZES.entities if task == "multihop" else SIZES.values
    assert np.isin(targets[batch.score], answers).all()
    assert ((batch.group >= 0) == batch.score).all()
    per_row = {"mqar": SIZES.pairs, "copy": SIZES.copy_len, "multihop": SIZES.chains}[task]
    np.testing.assert_array_equal(batch.score.sum(1), per_row)
    # The answers all lie in the last segment (where a reset baseline cuts the history).
    assert not batch.score[:, : (SIZES.segments - 1) * SIZES.segment_len].any()


def test_generators_are_pure_functions_of_seed_and_index():
    a = T.mqar(SIZES, 1, 7, 8)
    b = T.mqar(SIZES, 1, 7, 8)
    c = T.mqar(SIZES, 1, 8, 8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_bad_task_sizes_are_named():
    with pytest.raises(ValueError, match="distances"):
        T.TaskSizes(segments=2, segment_len=32, distances=(0, 2))
    with pytest.raises(ValueError, match="mqar needs 8 positions"):
        T.TaskSizes(segments=2, segment_len=8, pairs=4, distances=(0, 1))
    with pytest.raises(SystemExit, match="families"):
        configure(parse_args(["--preset", "tiny", "--families", "plain,nope"]))


def test_budget_matching_keeps_every_family_within_ten_percent():
    budget = M.Budget(dim=64, depth=2, heads=4, segment_len=32, segments=5)
    target = M.parameter_count(M.build("plain", budget))
    for name in M.FAMILIES:
        count = M.parameter_count(M.match_budget(name, budget, target))
        assert abs(count - target) <= 0.1 * target, (name, count, target)


def test_resets_cut_the_history_of_every_family():
    """With a reset before the last segment, the last segment's logits do not depend on
    the tokens before it (for every family, including the one-call ones)."""
    budget = dataclasses.replace(TINY.budget, depth=1)
    rng = np.random.default_rng(0)
    a = rng.integers(1, 256, (2, budget.length))
    b = a.copy()
    b[:, : -budget.segment_len] = rng.integers(1, 256, (2, budget.length - budget.segment_len))
    resets = np.zeros((budget.segments, 2), bool)
    resets[-1] = True
    S = budget.segment_len
    for name in M.FAMILIES:
        fam = M.build(name, budget)
        params = fam.init(jax.random.key(0), 2)
        logits = jax.jit(fam.logits)
        la = np.asarray(logits(params, a, resets))[:, -S:]
        lb = np.asarray(logits(params, b, resets))[:, -S:]
        np.testing.assert_allclose(la, lb, atol=1e-5, err_msg=name)
        if name != "plain":  # without the reset the history does matter
            lc = np.asarray(logits(params, b, np.zeros_like(resets)))[:, -S:]
            assert not np.allclose(la, lc, atol=1e-5), name


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny run of two families on two tasks with the speed sweep, and a second run of
    its recurrent-family cell alone (same seed) to compare with."""
    args = parse_args(["--preset", "tiny", "--families", "plain,rmt", "--tasks", "mqar,lm"])
    preset = dataclasses.replace(
        configure(args), speed=dataclasses.replace(TINY.speed, lengths=(32,))
    )
    again = dataclasses.replace(preset, families=("rmt",), tasks=("mqar",), speed=None)
    outs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    results = [
        run(p, seed=0, out=str(o), log=lambda s: None)
        for p, o in zip((preset, again), outs, strict=True)
    ]
    return outs, results


def test_a_tiny_run_writes_the_report_and_plots(tiny_runs):
    outs, results = tiny_runs
    out = outs[0]
    for name in ("results.json", "results.md", "accuracy_mqar.png", "lm_history.png", "speed.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert {c["family"] for c in saved["cells"]} == {"plain", "rmt"}
    assert {c["task"] for c in saved["cells"]} == {"mqar", "lm"}
    md = (out / "results.md").read_text()
    assert "RecurrentMemoryTransformer" in md and "d=2" in md and "history 2" in md
    mqar = next(c for c in saved["cells"] if c["task"] == "mqar")
    assert len(mqar["accuracy"]) == len(mqar["reset_accuracy"]) == len(TINY.sizes.distances)
    assert set(saved["speed"]) == {"plain", "rmt"}


def test_a_seeded_run_is_deterministic(tiny_runs):
    _, (a, b) = tiny_runs
    (cb,) = b["cells"]
    ca = next(c for c in a["cells"] if (c["family"], c["task"]) == ("rmt", "mqar"))
    assert ca["losses"] == cb["losses"]
    assert ca["accuracy"] == cb["accuracy"] and ca["reset_accuracy"] == cb["reset_accuracy"]


def test_the_rmt_curriculum_splits_the_stream_steps_over_lengths():
    budget = M.Budget(dim=16, depth=1, heads=2, segment_len=32, segments=5, rmt_curriculum=True)
    fam = M.build("rmt", budget)
    assert fam.curriculum == (2,) and "curriculum" in fam.reach
    sizes = T.TaskSizes(segments=5, segment_len=32, pairs=4, distances=(0, 1, 2, 4))
    (n1, short), (n2, full) = R.stream_stages(fam, sizes, 301)
    assert (n1, n2) == (150, 151) and full == sizes
    assert short.segments == 2 and short.distances == (0, 1)
    assert M.build("plain", budget).curriculum == ()
    assert R.stream_stages(M.build("plain", budget), sizes, 301) == [(301, sizes)]


def test_the_recipe_flag_switches_the_gallery_models_to_the_papers_blocks():
    preset = configure(parse_args(["--preset", "tiny", "--recipe", "paper"]))
    xl = M.build("transformer_xl", preset.budget).config
    assert (xl["position"], xl["ff_activation"], xl["emb_scale"]) == ("relative", "relu", True)
    assert M.build("rmt", preset.budget).config["position"] == "sinusoidal"
    default = M.build("longformer", configure(parse_args(["--preset", "tiny"])).budget).config
    assert default["position"] == "rotary"

"""The trainer on toy objectives: which parameters decay and train, gradient accumulation, the non-finite guard, the
schedule, and the metrics it writes. fp32."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zebrax import data
from zebrax.distill.trainer import TrainConfig, TrainingDiverged, make_optimizer, make_step, train
from zebrax.errors import ZebraxError

PARAMS = {"layers_0": {"mixer": {"A_log": jnp.ones(3), "D": jnp.ones(3), "dt_bias": jnp.ones(3),
                                 "in_proj": {"kernel": jnp.ones((2, 3))}},
                       "input_layernorm": {"scale": jnp.ones(2)}},
          "lm_head": {"kernel": jnp.ones((2, 3))}}


def fresh(params):
    """A copy for a step, which donates (consumes) the parameters it is given."""
    return jax.tree.map(jnp.copy, params)


def no_gradient(params, frozen, batch):
    return 0.0 * sum(jnp.sum(p) for p in jax.tree.leaves(params)), {}


def changed(before, after) -> set[str]:
    flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(t)}  # noqa: E731
    b, a = flat(before), flat(after)
    return {k for k in b if not np.array_equal(b[k], a[k])}


def test_weight_decay_spares_ssm_parameters_and_norms():
    cfg = TrainConfig(steps=2, learning_rate=0.1, warmup_ratio=0.0, final_lr_ratio=1.0, weight_decay=0.5)
    opt = make_optimizer(cfg, PARAMS)
    params, _, _ = make_step(no_gradient, opt)(fresh(PARAMS), opt.init(PARAMS), None, {"x": jnp.zeros((1, 1))})
    assert changed(PARAMS, params) == {"['layers_0']['mixer']['in_proj']['kernel']", "['lm_head']['kernel']"}


def test_only_trainable_patterns_are_updated():
    def pull(params, frozen, batch):  # every parameter has a gradient
        return sum(jnp.sum((p - 2.0) ** 2) for p in jax.tree.leaves(params)), {}

    cfg = TrainConfig(steps=2, learning_rate=0.1, trainable=("layers_*/mixer/*",))
    opt = make_optimizer(cfg, PARAMS)
    params, _, _ = make_step(pull, opt)(fresh(PARAMS), opt.init(PARAMS), None, {"x": jnp.zeros((1, 1))})
    assert all(k.startswith("['layers_0']['mixer']") for k in changed(PARAMS, params))
    assert len(changed(PARAMS, params)) == 4
    with pytest.raises(ZebraxError, match=r"trainable=\['mlp/\*'\] matches no parameter \(paths look like"):
        make_optimizer(TrainConfig(trainable=("mlp/*",)), PARAMS)


def test_accumulated_micro_batches_give_the_full_batch_update(rng):
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8,)), jnp.float32)

    def mse(params, frozen, batch):
        loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
        return loss, {"mse": loss}

    params = {"w": jnp.zeros(3)}
    results = []
    for accumulate in (1, 4):
        cfg = TrainConfig(steps=3, batch_size=8, accumulate=accumulate, learning_rate=0.1, warmup_ratio=0.0)
        opt = make_optimizer(cfg, params)
        step, state, p = make_step(mse, opt, accumulate), opt.init(params), fresh(params)
        for _ in range(3):
            p, state, metrics = step(p, state, None, {"x": x, "y": y})
        results.append((np.asarray(p["w"]), float(metrics["loss"])))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    def sometimes_nan(params, frozen, batch):
        loss = jnp.sum(params["w"] ** 2) * jnp.where(batch["bad"][0, 0], jnp.nan, 1.0)
        return loss, {}

    params = {"w": jnp.ones(2)}
    cfg = TrainConfig(steps=10, batch_size=1, learning_rate=0.1, max_bad_steps=3, log_every=1)
    opt = make_optimizer(cfg, params)
    step = make_step(sometimes_nan, opt)
    after, _, metrics = step(fresh(params), opt.init(params), None, {"bad": jnp.ones((1, 1), bool)})
    assert not bool(metrics["finite"])
    np.testing.assert_array_equal(np.asarray(after["w"]), np.ones(2))  # skipped: nothing moved
    rows = {"bad": np.array([[False], [True], [True], [True]])}
    it = data.batches(rows, 1, seed=0)
    with pytest.raises(TrainingDiverged, match=r"toy: 3 steps in a row had a non-finite loss or gradient"):
        train("toy", sometimes_nan, params, None, it, cfg, tmp_path, tokens_of=lambda b: 1)
    # counted on the device and read every log_every steps: a run of bad steps is seen at the next log, not before
    later = dataclasses.replace(cfg, log_every=5)
    with pytest.raises(TrainingDiverged, match=r"toy: 5 steps in a row .* \(seen at step 5\)"):
        train("toy", sometimes_nan, params, None, data.batches({"bad": np.ones((4, 1), bool)}, 1, seed=0), later,
              tmp_path / "later", tokens_of=lambda b: 1)


def test_a_stage_that_ends_in_skipped_steps_is_not_finished(tmp_path):
    """Two steps, the last non-finite: fewer than max_bad_steps in a row, but the stage's last update was skipped, so
    it ends in a TrainingDiverged, not a finished stage (whose evaluation would read nan)."""
    def last_nan(params, frozen, batch):
        return jnp.sum(params["w"] ** 2) * jnp.where(batch["bad"][0, 0], jnp.nan, 1.0), {}

    params = {"w": jnp.ones(2)}
    cfg = TrainConfig(steps=2, batch_size=2, learning_rate=0.1, max_bad_steps=5, log_every=1)
    rows = {"bad": np.array([[False], [True]])}

    class Ordered:  # step 1 the good row, step 2 the bad one
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            return {"bad": rows["bad"][self.i - 1:self.i].repeat(2, axis=0)}

        def get_state(self):
            return {"i": self.i}

    with pytest.raises(TrainingDiverged, match=r"toy: its last 1 step had a non-finite loss .* not finished"):
        train("toy", last_nan, params, None, Ordered(), cfg, tmp_path, tokens_of=lambda b: 1)
    assert train("toy", last_nan, params, None, Ordered(), dataclasses.replace(cfg, steps=1), tmp_path / "one",
                 tokens_of=lambda b: 1)["w"].shape == (2,)


def test_metrics_lines_and_the_schedule(tmp_path):
    def quad(params, frozen, batch):
        loss = jnp.sum((params["w"] - 1.0) ** 2)
        return loss, {"quad": loss}

    cfg = TrainConfig(steps=20, batch_size=2, learning_rate=0.1, warmup_ratio=0.25, log_every=5,
                      checkpoint_every=10, keep_checkpoints=5)
    it = data.batches({"x": np.zeros((4, 1))}, 2, seed=0)
    train("toy", quad, {"w": jnp.zeros(3)}, None, it, cfg, tmp_path, tokens_of=lambda b: 2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    assert all({"step", "stage", "loss", "tokens_per_sec", "lr", "grad_norm", "quad"} <= r.keys() for r in lines)
    assert lines[0]["lr"] == pytest.approx(0.1 * 4 / 5)  # step 5 uses the schedule's 5th value: warmup 5 steps
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (tmp_path / "tensorboard" / "toy").is_dir()
    # every checkpoint_every steps before the last, and no other (kept: up to 5); the last is the caller's to save
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "toy").iterdir()) == ["10"]


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
def test_the_step_compiles_once_whatever_its_inputs_placement(tmp_path, caplog, committed):
    """Parameters and a frozen tree as a pipeline hands them over (loaded from a checkpoint: committed to the device)
    or not: the step's inputs are placed alike from the first step on, so the second step does not compile again
    (it did when the frozen tree was committed: a second whole compile of every stage)."""
    def close(params, frozen, batch):
        loss = jnp.sum((params["w"] - frozen["t"]) ** 2)
        return loss, {}

    place = (lambda t: jax.device_put(t, jax.devices()[0])) if committed else (lambda t: t)  # noqa: E731
    params, frozen = place({"w": jnp.zeros(3)}), place({"t": jnp.ones(3)})
    cfg = TrainConfig(steps=4, batch_size=2, learning_rate=0.1, log_every=2, checkpoint_every=10)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        out = train("toy", close, params, frozen, data.batches({"x": np.zeros((4, 1))}, 2, seed=0), cfg, tmp_path,
                    tokens_of=lambda b: 2)
    assert sum("Compiling jit(step)" in r.getMessage() for r in caplog.records) == 1
    assert float(out["w"][0]) > 0 and float(params["w"][0]) == 0.0  # trained; the caller's parameters kept


def test_a_stage_whose_first_logged_steps_count_no_token_stops(tmp_path):
    """Rows whose loss masks are empty (chat replies cut off by seq_len) train on nothing: loss 0, no gradient. The
    stage stops after its first log_every steps naming the cause, before a loss of 0 is logged; one counted token in
    that span is enough to go on."""
    def quad(params, frozen, batch):
        loss = jnp.sum((params["w"] - 1.0) ** 2)
        return loss, {}

    empty = {"tokens": np.ones((4, 6), np.int32), "token_mask": np.ones((4, 6), bool),
             "loss_mask": np.zeros((4, 6), bool)}
    cfg = TrainConfig(steps=6, batch_size=2, learning_rate=0.1, log_every=3, checkpoint_every=10)
    count = lambda b: int(data.counted(b).sum())  # noqa: E731
    with pytest.raises(ZebraxError, match=r"toy: steps 1-3 counted no token \(every batch's loss mask is empty: the "
                                          r"replies cut off by rows of 6 tokens"):
        train("toy", quad, {"w": jnp.zeros(3)}, None, data.batches(empty, 2, seed=0), cfg, tmp_path / "a",
              tokens_of=lambda b: 12, counted_of=count)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    one = {**empty, "loss_mask": empty["loss_mask"].copy()}
    one["loss_mask"][2, 0] = True  # one row predicts one token; the first two batches hold every row
    train("toy", quad, {"w": jnp.zeros(3)}, None, data.batches(one, 2, seed=0), cfg, tmp_path / "b",
          tokens_of=lambda b: 12, counted_of=count)
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [3, 6]


@pytest.mark.parametrize("field, value, message", [
    ("steps", "10", r"TrainConfig.steps = '10': expected an integer >= 1"),
    ("steps", 2.0, r"TrainConfig.steps = 2.0: expected an integer >= 1"),
    ("learning_rate", 0.0, r"TrainConfig.learning_rate = 0.0: expected a number in \(0, inf\)"),
    ("warmup_ratio", 1.5, r"TrainConfig.warmup_ratio = 1.5: expected a number in \[0, 1\]"),
    ("b2", 1.0, r"TrainConfig.b2 = 1.0: expected a number in \[0, 1\)"),
    ("trainable", "layers_*", r"TrainConfig.trainable = 'layers_\*': expected a tuple of strings"),
    ("accumulate", 3, r"TrainConfig.accumulate = 3: must divide TrainConfig.batch_size = 8"),
])
def test_train_config_fields_are_checked_naming_field_and_value(field, value, message):
    with pytest.raises(ZebraxError, match=message):
        TrainConfig(**{field: value})

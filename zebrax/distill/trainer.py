"""The trainer: one stage's loop — batches → one jitted step → optax update → metrics and checkpoints —
resumable at any checkpointed step with the numbers an uninterrupted run would give.

An *objective* is ``objective(params, frozen, batch) -> (loss, metrics)``: ``params`` the trained tree, ``frozen``
what the step reads but never differentiates (the teacher, DPO's reference), ``batch`` a dict of ``[B, …]`` arrays.
The step accumulates gradients over ``accumulate`` micro-batches (a ``lax.scan``), clips by global norm, applies
AdamW (warmup then cosine; no weight decay on ``A_log``, ``D``, ``dt_bias`` and norms; parameters outside
``trainable`` get no update), and skips any update whose loss or gradient is not finite.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zebrax import files
from zebrax.errors import ConfigError, ZebraxError

NO_DECAY = ("A_log", "D", "dt_bias")  # and every norm's scale (a path part containing "norm")


class TrainingDiverged(ZebraxError):
    """Too many steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One stage's training. ``batch_size`` sequences per optimizer step, in ``accumulate`` micro-batches;
    ``trainable``: glob patterns over parameter paths (``layers_3/mixer/*``), default everything as in the paper."""

    steps: int = 100
    batch_size: int = 8
    accumulate: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.01
    final_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    max_grad_norm: float = 1.0
    trainable: tuple[str, ...] = ("*",)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5

    def __post_init__(self):
        field = lambda name: f"TrainConfig.{name}"  # noqa: E731
        for name in ("steps", "batch_size", "accumulate", "log_every", "checkpoint_every", "keep_checkpoints",
                     "max_bad_steps"):
            check_int(field(name), getattr(self, name), 1)
        if self.batch_size % self.accumulate:
            raise ConfigError(f"TrainConfig.accumulate = {self.accumulate!r}: must divide TrainConfig.batch_size = "
                              f"{self.batch_size!r} (micro-batches of equal size)")
        check_number(field("learning_rate"), self.learning_rate, 0.0, open_low=True)
        for name in ("warmup_ratio", "final_lr_ratio"):
            check_number(field(name), getattr(self, name), 0.0, 1.0)
        check_number(field("weight_decay"), self.weight_decay, 0.0)
        for name in ("b1", "b2"):
            check_number(field(name), getattr(self, name), 0.0, 1.0, open_high=True)
        check_number(field("max_grad_norm"), self.max_grad_norm, 0.0, open_low=True)
        check_strings(field("trainable"), self.trainable)

    def schedule(self) -> optax.Schedule:
        warmup = round(self.warmup_ratio * self.steps)
        return optax.warmup_cosine_decay_schedule(0.0, self.learning_rate, warmup, max(self.steps, warmup + 1),
                                                  end_value=self.learning_rate * self.final_lr_ratio)


def check_int(where: str, value, minimum: int) -> None:
    """ConfigError naming ``where`` and ``value`` unless it is an integer (not a bool) >= ``minimum``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ConfigError(f"{where} = {value!r}: expected an integer >= {minimum}")


def check_number(where: str, value, low: float, high: float = math.inf, *, open_low: bool = False,
                 open_high: bool = False) -> None:
    """ConfigError naming ``where`` and ``value`` unless it is a real number (int or float, not a bool) in the
    interval from ``low`` to ``high`` (closed unless ``open_low`` / ``open_high``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not (number and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
        raise ConfigError(f"{where} = {value!r}: expected a number in {bounds}")


def check_choice(where: str, value, choices: tuple) -> None:
    if not (isinstance(value, str) and value in choices):
        raise ConfigError(f"{where} = {value!r}: expected one of {', '.join(map(repr, choices))}")


def check_strings(where: str, value, *, empty: bool = False) -> None:
    """A tuple (or list) of non-empty strings, non-empty itself unless ``empty``: a lone string is refused (a tuple
    of its characters is not what was meant)."""
    if not (isinstance(value, (tuple, list)) and (empty or value)
            and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"{where} = {value!r}: expected a tuple of strings, e.g. ('a',)")


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


def _labels(params: dict, patterns: tuple[str, ...]) -> dict:
    labels = jax.tree.map_with_path(
        lambda keys, _: "train" if any(fnmatch.fnmatchcase(_path(keys), p) for p in patterns) else "freeze", params)
    if "train" not in jax.tree.leaves(labels):
        raise ZebraxError(f"trainable={list(patterns)} matches no parameter (paths look like "
                          f"{_path(jax.tree.leaves_with_path(params)[0][0])!r})")
    return labels


def _decays(params: dict) -> dict:
    def decays(keys, _):
        parts = _path(keys).split("/")
        return not (set(parts) & set(NO_DECAY) or any("norm" in p for p in parts))
    return jax.tree.map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig, params: dict) -> optax.GradientTransformation:
    adamw = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                        optax.adamw(cfg.schedule(), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay,
                                    mask=_decays(params)))
    return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, _labels(params, cfg.trainable))


def make_step(objective: Callable, optimizer: optax.GradientTransformation, accumulate: int = 1,
              shardings: tuple | None = None) -> Callable:
    """``step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)`` (``jitted_step``, run, and
    ``step.lower``-ed, with the shardings' mesh set)."""
    jitted = jitted_step(objective, optimizer, accumulate, shardings)
    if shardings is None:
        return jitted
    mesh = jax.tree.leaves(shardings[0])[0].mesh

    def sharded_step(*args):
        with jax.set_mesh(mesh):  # the ops then run Pallas kernels on each device's shard (ops.sharded.per_shard)
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    sharded_step.lower = lower
    return sharded_step


def jitted_step(objective: Callable, optimizer: optax.GradientTransformation, accumulate: int = 1,
                shardings: tuple | None = None):
    """The training step, ``jax.jit``-ed: ``step(params, opt_state, frozen, batch) -> (params, opt_state, metrics)``;
    ``metrics`` holds the objective's, ``loss``, ``grad_norm`` and ``finite`` (False: the update was skipped).
    ``params`` and ``opt_state`` are donated: the arrays passed in are consumed (updated in place where the backend
    can). ``shardings``: (params, optimizer state, frozen, metrics) ``NamedSharding`` trees for ``jax.jit`` (call
    it with their mesh set); the batch keeps the sharding it arrives with. ``zebrax.app.aot`` compiles this function."""
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    like_params = (lambda tree: tree) if shardings is None else (  # noqa: E731
        lambda tree: jax.lax.with_sharding_constraint(tree, shardings[0]))

    def step(params, opt_state, frozen, batch):
        # micro-batch j holds rows j, j + accumulate, …: each device's rows stay on it, a share of every micro-batch
        # (a contiguous split would put whole micro-batches on single devices, and the scan would gather them)
        micro = jax.tree.map(lambda x: x.reshape(-1, accumulate, *x.shape[1:]).swapaxes(0, 1), batch)

        def one(total, mb):
            (loss, metrics), grads = grad_fn(params, frozen, mb)
            return like_params(jax.tree.map(jnp.add, total, grads)), (loss, metrics)

        zeros = like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))  # sharded as params
        grads, (losses, metrics) = jax.lax.scan(one, zeros, micro)
        grads = jax.tree.map(lambda g, p: (g / accumulate).astype(p.dtype), grads, params)
        loss, grad_norm = jnp.mean(losses), optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_state = optimizer.update(grads, opt_state, params)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, optax.apply_updates(params, updates), params)
        metrics = {k: jnp.mean(v) for k, v in metrics.items()}
        return new_params, jax.tree.map(keep, new_state, opt_state), {
            **metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite}

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    p_sh, o_sh, f_sh, m_sh = shardings
    return jax.jit(step, in_shardings=(p_sh, o_sh, f_sh, None), out_shardings=(p_sh, o_sh, m_sh),
                   donate_argnums=(0, 1))


class MetricsLog:
    """``WORKDIR/metrics.jsonl`` (one object a line: ``step``, ``stage``, ``loss``, ``tokens_per_sec``, ``lr``, …)
    and TensorBoard event files in ``WORKDIR/tensorboard/STAGE``. Resuming at step s drops the lines of this stage
    after s, so the log reads as one uninterrupted run."""

    def __init__(self, workdir, stage: str, resumed_at: int):
        self.path, self.stage = workdir / "metrics.jsonl", stage
        self.writes = jax.process_index() == 0  # one log for a multi-host run
        if not self.writes:
            return
        self.lines = []  # on an object store, which cannot append: the whole file, rewritten at each log
        if self.path.exists():
            rows = [(line, json.loads(line)) for line in self.path.read_text().splitlines()]
            self.lines = [line for line, row in rows if not (row["stage"] == stage and row["step"] > resumed_at)]
            self.path.write_text("".join(line + "\n" for line in self.lines))
        from tensorboardX import SummaryWriter

        self.board = SummaryWriter(str(workdir / "tensorboard" / stage), purge_step=resumed_at + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.writes:
            return
        row = {"step": step, "stage": self.stage, **{k: _plain(v) for k, v in values.items()}}
        if files.is_local(self.path):
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self.lines.append(json.dumps(row))
            self.path.write_text("".join(line + "\n" for line in self.lines))
        for k, v in row.items():
            if isinstance(v, float):
                self.board.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writes:
            self.board.close()


def _plain(v):
    v = np.asarray(v)
    return bool(v) if v.dtype == bool else int(v) if v.dtype.kind in "iu" else round(float(v), 6)


def state_shardings(optimizer: optax.GradientTransformation, params, p_sh, mesh):
    """The optimizer state's ``NamedSharding``s: each moment sharded as the parameter it mirrors (``params``: arrays
    or ``ShapeDtypeStruct``s, ``p_sh`` their shardings), counts and other scalars replicated."""
    from zebrax.sharding import replicated

    return optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), p_sh,
                                 transform_non_params=lambda _: replicated(mesh))


def placed_step(optimizer, params, frozen, accumulate: int, objective: Callable, mesh, shardings):
    """(params, opt_state, frozen, step, batch placement): on the default device, or over ``mesh`` with
    ``shardings`` = (params', frozen's) and the optimizer state sharded as the parameters it mirrors."""
    from zebrax.sharding import global_batch, on_device, place, replicated

    if mesh is None:  # placed as the step's outputs are from the first step, or the second would compile it again
        params = on_device(params, copy=True)  # a copy: the step donates its inputs, the caller keeps ``params``
        return (params, on_device(optimizer.init(params)), on_device(frozen),
                make_step(objective, optimizer, accumulate), lambda b: b)

    p_sh, f_sh = shardings
    params = place(params, p_sh)  # a copy: the step donates its inputs, the caller keeps ``params``
    frozen = None if frozen is None else place(frozen, f_sh)
    o_sh = state_shardings(optimizer, params, p_sh, mesh)
    step = make_step(objective, optimizer, accumulate, (p_sh, o_sh, f_sh, replicated(mesh)))
    return params, jax.jit(optimizer.init, out_shardings=o_sh)(params), frozen, step, lambda b: global_batch(b, mesh)


def train(stage: str, objective: Callable, params: dict, frozen, data, cfg: TrainConfig, workdir: Path,
          *, tokens_of: Callable[[dict], int], counted_of: Callable[[dict], int] | None = None, mesh=None,
          shardings: tuple | None = None) -> dict:
    """Run ``stage`` to ``cfg.steps`` from its latest complete checkpoint in ``WORKDIR/checkpoints/STAGE`` (or from
    ``params``); returns the trained parameters. Checkpoints are written every ``cfg.checkpoint_every`` steps before
    the last: what this returns is the caller's to save (a stage's output), and a run stopped before it is saved
    resumes from the last checkpoint. ``data`` is a grain iterator of this process's rows (its state is
    checkpointed); ``tokens_of(batch)`` counts a batch's real tokens for tokens/s; ``counted_of(batch)``, the tokens
    its loss counts: when this run's first ``log_every`` steps count none, the stage stops with a ZebraxError before
    it logs them (a loss of 0 and no gradient are no training). With a ``mesh``, ``shardings`` =
    (the parameters', the frozen tree's): the step runs sharded, batches are spread over (data, fsdp), and
    checkpoints are restored straight into their shardings. In a multi-host run every process calls this with its
    own rows; process 0 writes the metrics, and the data position saved is process 0's (every process has taken
    the same number of batches). A stage whose last steps were all skipped (non-finite) is not finished: a
    ``TrainingDiverged``, however few they were."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    workdir = files.as_path(workdir)
    optimizer = make_optimizer(cfg, params)
    params, opt_state, frozen, step_fn, place = placed_step(optimizer, params, frozen, cfg.accumulate, objective,
                                                            mesh, shardings)
    state = {"params": params, "opt_state": opt_state}
    manager = ocp.CheckpointManager(
        workdir / "checkpoints" / stage,
        # every checkpoint_every steps before the last: not orbax's default save of the first step too, nor the
        # last (each a whole copy of the parameters and optimizer state, written while training runs; the last is
        # what the caller saves as the stage's output, and a finished stage's checkpoints are dropped)
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                             should_save_fn=lambda step, _: (step % cfg.checkpoint_every == 0
                                                                             and step < cfg.steps),
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=not files.is_local(workdir)))
    start = manager.latest_step() or 0
    if start:
        restored = manager.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                                  data=ocp.args.JsonRestore()))
        state = restored.state
        data.set_state(restored.data)
    log = MetricsLog(workdir, stage, start)
    schedule = cfg.schedule()
    bad = worst = jnp.zeros((), jnp.int32)  # non-finite steps in a row now, and the longest such run since the log
    tokens, since = 0, time.perf_counter()
    counted = None if counted_of is None else 0  # the loss's tokens in this run's first log_every steps
    bar = tqdm(total=cfg.steps, initial=start, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=jax.process_index() != 0)
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(data)
            tokens += tokens_of(batch)
            if counted is not None:
                counted += counted_of(batch)
            state["params"], state["opt_state"], metrics = step_fn(state["params"], state["opt_state"], frozen,
                                                                   place(batch))
            # counted on the device and read with the metrics: no host sync a step (the next batch overlaps it)
            bad = jnp.where(metrics["finite"], 0, bad + 1)
            worst = jnp.maximum(worst, bad)
            if counted is not None and step - start == min(cfg.log_every, cfg.steps - start):
                if counted == 0:
                    length = next(v for v in batch.values() if np.ndim(v) == 2).shape[1]
                    raise ZebraxError(f"{stage}: steps {start + 1}-{step} counted no token (every batch's loss "
                                      f"mask is empty: the replies cut off by rows of {length} tokens, or records "
                                      f"without reply tokens); raise distill.seq_len or check the data")
                counted = None  # checked once
            if step % cfg.log_every == 0 or step == cfg.steps:
                if int(worst) >= cfg.max_bad_steps:
                    raise TrainingDiverged(f"{stage}: {int(worst)} steps in a row had a non-finite loss or gradient "
                                           f"(seen at step {step}); lower {stage}.learning_rate or check the data")
                elapsed = time.perf_counter() - since
                values = {**metrics, "tokens_per_sec": tokens / elapsed, "lr": schedule(step - 1),
                          "skipped_steps_in_a_row": bad}
                log.write(step, values)
                worst = bad
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{tokens / elapsed:.0f}")
                tokens, since = 0, time.perf_counter()
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data.get_state())))
            bar.update(1)
        manager.wait_until_finished()
        if int(bad):  # skipped steps at the end: what the stage would hand on never saw them made finite again
            raise TrainingDiverged(f"{stage}: its last {int(bad)} step{'s' * (int(bad) > 1)} had a non-finite loss "
                                   f"or gradient (skipped), so the stage is not finished; lower its learning_rate "
                                   f"or check the data, then run again (it resumes from its last checkpoint)")
    finally:
        bar.close()
        log.close()
        manager.close()
    return state["params"]

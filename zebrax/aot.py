"""Ahead-of-time compilation of the method's programs for a TPU slice, on any machine.

libtpu's deviceless compiler (``jax.experimental.topologies``) gives the devices of a slice that is not there; the
program is traced with ``jax.ShapeDtypeStruct`` inputs carrying the shardings a run would give them, then the real
XLA TPU compiler (and Mosaic, for Pallas kernels) compiles it. Nothing is allocated or run. What comes back, per chip:
the argument, output and temporary bytes against the chip's HBM (the compiler's own figure), the FLOPs and bytes
the cost model counts, its estimate of the step's seconds, and the collectives in the compiled program.

Programs: ``ild``, ``kd``, ``dpo`` (the training steps exactly as ``zebrax distill`` builds them:
``stages.stage_objective``, ``trainer.make_optimizer``, ``trainer.jitted_step``, the parameter shardings of
``zebrax.sharding``), ``prefill`` and ``decode`` (``generate.Generator``'s, at a given context).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zebrax.errors import ConfigError, ZebraxError
from zebrax.ops.auto import compiling_for
from zebrax.recipe import from_teacher
from zebrax.traffic import hbm_traffic

PROGRAMS = ("ild", "kd", "dpo", "smart", "eval", "prefill", "decode")
TRAINING = ("ild", "kd", "dpo")
SCORING = ("smart", "eval")  # forward passes of the teacher and the students over rows
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: its device kind, whether its slices are 3-D tori, how many TensorCores a chip has (the
    number in a ``v5p-16`` name counts cores on v4 and v5p, chips on v5e and v6e) and its published bf16 peak."""

    device_kind: str
    dims: int
    cores_per_chip: int
    peak_flops: float  # bf16 FLOP/s a chip (Google's published figures)
    hbm_bandwidth: float  # bytes/s a chip (published)


GENERATIONS = {
    "v4": Generation("TPU v4", 3, 2, 275e12, 1228e9),
    "v5e": Generation("TPU v5 lite", 2, 1, 197e12, 819e9),
    "v5p": Generation("TPU v5", 3, 2, 459e12, 2765e9),
    "v6e": Generation("TPU v6 lite", 2, 1, 918e12, 1640e9),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


# the slice shapes Cloud TPU gives a number of chips
SHAPES = {3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
              512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
          2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}}


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5p-16"`` (cores on v4/v5p, chips on v5e/v6e) or ``"v5p:2x2x2"`` → ("v5p", (2, 2, 2))."""
    match = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v6litepod)([-:])(\d+(?:x\d+)*)", str(name).strip().lower())
    generation = match and ALIASES.get(match[1], match[1])
    if not match or generation not in GENERATIONS:
        raise ConfigError(f"topology {name!r}: expected e.g. v5p-16 or v5p:2x2x2 "
                          f"(generations: {', '.join(GENERATIONS)})")
    gen = GENERATIONS[generation]
    if match[2] == "-":
        if "x" in match[3] or int(match[3]) % gen.cores_per_chip:
            raise ConfigError(f"topology {name!r}: {generation}-N counts "
                              f"{'TensorCores, two a chip' if gen.cores_per_chip == 2 else 'chips'}")
        chips = int(match[3]) // gen.cores_per_chip
        if chips not in SHAPES[gen.dims]:
            raise ConfigError(f"topology {name!r}: no {generation} slice of {chips} chips (known: "
                              f"{', '.join(f'{generation}-{n * gen.cores_per_chip}' for n in SHAPES[gen.dims])}; "
                              f"or give the shape, e.g. {generation}:{'x'.join(['2'] * gen.dims)})")
        return generation, SHAPES[gen.dims][chips]
    shape = tuple(int(d) for d in match[3].split("x"))
    if len(shape) != gen.dims or 0 in shape:
        raise ConfigError(f"topology {name!r}: a {generation} slice has {gen.dims} dimensions, e.g. "
                          f"{generation}:{'x'.join(['2'] * gen.dims)}")
    return generation, shape


@functools.cache
def devices(topology: str) -> tuple:
    """The TPU devices of a slice (not attached: for compiling only)."""
    from jax.experimental import topologies

    generation, shape = parse_topology(topology)
    dims = "x".join(map(str, shape))
    kw = {"chips_per_host_bounds": (*shape, 1)[:3]} if math.prod(shape) < 4 else {}
    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{dims}", **kw).devices)
    except (RuntimeError, ValueError) as e:
        import importlib.util

        hint = ("" if importlib.util.find_spec("libtpu") else
                f"; compiling for a TPU needs libtpu: pip install 'jax[tpu]=={jax.__version__}'")
        raise ZebraxError(f"topology {topology!r}: libtpu could not describe it ({str(e).splitlines()[0]}){hint}"
                          ) from None


def _bytes(found: re.Match) -> int:
    """XLA's "432.55G" (its units are powers of 1024) → bytes; ``found``: the number and the unit letter."""
    return int(float(found[1]) * 1024 ** ("KMGT".index(found[2]) + 1))


@functools.cache
def hbm_bytes(topology: str) -> int:
    """A chip's HBM as the TPU compiler counts it, from its own refusal of a program one byte too big for any chip
    (probed once per process and generation; about a second)."""
    mesh_devices = devices(topology)[:1]
    mesh = jax.sharding.Mesh(np.asarray(mesh_devices), ("x",))
    big = jax.ShapeDtypeStruct((1 << 14, 1 << 14), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:  # 2^38 bytes of temporaries: more than any TPU has
        jax.jit(lambda x: jnp.sort(jnp.concatenate([x] * 256), axis=0)[0]).trace(big).lower().compile()
    except Exception as e:  # noqa: BLE001 — the compiler's message is the measurement
        found = re.search(r"exceeds available HBM \(([\d.]+)([KMGT])\)", str(e))
        if found:
            return _bytes(found)
        raise
    raise ZebraxError(f"{topology}: the compiler accepted 256 GiB of temporaries; its HBM is unknown")


@dataclasses.dataclass
class Report:
    """What ``compile_program`` found. ``per_chip_bytes``: ``arguments``, ``outputs``, ``temporaries`` (the
    compiler's), ``total`` (arguments + outputs − donated + temporaries). ``flops``, ``bytes_accessed`` and
    ``seconds`` are per chip, from the compiler's cost model (an estimate, not a measurement; where it gives none,
    ``seconds_from`` says "roofline": the larger of flops / peak and bytes / HBM bandwidth, published figures);
    ``mfu`` = flops / seconds / the chip's published bf16 peak. ``hbm_traffic_bytes``: what a chip reads from and
    writes to HBM in one call, estimated from the compiled program (``zebrax.traffic``; the cost model's
    ``bytes_accessed`` also counts on-chip copies); for prefill and decode, ``must_read_bytes`` (the weights,
    cache and states a chip holds: its arguments) and ``read_ratio`` = traffic / must-read. When the compiler
    refuses the program (``fits`` False and ``error`` set), the figures it could not give are None."""

    program: str
    topology: str
    chips: int
    mesh: dict
    settings: dict
    fits: bool
    hbm_bytes: int
    per_chip_bytes: dict
    flops: float | None
    bytes_accessed: float | None
    seconds: float | None
    seconds_from: str | None
    tokens: int
    tokens_per_second: float | None
    mfu: float | None
    collectives: dict
    compile_seconds: float
    hbm_traffic_bytes: int | None = None
    must_read_bytes: int | None = None
    read_ratio: float | None = None
    advice: list = dataclasses.field(default_factory=list)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def __str__(self) -> str:
        gib = lambda b: "?" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
        b = self.per_chip_bytes
        lines = [f"{self.program} on {self.topology} ({self.chips} chips), mesh "
                 f"{' × '.join(f'{k} {v}' for k, v in self.mesh.items())}; "
                 f"{', '.join(f'{k} {v}' for k, v in self.settings.items())}",
                 f"  per chip: arguments {gib(b['arguments'])}, outputs {gib(b['outputs'])}, temporaries "
                 f"{gib(b['temporaries'])}, total {gib(b['total'])} of {gib(self.hbm_bytes)} HBM"
                 + (f" ({100 * (1 - b['total'] / self.hbm_bytes):.0f}% left)" if self.fits else "")]
        if self.flops is not None:
            lines.append(f"  {self.seconds_from} (an estimate): {self.flops / 1e12:.2f} TFLOP and "
                         f"{self.bytes_accessed / 1e9:.2f} GB accessed a chip, {self.seconds * 1e3:.2f} ms a step "
                         f"→ {self.tokens_per_second:,.0f} tokens/s, MFU {100 * self.mfu:.1f}%")
        if self.read_ratio is not None:
            lines.append(f"  HBM traffic (from the compiled program): {self.hbm_traffic_bytes / 1e9:.2f} GB a chip, "
                         f"{self.read_ratio:.2f}× the {self.must_read_bytes / 1e9:.2f} GB of weights, cache and "
                         f"states it must read")
        if self.collectives:
            lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in self.collectives.items()))
        lines.append(f"  compiled in {self.compile_seconds:.1f} s")
        if not self.fits:
            total = b["total"]
            lines.append(f"  does not fit: {gib(total)} a chip is {gib(total - self.hbm_bytes)} over"
                         if total is not None else f"  does not fit: {self.error}")
            lines += [f"  try: {a}" for a in self.advice]
        return "\n".join(lines)


@contextlib.contextmanager
def _optimised():
    """XLA's optimisations on, as a run compiles the program, whatever this process set for its own programs; the
    persistent compilation cache off (a deviceless executable cannot be read back from it)."""
    settings = {"jax_disable_most_optimizations": False, "jax_enable_compilation_cache": False}
    before = {k: jax.config.values[k] for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def _shard_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ``ShapeDtypeStruct``s (the largest shard of each leaf)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _collectives(hlo: str) -> dict:
    found = re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo)
    return dict(sorted(collections.Counter(found).items()))


def compile_program(fn, args: tuple, *, program: str, topology: str, mesh, tokens: int, settings: dict,
                    advice: list[str] = (), reads_arguments: bool = False, repeats: int = 1) -> Report:
    """Compile ``fn`` (a ``jax.jit``-ed function) for ``args`` (sharded ``ShapeDtypeStruct`` trees over ``mesh``)
    with the mesh set and the ops tracing for a TPU; ``tokens``: what one call processes (for tokens/s);
    ``reads_arguments``: a step that must read all its arguments once (decode), whose traffic is compared with
    them; ``repeats``: the trips of the loop that holds the step's work (gradient accumulation), whose body the
    cost model counts once: its FLOPs, bytes and seconds are multiplied by it (the optimizer's update outside the
    loop with them, a few percent too many)."""
    generation, _ = parse_topology(topology)
    hbm = hbm_bytes(topology)
    common = dict(program=program, topology=topology, chips=len(devices(topology)), hbm_bytes=hbm,
                  mesh={k: int(v) for k, v in mesh.shape.items()}, settings=settings, tokens=tokens)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), compiling_for("tpu"), _optimised():
            compiled = fn.trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 — XLA's errors carry no type of their own
        message = str(e)
        found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        if not found:
            raise
        temporaries = _bytes(found)
        arguments = _shard_bytes(args)
        return Report(**common, fits=False, per_chip_bytes={"arguments": arguments, "outputs": None,
                                                            "temporaries": temporaries,
                                                            "total": arguments + temporaries},
                      flops=None, bytes_accessed=None, seconds=None, seconds_from=None, tokens_per_second=None,
                      mfu=None, collectives={}, compile_seconds=time.perf_counter() - start, advice=list(advice),
                      error=message.splitlines()[0][:400])
    seconds_to_compile = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    flops, accessed = repeats * float(cost.get("flops", 0.0)), repeats * float(cost.get("bytes accessed", 0.0))
    seconds, source = repeats * float(cost.get("optimal_seconds", -1.0)), "cost model"
    if seconds <= 0:  # the cost model gives no estimate for some programs (a negative figure): the roofline's
        chip = GENERATIONS[generation]
        seconds, source = max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth), "roofline"
    fits = total <= hbm
    hlo = compiled.as_text()
    moved = hbm_traffic(hlo)
    must_read = memory.argument_size_in_bytes if reads_arguments else None
    return Report(**common, fits=fits,
                  per_chip_bytes={"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                                  "temporaries": memory.temp_size_in_bytes, "total": total},
                  flops=flops, bytes_accessed=accessed, seconds=seconds, seconds_from=source,
                  tokens_per_second=tokens / seconds if seconds else None,
                  mfu=flops / seconds / GENERATIONS[generation].peak_flops if seconds else None,
                  collectives=_collectives(hlo), compile_seconds=seconds_to_compile, hbm_traffic_bytes=moved,
                  must_read_bytes=must_read, read_ratio=moved / must_read if must_read else None,
                  advice=[] if fits else list(advice))


def model_config(name):
    """A model's config from a zebrax checkpoint or a preset name (``llama3_1_8b``), no weights read; a config
    object is returned as it is."""
    from zebrax import checkpoint
    from zebrax.presets import preset_config

    if not isinstance(name, (str, os.PathLike)):
        return name
    return checkpoint.load_config(name) if checkpoint.is_checkpoint(name) else preset_config(str(name))


def _sharded(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _params(config, mesh):
    """A model's parameters as sharded ``ShapeDtypeStruct``s, by the rules of ``zebrax.sharding``."""
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    params = abstract_params(config)
    return _sharded(params, param_shardings(config, params, mesh))


def _rows(fields: dict, batch: int, length: int, mesh) -> dict:
    from zebrax.sharding import batch_sharding

    return {k: jax.ShapeDtypeStruct((batch, length), dtype, sharding=batch_sharding(mesh, 2))
            for k, dtype in fields.items()}


def _advice(exp, stage: str, mesh) -> list[str]:
    """What would lower a training step's memory a chip, most effective first."""
    from zebrax.models.decoder import remat_policy
    from zebrax.sharding import row_shards

    cfg = getattr(exp, stage)
    shards = row_shards(mesh)
    out = [] if remat_policy(exp.remat) == "full" else [
        "--remat (full): the students keep only each block's input for the backward pass"]
    if cfg.batch_size // cfg.accumulate > shards and cfg.batch_size % (2 * cfg.accumulate) == 0:
        out.append(f"--accumulate {2 * cfg.accumulate}: micro-batches of {cfg.batch_size // cfg.accumulate // 2} "
                   f"sequences")
    out.append("a larger slice (more fsdp), or --mesh tensor=N: the weights and activations split further")
    return out


def _hybrid(program: str, student):
    from zebrax.config import HybridConfig

    if student is None or not isinstance(student, HybridConfig):
        raise ConfigError(f"compile {program}: --student must be a Zebra-Llama hybrid (a preset such as "
                          f"zebra-llama-8b-8mla-24m2, or a checkpoint); got {type(student).__name__}")
    return student


def _students(exp, teacher, student) -> dict:
    """The two students ILD trains and SMART scores (all-MLA, all-Mamba2): the hybrid's settings with one mixer
    everywhere, or without a hybrid the experiment's ``student`` settings."""
    from zebrax.distill.stages import STUDENTS

    if student:
        return {n: student.replace(mixers=(n,) * student.num_hidden_layers) for n in STUDENTS}
    return {n: from_teacher(teacher, mla_layers=layers, **exp.student) for n, layers in STUDENTS.items()}


def _scoring(program: str, exp, teacher, student, mesh, topology: str, batch: int) -> Report:
    """SMART's scoring pass (one swap; it runs once per layer and once with none) or the evaluation's batch sums
    (perplexity and KL to the teacher) over ``batch`` rows of ``exp.seq_len`` tokens."""
    from zebrax.evaluate import batch_sums
    from zebrax.models import build
    from zebrax.select import swap_kl, swap_params
    from zebrax.sharding import batch_sharding, replicated

    compute = lambda c: c.replace(dtype=exp.compute_dtype)  # noqa: E731
    rows = _rows({"tokens": jnp.int32, "token_mask": bool, "loss_mask": bool}, batch, exp.seq_len, mesh)
    if program == "eval":
        student = _hybrid(program, student)
        fn = batch_sums(build(compute(student)), build(compute(teacher)))
        args = (_params(student, mesh), _params(teacher, mesh), rows["tokens"], rows["token_mask"], rows["loss_mask"])
    else:
        s = _students(exp, teacher, student)
        fn = jax.jit(swap_kl(compute(s["mla"]), compute(s["mamba2"])))
        logits = jax.ShapeDtypeStruct((batch, exp.seq_len, teacher.vocab_size), jnp.float32,
                                      sharding=batch_sharding(mesh, 3))
        x = jax.ShapeDtypeStruct((batch, exp.seq_len, teacher.hidden_size), jnp.dtype(exp.compute_dtype),
                                 sharding=batch_sharding(mesh, 3))  # the all-Mamba2 student's input to the swap
        swap = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
        args = (swap_params(_params(s["mla"], mesh), _params(s["mamba2"], mesh), teacher.num_hidden_layers),
                rows["tokens"], x, logits, swap)
    settings = {"batch": batch, "seq_len": exp.seq_len, "compute_dtype": exp.compute_dtype}
    return compile_program(fn, args, program=program, topology=topology, mesh=mesh, tokens=batch * exp.seq_len,
                           settings=settings)


def _training(stage: str, exp, teacher, student, mesh, topology: str) -> Report:
    from zebrax.distill.stages import stage_objective
    from zebrax.distill.trainer import jitted_step, make_optimizer, state_shardings
    from zebrax.sharding import replicated

    trained = _students(exp, teacher, student) if stage == "ild" else {"": _hybrid(stage, student)}
    cfg = getattr(exp, stage)
    objective = stage_objective(exp, stage, teacher, trained)
    params = {n: _params(c, mesh) for n, c in trained.items()}
    params = params[""] if "" in params else params
    frozen = _params(teacher if stage != "dpo" else student, mesh)
    optimizer = make_optimizer(cfg, params)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    o_sh = state_shardings(optimizer, params, p_sh, mesh)
    opt_state = _sharded(jax.eval_shape(optimizer.init, params), o_sh)
    fields = {"tokens": jnp.int32, "token_mask": bool, "loss_mask": bool, **({"segment_ids": jnp.int32}
                                                                              if exp.pack and stage != "dpo" else {})}
    if stage == "dpo":
        fields = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in fields.items()}
    batch = _rows(fields, cfg.batch_size, exp.seq_len, mesh)
    step = jitted_step(objective, optimizer, cfg.accumulate,
                       (p_sh, o_sh, jax.tree.map(lambda x: x.sharding, frozen), replicated(mesh)))
    tokens = cfg.batch_size * exp.seq_len * (2 if stage == "dpo" else 1)
    settings = {"batch": cfg.batch_size, "seq_len": exp.seq_len, "accumulate": cfg.accumulate, "remat": exp.remat,
                "compute_dtype": exp.compute_dtype, "loss_chunk": exp.loss_chunk}
    return compile_program(step, (params, opt_state, frozen, batch), program=stage, topology=topology, mesh=mesh,
                           repeats=cfg.accumulate,
                           tokens=tokens, settings=settings, advice=_advice(exp, stage, mesh))


def _generation(program: str, config, mesh, topology: str, batch: int, length: int, impl) -> Report:
    from zebrax.generate import Generator
    from zebrax.models import build
    from zebrax.ops.sharded import BATCH
    from zebrax.sharding import batch_sharding, replicated

    generator = Generator(build(config, impl))
    params = _params(config, mesh)
    rows = math.prod(mesh.shape[a] for a in BATCH)
    settings = {"batch": batch, "context" if program == "decode" else "seq_len": length, "dtype": config.dtype}
    if program == "prefill":
        fn = jax.jit(functools.partial(generator._prefill, max_len=length))
        args = (params, *_rows({"tokens": jnp.int32, "token_mask": bool}, batch, length, mesh).values())
        return compile_program(fn, args, program=program, topology=topology, mesh=mesh, tokens=batch * length,
                               settings=settings)
    with compiling_for("tpu"):  # the caches as a TPU allocates them (``cache.KVCache``, ``cache.LatentCache``)
        cache = jax.eval_shape(lambda: type(generator.module).init_cache(config, batch, length))
    by_rows = lambda x: (batch_sharding(mesh, x.ndim) if x.ndim and x.shape[0] == batch and batch % rows == 0  # noqa: E731
                         else replicated(mesh))
    cache = _sharded(cache, jax.tree.map(by_rows, cache))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    tokens = _sharded(tokens, by_rows(tokens))
    fn = jax.jit(generator._decode_step, donate_argnums=1)  # the decode loop updates its cache in place
    return compile_program(fn, (params, cache, tokens), program=program, topology=topology, mesh=mesh, tokens=batch,
                           settings=settings, reads_arguments=True)


def compile(program: str, *, topology: str, teacher=None, student=None, model=None, mesh: dict | None = None,
            batch: int | None = None, seq_len: int | None = None, context: int | None = None,
            accumulate: int | None = None, remat: bool | str | None = None, compute_dtype: str | None = None,
            loss_chunk: int | None = None, experiment=None, impl="auto") -> Report:
    """Compile one program of the method for a TPU ``topology`` (``"v5p-16"``, ``"v5p:2x2x2"``) on this machine,
    nothing run, and report its memory a chip, the cost model's time and its collectives (``Report``).

    Training programs (``ild``, ``kd``, ``dpo``): ``teacher`` and ``student`` are presets, checkpoints (their
    configs only) or config objects; ``experiment`` a ``distill`` ``Experiment`` (its objective settings,
    optimizer, remat, compute dtype, batch and ``accumulate`` of the stage); ``batch``, ``seq_len``, ``accumulate``,
    ``remat``, ``compute_dtype``, ``loss_chunk`` override it. Scoring (``smart``: SMART's pass with one layer
    swapped; ``eval``: perplexity and KL to the teacher): ``teacher`` and ``student``, ``batch`` rows of ``seq_len``
    tokens. Generation (``prefill``: ``seq_len`` tokens; ``decode``: one step at a ``context``-token cache):
    ``model``, and ``impl`` the ops' implementations as ``models.build`` takes them ("pallas",
    ``{"attention": "pallas"}``; default "auto": what ``auto`` runs on a TPU; a kernel that compiles is not one
    measured faster, and the cost model's time is an estimate). ``mesh``: ``MeshConfig`` fields over the slice's
    chips (default: every chip on fsdp)."""
    from zebrax.distill.pipeline import Experiment
    from zebrax.sharding import MeshConfig, make_mesh

    if program not in PROGRAMS:
        raise ConfigError(f"compile: program {program!r} is not one of {', '.join(PROGRAMS)}")
    chips = devices(topology)
    try:
        mesh = make_mesh(MeshConfig(**(mesh or {})), list(chips))
    except TypeError:
        raise ConfigError(f"compile: mesh={mesh!r}: expected sizes of data, fsdp, tensor") from None
    if program in TRAINING + SCORING:
        if teacher is None:
            raise ConfigError(f"compile {program}: --teacher (a preset or a checkpoint) is required")
        exp = experiment if experiment is not None else Experiment()
        if program in SCORING:
            if not (isinstance(batch, int) and batch >= 1):
                raise ConfigError(f"compile {program}: --batch must be an integer >= 1 (got {batch!r})")
            exp = dataclasses.replace(exp, **{k: v for k, v in (("seq_len", seq_len), ("compute_dtype", compute_dtype))
                                              if v is not None})
            return _scoring(program, exp, model_config(teacher), student and model_config(student), mesh, topology,
                            batch)
        cfg = getattr(exp, program)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("batch_size", batch), ("accumulate", accumulate))
                                          if v is not None})
        changes = {"seq_len": seq_len, "remat": remat, "compute_dtype": compute_dtype, "loss_chunk": loss_chunk}
        exp = dataclasses.replace(exp, **{program: cfg}, **{k: v for k, v in changes.items() if v is not None})
        return _training(program, exp, model_config(teacher), student and model_config(student), mesh, topology)
    if model is None:
        raise ConfigError(f"compile {program}: --model (a preset or a checkpoint) is required")
    config = model_config(model)
    if compute_dtype is not None:
        config = config.replace(dtype=compute_dtype)
    length = context if program == "decode" else seq_len
    if not (isinstance(batch, int) and batch >= 1 and isinstance(length, int) and length >= 1):
        what = "--context" if program == "decode" else "--seq-len"
        raise ConfigError(f"compile {program}: --batch and {what} must be integers >= 1 (got {batch!r}, {length!r})")
    return _generation(program, config, mesh, topology, batch, length, impl)

"""A TPU slice this machine does not have: its devices (libtpu's deviceless compiler, ``jax.experimental.topologies``),
its HBM as the compiler counts it, and ``compile_program``: a ``jax.jit``-ed function compiled for it with sharded
``jax.ShapeDtypeStruct`` inputs, nothing allocated or run, and what came back (``Report``): the argument, output and
temporary bytes a chip against its HBM, the FLOPs and bytes the cost model counts, its estimate of the step's
seconds, the HBM traffic read from the compiled program (``traffic.py``) and the collectives.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zebrax.app.traffic import hbm_traffic
from zebrax.errors import ConfigError, ZebraxError
from zebrax.ops.auto import compiling_for

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
    writes to HBM in one call, estimated from the compiled program (``zebrax.app.traffic``; the cost model's
    ``bytes_accessed`` also counts on-chip copies); for prefill and decode, ``must_read_bytes`` (the weights,
    cache and states a chip holds: its arguments) and ``read_ratio`` = traffic / must-read. When the compiler
    refuses the program (``fits`` False and ``error`` set), the figures it could not give are None. For a prefill,
    ``attention_flops`` (a chip's share of the prompt's causal attention, counted from the shapes: the cost model
    counts one block of the attention's loop) and ``attention_seconds`` (those FLOPs at the chip's published
    peak, a lower bound to add to ``seconds``)."""

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
    attention_flops: float | None = None
    attention_seconds: float | None = None

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
        if self.attention_flops is not None:
            lines.append(f"  causal attention (counted from the shapes; the cost model counts one block of its loop): "
                         f"{self.attention_flops / 1e12:,.0f} TFLOP a chip, at least {self.attention_seconds:.2f} s "
                         f"more at the chip's peak")
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
                    static: dict | None = None, advice: list[str] = (), reads_arguments: bool = False,
                    repeats: int = 1, attention_flops: float | None = None) -> Report:
    """Compile ``fn`` (a ``jax.jit``-ed function) for ``args`` (sharded ``ShapeDtypeStruct`` trees over ``mesh``) and
    its ``static`` keyword arguments, with the mesh set and the ops tracing for a TPU; ``tokens``: what one call
    processes (for tokens/s);
    ``reads_arguments``: a step that must read all its arguments once (decode), whose traffic is compared with
    them; ``repeats``: the trips of the loop that holds the step's work (gradient accumulation, a chunked prefill's
    chunks), whose body the cost model counts once: its FLOPs, bytes and seconds are multiplied by it (the
    optimizer's update outside the loop with them, a few percent too many); ``attention_flops``: a chip's share of
    the attention the cost model does not count (``Report``)."""
    generation, _ = parse_topology(topology)
    hbm = hbm_bytes(topology)
    common = dict(program=program, topology=topology, chips=len(devices(topology)), hbm_bytes=hbm,
                  mesh={k: int(v) for k, v in mesh.shape.items()}, settings=settings, tokens=tokens,
                  attention_flops=attention_flops,
                  attention_seconds=None if attention_flops is None else
                  attention_flops / GENERATIONS[parse_topology(topology)[0]].peak_flops)
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh), compiling_for("tpu"), _optimised():
            compiled = fn.trace(*args, **(static or {})).lower().compile()
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



"""Sharding by name: a device mesh with axes (data, fsdp, tensor) and one rules table from the logical axis names
every parameter carries (``zebrax.models.logical_axes``) to mesh axes. Changing the mesh never changes model code.

- ``data``: batch only (parameters replicated across it); ``fsdp``: batch and parameters (the ``embed`` axis of
  every weight, or the latent axis of MLA's up-projections, which have none: fully sharded data parallelism);
  ``tensor``: heads, MLP width, vocabulary and SSM heads.
- An axis naming a concatenation of unlike pieces — Mamba2's ``ssm_in`` ([z ; xBC ; dt]) and ``ssm_conv``
  ([x ; B ; C]) — is never split: a shard boundary would cut through the pieces.
- A dimension that a mesh axis does not divide stays whole (replicated) rather than padded.
- A Pallas kernel is opaque to XLA's partitioner, which would gather its operands whole onto every device; under a
  mesh set with ``jax.set_mesh`` the ops run each kernel on every device's shard instead (``ops.sharded.per_shard``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zebrax.errors import ConfigError
from zebrax.ops.sharded import AXES, BATCH

# the axes every model shares; each mixer kind adds the axes only it uses (``MixerKind.axes``): ``rules()``
BASE_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "ssm_heads": "tensor",  # the state heads of a linear mixer (Mamba2, Gated DeltaNet)
    "conv": None,
    "ssm_conv": None,  # the conv's channels, a concatenation ([x ; B ; C], [q ; k ; v])
}


def rules() -> dict[str, str | None]:
    """Logical axis → mesh axis: ``BASE_RULES`` and every registered mixer kind's own axes."""
    from zebrax.mixers import kinds

    return {**BASE_RULES, **{axis: rule for kind in kinds().values() for axis, rule in kind.axes.items()}}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis; one of them may be -1: every visible device not taken by the others (default: all on
    fsdp)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"MeshConfig{tuple(sizes)}: sizes must be >= 1, with at most one -1")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(f"MeshConfig{tuple(sizes)}: {n_devices} devices are not a multiple of {known}")
            sizes[sizes.index(-1)] = n_devices // known
        if int(np.prod(sizes)) > n_devices:
            raise ConfigError(f"MeshConfig{tuple(sizes)} needs {int(np.prod(sizes))} devices; {n_devices} are visible")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices[: int(np.prod(shape))]).reshape(shape), AXES)


def partition_spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The rules applied to one array: each dimension to its mesh axis, if that axis divides it and is not taken."""
    out, used, table = [], set(), rules()
    for name, size in zip(names, shape, strict=True):
        if name not in table and name is not None:
            raise ConfigError(f"sharding: no rule for the logical axis {name!r} (known: {', '.join(sorted(table))})")
        axis = table.get(name) if name is not None else None
        ok = axis is not None and axis not in used and size % mesh.shape[axis] == 0
        out.append(axis if ok else None)
        if ok:
            used.add(axis)
    return PartitionSpec(*out)


def param_shardings(config, params, mesh: Mesh):
    """``NamedSharding`` for every parameter of a model ``config`` (``params``: its tree, arrays or shapes)."""
    from zebrax.models import logical_axes

    names = logical_axes(config)
    return jax.tree.map(lambda n, p: NamedSharding(mesh, partition_spec(tuple(n), tuple(p.shape), mesh)), names, params,
                        is_leaf=lambda x: isinstance(x, tuple))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over (data, fsdp); the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cache_shardings(cache, mesh: Mesh):
    """``NamedSharding`` for every leaf of a decode cache (``cache.Cache``, of arrays or shapes): rows over (data,
    fsdp) where the mesh divides the batch, and each layer cache's other axes by the rules (its ``axes()``: GQA's kv
    heads and a linear mixer's state heads over tensor where they divide; MLA's latent, which has no head axis, whole).
    The sequence axis is never split. A layer cache without ``axes()`` is split by rows only."""
    rows = row_shards(mesh)

    def sharding(names, x):
        batch = BATCH if x.ndim and x.shape[0] % rows == 0 else None
        rest = partition_spec(tuple(None if n in ("batch", "seq") else n for n in names[1:]), x.shape[1:], mesh)
        return NamedSharding(mesh, PartitionSpec(batch, *rest) if x.ndim else PartitionSpec())

    def layer(c):
        if not hasattr(c, "axes"):
            return jax.tree.map(lambda x: sharding(("batch",) + (None,) * (x.ndim - 1), x), c)
        return c.replace(**{field: sharding(names, getattr(c, field)) for field, names in c.axes().items()})

    return cache.replace(index=replicated(mesh), kv_mask=sharding(("batch", "seq"), cache.kv_mask),
                         layers=tuple(layer(c) for c in cache.layers))


def place(tree, shardings, *, copy: bool = True):
    """Host arrays (the same on every process), or global arrays, → global arrays with ``shardings``: each process
    fills the shards its devices hold from host arrays, and global arrays are resharded on the devices, so no tree
    is ever whole on one device. ``copy``: global arrays are copied even where they already lie as asked (a training
    step may donate the result); without it such an array is returned as it is."""
    def one(x, s):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:  # a global array
            return jax.device_put(x, s, may_alias=not copy)
        return jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx])

    return jax.tree.map(one, tree, shardings)


def on_device(tree, *, copy: bool = False):
    """``tree`` committed to this process's default device (a run without a mesh; in a run of several processes,
    ``jax.devices()[0]`` is process 0's). A jitted program's outputs are committed, and committed or not are
    different signatures to ``jax.jit``: inputs placed here compile once, whether they came from a checkpoint or from
    memory. ``copy``: new buffers even for arrays already there (a step may donate them)."""
    return jax.device_put(tree, jax.local_devices()[0], may_alias=not copy)


def row_shards(mesh: Mesh) -> int:
    """How many parts rows are split into (``data`` × ``fsdp``)."""
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def place_rows(rows: dict, mesh: Mesh) -> dict:
    """Host rows ``{field: [N, …]}`` (the same on every process) → global arrays: the rows split over (data, fsdp)
    where their number divides, else whole on every device."""
    def sharding(v):
        return batch_sharding(mesh, np.ndim(v)) if np.shape(v)[0] % row_shards(mesh) == 0 else replicated(mesh)

    return place(rows, {k: sharding(v) for k, v in rows.items()})


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows → arrays over the whole mesh (each process holds its share of the global batch)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}

"""Pallas kernels on each device's shard. A ``pallas_call`` is opaque to XLA's partitioner, which would gather its
operands whole onto every device; ``per_shard`` runs the kernel through ``jax.shard_map`` instead when a mesh is set
(``jax.set_mesh``). The mesh's axis names are defined here, where the ops read them; ``zebrax.sharding`` maps the
parameters' logical axes onto the same names."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # rows are split over both; ``tensor`` splits heads


def rows(x: jax.Array) -> jax.Array:
    """``x`` constrained to have its rows (first dimension) split over (data, fsdp) when a mesh is set and they
    divide, the other dimensions whole: the residual stream stays sharded as the batch is (each block's input and
    output, ``models.decoder.Block``). Without it XLA's partitioner may follow the FSDP weights' sharding instead:
    the 1B ILD step computed every layer on the whole batch on every chip (96 × 2048 rows: 216 GiB of temporaries),
    and the 1B KD step at 192 × 2048 needs 107.4 GiB a chip on v5p-16 against 66.1 with it. The 8B KD step at one
    micro-batch is the exception (91.2 GiB with it, 49.2 without; ``docs/scaling.md``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    batch = tuple(a for a in BATCH if a in mesh.axis_names)
    n = int(np.prod([mesh.shape[a] for a in batch]))
    if n == 1 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(batch, *([None] * (x.ndim - 1))))


def per_shard(kernel: Callable, args: tuple, dims: tuple[str, ...], out_dims: str | tuple[str, ...]):
    """``kernel(*args)``, run by ``jax.shard_map`` on each device's block when a mesh is set (``jax.set_mesh``), so that
    XLA does not gather the operands of a Pallas call; called directly otherwise. ``dims`` gives each argument's
    dimensions (``out_dims`` the outputs'), a letter each: ``b`` rows (split over data × fsdp), ``h`` heads (split over
    tensor), ``.`` whole; an argument that is None or a Python scalar is passed through. Rows and heads are split only
    where every dimension so marked divides by the mesh axes (query heads and their KV heads, or SSM heads and their
    B/C groups, then stay together on one device); otherwise that axis stays whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*args)
    batch = tuple(a for a in BATCH if a in mesh.axis_names)
    sizes = {"b": int(np.prod([mesh.shape[a] for a in batch])), "h": mesh.shape.get("tensor", 1)}
    arrays = [i for i, a in enumerate(args) if isinstance(a, jax.Array | np.ndarray)]

    def splits(letter: str) -> bool:
        marked = [args[i].shape[d] for i in arrays for d, c in enumerate(dims[i]) if c == letter]
        return sizes[letter] > 1 and all(n % sizes[letter] == 0 for n in marked)

    axis = {"b": batch if splits("b") else None, "h": "tensor" if splits("h") else None, ".": None}
    spec = lambda d: PartitionSpec(*(axis[c] for c in d))  # noqa: E731

    def on_block(*blocks):
        full = list(args)
        for i, block in zip(arrays, blocks, strict=True):
            full[i] = block
        return kernel(*full)

    out_specs = spec(out_dims) if isinstance(out_dims, str) else tuple(map(spec, out_dims))
    return jax.shard_map(on_block, in_specs=tuple(spec(dims[i]) for i in arrays), out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in arrays))

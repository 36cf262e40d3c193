"""The processes of a multi-host run (``jax.distributed``): joining the run (``distributed``, on a cluster JAX detects
or by flags), waiting for all (``sync``), process 0's word to every process (``broadcast_text``) and every process's
copy of global arrays (``gather``). With one process each is what one process needs, and nothing waits."""

from __future__ import annotations

import jax
import numpy as np


def gather(tree):
    """Global arrays → host numpy arrays on every process (``process_allgather`` across hosts)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def sync(tag: str) -> None:
    """Every process of a multi-host run reaches this point before any goes on (files written by process 0 are then
    there for all); nothing with one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def broadcast_text(text: str | None, limit: int = 4096) -> str | None:
    """Process 0's ``text`` on every process (None stays None); with one process, ``text``."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = np.zeros(limit + 1, np.uint8)
    if text is not None and jax.process_index() == 0:
        encoded = text.encode()
        if len(encoded) > limit:
            raise ValueError(f"broadcast_text: {len(encoded)} bytes, more than {limit}")
        raw[0], raw[1:1 + len(encoded)] = 1, np.frombuffer(encoded, np.uint8)
    raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(raw[1:]).rstrip(b"\0").decode() if raw[0] else None


def detected_cluster() -> str | None:
    """The cluster ``jax.distributed.initialize()`` joins with no arguments, by JAX's name for it ("gcetpu",
    "gketpu", "slurm", "ompi", …), read from the environment by JAX's own detection (its opt-in methods, mpi4py,
    are not tried); None off any."""
    try:
        from jax._src import clusters
    except ImportError:  # a JAX without that module: flags only
        return None
    found = (env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method and env.is_env_present())
    return getattr(next(found, None), "name", None)


def distributed(coordinator: str | None = None, num_processes: int | None = None,
                process_id: int | None = None) -> None:
    """Join a multi-host run (``jax.distributed.initialize``) before any other JAX call. On a cluster JAX detects
    (``detected_cluster``: the VMs of a TPU pod slice, a SLURM job, Open MPI) with no flags; the flags override
    what it detects, or name the run where there is nothing to detect. Elsewhere, without flags, one process. CPU
    hosts exchange collectives through gloo."""
    if coordinator is None and not num_processes and detected_cluster() is None:
        return
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)

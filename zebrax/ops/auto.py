"""What ``impl="auto"`` runs on each backend.

A Pallas kernel becomes a default only where it has been compiled on that backend, run against its
reference and measured faster than the XLA path; each such measurement is a row in ``docs/benchmarks.md``
and an entry in ``PALLAS_MEASURED_FASTER``. Everywhere else ``auto`` takes the XLA path (blocked attention,
chunked SSD), which every backend compiles. Forcing a kernel stays one argument away (``impl="pallas"``).

The backend is JAX's, except while a program is compiled ahead of time for another (``compiling_for``: a TPU
program traced on a CPU machine, ``zebrax.app.aot``): then the ops choose, and the kernels lower, for that backend.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

KERNELS = ("flash_attention", "mla_decode", "ssd")

# (kernel, backend) -> the docs/benchmarks.md section with its check against the reference and its speed.
# No accelerator has been lent to this project's measurements yet, so no kernel is anyone's default.
PALLAS_MEASURED_FASTER: dict[tuple[str, str], str] = {}


_COMPILING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("compiling_for", default=None)


def target_backend() -> str:
    """The backend the ops trace for: the one ``compiling_for`` names, else JAX's default."""
    return _COMPILING_FOR.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str):
    """Trace for backend ``name`` ("tpu", "gpu") in this block, whatever JAX's default backend is."""
    token = _COMPILING_FOR.set(name)
    try:
        yield
    finally:
        _COMPILING_FOR.reset(token)


def pallas_is_default(kernel: str, backend: str | None = None) -> bool:
    """True where ``kernel`` was measured faster than the XLA path on ``backend`` (default: ``target_backend()``)."""
    assert kernel in KERNELS, kernel
    return (kernel, backend or target_backend()) in PALLAS_MEASURED_FASTER


def auto_choices(backend: str | None = None) -> dict[str, str]:
    """What ``auto`` runs for each op on ``backend``: ``{"attention": "blocked", …}``."""
    pick = lambda kernel, xla: "pallas" if pallas_is_default(kernel, backend) else xla  # noqa: E731
    return {"attention": pick("flash_attention", "blocked"), "latent_attention": pick("mla_decode", "blocked"),
            "ssd": pick("ssd", "chunked")}

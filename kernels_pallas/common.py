"""Helpers every kernel shares: tile arithmetic, float32 block products, per-backend compiler parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

COMPILED_BACKENDS = ("gpu", "tpu")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def lane_padded(dim: int, minimum: int = 16) -> int:
    """A head or state dimension padded to a power of two >= ``minimum`` (Triton tiles; dot operands >= 16)."""
    return max(minimum, next_power_of_two(dim))


def resolve_backend(backend: str | None, interpret: bool | None) -> str:
    """"gpu" or "tpu" to compile; "interpret" to run the kernel as plain JAX (the default elsewhere)."""
    backend = backend or jax.default_backend()
    if interpret or (interpret is None and backend not in COMPILED_BACKENDS):
        return "interpret"
    return backend


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """Float32 product of 2-D blocks, transposes folded into the contraction (Triton and Mosaic lower it)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def compiler_params(backend: str, n_parallel: int):
    """Per-backend parameters: every grid axis is independent (sequential work stays inside the kernel)."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel)
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=1)
    return None

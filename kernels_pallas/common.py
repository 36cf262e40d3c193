"""What every kernel shares: where it runs (``Target``), how a program walks its sequential axis (``Sweep``,
``sweep_call``), block products with float32 accumulation, tile arithmetic.

Every kernel is a grid of independent programs (batch, head, block…), each walking one sequential axis (key
blocks, query blocks, chunks) while carrying a running value (softmax statistics, an SSM state, gradient
sums). The walk takes one of two forms, chosen by the backend, over the same kernel body:

- **loop** (Triton on a GPU; interpret mode on a CPU): the walked axis is whole in the ``BlockSpec`` — on a
  GPU that is a window onto HBM, and only the tile a ``fori_loop`` step slices is ever loaded into registers
  or shared memory — and the carry is a loop value.
- **grid** (Mosaic on a TPU, where every ``BlockSpec`` block is copied into VMEM): the walked axis is the
  last grid axis, marked ``"arbitrary"``; each grid step holds one tile, the carry lives in VMEM scratch,
  and index maps send skipped steps to a tile already resident, so they cost no copy. The slot offset of
  the first query is a scalar-prefetch operand (SMEM), so the index maps can see it.

Either way, a program's working set is a few tiles, whatever the sequence length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

COMPILED_BACKENDS = ("gpu", "tpu")


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def lane_padded(dim: int, minimum: int = 16) -> int:
    """A head or state dimension padded to a power of two >= ``minimum`` (Triton tiles; dot operands >= 16)."""
    return max(minimum, next_power_of_two(dim))


def keys_minor(dim: int, backend: str) -> bool:
    """Whether ``backend`` lays a ``[..., L, dim]`` array out with ``L`` minor-most. A TPU does when ``dim`` is no
    multiple of its 128 lanes (``client.get_default_layout``: ``{2,3,1,0}`` for ``[8, 3, 32768, 64]``, ``[8, 5, 32768,
    96]`` and ``[1, 3, 100, 64]`` on v4, v5e, v5p and v6e, bf16 and fp32), which is ``[..., dim, L]`` row-major."""
    return backend == "tpu" and dim % 128 != 0


def cdiv(a, b):
    """Ceiling division of non-negative integers. Traced values go through ``lax.div`` (no sign fix-up, which
    Mosaic lowers only with a TPU description at hand)."""
    return lax.div(a + b - 1, b)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a kernel runs. ``backend``: whose kernel form and tile rules apply — "gpu" (Triton, loop form),
    "tpu" (Mosaic, grid form) or "cpu" (the loop form at small tiles). ``interpret``: run as plain JAX (always
    so on a CPU; ``backend="tpu", interpret=True`` runs the TPU form on a CPU)."""

    backend: str
    interpret: bool

    @property
    def sweep_in_grid(self) -> bool:
        return self.backend == "tpu"


def resolve_target(backend: str | None, interpret: bool | None) -> Target:
    backend = backend or jax.default_backend()
    if backend not in COMPILED_BACKENDS:
        return Target("cpu", True)
    return Target(backend, bool(interpret))


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """Product of 2-D blocks accumulated in float32, transposes folded into the contraction. 16-bit operands
    (bf16, fp16) multiply as they are — the tensor cores' and the MXU's full rate; float32 operands at
    ``Precision.HIGHEST`` (true float32, not a TF32 or bf16-pass approximation)."""
    if a.dtype != b.dtype:
        raise TypeError(f"dot operands differ in dtype: {a.dtype} and {b.dtype}")
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The walk of one program over ``steps`` tiles of its sequential axis, in the loop or the grid form."""

    in_grid: bool
    axis: int  # the walked grid axis in the grid form: the number of outer (parallel) axes

    def start(self, step, size: int):
        """Where step's tile starts inside a walked ref: 0 in the grid form, where the ref is the tile."""
        return 0 if self.in_grid else pl.multiple_of(step * size, size)

    def tile(self, step, size: int):
        """The index of step's tile inside a walked ref."""
        return pl.ds(self.start(step, size), size)

    def item(self, step):
        """The index of step's entry along a walked axis whose tile is one entry."""
        return 0 if self.in_grid else step

    def run(self, lo, hi, body, init, finish, scratch) -> None:
        """``finish(body(hi-1, … body(lo, init)))`` where ``body(step, carry) -> carry``; ``scratch``: one VMEM
        ref per carry leaf (grid form only)."""
        if not self.in_grid:
            finish(lax.fori_loop(lo, hi, body, init))
            return
        step = pl.program_id(self.axis)
        treedef = jax.tree.structure(init)
        load = lambda: jax.tree.unflatten(treedef, [r[...] for r in scratch])  # noqa: E731

        def store(carry):
            for ref, value in zip(scratch, jax.tree.leaves(carry), strict=True):
                ref[...] = value

        pl.when(step == 0)(lambda: store(init))
        pl.when((step >= lo) & (step < hi))(lambda: store(body(step, load())))
        pl.when(step == pl.num_programs(self.axis) - 1)(lambda: finish(load()))


@dataclasses.dataclass(frozen=True)
class Block:
    """One operand's block: ``shape`` (None squeezes an axis), ``index(*outer, s)`` the block index per axis,
    ``s`` the tile of the walked axis at this step; ``walked``: that axis, or None for a block that stays
    resident through the walk; ``full``: the walked axis's length (the loop form's block)."""

    shape: tuple
    index: Callable
    walked: int | None = None
    full: int = 0


def _whole(index, axis):
    return tuple(0 if a == axis else i for a, i in enumerate(index))


def sweep_call(kernel, *, target: Target, name: str, outer: tuple, steps: int, step_map: Callable,
               inputs: list[Block], outputs: list[Block], out_shape, scratch: list[tuple], with_offset: bool = True):
    """A ``pallas_call`` of ``kernel([off_ref,] *input_refs, *output_refs, *scratch_refs)`` over ``outer``
    programs each walking ``steps`` tiles; ``step_map(*outer, step[, offset])`` names the tile a walked block
    holds at a step (clamped to stay put on skipped steps; reversed for a backward walk). With ``with_offset``
    the returned function takes the slot offset ``[1]`` int32 before the inputs. Scratch (float32 shapes)
    exists in the grid form only; the kernel's ``Sweep`` is ``Sweep(target.sweep_in_grid, len(outer))``."""
    n = len(outer)
    if target.sweep_in_grid:
        from jax.experimental.pallas import tpu as pltpu

        def spec(block: Block):
            def index_map(*args):  # (*outer, step[, offset ref])
                offset = (args[n + 1][0],) if with_offset else ()
                return block.index(*args[:n], step_map(*args[:n + 1], *offset))
            return pl.BlockSpec(block.shape, index_map)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=int(with_offset), grid=(*outer, steps), in_specs=[spec(b) for b in inputs],
            out_specs=[spec(b) for b in outputs],
            scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch])
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * n + ("arbitrary",))
        return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=target.interpret,
                              compiler_params=params, name=name)

    def spec(block: Block):
        shape = list(block.shape)
        if block.walked is not None:
            shape[block.walked] = block.full
            return pl.BlockSpec(tuple(shape), lambda *g: _whole(block.index(*g, 0), block.walked))
        return pl.BlockSpec(tuple(shape), lambda *g: block.index(*g, 0))

    params = None
    if target.backend == "gpu" and not target.interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    offset = [pl.BlockSpec((1,), lambda *g: (0,))] if with_offset else []
    return pl.pallas_call(kernel, grid=outer, in_specs=offset + [spec(b) for b in inputs],
                          out_specs=[spec(b) for b in outputs], out_shape=out_shape, interpret=target.interpret,
                          compiler_params=params, name=name)

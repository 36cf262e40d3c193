"""Every SSD implementation against the reference recurrence: outputs, final state and gradients.

Tolerances (fp32): chunked 1e-5, Pallas (interpret mode on the CPU) 1e-4, each relative to the largest
magnitude of the compared array; bf16 inputs 2e-2 against the reference run on the same bf16 inputs. The Pallas
kernels run in both forms: the loop form (Triton's, the CPU default) and the grid form (Mosaic's: ``backend="tpu",
interpret=True``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.ssd import BlockSizes, ssd_pallas
from tests.helpers import close
from zebrax.errors import InvalidArgument
from zebrax.ops import ssd, ssd_decode_step

TOL = {"chunked": 1e-5, "pallas": 1e-4}
# the ops compiled whole: run eagerly, each of their operations would compile a program of its own
SSD = jax.jit(ssd, static_argnames=("chunk_size", "impl"))
DECODE_STEP = jax.jit(ssd_decode_step)
# (batch, length, heads, groups, head_dim, d_state, chunk_size, with initial state)
CASES = {
    "ragged_tail_groups": (2, 37, 4, 2, 8, 6, 16, True),  # 37 % 16 != 0; p, n padded inside the kernel
    "one_group_exact": (1, 32, 2, 1, 16, 16, 16, False),
    "shorter_than_a_chunk": (2, 5, 4, 4, 8, 8, 16, True),  # groups == heads (Zebra's C)
}


def inputs(case, dtype=jnp.float32, seed=0):
    b, length, h, g, p, n, _, with_state = CASES[case]
    rng = np.random.default_rng(seed)
    arr = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)  # noqa: E731
    return dict(
        x=arr(b, length, h, p), dt=jax.nn.softplus(arr(b, length, h) - 1.0).astype(dtype),
        A=-jnp.exp(arr(h, scale=0.5)).astype(jnp.float32), B=arr(b, length, g, n, scale=0.5),
        C=arr(b, length, g, n, scale=0.5), D=arr(h), initial_state=arr(b, h, p, n) if with_state else None,
    )


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_final_state_equal_the_reference(impl, case):
    args, chunk = inputs(case), CASES[case][6]
    y_ref, s_ref = SSD(**args, chunk_size=chunk, impl="reference")
    y, s = SSD(**args, chunk_size=chunk, impl=impl)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    close(y, y_ref, TOL[impl], "y")
    close(s, s_ref, TOL[impl], "final state")


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("case", ["ragged_tail_groups", "shorter_than_a_chunk"])
def test_gradients_equal_the_reference(impl, case):
    """d/d(x, dt, A, B, C, D, initial_state) of <y, Ry> + <final, Rs> for random cotangents R."""
    args, chunk = inputs(case), CASES[case][6]
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    rng = np.random.default_rng(1)
    ct_y = jnp.asarray(rng.normal(size=args["x"].shape), jnp.float32)
    ct_s = jnp.asarray(rng.normal(size=args["initial_state"].shape), jnp.float32)

    def loss(which, *values):
        y, s = SSD(**dict(zip(names, values, strict=True)), chunk_size=chunk, impl=which)
        return jnp.sum(y * ct_y) + jnp.sum(s * ct_s)

    values = [args[k] for k in names]
    grad = jax.jit(jax.grad(loss, argnums=range(1, 8)), static_argnums=0)
    want, got = grad("reference", *values), grad(impl, *values)
    for name, g, w in zip(names, got, want, strict=True):
        close(g, w, TOL[impl], f"d/d{name}")


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_bfloat16_inputs(impl):
    args = inputs("ragged_tail_groups", dtype=jnp.bfloat16)
    y_ref, s_ref = SSD(**args, chunk_size=16, impl="reference")
    y, s = SSD(**args, chunk_size=16, impl=impl)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    close(y, y_ref, 2e-2, "y")
    close(s, s_ref, 2e-2, "final state")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_pallas_tpu_form_equals_the_reference(dtype):
    """The grid form: three chunks of 128 walked on the last grid axis, forward and backward (reversed)."""
    rng = np.random.default_rng(3)
    b, length, h, g, p, n = 1, 300, 2, 1, 8, 16
    arr = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)  # noqa: E731
    args = dict(x=arr(b, length, h, p), dt=jax.nn.softplus(arr(b, length, h) - 2.0).astype(dtype),
                A=-jnp.exp(jnp.asarray(rng.normal(size=h) * 0.5, jnp.float32)), B=arr(b, length, g, n, scale=0.5),
                C=arr(b, length, g, n, scale=0.5), D=arr(h), initial_state=arr(b, h, p, n))
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    y, s = ssd_pallas(**args, chunk_size=128, backend="tpu", interpret=True)
    y_ref, s_ref = SSD(**args, chunk_size=128, impl="reference")
    assert y.dtype == dtype
    close(y, y_ref, tol, "y")
    close(s, s_ref, tol, "final state")
    ct = jnp.asarray(rng.normal(size=args["x"].shape), jnp.float32)

    def grads(fn):
        loss = lambda x, B, C, s0: jnp.sum(fn(x, B, C, s0)[0].astype(jnp.float32) * ct)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=range(4)))(args["x"], args["B"], args["C"], args["initial_state"])

    rest = {k: args[k] for k in ("dt", "A", "D")}
    got = grads(lambda x, B, C, s0: ssd_pallas(x=x, B=B, C=C, initial_state=s0, **rest, chunk_size=128,
                                               backend="tpu", interpret=True))
    want = grads(lambda x, B, C, s0: SSD(x=x, B=B, C=C, initial_state=s0, **rest, chunk_size=128, impl="reference"))
    for name, gt, w in zip(["x", "B", "C", "initial_state"], got, want, strict=True):
        close(gt, w, tol * (3 if dtype == jnp.bfloat16 else 1), f"d/d{name}")


def test_split_sequence_with_carried_state_equals_one_pass():
    """Running [0, 20) then [20, 37) from the carried state gives the same outputs and state as one pass."""
    args = inputs("ragged_tail_groups")
    y, s = SSD(**args, chunk_size=16, impl="chunked")
    first = {k: (v[:, :20] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()}
    y1, s1 = SSD(**first, chunk_size=16, impl="chunked")
    second = {k: (v[:, 20:] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()} | {"initial_state": s1}
    y2, s2 = SSD(**second, chunk_size=16, impl="chunked")
    close(jnp.concatenate([y1, y2], axis=1), y, 1e-5, "y")
    close(s2, s, 1e-5, "state")


def test_decode_steps_equal_the_reference():
    args = inputs("ragged_tail_groups")
    y_ref, s_ref = SSD(**args, chunk_size=16, impl="reference")
    state = args["initial_state"]
    for t in range(args["x"].shape[1]):
        y_t, state = DECODE_STEP(args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t],
                                     args["C"][:, t], args["D"], state)
        close(y_t, y_ref[:, t], 1e-5, f"y[{t}]")
    close(state, s_ref, 1e-5, "state")


def test_pallas_result_does_not_depend_on_the_kernel_chunk():
    args = inputs("ragged_tail_groups")
    y16, s16 = ssd_pallas(**args, chunk_size=16, block_sizes=BlockSizes(chunk=16), interpret=True)
    y32, s32 = ssd_pallas(**args, chunk_size=16, block_sizes=BlockSizes(chunk=32), interpret=True)
    close(y16, y32, 1e-4, "y")
    close(s16, s32, 1e-4, "state")


def test_block_sizes_are_legal_by_construction():
    assert BlockSizes.for_backend("gpu", 256) == BlockSizes(chunk=64)
    assert BlockSizes.for_backend("tpu", 64).chunk == 128 and BlockSizes.for_backend("tpu", 256).chunk == 256
    assert BlockSizes(chunk=16).padded(6) == 16 and BlockSizes(chunk=16).padded(80) == 128
    for backend in ("gpu", "tpu", "cpu"):
        for chunk in (1, 8, 48, 100, 256, 300):
            BlockSizes.for_backend(backend, chunk).validate(backend)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(chunk=48).validate("gpu")
    with pytest.raises(ValueError, match="multiple of 128"):
        BlockSizes(chunk=64).validate("tpu")


def test_bad_shapes_name_the_argument():
    args = inputs("one_group_exact")
    with pytest.raises(InvalidArgument, match=r"dt has shape \(1, 31, 2\), expected \(1, 32, 2\)"):
        ssd(**(args | {"dt": args["dt"][:, :31]}), chunk_size=16)
    with pytest.raises(InvalidArgument, match="groups=3 must divide heads=2"):
        B = jnp.zeros((1, 32, 3, 16))
        ssd(**(args | {"B": B, "C": B}), chunk_size=16)


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("head_dim, d_state, dtype", [(64, 128, jnp.float32), (48, 20, jnp.bfloat16)])
def test_pallas_kernels_lower_for_gpu_and_tpu(platform, backend, head_dim, d_state, dtype):
    """Cross-platform lowering on this CPU runs the Pallas Triton (GPU) and Mosaic (TPU) lowerings of both
    kernels: block shapes, loads and every primitive must be accepted (interpret mode checks none of that);
    the second case needs padding to 64 / 32 and multiplies in bf16."""
    x = jnp.zeros((1, 200, 4, head_dim), dtype)
    dt, A, D = jnp.full((1, 200, 4), 0.1, dtype), -jnp.ones(4), jnp.ones(4)
    B = jnp.zeros((1, 200, 2, d_state), dtype)

    def loss(x, dt, A, B, C, D):
        return ssd_pallas(x, dt, A, B, C, D, chunk_size=256, backend=backend)[0].astype(jnp.float32).sum()

    for fn in (loss, jax.grad(loss, argnums=range(6))):
        text = jax.jit(fn).trace(x, dt, A, B, B, D).lower(lowering_platforms=(platform,)).as_text()
        assert "ssd_forward" in text and (fn is loss or "ssd_backward" in text)

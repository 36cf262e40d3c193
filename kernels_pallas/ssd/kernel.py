"""Chunked SSD as Pallas kernels: a forward kernel and a backward kernel joined by ``jax.custom_vjp``.

Layout: one program per (batch, head); it walks the sequence chunk by chunk carrying the ``[head_dim,
d_state]`` state (``kernels_pallas.common.Sweep``: a ``fori_loop`` inside the program with Triton, where grid
axes run in parallel; the last grid axis, with the state in VMEM scratch, with Mosaic), so the kernels lower
for GPU and TPU and run with ``interpret=True`` on the CPU. Inside a chunk of ``q`` positions, with
``u = x·dt``, ``cum`` the within-chunk cumulative sum of ``dt·A``, ``S`` the state entering the chunk::

    decay[i, j] = exp(cum_i − cum_j) for i >= j, else 0                          [q, q]
    y           = ((C Bᵀ) ∘ decay) u + exp(cum) ∘ (C Sᵀ)                          [q, p]
    S'          = exp(cum_last) S + uᵀ diag(exp(cum_last − cum)) B               [p, n]

Document starts (``reset``) enter as ``r``, the count of resets at or before each position of its chunk: every
decay above is multiplied by a mask (positions i, j in one document iff r_i = r_j; the entering state reaches i
iff r_i = 0; position j reaches the chunk's end iff r_j = r_last), so the cumulative sums never see −inf and the
backward formulas keep their form with the masked decays.

The forward kernel also stores each chunk's entering state; the backward kernel walks the chunks in
reverse, carrying dS, and returns du, dB, dC (per head), d cum and d(initial state). Everything that is
not the scan (u = x·dt, the cumulative sums, padding, the D skip, summing dB/dC over the heads of a
group) is plain JAX around the kernels, differentiated by JAX.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.common import Block, Sweep, Target, dot, lane_padded, next_power_of_two, resolve_target, sweep_call
from kernels_pallas.ssd.reference import add_skip, within_chunk_resets


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """chunk: positions per in-kernel chunk (the ``[chunk, chunk]`` tiles); head_dim and d_state are
    zero-padded to ``lane_multiple`` (a power of two for Triton, 128 lanes for Mosaic TPU)."""

    chunk: int
    lane_multiple: int = 16

    @classmethod
    def for_backend(cls, backend: str, chunk_size: int) -> BlockSizes:
        """The SSD result does not depend on the chunk length, so the kernel picks one its backend likes."""
        if backend == "tpu":
            return cls(chunk=max(128, -(-chunk_size // 128) * 128), lane_multiple=16)
        chunk = next_power_of_two(max(chunk_size, 16))
        return cls(chunk=min(chunk, 64) if backend == "gpu" else chunk)

    def padded(self, dim: int) -> int:
        """head_dim / d_state after padding: a power of two >= lane_multiple."""
        return lane_padded(dim, self.lane_multiple)

    def validate(self, backend: str) -> None:
        """Block rules interpret mode does not check: Triton wants power-of-two tiles with dot operands
        >= 16; Mosaic slices the lane axis of the ``[1, L]`` cumulative sums in chunks of 128."""
        if backend == "tpu":
            if self.chunk % 128:
                raise ValueError(f"BlockSizes.chunk={self.chunk} must be a multiple of 128 on TPU")
        elif self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"BlockSizes.chunk={self.chunk} must be a power of two >= 16")


def _row_sum(t):
    return jnp.sum(t, axis=1, keepdims=True)


def _decays(col_ref, row_ref, rcol_ref, rrow_ref, start, q, causal):
    """The masked decays of the chunk at ``start``: (decay ``[q, q]``, from the chunk's start ``[q, 1]``, to its end
    ``[q, 1]``, across it ``[1, 1]``); last values are loaded, since Triton cannot slice a value."""
    rows, last_row = pl.ds(start, q), pl.ds(start + q - 1, 1)
    col, row, last = col_ref[rows, :], row_ref[:, rows], col_ref[last_row, :]
    r_col, r_row, r_last = rcol_ref[rows, :], rrow_ref[:, rows], rcol_ref[last_row, :]
    decay = jnp.exp(jnp.where(causal & (r_col == r_row), col - row, -jnp.inf))  # masked before the exp
    e = jnp.where(r_col == 0, jnp.exp(col), 0.0)
    w = jnp.where(r_col == r_last, jnp.exp(last - col), 0.0)
    return decay, e, w, jnp.where(r_last == 0, jnp.exp(last), 0.0)


def _forward_kernel(u_ref, col_ref, row_ref, rcol_ref, rrow_ref, b_ref, c_ref, s0_ref, y_ref, states_ref, final_ref,
                    *scratch, sweep, q, n_chunks):
    causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)

    def chunk(c, state):
        start = sweep.start(c, q)
        rows = pl.ds(start, q)
        u, B, C = u_ref[rows, :], b_ref[rows, :], c_ref[rows, :]  # [q, p], [q, n], [q, n]
        decay, e, w, e_last = _decays(col_ref, row_ref, rcol_ref, rrow_ref, start, q, causal)
        states_ref[sweep.item(c)] = state
        scores = dot(C, B, trans_b=True) * decay
        y_ref[rows, :] = dot(scores.astype(u.dtype), u) + e * dot(C, state.astype(C.dtype), trans_b=True)
        return e_last * state + dot((u * w).astype(B.dtype), B, trans_a=True)

    def finish(state):
        final_ref[...] = state

    sweep.run(0, n_chunks, chunk, s0_ref[...], finish, scratch)


def _backward_kernel(u_ref, col_ref, row_ref, rcol_ref, rrow_ref, b_ref, c_ref, states_ref, dy_ref, dfinal_ref,
                     du_ref, db_ref, dc_ref, dcol_ref, drow_ref, ds0_ref, *scratch, sweep, q, n_chunks):
    causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1

    def chunk(i, d_state):
        c = n_chunks - 1 - i
        start = sweep.start(c, q)
        rows = pl.ds(start, q)
        u, B, C, dy = u_ref[rows, :], b_ref[rows, :], c_ref[rows, :], dy_ref[rows, :]
        state = states_ref[sweep.item(c)]  # [p, n] entering this chunk
        low = lambda t: t.astype(u.dtype)  # noqa: E731  (products take the inputs' dtype)
        decay, e, w, e_last = _decays(col_ref, row_ref, rcol_ref, rrow_ref, start, q, causal)
        G = dot(C, B, trans_b=True)
        # y = (G ∘ decay) u + e ∘ (C Sᵀ)
        d_scores = dot(low(dy), u, trans_b=True) * decay  # dG
        T = d_scores * G  # d(decay) ∘ decay
        u_dS = dot(u, low(d_state))  # [q, n]
        du_ref[rows, :] = dot(low(G * decay), low(dy), trans_a=True) + w * dot(B, low(d_state), trans_b=True)
        dc_ref[rows, :] = dot(low(d_scores), B) + e * dot(low(dy), low(state))
        db_ref[rows, :] = dot(low(d_scores), C, trans_a=True) + w * u_dS
        de = _row_sum(dy * dot(C, low(state), trans_b=True))
        dw = _row_sum(u_dS * B)
        d_last = jnp.sum(dw * w, axis=0, keepdims=True) + jnp.sum(_row_sum(state * d_state), axis=0,
                                                                 keepdims=True) * e_last
        dcol_ref[rows, :] = _row_sum(T) + de * e - dw * w + jnp.where(is_last, d_last, 0.0)
        drow_ref[:, rows] = -jnp.sum(T, axis=0, keepdims=True)
        return e_last * d_state + dot(low(dy * e), C, trans_a=True)

    def finish(d_state):
        ds0_ref[...] = d_state

    sweep.run(0, n_chunks, chunk, dfinal_ref[...], finish, scratch)


def _pallas(kernel, name, u, B, q, target, in_names, out_names, *args, reverse=False):
    """One program per (batch, head) on head-major arrays, walking the chunks (backwards with ``reverse``);
    blocks are named by what they hold: ``seq_p`` ``[L, p]``, ``seq_n`` ``[L, n]``, ``col`` ``[L, 1]``, ``row``
    ``[1, L]``, ``state`` ``[p, n]``, ``states`` ``[chunks, p, n]`` per head, and ``group`` ``[L, n]`` of the
    head's group (B and C). Outputs are float32."""
    b, h, length, p = u.shape
    g, n = B.shape[1], B.shape[-1]
    n_chunks = length // q
    head = lambda i, j, c: (i, j)  # noqa: E731
    group = lambda i, j, c: (i, lax.div(j, h // g))  # noqa: E731
    blocks = {"seq_p": Block((None, None, q, p), lambda *a: (*head(*a), a[2], 0), walked=2, full=length),
              "seq_n": Block((None, None, q, n), lambda *a: (*head(*a), a[2], 0), walked=2, full=length),
              "group": Block((None, None, q, n), lambda *a: (*group(*a), a[2], 0), walked=2, full=length),
              "col": Block((None, None, q, 1), lambda *a: (*head(*a), a[2], 0), walked=2, full=length),
              "row": Block((None, None, 1, q), lambda *a: (*head(*a), 0, a[2]), walked=3, full=length),
              "states": Block((None, None, 1, p, n), lambda *a: (*head(*a), a[2], 0, 0), walked=2, full=n_chunks),
              "state": Block((None, None, p, n), lambda *a: (*head(*a), 0, 0))}
    full = {"seq_p": (length, p), "seq_n": (length, n), "col": (length, 1), "row": (1, length), "state": (p, n),
            "states": (n_chunks, p, n)}
    return sweep_call(
        functools.partial(kernel, sweep=Sweep(target.sweep_in_grid, 2), q=q, n_chunks=n_chunks),
        target=target, name=name, outer=(b, h), steps=n_chunks,
        step_map=(lambda i, j, step: n_chunks - 1 - step) if reverse else (lambda i, j, step: step),
        inputs=[blocks[x] for x in in_names], outputs=[blocks[x] for x in out_names],
        out_shape=[jax.ShapeDtypeStruct((b, h, *full[x]), jnp.float32) for x in out_names],
        scratch=[(p, n)], with_offset=False,
    )(*args)


def _forward(u, cum, counts, B, C, s0, q, target):
    return _pallas(_forward_kernel, "ssd_forward", u, B, q, target,
                   ["seq_p", "col", "row", "col", "row", "group", "group", "state"], ["seq_p", "states", "state"],
                   u, cum[..., None], cum[:, :, None, :], counts[..., None], counts[:, :, None, :], B, C, s0)


def _backward(u, cum, counts, B, C, states, dy, dfinal, q, target):
    return _pallas(_backward_kernel, "ssd_backward", u, B, q, target,
                   ["seq_p", "col", "row", "col", "row", "group", "group", "states", "seq_p", "state"],
                   ["seq_p", "seq_n", "seq_n", "col", "row", "state"],
                   u, cum[..., None], cum[:, :, None, :], counts[..., None], counts[:, :, None, :], B, C, states, dy,
                   dfinal, reverse=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def ssd_scan(u, cum, counts, B, C, initial_state, q: int, target: Target):
    """The kernel-level scan on padded, head-major arrays: u ``[b, h, L, p]`` (x·dt), B/C ``[b, g, L, n]`` in
    one dtype (the products' operands: bf16/fp16 on the tensor cores, or float32), cum ``[b, h, L]`` (within-
    chunk cumulative dt·A), counts ``[b, h, L]`` (within-chunk cumulative document starts) and initial_state
    ``[b, h, p, n]`` float32; L a multiple of q → (y ``[b, h, L, p]`` without the D skip, final state), float32."""
    y, _, final = _forward(u, cum, counts, B, C, initial_state, q, target)
    return y, final


def _ssd_scan_fwd(u, cum, counts, B, C, initial_state, q, target):
    y, states, final = _forward(u, cum, counts, B, C, initial_state, q, target)
    return (y, final), (u, cum, counts, B, C, states)


def _ssd_scan_bwd(q, target, residuals, cotangents):
    u, cum, counts, B, C, states = residuals
    dy, dfinal = cotangents
    du, dB, dC, dcol, drow, ds0 = _backward(u, cum, counts, B, C, states, dy, dfinal, q, target)
    b, h, length, n = dB.shape
    g = B.shape[1]
    per_group = lambda t: t.reshape(b, g, h // g, length, n).sum(axis=2)  # noqa: E731
    return (du.astype(u.dtype), dcol[..., 0] + drow[:, :, 0, :], jnp.zeros_like(counts),
            per_group(dB).astype(B.dtype), per_group(dC).astype(C.dtype), ds0)


ssd_scan.defvjp(_ssd_scan_fwd, _ssd_scan_bwd)


def ssd_pallas(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None, reset=None,
               block_sizes: BlockSizes | None = None, interpret: bool | None = None, backend: str | None = None):
    """Same contract as ``ssd_reference``: x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B/C ``[b, l, g, n]``,
    D ``[h]``, initial_state ``[b, h, p, n]``, reset ``[b, l]`` bool → (y in x's dtype, final state float32).
    Differentiable.

    The products take u = x·dt, B and C in the inputs' common dtype and accumulate in float32; decays, states
    and outputs are float32. ``backend`` ("gpu", "tpu"; default: the current one) picks the kernel form,
    tiles and compiler parameters; ``interpret=True`` (always so on a CPU) runs the kernels as plain JAX.
    """
    target = resolve_target(backend, interpret)
    blocks = block_sizes or BlockSizes.for_backend(target.backend, chunk_size)
    blocks.validate(target.backend)
    b, length, h, p = x.shape
    n = B.shape[3]
    q, p_pad, n_pad = blocks.chunk, blocks.padded(p), blocks.padded(n)
    pad_len = -length % q
    f32, operand = jnp.float32, jnp.result_type(x, B, C)

    def padded(t, last):  # [b, l, heads, last] → [b, heads, L, last_padded], zeros appended
        t = jnp.pad(t.astype(operand), [(0, 0), (0, pad_len), (0, 0), (0, last - t.shape[-1])])
        return jnp.swapaxes(t, 1, 2)

    u = padded(x.astype(f32) * dt.astype(f32)[..., None], p_pad)
    a = jnp.swapaxes(jnp.pad(dt.astype(f32) * A.astype(f32), [(0, 0), (0, pad_len), (0, 0)]), 1, 2)  # [b, h, L]
    cum = jnp.cumsum(a.reshape(b, h, -1, q), axis=-1).reshape(b, h, -1)
    reset = jnp.zeros((b, length), bool) if reset is None else reset
    counts = jnp.broadcast_to(within_chunk_resets(reset, length, q).reshape(b, 1, -1), cum.shape)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    s0 = jnp.pad(s0, [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])
    y, final = ssd_scan(u, cum, counts, padded(B, n_pad), padded(C, n_pad), s0, q, target)
    y = jnp.swapaxes(y[:, :, :length, :p], 1, 2)
    return add_skip(y, x, D).astype(x.dtype), final[:, :, :p, :n]

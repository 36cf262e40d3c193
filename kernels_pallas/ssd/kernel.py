"""Chunked SSD as Pallas kernels: a forward kernel and a backward kernel joined by ``jax.custom_vjp``.

Layout: one program per (batch, head); it walks the sequence chunk by chunk with ``lax.fori_loop``,
carrying the ``[head_dim, d_state]`` state, so the same kernel lowers on GPU (Triton: grid axes run in
parallel, the chunk loop stays inside the program) and TPU (Mosaic), and runs with ``interpret=True``
on the CPU. Inside a chunk of ``q`` positions, with ``u = x·dt``, ``cum`` the within-chunk cumulative
sum of ``dt·A``, ``S`` the state entering the chunk::

    decay[i, j] = exp(cum_i − cum_j) for i >= j, else 0                          [q, q]
    y           = ((C Bᵀ) ∘ decay) u + exp(cum) ∘ (C Sᵀ)                          [q, p]
    S'          = exp(cum_last) S + uᵀ diag(exp(cum_last − cum)) B               [p, n]

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

from kernels_pallas.common import compiler_params, dot, lane_padded, next_power_of_two, resolve_backend
from kernels_pallas.ssd.reference import add_skip


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


def _chunk_decay(col, row, causal):
    """exp(cum_i − cum_j) below the diagonal, 0 above (masked before the exp: no overflow)."""
    return jnp.exp(jnp.where(causal, col - row, -jnp.inf))


def _forward_kernel(u_ref, col_ref, row_ref, b_ref, c_ref, s0_ref, y_ref, states_ref, final_ref, *, q, n_chunks):
    causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)

    def chunk(c, state):
        start = pl.multiple_of(c * q, q)
        rows = pl.ds(start, q)
        u, col, row = u_ref[rows, :], col_ref[rows, :], row_ref[:, rows]  # [q, p], [q, 1], [1, q]
        B, C = b_ref[rows, :], c_ref[rows, :]  # [q, n]
        last = col_ref[pl.ds(start + q - 1, 1), :]  # [1, 1]: loaded, since Triton cannot slice a value
        states_ref[c] = state
        scores = dot(C, B, trans_b=True) * _chunk_decay(col, row, causal)
        y_ref[rows, :] = dot(scores, u) + jnp.exp(col) * dot(C, state, trans_b=True)
        return jnp.exp(last) * state + dot(u * jnp.exp(last - col), B, trans_a=True)

    final_ref[...] = lax.fori_loop(0, n_chunks, chunk, s0_ref[...])


def _backward_kernel(u_ref, col_ref, row_ref, b_ref, c_ref, states_ref, dy_ref, dfinal_ref,
                     du_ref, db_ref, dc_ref, dcol_ref, drow_ref, ds0_ref, *, q, n_chunks):
    causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
    is_last = lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1

    def chunk(i, d_state):
        c = n_chunks - 1 - i
        start = pl.multiple_of(c * q, q)
        rows = pl.ds(start, q)
        u, col, row = u_ref[rows, :], col_ref[rows, :], row_ref[:, rows]
        B, C, dy = b_ref[rows, :], c_ref[rows, :], dy_ref[rows, :]
        last = col_ref[pl.ds(start + q - 1, 1), :]
        state = states_ref[c]  # [p, n] entering this chunk
        decay = _chunk_decay(col, row, causal)
        G = dot(C, B, trans_b=True)
        e, w, e_last = jnp.exp(col), jnp.exp(last - col), jnp.exp(last)  # [q, 1], [q, 1], [1, 1]
        # y = (G ∘ decay) u + e ∘ (C Sᵀ)
        d_scores = dot(dy, u, trans_b=True) * decay  # dG
        T = d_scores * G  # d(decay) ∘ decay
        u_dS = dot(u, d_state)  # [q, n]
        du_ref[rows, :] = dot(G * decay, dy, trans_a=True) + w * dot(B, d_state, trans_b=True)
        dc_ref[rows, :] = dot(d_scores, B) + e * dot(dy, state)
        db_ref[rows, :] = dot(d_scores, C, trans_a=True) + w * u_dS
        de = _row_sum(dy * dot(C, state, trans_b=True))
        dw = _row_sum(u_dS * B)
        d_last = jnp.sum(dw * w, axis=0, keepdims=True) + jnp.sum(_row_sum(state * d_state), axis=0,
                                                                 keepdims=True) * e_last
        dcol_ref[rows, :] = _row_sum(T) + de * e - dw * w + jnp.where(is_last, d_last, 0.0)
        drow_ref[:, rows] = -jnp.sum(T, axis=0, keepdims=True)
        return e_last * d_state + dot(dy * e, C, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, n_chunks, chunk, dfinal_ref[...])


def _pallas(kernel, name, u, B, q, backend, in_names, out_names, *args):
    """One program per (batch, head) on head-major arrays; blocks are named by what they hold: ``seq_p``
    ``[L, p]``, ``seq_n`` ``[L, n]``, ``col`` ``[L, 1]``, ``row`` ``[1, L]``, ``state`` ``[p, n]``, ``states``
    ``[chunks, p, n]`` per head, and ``group`` ``[L, n]`` of the head's group (B and C). Outputs are float32."""
    b, h, length, p = u.shape
    g, n = B.shape[1], B.shape[-1]
    n_chunks = length // q
    shapes = {"seq_p": (length, p), "seq_n": (length, n), "col": (length, 1), "row": (1, length),
              "state": (p, n), "states": (n_chunks, p, n)}

    def spec(block):
        if block == "group":
            return pl.BlockSpec((None, None, length, n), lambda i, j: (i, j // (h // g), 0, 0))
        tail = shapes[block]
        return pl.BlockSpec((None, None, *tail), lambda i, j: (i, j) + (0,) * len(tail))

    return pl.pallas_call(
        functools.partial(kernel, q=q, n_chunks=n_chunks),
        grid=(b, h),
        in_specs=[spec(x) for x in in_names],
        out_specs=[spec(x) for x in out_names],
        out_shape=[jax.ShapeDtypeStruct((b, h, *shapes[x]), jnp.float32) for x in out_names],
        interpret=backend not in ("gpu", "tpu"),
        compiler_params=compiler_params(backend, 2),
        name=name,
    )(*args)


def _forward(u, cum, B, C, s0, q, backend):
    return _pallas(_forward_kernel, "ssd_forward", u, B, q, backend,
                   ["seq_p", "col", "row", "group", "group", "state"], ["seq_p", "states", "state"],
                   u, cum[..., None], cum[:, :, None, :], B, C, s0)


def _backward(u, cum, B, C, states, dy, dfinal, q, backend):
    return _pallas(_backward_kernel, "ssd_backward", u, B, q, backend,
                   ["seq_p", "col", "row", "group", "group", "states", "seq_p", "state"],
                   ["seq_p", "seq_n", "seq_n", "col", "row", "state"],
                   u, cum[..., None], cum[:, :, None, :], B, C, states, dy, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def ssd_scan(u, cum, B, C, initial_state, q: int, backend: str):
    """The kernel-level scan on padded, head-major float32 arrays.

    u ``[b, h, L, p]`` (x·dt), cum ``[b, h, L]`` (within-chunk cumulative dt·A), B/C ``[b, g, L, n]``,
    initial_state ``[b, h, p, n]``; L a multiple of q → (y ``[b, h, L, p]`` without the D skip, final state).
    ``backend`` "gpu" (Triton) or "tpu" (Mosaic) compiles the kernels; anything else interprets them.
    """
    y, _, final = _forward(u, cum, B, C, initial_state, q, backend)
    return y, final


def _ssd_scan_fwd(u, cum, B, C, initial_state, q, backend):
    y, states, final = _forward(u, cum, B, C, initial_state, q, backend)
    return (y, final), (u, cum, B, C, states)


def _ssd_scan_bwd(q, backend, residuals, cotangents):
    u, cum, B, C, states = residuals
    dy, dfinal = cotangents
    du, dB, dC, dcol, drow, ds0 = _backward(u, cum, B, C, states, dy, dfinal, q, backend)
    b, h, length, n = dB.shape
    g = B.shape[1]
    per_group = lambda t: t.reshape(b, g, h // g, length, n).sum(axis=2)  # noqa: E731
    return du, dcol[..., 0] + drow[:, :, 0, :], per_group(dB), per_group(dC), ds0


ssd_scan.defvjp(_ssd_scan_fwd, _ssd_scan_bwd)


def ssd_pallas(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None, block_sizes: BlockSizes | None = None,
               interpret: bool | None = None, backend: str | None = None):
    """Same contract as ``ssd_reference``: x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B/C ``[b, l, g, n]``,
    D ``[h]``, initial_state ``[b, h, p, n]`` → (y in x's dtype, final state float32). Differentiable.

    ``backend`` ("gpu", "tpu"; default: the current one) picks the lowering, block sizes and compiler
    parameters; ``interpret=True`` (the default off GPU and TPU) runs the kernels as plain JAX instead.
    """
    backend = resolve_backend(backend, interpret)
    blocks = block_sizes or BlockSizes.for_backend(backend, chunk_size)
    blocks.validate(backend)
    b, length, h, p = x.shape
    n = B.shape[3]
    q, p_pad, n_pad = blocks.chunk, blocks.padded(p), blocks.padded(n)
    pad_len = -length % q
    f32 = jnp.float32

    def padded(t, last):  # [b, l, heads, last] → [b, heads, L, last_padded], zeros appended
        t = jnp.pad(t.astype(f32), [(0, 0), (0, pad_len), (0, 0), (0, last - t.shape[-1])])
        return jnp.swapaxes(t, 1, 2)

    u = padded(x.astype(f32) * dt.astype(f32)[..., None], p_pad)
    a = jnp.swapaxes(jnp.pad(dt.astype(f32) * A.astype(f32), [(0, 0), (0, pad_len), (0, 0)]), 1, 2)  # [b, h, L]
    cum = jnp.cumsum(a.reshape(b, h, -1, q), axis=-1).reshape(b, h, -1)
    s0 = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    s0 = jnp.pad(s0, [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])
    y, final = ssd_scan(u, cum, padded(B, n_pad), padded(C, n_pad), s0, q, backend)
    y = jnp.swapaxes(y[:, :, :length, :p], 1, 2)
    return add_skip(y, x, D).astype(x.dtype), final[:, :, :p, :n]

"""The state-space dual (SSD) scan of Mamba2, behind one signature.

Per head h, with the group g(h) = h // (heads // groups) supplying B and C::

    S_t = exp(dt_t · A) · S_{t-1} + dt_t · x_t ⊗ B_t          S: [head_dim, d_state]
    y_t = S_t · C_t + D · x_t

``impl``: ``reference`` (the recurrence, ``lax.scan`` over time: the definition), ``chunked`` (the SSD
algorithm in jax.numpy: quadratic attention-like form inside each chunk, a recurrence across chunks),
``pallas`` (``kernels_pallas.ssd``: forward and backward kernels), ``auto`` (Pallas where it was
measured faster on this backend, ``zebrax.ops.auto``; chunked elsewhere). Every impl accumulates in
float32 and returns y in x's dtype, the state in float32.

``reset`` ``[b, l]`` bool (optional) starts a new document at t: the state from before t is dropped (documents
packed into one row stay apart). Every impl masks the decays it would apply across a reset with ``where``;
no decay is ever set to −inf, so the cumulative sums stay finite and exact.

``chunk_size`` is the block length of the algorithm. The result does not depend on it (up to float
rounding), so it is a speed setting: ``chunked`` uses it as given; ``pallas`` lets its ``BlockSizes`` adapt
it to the backend's tile rules; ``auto`` on a CPU caps it at ``CPU_CHUNK``.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp

from kernels_pallas.ssd.reference import add_skip, repeat_groups, ssd_reference, ssd_step, within_chunk_resets
from zebrax.errors import InvalidArgument
from zebrax.ops.auto import pallas_is_default, target_backend
from zebrax.ops.sharded import per_shard

CPU_CHUNK = 64  # block length `auto` uses for the chunked path on a CPU (measured in docs/benchmarks.md)


class SSDImpl(str, enum.Enum):
    REFERENCE = "reference"
    CHUNKED = "chunked"
    PALLAS = "pallas"
    AUTO = "auto"


def ssd(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None, reset=None, impl: str | SSDImpl = "auto"):
    """x ``[b, l, h, p]``, dt ``[b, l, h]`` (already softplus'd and biased), A ``[h]``,
    B and C ``[b, l, g, n]`` (g divides h), D ``[h]`` or None, initial_state ``[b, h, p, n]`` or None,
    reset ``[b, l]`` bool or None → (y ``[b, l, h, p]``, final_state ``[b, h, p, n]`` float32)."""
    _check_shapes(x, dt, A, B, C, D, initial_state, chunk_size)
    if reset is not None and tuple(reset.shape) != tuple(x.shape[:2]):
        raise InvalidArgument(f"ssd: reset has shape {tuple(reset.shape)}, expected {tuple(x.shape[:2])}")
    impl = SSDImpl(impl)
    if impl is SSDImpl.AUTO:
        if pallas_is_default("ssd"):
            impl = SSDImpl.PALLAS
        else:  # the result does not depend on the block length; on a CPU short blocks are fastest
            impl = SSDImpl.CHUNKED
            chunk_size = min(chunk_size, CPU_CHUNK) if target_backend() == "cpu" else chunk_size
    kw = dict(initial_state=initial_state, reset=reset)
    if impl is SSDImpl.REFERENCE:
        return ssd_reference(x, dt, A, B, C, D, **kw)
    if impl is SSDImpl.CHUNKED:
        return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)
    from kernels_pallas.ssd import ssd_pallas

    run = lambda x, dt, A, B, C, D, s0, r: ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size,  # noqa: E731
                                                      initial_state=s0, reset=r, backend=target_backend())
    dims = ("b.h.", "b.h", "h", "b.h.", "b.h.", "h", "bh..", "b.")  # x, dt, A, B, C, D, initial_state, reset
    return per_shard(run, (x, dt, A, B, C, D, initial_state, reset), dims, ("b.h.", "bh.."))


def _check_shapes(x, dt, A, B, C, D, initial_state, chunk_size):
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    expected = {
        "dt": (dt.shape, (b, length, h)), "A": (A.shape, (h,)), "B": (B.shape, (b, length, g, n)),
        "C": (C.shape, (b, length, g, n)),
    }
    if D is not None:
        expected["D"] = (D.shape, (h,))
    if initial_state is not None:
        expected["initial_state"] = (initial_state.shape, (b, h, p, n))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise InvalidArgument(f"ssd: {name} has shape {tuple(got)}, expected {want} for x {tuple(x.shape)}")
    if h % g:
        raise InvalidArgument(f"ssd: groups={g} must divide heads={h}")
    if chunk_size < 1:
        raise InvalidArgument(f"ssd: chunk_size={chunk_size} must be >= 1")


def segsum(a):
    """a ``[..., T]`` → ``[..., T, T]`` with ``out[i, j] = a[j+1] + … + a[i]`` for i >= j, −inf above the
    diagonal. Built from masked cumulative sums, never from differences of large prefix sums."""
    t = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((t, t), bool), -1)
    sums = jnp.cumsum(jnp.where(strictly_lower, a[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), sums, -jnp.inf)


def ssd_chunked(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None, reset=None):
    """The SSD algorithm: b batch, c chunk, l/s positions in a chunk, g group, r head in group, p head dim,
    n state. B and C stay per group (never repeated to heads). Inside a chunk the decay is
    ``exp(cum_l − cum_s)`` from the within-chunk cumulative sum (float32), as in mamba_ssm's kernels; with
    ``reset``, the decays across a document start are masked to 0 (``within_chunk_resets``)."""
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, q = h // g, chunk_size
    pad = -length % q
    f32 = lambda t: jnp.pad(t.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))  # noqa: E731
    c = (length + pad) // q
    xdt = (f32(x) * f32(dt)[..., None]).reshape(b, c, q, g, r, p)
    Bc, Cc = f32(B).reshape(b, c, q, g, n), f32(C).reshape(b, c, q, g, n)
    a = (f32(dt) * A.astype(jnp.float32)).reshape(b, c, q, g, r)
    a_cum = jnp.cumsum(jnp.moveaxis(a, 2, -1), axis=-1)  # [b, c, g, r, l]
    counts = within_chunk_resets(jnp.zeros((b, length), bool) if reset is None else reset, length, q)  # [b, c, l]
    same = (counts[..., :, None] == counts[..., None, :])[:, :, None, None]  # [b, c, 1, 1, l, s]
    # 1. inside each chunk: masked, decayed attention-like product
    causal = jnp.tril(jnp.ones((q, q), bool)) & same
    decay = jnp.exp(jnp.where(causal, a_cum[..., :, None] - a_cum[..., None, :], -jnp.inf))  # [b, c, g, r, l, s]
    scores = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xdt)
    # 2. the state each chunk adds, decayed to the chunk's end
    reaches_end = (counts == counts[..., -1:])[:, :, :, None, None, None]  # [b, c, l, 1, 1, 1]
    to_end = jnp.where(reaches_end, jnp.moveaxis(jnp.exp(a_cum[..., -1:] - a_cum), -1, 2)[..., None], 0.0)
    chunk_states = jnp.einsum("bclgn,bclgrp->bcgrpn", Bc, xdt * to_end)
    # 3. across chunks: the state entering each chunk (z: target chunk, c: source; index 0 = initial state)
    init = jnp.zeros((b, 1, g, r, p, n), jnp.float32) if initial_state is None else (
        initial_state.astype(jnp.float32).reshape(b, 1, g, r, p, n)
    )
    chunk_states = jnp.concatenate([init, chunk_states], axis=1)
    chunk_totals = jnp.moveaxis(a_cum[..., -1], 1, -1)  # [b, g, r, c]
    chunk_decay = jnp.exp(segsum(jnp.pad(chunk_totals, [(0, 0)] * 3 + [(1, 0)])))  # [b, g, r, c+1, c+1]
    resets_between = segsum(jnp.pad(counts[..., -1], [(0, 0), (1, 0)]))[:, None, None]  # chunks passed through
    chunk_decay = jnp.where(resets_between == 0, chunk_decay, 0.0)
    states = jnp.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, chunk_states)
    states, final = states[:, :-1], states[:, -1]
    # 4. the entering state read out inside each chunk
    from_start = jnp.where((counts == 0)[:, :, :, None, None, None], jnp.moveaxis(jnp.exp(a_cum), -1, 2)[..., None],
                           0.0)  # [b, c, l, g, r, 1]
    y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", Cc, states) * from_start
    y = (y_diag + y_off).reshape(b, c * q, h, p)[:, :length]
    return add_skip(y, x, D).astype(x.dtype), final.reshape(b, h, p, n)


def ssd_decode_step(x, dt, A, B, C, D, state):
    """One new token in O(1): x ``[b, h, p]``, dt ``[b, h]``, A ``[h]``, B/C ``[b, g, n]``, D ``[h]`` or None,
    state ``[b, h, p, n]`` → (y ``[b, h, p]`` in x's dtype, new state float32)."""
    h = x.shape[1]
    y, state = ssd_step(x, dt, A, repeat_groups(B[:, None], h)[:, 0], repeat_groups(C[:, None], h)[:, 0], state)
    return add_skip(y, x, D).astype(x.dtype), state

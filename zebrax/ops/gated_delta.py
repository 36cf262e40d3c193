"""The gated delta rule (Gated DeltaNet: Yang, Kautz & Hatamizadeh 2024; the linear mixer of Qwen3-Next and of HyLo).

Per head, a state ``S`` ``[K, V]`` (keys → values) is decayed, corrected toward the current value, and read::

    S_t = exp(g_t) · S_{t-1}
    S_t = S_t + β_t · k_t ⊗ (v_t − S_tᵀ k_t)            (the delta rule: write what the state does not yet hold)
    o_t = S_tᵀ (q_t · scale)

``g`` ≤ 0 is the log decay, ``β`` ∈ (0, 1) the write strength; ``scale`` defaults to K^-½. Three forms, one
definition:

- ``gated_delta_reference``: the recurrence above, token by token (``lax.scan``): the definition.
- ``gated_delta_chunked``: the same in chunks of C tokens (the WY form): inside a chunk the writes are one unit-lower
  triangular inverse, ``T = (I + strict_lower(diag(β) K Kᵀ ⊙ Γ))⁻¹`` (``_unit_lower_inverse``, forward
  substitution), with Γ_ij = exp(G_i − G_j) the decay between tokens; then ``U = T (β ⊙ V)``,
  ``W = T (β ⊙ exp(G) ⊙ K)``; the state crosses chunks once each: what a chunk writes is ``U − W S`` (the new values
  less what the old state already gave). Matmuls of C × C and C × K, so the sequence costs O(L·C·(K+V) + L·K·V) and
  keeps a state a chunk.
- ``gated_delta_step``: one token against a carried state, for decode.

Shapes: ``q``, ``k`` ``[B, L, Hk, K]``; ``v`` ``[B, L, H, V]``; ``g``, ``beta`` ``[B, L, H]``; state ``[B, H, K, V]``
(float32); ``reset`` ``[B, L]`` bool (optional) starts a new document at t: ``S_{t-1}`` is dropped (packed rows), the
decays across it masked with ``where``. ``Hk`` divides ``H``: each query/key head serves ``H / Hk`` consecutive
value heads (Qwen3-Next's grouping). Computed in float32; the output has ``v``'s dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prepare(q, k, v, g, beta, scale):
    """float32, heads grouped to ``v``'s, ``q`` scaled."""
    heads, k_heads = v.shape[2], k.shape[2]
    if q.shape != k.shape:
        raise ValueError(f"gated delta: q {q.shape} and k {k.shape} must have one shape")
    if heads % k_heads:
        raise ValueError(f"gated delta: {k_heads} key heads do not divide {heads} value heads")
    q, k = (jnp.repeat(x, heads // k_heads, axis=2) for x in (q, k))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return f32(q) * scale, f32(k), f32(v), f32(g), f32(beta)


def _initial(state, q, v):
    """``state``, or zeros ``[B, H, K, V]``, float32 (q ``[B, L, H, K]``, v ``[B, L, H, V]``)."""
    b, _, h, d_k = q.shape
    return jnp.zeros((b, h, d_k, v.shape[-1]), jnp.float32) if state is None else state.astype(jnp.float32)


def _step(state, q, k, v, g, beta, reset):
    """One token: ``state`` ``[B, H, K, V]``; q, k ``[B, H, K]``; v ``[B, H, V]``; g, beta ``[B, H]``; reset ``[B]``."""
    state = jnp.where(reset[:, None, None, None], 0.0, state * jnp.exp(g)[..., None, None])
    delta = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", state, k))
    state = state + jnp.einsum("bhk,bhv->bhkv", k, delta)
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def _resets(reset, v):
    """``reset`` ``[B, L]`` bool, checked, or all False."""
    if reset is None:
        return jnp.zeros(v.shape[:2], bool)
    if tuple(reset.shape) != tuple(v.shape[:2]):
        raise ValueError(f"gated delta: reset has shape {tuple(reset.shape)}, expected {tuple(v.shape[:2])}")
    return reset.astype(bool)


def gated_delta_reference(q, k, v, g, beta, *, scale=None, initial_state=None, reset=None):
    """(output ``[B, L, H, V]``, final state ``[B, H, K, V]``): the recurrence, token by token."""
    dtype, reset = v.dtype, _resets(reset, v)
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)

    def one(state, x):
        return _step(state, *x)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset)]
    state, out = jax.lax.scan(one, _initial(initial_state, q, v), time_major)
    return jnp.moveaxis(out, 0, 1).astype(dtype), state


def gated_delta_step(q, k, v, g, beta, state, *, scale=None):
    """(output ``[B, H, V]``, new state): one token (q, k ``[B, Hk, K]``, v ``[B, H, V]``, g, beta ``[B, H]``)
    against ``state`` ``[B, H, K, V]``, for decode."""
    out, state = gated_delta_reference(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale=scale,
                                       initial_state=state)  # decode: no reset
    return out[:, 0], state


@jax.custom_vjp
def _unit_lower_inverse(strict: jax.Array) -> jax.Array:
    """``(I + N)⁻¹`` of strictly lower triangular ``N`` ``[..., C, C]`` by forward substitution, a row a step: row
    ``i`` is ``e_i − N_i (I + N)⁻¹``, which reads only the rows above it (``N_ij = 0`` for ``j ≥ i``). Backward
    stable, as a triangular solve is. The power series ``Π_j (I + (−N)^(2^j))`` is not: where keys repeat and decay
    and β are near 1 (a repeated text), ``N^(2^j)`` reaches C(64, 31) ≈ 1.8e18 and float32 loses the inverse to
    cancellation (a trained hybrid's state overflowed after 512 tokens of RULER's haystack). No LAPACK call either:
    XLA:CPU runs a triangular solve as one into scipy's OpenBLAS, which a training step calling it from XLA's threads
    could hang in. The gradient is the inverse's own (``_inverse_vjp``), so the backward pass keeps ``T``, not the C
    steps of the substitution."""
    c = strict.shape[-1]
    eye = jnp.eye(c, dtype=strict.dtype)

    def row(i, inverse):
        below = jnp.einsum("...j,...jk->...k", strict[..., i, :], inverse)
        return inverse.at[..., i, :].set(eye[i] - below)

    return jax.lax.fori_loop(1, c, row, jnp.broadcast_to(eye, strict.shape))


def _inverse_vjp(inverse, grad):
    """T = (I + N)⁻¹ ⇒ dN = −Tᵀ dT Tᵀ, kept where N lives (strictly below the diagonal)."""
    t = jnp.swapaxes(inverse, -1, -2)
    return (jnp.tril(-(t @ grad @ t), -1),)


_unit_lower_inverse.defvjp(lambda strict: (_unit_lower_inverse(strict),) * 2, _inverse_vjp)


def gated_delta_chunked(q, k, v, g, beta, *, chunk_size: int = 64, scale=None, initial_state=None, reset=None):
    """(output ``[B, L, H, V]``, final state ``[B, H, K, V]``): the recurrence in chunks of ``chunk_size`` tokens
    (module docstring). ``L`` need not be a multiple of the chunk: the tail is padded with tokens that neither decay
    (g = 0) nor write (β = 0, k = 0). With ``reset``, R_i counts the resets at or before token i of its chunk: a decay
    from j to i holds iff R_i = R_j, from the chunk's start to i iff R_i = 0."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated delta: chunk_size={chunk_size!r} must be an integer >= 1")
    dtype, length, reset = v.dtype, v.shape[1], _resets(reset, v)
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale)
    pad = -length % chunk_size
    if pad:
        q, k, v, g, beta, reset = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                                   for x in (q, k, v, g, beta, reset))
    state = _initial(initial_state, q, v)
    b, total, h, _ = q.shape
    n, c = total // chunk_size, chunk_size
    # [B, L, H, …] → [B, H, N, C, …]
    q, k, v = (x.reshape(b, n, c, h, -1).transpose(0, 3, 1, 2, 4) for x in (q, k, v))
    g, beta = (x.reshape(b, n, c, h).transpose(0, 3, 1, 2) for x in (g, beta))
    G = jnp.cumsum(g, axis=-1)  # log decay from the chunk's start, inclusive
    R = jnp.cumsum(reset.reshape(b, 1, n, c).astype(jnp.int32), axis=-1)  # resets at or before each token
    same = jnp.tril(jnp.ones((c, c), bool)) & (R[..., :, None] == R[..., None, :])  # j <= i, one document
    gamma = jnp.where(same, jnp.exp(jnp.where(same, G[..., :, None] - G[..., None, :], 0.0)), 0.0)  # Γ_ij
    from_start = jnp.where(R == 0, jnp.exp(G), 0.0)  # the entering state's decay to each token
    to_end = jnp.where(R == R[..., -1:], jnp.exp(G[..., -1:] - G), 0.0)  # each write's decay to the chunk's end
    k_beta = k * beta[..., None]
    strict = jnp.einsum("bhnik,bhnjk->bhnij", k_beta, k) * gamma * (1 - jnp.eye(c))
    T = _unit_lower_inverse(strict)
    U = jnp.einsum("bhnij,bhnjv->bhniv", T, v * beta[..., None])
    W = jnp.einsum("bhnij,bhnjk->bhnik", T, k_beta * from_start[..., None])
    inner = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * gamma  # o_i's reads of the chunk's own writes, j <= i
    q_decayed = q * from_start[..., None]
    k_to_end = k * to_end[..., None]
    chunk_decay = jnp.where(R[..., -1] == 0, jnp.exp(G[..., -1]), 0.0)

    def chunk(state, x):
        q_d, k_e, u, w, a, decay = x
        new = u - jnp.einsum("bhik,bhkv->bhiv", w, state)  # what the chunk writes that the state lacks
        out = jnp.einsum("bhik,bhkv->bhiv", q_d, state) + jnp.einsum("bhij,bhjv->bhiv", a, new)
        state = state * decay[..., None, None] + jnp.einsum("bhik,bhiv->bhkv", k_e, new)
        return state, out

    chunk_major = [jnp.moveaxis(x, 2, 0) for x in (q_decayed, k_to_end, U, W, inner, chunk_decay)]
    state, out = jax.lax.scan(chunk, state, chunk_major)
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, total, -1).transpose(0, 2, 1, 3)[:, :length]
    return out.astype(dtype), state


__all__ = ["gated_delta_reference", "gated_delta_chunked", "gated_delta_step"]

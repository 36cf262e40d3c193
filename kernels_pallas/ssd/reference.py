"""The SSD recurrence itself, one time step at a time: the definition the kernels are tested against.

Per head h, with group g(h) = h // (heads // groups) supplying B and C::

    S_t = exp(dt_t · A) · S_{t-1} + dt_t · x_t ⊗ B_t          S: [head_dim, d_state]
    y_t = S_t · C_t + D · x_t

``reset`` ``[b, l]`` bool (optional) starts a new document at t: the decay exp(dt_t · A) is replaced by 0, so
nothing before t reaches t or later (documents packed into one row stay apart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def repeat_groups(t: jax.Array, heads: int) -> jax.Array:
    """[b, l, g, n] → [b, l, heads, n]: group g serves heads g·(heads/g) … (g+1)·(heads/g) − 1."""
    return jnp.repeat(t, heads // t.shape[2], axis=2)


def add_skip(y: jax.Array, x: jax.Array, D: jax.Array | None) -> jax.Array:
    """y + D·x in float32 (D per head)."""
    return y if D is None else y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)


def within_chunk_resets(reset, length: int, chunk: int):
    """reset ``[b, l]`` bool or None → ``[b, L/chunk, chunk]`` float32: the resets at or before each position of
    its chunk (L the padded length). Positions s <= l of one chunk are in one document iff their counts are equal;
    the state entering a chunk reaches l iff its count is 0."""
    b = reset.shape[0]
    pad = -length % chunk
    r = jnp.pad(reset.astype(jnp.float32), [(0, 0), (0, pad)])
    return jnp.cumsum(r.reshape(b, -1, chunk), axis=-1)


def ssd_step(x, dt, A, B, C, state, reset=None):
    """One time step: x ``[b, h, p]``, dt ``[b, h]``, A ``[h]``, B/C ``[b, h, n]`` (per head), state
    ``[b, h, p, n]``, reset ``[b]`` bool or None → (S_t · C_t ``[b, h, p]`` (no D skip), new state), float32."""
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    decay = jnp.exp(f32(dt) * f32(A))[:, :, None, None]
    if reset is not None:
        decay = jnp.where(reset[:, None, None, None], 0.0, decay)
    state = decay * f32(state) + jnp.einsum("bhp,bhn->bhpn", f32(x) * f32(dt)[..., None], f32(B))
    return jnp.einsum("bhpn,bhn->bhp", state, f32(C)), state


def ssd_reference(x, dt, A, B, C, D=None, *, initial_state=None, reset=None):
    """x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B/C ``[b, l, g, n]``, D ``[h]``, state ``[b, h, p, n]``,
    reset ``[b, l]`` bool → (y ``[b, l, h, p]`` in x's dtype, final state float32). ``lax.scan`` over time, float32."""
    b, _, h, p = x.shape
    n = B.shape[-1]
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    state = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else f32(initial_state)

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, reset_t = inputs
        y_t, state = ssd_step(x_t, dt_t, A, B_t, C_t, state, reset_t)
        return state, y_t

    time_major = lambda t: jnp.moveaxis(f32(t), 1, 0)  # noqa: E731
    reset = jnp.zeros(x.shape[:2], bool) if reset is None else reset.astype(bool)
    inputs = (time_major(x), time_major(dt), time_major(repeat_groups(B, h)), time_major(repeat_groups(C, h)),
              jnp.moveaxis(reset, 1, 0))
    state, y = jax.lax.scan(step, state, inputs)
    return add_skip(jnp.moveaxis(y, 0, 1), x, D).astype(x.dtype), state

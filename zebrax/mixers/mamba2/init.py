"""Mamba2 on a Llama teacher: its config by the Zebra recipe (``recipe``), and its parameters from a teacher layer's
GQA attention (``mamba2_from_attention``, METHOD §4, the attention-shaped variant):
``x ← W_v``, ``B ← W_k``, ``C ← W_q``, ``out_proj ← W_o``; fresh from an explicit PRNG key: the ``z`` and ``dt`` rows
of ``in_proj`` (PyTorch's Linear default, U(±1/√d_model)), the conv (PyTorch's Conv1d default), ``A_log = log
U(A_init_range)``, ``dt_bias = softplus⁻¹(dt)`` with dt log-uniform in ``[dt_min, dt_max]``; ``D = 1``, gate-norm
weight 1."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.errors import ConfigError
from zebrax.layers.conv import conv_init
from zebrax.layers.decay import a_log_init, dt_bias_init
from zebrax.mixers.attention.config import AttentionConfig
from zebrax.mixers.mamba2.config import GATED_NORM_EPS, Mamba2Config


def check_shapes(teacher: AttentionConfig, m: Mamba2Config) -> None:
    want = dict(n_heads=teacher.n_heads, n_groups=teacher.n_heads, xb_heads=teacher.n_kv_heads,
                head_dim=teacher.head_dim, d_state=teacher.head_dim, d_inner=teacher.n_heads * teacher.head_dim)
    wrong = {k: (getattr(m, k), v) for k, v in want.items() if getattr(m, k) != v}
    if wrong or teacher.attention_bias or m.use_bias:
        details = ", ".join(f"{k}={got} (needs {need})" for k, (got, need) in wrong.items()) or "biases"
        raise ConfigError(f"Mamba2 init from attention: {details}; x, B and C take W_v, W_k and W_q, so the mixer "
                          "must be attention-shaped (heads = groups, xb_heads = KV heads, head_dim = d_state) without "
                          "biases")


def mamba2_from_attention(attention: dict, teacher: AttentionConfig, m: Mamba2Config, key: jax.Array
                          ) -> tuple[dict, dict]:
    """Teacher attention params (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` kernels) → (Mamba2 mixer params,
    an empty report: nothing is truncated)."""
    check_shapes(teacher, m)
    wq, wk, wv, wo = (np.asarray(attention[f"{p}_proj"]["kernel"], np.float32) for p in "qkvo")
    d = wq.shape[0]
    k_z, k_dt, k_conv, k_bias, k_a, k_dtb = jax.random.split(key, 6)
    bound = 1.0 / math.sqrt(d)
    fresh = lambda k, n: np.asarray(jax.random.uniform(k, (d, n), jnp.float32, -bound, bound))  # noqa: E731
    in_proj = np.concatenate([fresh(k_z, m.d_inner), wv.reshape(d, -1), wk.reshape(d, -1), wq.reshape(d, -1),
                              fresh(k_dt, m.n_heads)], axis=1)
    conv = conv_init(m.conv_kernel)
    return {
        "in_proj": {"kernel": in_proj},
        "conv_kernel": np.asarray(conv(k_conv, (m.conv_kernel, m.conv_dim), jnp.float32)),
        "conv_bias": np.asarray(conv(k_bias, (m.conv_dim,), jnp.float32)),
        "A_log": np.asarray(a_log_init(m)(k_a, (m.n_heads,), jnp.float32)),
        "dt_bias": np.asarray(dt_bias_init(m)(k_dtb, (m.n_heads,), jnp.float32)),
        "D": np.ones((m.n_heads,), np.float32),
        "norm": {"scale": np.ones((m.d_inner,), np.float32)},
        "out_proj": {"kernel": wo.reshape(m.d_inner, d)},
    }, {}


def recipe(teacher) -> Mamba2Config:
    """Zebra's Mamba2 on a Llama teacher (METHOD §3): the attention-shaped variant, expand 1, ``n_heads = n_groups`` =
    query heads, ``xb_heads`` = KV heads, ``head_dim = d_state`` = the teacher's head_dim, conv 4, chunk 256,
    gated-norm eps ``GATED_NORM_EPS`` (the reference code's, whatever the teacher's ``rms_norm_eps``)."""
    heads, head_dim = teacher.num_attention_heads, teacher.head_dim
    return Mamba2Config(d_model=teacher.hidden_size, d_inner=heads * head_dim, n_heads=heads, head_dim=head_dim,
                        d_state=head_dim, n_groups=heads, xb_heads=teacher.num_key_value_heads, conv_kernel=4,
                        chunk_size=256, norm_eps=GATED_NORM_EPS)

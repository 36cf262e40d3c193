"""Gated DeltaNet on a Llama teacher: its config, attention-shaped as Zebra's Mamba2 is (``recipe``), and its
parameters from a teacher layer's GQA attention as Mamba2's are made from it (``gated_delta_from_attention``,
METHOD §4; HyLo does the same for its GDN layers): ``q_proj ← W_q``, ``k_proj ← W_k``, ``v_proj ← W_v``,
``out_proj ← W_o``; fresh from an explicit PRNG key: the gate ``g_proj`` and the ``a_proj`` / ``b_proj`` rows
(PyTorch's Linear default, U(±1/√d_model)), the conv (PyTorch's Conv1d default), ``A_log = log U(A_init_range)``,
``dt_bias = softplus⁻¹(dt)`` with dt log-uniform in ``[dt_min, dt_max]``; output-norm weight 1."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.errors import ConfigError
from zebrax.layers.conv import conv_init
from zebrax.layers.decay import a_log_init, dt_bias_init
from zebrax.mixers.attention.config import AttentionConfig
from zebrax.mixers.gdn.config import GatedDeltaConfig


def check_shapes(teacher: AttentionConfig, m: GatedDeltaConfig) -> None:
    want = dict(n_heads=teacher.n_heads, q_heads=teacher.n_heads, k_heads=teacher.n_kv_heads,
                v_heads=teacher.n_kv_heads, head_k_dim=teacher.head_dim, head_v_dim=teacher.head_dim)
    wrong = {k: (getattr(m, k), v) for k, v in want.items() if getattr(m, k) != v}
    if wrong or teacher.attention_bias:
        details = ", ".join(f"{k}={got} (needs {need})" for k, (got, need) in wrong.items()) or "attention biases"
        raise ConfigError(f"Gated DeltaNet init from attention: {details}; q, k and v take W_q, W_k and W_v, so the "
                          "mixer must be attention-shaped (a state head per query head, k and v on the KV heads, "
                          "head dims the teacher's) and the teacher without biases")


def gated_delta_from_attention(attention: dict, teacher: AttentionConfig, m: GatedDeltaConfig, key: jax.Array
                               ) -> tuple[dict, dict]:
    """Teacher attention params (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` kernels) → (Gated DeltaNet mixer
    params, an empty report: nothing is truncated)."""
    check_shapes(teacher, m)
    wq, wk, wv, wo = (np.asarray(attention[f"{p}_proj"]["kernel"], np.float32) for p in "qkvo")
    d = wq.shape[0]
    k_g, k_a, k_b, k_conv, k_alog, k_dt = jax.random.split(key, 6)
    bound = 1.0 / math.sqrt(d)
    fresh = lambda k, *shape: np.asarray(jax.random.uniform(k, (d, *shape), jnp.float32, -bound, bound))  # noqa: E731
    return {
        "q_proj": {"kernel": wq.reshape(d, -1)},
        "k_proj": {"kernel": wk.reshape(d, -1)},
        "v_proj": {"kernel": wv.reshape(d, -1)},
        "g_proj": {"kernel": fresh(k_g, m.n_heads, m.head_v_dim)},
        "a_proj": {"kernel": fresh(k_a, m.n_heads)},
        "b_proj": {"kernel": fresh(k_b, m.n_heads)},
        "conv_kernel": np.asarray(conv_init(m.conv_kernel)(k_conv, (m.conv_kernel, m.conv_dim), jnp.float32)),
        "A_log": np.asarray(a_log_init(m)(k_alog, (m.n_heads,), jnp.float32)),
        "dt_bias": np.asarray(dt_bias_init(m)(k_dt, (m.n_heads,), jnp.float32)),
        "norm": {"scale": np.ones((m.head_v_dim,), np.float32)},
        "out_proj": {"kernel": wo.reshape(m.n_heads, m.head_v_dim, d)},
    }, {}


def recipe(teacher) -> GatedDeltaConfig:
    """Gated DeltaNet on a Llama teacher, attention-shaped as Zebra's Mamba2 is: a state head per query head, q on
    the query heads, k and v on the KV heads, ``head_k_dim = head_v_dim`` = the teacher's head_dim, conv 4, chunk
    64 (``gated_delta_from_attention``)."""
    heads, kv_heads, head_dim = teacher.num_attention_heads, teacher.num_key_value_heads, teacher.head_dim
    return GatedDeltaConfig(d_model=teacher.hidden_size, n_heads=heads, head_k_dim=head_dim, head_v_dim=head_dim,
                            q_heads=heads, k_heads=kv_heads, v_heads=kv_heads, conv_kernel=4, chunk_size=64)

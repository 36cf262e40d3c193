"""``ema`` on a Llama teacher: a head per query head of the teacher's head_dim (``recipe``); ``v_proj`` from ``W_v``
(each KV head repeated to its query heads), ``o_proj`` from ``W_o``, ``a_proj`` fresh (``from_attention``)."""

from __future__ import annotations

import jax
import numpy as np

from tests.kinds.ema.config import EMAConfig


def recipe(teacher) -> EMAConfig:
    return EMAConfig(d_model=teacher.hidden_size, n_heads=teacher.num_attention_heads, head_dim=teacher.head_dim)


def from_attention(attention: dict, teacher, config: EMAConfig, key) -> tuple[dict, dict]:
    wv = np.asarray(attention["v_proj"]["kernel"], np.float32)  # [d, G, hd]
    wo = np.asarray(attention["o_proj"]["kernel"], np.float32)  # [H, hd, d]
    v = np.repeat(wv, teacher.n_heads // teacher.n_kv_heads, axis=1)
    a = np.asarray(jax.random.normal(key, (wv.shape[0], config.n_heads)), np.float32) * 0.02
    return {"v_proj": {"kernel": v}, "a_proj": {"kernel": a}, "o_proj": {"kernel": wo}}, {}

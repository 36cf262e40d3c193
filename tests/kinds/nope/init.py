"""``nope`` on a Llama teacher: the teacher's heads (``recipe``) and its q, k, v, o weights (``from_attention``)."""

from __future__ import annotations

import numpy as np

from tests.kinds.nope.config import NoPEConfig


def recipe(teacher) -> NoPEConfig:
    return NoPEConfig(d_model=teacher.hidden_size, n_heads=teacher.num_attention_heads,
                      n_kv_heads=teacher.num_key_value_heads, head_dim=teacher.head_dim)


def from_attention(attention: dict, teacher, config: NoPEConfig, key) -> tuple[dict, dict]:
    return {f"{p}_proj": {"kernel": np.asarray(attention[f"{p}_proj"]["kernel"], np.float32)} for p in "qkvo"}, {}

"""Teacher parameters → student parameters, one file per method (``mla_svd.py``, ``mamba2_from_attention.py``),
and ``assemble.py`` (a hybrid from an all-MLA and an all-Mamba2 student).

``init_hybrid`` builds every layer of a ``HybridConfig`` from its Llama teacher: MLA layers by SVD, Mamba2
layers from the attention weights, attention layers copied; MLPs, norms, embeddings, final norm and head copied.
"""

from __future__ import annotations

import jax
import numpy as np

from zebrax.config import HybridConfig, LlamaConfig
from zebrax.convert.mapping import NP_DTYPES
from zebrax.init.assemble import assemble
from zebrax.init.mamba2_from_attention import mamba2_from_attention
from zebrax.init.mla_svd import mla_from_attention

__all__ = ["assemble", "init_hybrid", "mamba2_from_attention", "mla_from_attention"]


def init_hybrid(teacher: LlamaConfig, params: dict, config: HybridConfig, key: jax.Array) -> tuple[dict, dict]:
    """(hybrid params in ``config.param_dtype``, report ``{"layers": [{layer, mixer, q/kv relative error}]}``)."""
    config.check_teacher(teacher)
    dtype = NP_DTYPES[config.param_dtype]
    cast = lambda tree: jax.tree.map(lambda w: np.asarray(w, np.float32).astype(dtype), tree)  # noqa: E731
    out = {name: cast(params[name]) for name in params if not name.startswith("layers_")}
    report = []
    keys = jax.random.split(key, config.num_hidden_layers)
    for i, mixer in enumerate(config.mixers):
        layer = params[f"layers_{i}"]
        new = {k: cast(v) for k, v in layer.items() if k != "self_attn"}
        attention = layer["self_attn"]
        row = {"layer": i, "mixer": mixer}
        if mixer == "attention":
            new["self_attn"] = cast(attention)
        elif mixer == "mla":
            mla, errors = mla_from_attention(attention, config.attention, config.mla)
            new["self_attn"] = cast(mla)
            row.update(errors)
        else:
            new["mixer"] = cast(mamba2_from_attention(attention, config.attention, config.mamba2, keys[i]))
        out[f"layers_{i}"] = new
        report.append(row)
    return out, {"layers": report}

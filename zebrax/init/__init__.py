"""Teacher parameters → hybrid parameters (``init_hybrid``), and a hybrid from an all-MLA and an all-linear student
(``assemble.py``).

``init_hybrid`` builds every layer of a ``HybridConfig`` from its Llama teacher: each mixer by its kind's
``from_attention`` (``zebrax.mixers``: MLA by SVD, Mamba2 and Gated DeltaNet from the attention weights, each in its
kind's ``init.py``), or for the kinds in ``random`` by the module's own initialisation (the ablation); the teacher's
own kind's layers copied; MLPs, norms, embeddings, final norm and head copied.
"""

from __future__ import annotations

import functools
from collections.abc import Collection

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.config import HybridConfig, LlamaConfig
from zebrax.convert.mapping import NP_DTYPES
from zebrax.init.assemble import assemble
from zebrax.mixers import kind, teacher_kind
from zebrax.models import build

__all__ = ["assemble", "init_hybrid"]


def init_hybrid(teacher: LlamaConfig, params: dict, config: HybridConfig, key: jax.Array,
                shardings: dict | None = None, *, random: Collection[str] = ()) -> tuple[dict, dict]:
    """(hybrid params in ``config.param_dtype``, report ``{"layers": [{layer, mixer, q/kv relative error}]}``).
    ``random``: mixer kinds whose layers start from the hybrid module's own initialisation (``key``), not from the
    teacher's attention (their report rows say ``"init": "random"``).

    ``shardings``: the hybrid's ``NamedSharding`` tree (``sharding.param_shardings``), for a teacher of global arrays
    over a mesh. The hybrid is then made shard by shard: what is copied is cast on the devices that hold it, and each
    new mixer is computed from its layer's attention weights alone (gathered to the host one layer at a time) and
    placed with ``jax.make_array_from_callback``, so no host holds a whole teacher or a whole student."""
    config.check_teacher(teacher)
    dtype = NP_DTYPES[config.param_dtype]
    if shardings is None:
        host = lambda tree: tree  # noqa: E731
        copy = made = lambda tree, _: jax.tree.map(lambda w: np.asarray(w, np.float32).astype(dtype), tree)  # noqa: E731
    else:
        from zebrax.hosts import gather
        from zebrax.sharding import place

        host = gather
        copy = lambda tree, s: place(jax.tree.map(lambda w: w.astype(jnp.float32).astype(dtype), tree), s)  # noqa: E731
        made = lambda tree, s: place(jax.tree.map(lambda w: np.asarray(w, np.float32).astype(dtype), tree), s)  # noqa: E731
    at = lambda *path: None if shardings is None else functools.reduce(dict.__getitem__, path, shardings)  # noqa: E731
    out = {name: copy(params[name], at(name)) for name in params if not name.startswith("layers_")}
    report = []
    keys = jax.random.split(key, config.num_hidden_layers)
    fresh = _fresh(config, key) if set(random) & set(config.mixers) else None
    attention = teacher_kind().scope  # the teacher's attention, in every layer of it
    for i, spec in enumerate(config.plan()):
        name, layer = f"layers_{i}", params[f"layers_{i}"]
        new = {k: copy(v, at(name, k)) for k, v in layer.items() if k != attention}
        row, mixer = {"layer": i, "mixer": spec.mixer}, kind(spec.mixer)
        if mixer.teacher:
            new[attention] = copy(layer[attention], at(name, attention))
        elif spec.mixer in random:
            new[mixer.scope] = made(fresh[name][mixer.scope], at(name, mixer.scope))
            row["init"] = "random"
        else:
            made_params, made_report = mixer.from_attention(host(layer[attention]), config.attention, spec.config,
                                                            keys[i])
            new[mixer.scope] = made(made_params, at(name, mixer.scope))
            row.update(made_report)
        out[name] = new
        report.append(row)
    return out, {"layers": report}


def _fresh(config: HybridConfig, key: jax.Array) -> dict:
    """The hybrid's parameters as its module initialises them (on the host, ``float32``)."""
    import flax.linen as nn

    fresh = build(config).init(key, np.zeros((1, 1), np.int32))["params"]
    return jax.tree.map(lambda w: np.asarray(w, np.float32), nn.unbox(fresh))

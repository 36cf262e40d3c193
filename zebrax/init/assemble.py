"""Hybrid assembly (METHOD §4): layer ``i`` — mixer, MLP and norms — from the (ILD-trained) all-MLA student if ``i``
is an MLA layer, else from the linear student (all-Mamba2, or all of another linear kind: ``gdn``); embeddings, final
norm and head from one of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from zebrax.config import HybridConfig
from zebrax.errors import ConfigError

MIXER_FIELDS = ("mixers", "configs", "layer_configs")  # each student's own; every other setting is shared


def check_students(mla_config, mamba_config, what: str) -> None:
    """ConfigError (prefixed ``what``) unless ``mla_config`` is an all-MLA and ``mamba_config`` an all-Mamba2 (or
    all-``gdn``: one linear kind) hybrid of as many layers that agree on every setting outside their mixers
    (``MIXER_FIELDS``): the hybrid runs layers of both under one ``hidden_act``, ``rms_norm_eps``, ``mlp_bias``,
    vocabulary, … The error names each field that differs and both values."""
    for name, config, kinds in (("mla_student", mla_config, {"mla"}), ("mamba_student", mamba_config, None)):
        if not isinstance(config, HybridConfig) or len(set(config.mixers)) != 1 or set(config.mixers) != (
                kinds or set(config.linear_kinds())):
            got = config.layer_map() if isinstance(config, HybridConfig) else type(config).__name__
            raise ConfigError(f"{what}: {name} must be an all-{'mla' if kinds else 'mamba2 (or gdn)'} hybrid, "
                              f"got {got}")
    names = ["num_hidden_layers"] + [f.name for f in dataclasses.fields(HybridConfig) if f.name not in MIXER_FIELDS]
    differ = [f"{n}: {getattr(mla_config, n)!r} (mla_student) vs {getattr(mamba_config, n)!r} (mamba_student)"
              for n in names if getattr(mla_config, n) != getattr(mamba_config, n)]
    if differ:
        raise ConfigError(f"{what}: the students differ in {'; '.join(differ)} — a hybrid of their layers runs under "
                          "one setting of each (students of one teacher, made with one recipe, agree)")


def assemble(mla_student: tuple[HybridConfig, dict], mamba_student: tuple[HybridConfig, dict],
             mla_layers: Sequence[int], *, embeddings_from: str = "mamba2") -> tuple[HybridConfig, dict]:
    """``(config, params)`` of each student → the hybrid's. ``embeddings_from``: ``"mamba2"`` (the linear student,
    whatever its kind) or ``"mla"``."""
    (mla_config, mla_params), (mamba_config, mamba_params) = mla_student, mamba_student
    check_students(mla_config, mamba_config, "assemble")
    if embeddings_from not in ("mamba2", "mla"):
        raise ConfigError(f"assemble: embeddings_from={embeddings_from!r} is not 'mamba2' or 'mla'")
    n = mla_config.num_hidden_layers
    bad = [i for i in mla_layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ConfigError(f"assemble: mla_layers {bad} are outside the students' layers 0..{n - 1}")
    linear = mamba_config.mixers[0]
    mixers = tuple("mla" if i in set(mla_layers) else linear for i in range(n))
    base_config, base_params = (mamba_config, mamba_params) if embeddings_from == "mamba2" else (
        mla_config, mla_params)
    own = {i: cfg for student in (mla_config, mamba_config) for i, cfg in student.layer_configs
           if student.mixers[i] == mixers[i]}  # a layer's own config comes with it
    config = base_config.replace(mixers=mixers, configs=(("mla", mla_config.mla),
                                                         (linear, getattr(mamba_config, linear))),
                                 layer_configs=tuple(own.items()))
    params = {k: v for k, v in base_params.items() if not k.startswith("layers_")}
    for i, mixer in enumerate(mixers):
        params[f"layers_{i}"] = (mla_params if mixer == "mla" else mamba_params)[f"layers_{i}"]
    return config, params

"""Hybrid assembly (METHOD §4): layer ``i`` — mixer, MLP and norms — from the (ILD-trained) attention student (all-MLA)
if ``i`` is one of its layers, else from the linear student (all of one linear kind: Mamba2, Gated DeltaNet);
embeddings, final norm and head from one of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from zebrax.config import HybridConfig
from zebrax.errors import ConfigError
from zebrax.mixers import kind

MIXER_FIELDS = ("mixers", "configs", "layer_configs")  # each student's own; every other setting is shared
EMBEDDINGS_FROM = ("linear", "mla")


def _single_kind(config, family: str) -> str | None:
    """The one kind of every layer of ``config`` when it is a hybrid of one non-teacher kind of ``family``."""
    if not isinstance(config, HybridConfig) or len(set(config.mixers)) != 1:
        return None
    found = kind(config.mixers[0])
    return found.name if found.family == family and not found.teacher else None


def check_students(mla_config, linear_config, what: str) -> None:
    """ConfigError (prefixed ``what``) unless ``mla_config`` is a hybrid of one attention kind (all-MLA) and
    ``linear_config`` one of one linear kind (all-Mamba2, all-GDN), of as many layers, that agree on every setting
    outside their mixers (``MIXER_FIELDS``): the hybrid runs layers of both under one ``hidden_act``,
    ``rms_norm_eps``, ``mlp_bias``, vocabulary, … The error names each field that differs and both values."""
    for name, config, family in (("mla_student", mla_config, "attention"), ("linear_student", linear_config, "linear")):
        if _single_kind(config, family) is None:
            got = config.layer_map() if isinstance(config, HybridConfig) else type(config).__name__
            raise ConfigError(f"{what}: {name} must be a hybrid of one {family} kind in every layer "
                              f"({'mla' if family == 'attention' else 'mamba2 or gdn'}), got {got}")
    names = ["num_hidden_layers"] + [f.name for f in dataclasses.fields(HybridConfig) if f.name not in MIXER_FIELDS]
    differ = [f"{n}: {getattr(mla_config, n)!r} (mla_student) vs {getattr(linear_config, n)!r} (linear_student)"
              for n in names if getattr(mla_config, n) != getattr(linear_config, n)]
    if differ:
        raise ConfigError(f"{what}: the students differ in {'; '.join(differ)} — a hybrid of their layers runs under "
                          "one setting of each (students of one teacher, made with one recipe, agree)")


def assemble(mla_student: tuple[HybridConfig, dict], linear_student: tuple[HybridConfig, dict],
             mla_layers: Sequence[int], *, embeddings_from: str = "linear") -> tuple[HybridConfig, dict]:
    """``(config, params)`` of each student → the hybrid's. ``embeddings_from``: ``"linear"`` (the linear student,
    whatever its kind) or ``"mla"``."""
    (mla_config, mla_params), (linear_config, linear_params) = mla_student, linear_student
    check_students(mla_config, linear_config, "assemble")
    if embeddings_from not in EMBEDDINGS_FROM:
        raise ConfigError(f"assemble: embeddings_from={embeddings_from!r} is not one of {EMBEDDINGS_FROM}")
    n = mla_config.num_hidden_layers
    bad = [i for i in mla_layers if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ConfigError(f"assemble: mla_layers {bad} are outside the students' layers 0..{n - 1}")
    attention, linear = mla_config.mixers[0], linear_config.mixers[0]
    mixers = tuple(attention if i in set(mla_layers) else linear for i in range(n))
    base_config, base_params = (linear_config, linear_params) if embeddings_from == "linear" else (
        mla_config, mla_params)
    own = {i: cfg for student in (mla_config, linear_config) for i, cfg in student.layer_configs
           if student.mixers[i] == mixers[i]}  # a layer's own config comes with it
    config = base_config.replace(mixers=mixers, configs=((attention, getattr(mla_config, attention)),
                                                         (linear, getattr(linear_config, linear))),
                                 layer_configs=tuple(own.items()))
    params = {k: v for k, v in base_params.items() if not k.startswith("layers_")}
    for i, mixer in enumerate(mixers):
        params[f"layers_{i}"] = (mla_params if mixer == attention else linear_params)[f"layers_{i}"]
    return config, params

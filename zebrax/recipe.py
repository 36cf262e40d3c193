"""The Zebra recipe (METHOD §1–3): the ``HybridConfig`` a Llama teacher's attention layers become — which layers
are MLA, which keep the teacher's attention, which are the linear kind (Mamba2 by default), and which any other
registered kind — each kind's settings derived from the teacher's shape by the kind's own ``recipe``
(``zebrax.mixers.<kind>.init.recipe``)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence

from zebrax.config import HybridConfig, LlamaConfig
from zebrax.errors import ConfigError
from zebrax.mixers import kind, kinds, teacher_kind

MLA = "mla"  # the recipe's attention kind: its layers are ``mla_layers``, its settings the rank arguments below


def from_teacher(
    teacher: LlamaConfig,
    *,
    mla_layers: Sequence[int] | str = "all",
    attention_layers: Sequence[int] = (),
    kv_lora_rank: int = 128,
    q_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    rope_factor: float = 32.0,
    rope_original_max_position_embeddings: int = 8192,
    linear: str = "mamba2",
    layers: Mapping[str, Sequence[int]] | None = None,
    layer_ranks: dict | None = None,
    **overrides: dict,
) -> HybridConfig:
    """The Zebra recipe on a Llama teacher: layers in ``mla_layers`` (a list, ``"all"`` or ``"none"``) become MLA,
    those in ``attention_layers`` keep the teacher's attention, those in ``layers`` (``{kind: [layer, …]}``) any other
    registered kind, and the rest ``linear``: a kind of the linear family (``mamba2``, or ``gdn``: Gated DeltaNet).

    Each kind's config is its ``recipe`` on the teacher (``zebrax.mixers.<kind>.init``): MLA's takes
    ``kv_lora_rank``, ``q_lora_rank``, ``qk_rope_head_dim``, ``rope_factor`` and
    ``rope_original_max_position_embeddings``; Mamba2's is the attention-shaped variant (expand 1, ``n_heads =
    n_groups`` = query heads, ``xb_heads`` = KV heads, ``head_dim = d_state`` = the teacher's head_dim, conv 4, chunk
    256, the reference code's gated-norm eps). ``mla={…}``, ``mamba2={…}``, … (a kind's name): any field of that
    kind's config to override. ``layer_ranks``: ``{layer: {"kv_lora_rank": r, "q_lora_rank": r}}`` for MLA layers
    of their own ranks (``HybridConfig.layer_configs``; AMD's ``layer_rank_list``). The hybrid holds the configs of
    MLA and the linear kind whether it places them or not, as the reference code's layouts do.
    """
    if not isinstance(teacher, LlamaConfig):
        raise ConfigError(f"HybridConfig.from_teacher: the teacher must be a Llama-shaped model "
                          f"(LlamaConfig), got {type(teacher).__name__}")
    others = dict(layers or {})
    if not kind(linear).linear:
        raise ConfigError(f"HybridConfig: linear={linear!r} is not a kind of the linear family "
                          f"({', '.join(k.name for k in kinds().values() if k.linear)})")
    placed = {MLA, linear, *others}
    stray = sorted(set(overrides) - placed)
    if stray:
        raise ConfigError(f"HybridConfig.from_teacher: unknown arguments {stray} (a kind's overrides are named "
                          f"after it; this hybrid holds {', '.join(sorted(placed))})")
    n = teacher.num_hidden_layers
    sets = {MLA: _layer_set("mla_layers", mla_layers, n),
            teacher_kind().name: _layer_set("attention_layers", attention_layers, n)}
    for name, chosen in others.items():
        if name in sets or name == linear:
            raise ConfigError(f"HybridConfig: layers[{name!r}]: its layers are given by mla_layers, "
                              f"attention_layers, or are the rest (linear={linear!r})")
        sets[name] = _layer_set(f"layers[{name!r}]", chosen, n)
    taken: dict[int, str] = {}
    argument = {MLA: "mla_layers", teacher_kind().name: "attention_layers"}
    for name, chosen in sets.items():
        both = sorted(i for i in chosen if i in taken)
        if both:
            raise ConfigError(f"HybridConfig: layers {both} are in both {argument.get(taken[both[0]], taken[both[0]])} "
                              f"and {argument.get(name, f'layers[{name!r}]')}")
        taken.update(dict.fromkeys(chosen, name))
    mixers = tuple(taken.get(i, linear) for i in range(n))
    mla_arguments = dict(kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                         rope_factor=rope_factor, check=bool(sets[MLA]),
                         rope_original_max_position_embeddings=rope_original_max_position_embeddings)
    configs = {}  # MLA's and the linear kind's whether placed or not (the reference code's layouts hold both)
    for name in dict.fromkeys((MLA, linear, *(m for m in mixers if not kind(m).teacher))):
        config = kind(name).recipe(teacher, **(mla_arguments if name == MLA else {}))
        configs[name] = dataclasses.replace(config, **overrides.get(name, {}))
    return HybridConfig(
        vocab_size=teacher.vocab_size, hidden_size=teacher.hidden_size, intermediate_size=teacher.intermediate_size,
        mixers=mixers, attention=teacher.attention_config(), configs=tuple(configs.items()),
        layer_configs=_own_ranks(layer_ranks or {}, configs[MLA], sets[MLA]),
        rms_norm_eps=teacher.rms_norm_eps,
        max_position_embeddings=teacher.max_position_embeddings, tie_word_embeddings=teacher.tie_word_embeddings,
        mlp_bias=teacher.mlp_bias, hidden_act=teacher.hidden_act, bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id, dtype=teacher.dtype,
        param_dtype=teacher.param_dtype,
    )


def _own_ranks(layer_ranks: dict, mla, mla_set: set[int]) -> tuple:
    """``layer_ranks`` as ``layer_configs``: each MLA layer's config with its own ranks (ConfigError naming a layer
    that is not MLA, or another field)."""
    own = []
    for i, ranks in sorted(layer_ranks.items(), key=lambda item: str(item[0])):
        if i not in mla_set:
            raise ConfigError(f"HybridConfig: layer_ranks gives layer {i!r} ranks, but the MLA layers are "
                              f"{sorted(mla_set)}")
        if not (isinstance(ranks, dict) and set(ranks) <= {"kv_lora_rank", "q_lora_rank"}):
            raise ConfigError(f"HybridConfig: layer_ranks[{i}] = {ranks!r}: expected a dict of kv_lora_rank and "
                              f"q_lora_rank")
        own.append((i, dataclasses.replace(mla, **ranks)))
    return tuple(own)


def arguments() -> tuple[str, ...]:
    """What ``from_teacher`` takes besides the teacher: its own arguments and, for overrides, the name of every
    registered kind with a config of its own (``mla={…}``, ``mamba2={…}``, ``gdn={…}``)."""
    own = [p for p in inspect.signature(from_teacher).parameters if p not in ("teacher", "overrides")]
    return (*own, *(k.name for k in kinds().values() if k.name not in own and not k.teacher))


def _layer_set(name: str, layers: Sequence[int] | str, n: int) -> set[int]:
    if isinstance(layers, str):
        if layers not in ("all", "none"):
            raise ConfigError(f"HybridConfig: {name}={layers!r}: expected a list of layer indices, 'all' or 'none'")
        return set(range(n)) if layers == "all" else set()
    out = set()
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
            raise ConfigError(f"HybridConfig: {name} holds {i!r}; the teacher's layers are 0..{n - 1}")
        out.add(i)
    return out

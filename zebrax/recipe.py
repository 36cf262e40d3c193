"""The Zebra recipe (METHOD §1–3): the ``HybridConfig`` a Llama teacher's attention layers become — which layers
are MLA, which keep attention, which are the linear kind (Mamba2 by default), and each kind's settings derived from
the teacher's shape (``HybridConfig.from_teacher`` is ``from_teacher`` here). Each linear kind's own part is its
``recipe`` in its module (``zebrax.layers.mamba2.recipe``, ``zebrax.layers.gated_delta.recipe``)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

from zebrax.config import AttentionConfig, HybridConfig, LlamaConfig, MLAConfig, RopeScaling
from zebrax.errors import ConfigError
from zebrax.mixers import kind, kinds


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
    mla: dict | None = None,
    layer_ranks: dict | None = None,
    **overrides: dict,
) -> HybridConfig:
    """The Zebra recipe (METHOD §1–3) on a Llama teacher: layers in ``mla_layers`` (a list, ``"all"`` or
    ``"none"``) become MLA, those in ``attention_layers`` keep the teacher's attention, the rest ``linear``:
    Mamba2, or another registered kind with a recipe (``gdn``: Gated DeltaNet, ``zebrax.layers.gated_delta``).

    MLA: ``kv_groups`` = the teacher's KV heads, ``qk_rope_head_dim`` (default head_dim / 2; an even divisor
    of head_dim, so that each MLA RoPE pair keeps the frequency of the teacher pair it is taken from:
    ``rope_head_dims``) + ``qk_nope_head_dim`` = head_dim, ``v_head_dim`` = head_dim, ``q_lora_rank`` (default
    2/3 of the query width, rounded to 8), DeepSeek's YaRN on the rope part (base = the teacher's
    ``rope_theta``, ``rope_factor``, original length ``rope_original_max_position_embeddings``, beta 32/1),
    interleaved pairs, no latent norms.
    The ``linear`` kind: its recipe (``zebrax.layers.mamba2.recipe``: the attention-shaped variant, expand 1,
    ``n_heads = n_groups`` = query heads, ``xb_heads`` = KV heads, ``head_dim = d_state`` = the teacher's
    head_dim, conv 4, chunk 256, the reference code's gated-norm eps). ``mla={…}``, ``mamba2={…}`` (the
    ``linear`` kind's name): any field of its config to override. ``layer_ranks``: ``{layer: {"kv_lora_rank": r,
    "q_lora_rank": r}}`` for MLA layers of their own ranks (``HybridConfig.layer_configs``; AMD's
    ``layer_rank_list``).
    """
    recipe = kind(linear).recipe
    if recipe is None:
        raise ConfigError(f"HybridConfig: linear={linear!r} has no recipe from a teacher's attention")
    stray = sorted(set(overrides) - {linear})
    if stray:
        raise ConfigError(f"HybridConfig.from_teacher: unknown arguments {stray} (a kind's overrides are named "
                          f"after it; this hybrid holds mla and {linear})")
    if not isinstance(teacher, LlamaConfig):
        raise ConfigError(f"HybridConfig.from_teacher: the teacher must be a Llama-shaped model "
                          f"(LlamaConfig), got {type(teacher).__name__}")
    n = teacher.num_hidden_layers
    mla_set = _layer_set("mla_layers", mla_layers, n)
    attention_set = _layer_set("attention_layers", attention_layers, n)
    both = sorted(mla_set & attention_set)
    if both:
        raise ConfigError(f"HybridConfig: layers {both} are in both mla_layers and attention_layers")
    heads, kv_heads, head_dim, d = (teacher.num_attention_heads, teacher.num_key_value_heads, teacher.head_dim,
                                    teacher.hidden_size)
    rope = qk_rope_head_dim if qk_rope_head_dim is not None else head_dim // 2
    if q_lora_rank is None:
        q_lora_rank = max(8, round(heads * head_dim * 2 / 3 / 8) * 8)
    if mla_set and rope not in rope_head_dims(head_dim):
        raise ConfigError(f"HybridConfig: qk_rope_head_dim={rope!r}: MLA's RoPE pairs would rotate at other "
                          f"frequencies than the teacher pairs they are taken from; for head_dim={head_dim} it "
                          f"must be one of {rope_head_dims(head_dim)} (an even divisor of head_dim below it)")
    kv_rows = kv_heads * (2 * head_dim - rope)  # per KV group: the nope part of K and all of V
    limits = {"kv_lora_rank": (kv_lora_rank, min(d, kv_rows), "min(hidden, KV heads·(2·head_dim − rope))"),
              "q_lora_rank": (q_lora_rank, min(d, heads * head_dim), "min(hidden, heads·head_dim)"),
              "qk_rope_head_dim": (rope, head_dim - 1, "head_dim - 1: MLA keeps a non-rope part")}
    for name, (value, limit, what) in limits.items():
        if not isinstance(value, int) or not 0 < value <= (limit if mla_set else value):
            raise ConfigError(f"HybridConfig: {name}={value} must be in 1..{limit} ({what} of the teacher)")
    mla_config = dataclasses.replace(MLAConfig(
        d_model=d, n_heads=heads, kv_groups=kv_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=head_dim - rope, qk_rope_head_dim=rope, v_head_dim=head_dim, norm_eps=1e-6,
        rope_theta=teacher.rope_theta, rope_interleave=True,
        rope_scaling=RopeScaling("yarn", factor=rope_factor,
                                 original_max_position_embeddings=rope_original_max_position_embeddings),
    ), **(mla or {}))
    linear_config = dataclasses.replace(recipe(teacher), **overrides.get(linear, {}))
    attention = AttentionConfig(heads, kv_heads, head_dim, teacher.rope_theta, teacher.rope_scaling,
                                teacher.attention_bias)
    mixers = tuple("mla" if i in mla_set else "attention" if i in attention_set else linear for i in range(n))
    return HybridConfig(
        vocab_size=teacher.vocab_size, hidden_size=d, intermediate_size=teacher.intermediate_size, mixers=mixers,
        attention=attention, configs=(("mla", mla_config), (linear, linear_config)),
        layer_configs=_own_ranks(layer_ranks or {}, mla_config, mla_set),
        rms_norm_eps=teacher.rms_norm_eps,
        max_position_embeddings=teacher.max_position_embeddings, tie_word_embeddings=teacher.tie_word_embeddings,
        mlp_bias=teacher.mlp_bias, hidden_act=teacher.hidden_act, bos_token_id=teacher.bos_token_id,
        eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id, dtype=teacher.dtype,
        param_dtype=teacher.param_dtype,
    )


def _own_ranks(layer_ranks: dict, mla: MLAConfig, mla_set: set[int]) -> tuple:
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
    registered kind but attention (``mamba2={…}``, ``gdn={…}``)."""
    own = [p for p in inspect.signature(from_teacher).parameters if p not in ("teacher", "overrides")]
    return (*own, *(k for k in kinds() if k not in own and k != "attention"))


def rope_head_dims(head_dim: int) -> list[int]:
    """The ``qk_rope_head_dim`` values for an MLA initialised from a teacher of ``head_dim`` (``init/mla_svd.py``):
    MLA pair ``k`` rotates at ``θ^(-2k/d_rope)`` and is taken from teacher pair ``k·head_dim/d_rope``, rotating at
    ``θ^(-2j/head_dim)``; the two agree for every ``k`` only when ``d_rope`` divides ``head_dim``."""
    return [r for r in range(2, head_dim, 2) if head_dim % r == 0]


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

"""transformers ``config.json`` ↔ zebrax configs (``zebrax.config``): ``from_hf(cls, d)`` and ``to_hf(config)`` for
each architecture zebrax converts (Llama and Mistral, Mamba2, dense DeepSeek-V3), and ``rope_from_hf`` for their RoPE
parameters. Every transformers field is read, refused (a ConfigError naming it), or listed in ``IGNORED[cls]`` with
the reason it does not change what the model computes."""

from __future__ import annotations

import dataclasses

from zebrax.checks import ROPE_TYPES
from zebrax.config import (
    DeepseekV3Config,
    LlamaConfig,
    Mamba2Config,
    Mamba2LMConfig,
    MLAConfig,
    RopeScaling,
)
from zebrax.errors import ConfigError

# Fields of every transformers config that do not change what a model computes.
BOOKKEEPING = {
    "transformers_version": "bookkeeping", "architectures": "bookkeeping", "model_type": "selects the architecture",
    "output_hidden_states": "an output option", "return_dict": "an output option", "use_cache": "an output option",
    "dtype": "storage dtype; zebrax converts to the dtype asked for", "torch_dtype": "as dtype",
    "chunk_size_feed_forward": "not read by these models", "is_encoder_decoder": "decoder-only models",
    "id2label": "classification heads only", "label2id": "classification heads only",
    "problem_type": "classification heads only", "initializer_range": "initialisation of new weights only",
    "_name_or_path": "bookkeeping",
}


def refuse_set(cls, d: dict, name: str, allowed, why: str) -> None:
    """A transformers config field zebrax does not compute: refused unless it holds one of ``allowed``."""
    if name in d and d[name] not in allowed:
        raise ConfigError(f"{cls.__name__}: {name}={d[name]!r} is not supported ({why})")


def refuse_quantized(cls, d: dict) -> None:
    refuse_set(cls, d, "quantization_config", (None,), "quantized checkpoints store other tensors; convert the "
               "full-precision checkpoint, or its GGUF")


def _hf_float(v) -> float:
    """transformers writes non-finite floats into config.json as ``{"__float__": "Infinity"}``."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def rope_from_hf(d: dict | None, max_position_embeddings: int | None = None) -> RopeScaling:
    """Translate transformers' ``rope_parameters`` / ``rope_scaling`` (without ``rope_theta``). Every key
    is read or refused: an unread key would mean other frequencies than the checkpoint was trained with."""
    d = dict(d or {})
    rope_type = d.pop("rope_type", d.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"RopeScaling: rope_type={rope_type!r} is not supported; zebrax computes "
                          f"{', '.join(ROPE_TYPES)}")
    partial = d.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"RopeScaling: partial_rotary_factor={partial} is not supported (RoPE on every "
                          "dimension of the head only)")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"RopeScaling: unknown rope parameters {unknown} for rope_type={rope_type!r}; "
                          f"zebrax reads {sorted(fields)}")
    if rope_type == "yarn" and d.get("factor") is None and max_position_embeddings:
        # transformers' rule: without an explicit factor, the ratio of the two context lengths
        d["factor"] = max_position_embeddings / d.get("original_max_position_embeddings", max_position_embeddings)
    return RopeScaling(rope_type=rope_type, **{k: v for k, v in d.items() if v is not None})


def _llama_from_hf(d: dict) -> LlamaConfig:
    """Translate a transformers ``config.json`` (4.x ``rope_scaling`` or 5.x ``rope_parameters``) of a Llama
    or a Mistral: every field is read, refused, or listed in ``IGNORED`` with the reason."""
    refuse_quantized(LlamaConfig, d)
    if d.get("model_type") == "mistral":
        refuse_set(LlamaConfig, d, "sliding_window", (None,), "zebrax attends to every earlier token")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in d:
        rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
    max_positions = d.get("max_position_embeddings", 4096)
    eos = d.get("eos_token_id")
    return LlamaConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_from_hf(rope, max_positions),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=() if eos is None else eos,
        pad_token_id=d.get("pad_token_id"),
    )

def _llama_to_hf(config: LlamaConfig) -> dict:
    rope = {"rope_type": config.rope_scaling.rope_type, "rope_theta": config.rope_theta}
    if config.rope_scaling.rope_type != "default":
        rope.update(
            {k: v for k, v in dataclasses.asdict(config.rope_scaling).items() if k != "rope_type"}
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
    }


def _mamba2_from_hf(d: dict) -> Mamba2LMConfig:
    """Translate transformers' ``Mamba2Config`` JSON: every field is read, refused, or in ``IGNORED``."""
    refuse_quantized(Mamba2LMConfig, d)
    hidden = d["hidden_size"]
    d_inner = int(d.get("expand", 2) * hidden)
    mixer = Mamba2Config(
        d_model=hidden, d_inner=d_inner, n_heads=d["num_heads"], head_dim=d.get("head_dim", 64),
        d_state=d.get("state_size", 128), n_groups=d.get("n_groups", 1), conv_kernel=d.get("conv_kernel", 4),
        use_conv_bias=d.get("use_conv_bias", True), use_bias=d.get("use_bias", False),
        chunk_size=d.get("chunk_size", 256),
        dt_limit=tuple(_hf_float(v) for v in d.get("time_step_limit", (0.0, float("inf")))),
        dt_min=d.get("time_step_min", 1e-3), dt_max=d.get("time_step_max", 0.1),
        dt_init_floor=d.get("time_step_floor", 1e-4), norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=d.get("hidden_act", "silu"),
    )
    eos = d.get("eos_token_id")
    return Mamba2LMConfig(
        vocab_size=d["vocab_size"], num_hidden_layers=d["num_hidden_layers"], mixer=mixer,
        rms_norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=d.get("tie_word_embeddings", True),
        residual_in_fp32=d.get("residual_in_fp32", True), bos_token_id=d.get("bos_token_id"),
        eos_token_id=() if eos is None else eos, pad_token_id=d.get("pad_token_id"),
    )

def _mamba2_to_hf(config: Mamba2LMConfig) -> dict:
    m = config.mixer
    if m.xb_heads is not None or m.d_inner % m.d_model:
        raise ConfigError("Mamba2LMConfig: transformers' Mamba2 has no attention-shaped mixer (xb_heads) and "
                          f"needs d_inner a multiple of d_model; got xb_heads={m.xb_heads}, d_inner={m.d_inner}")
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": config.vocab_size,
        "hidden_size": m.d_model, "num_hidden_layers": config.num_hidden_layers, "expand": m.d_inner // m.d_model,
        "num_heads": m.n_heads, "head_dim": m.head_dim, "state_size": m.d_state, "n_groups": m.n_groups,
        "conv_kernel": m.conv_kernel, "use_conv_bias": m.use_conv_bias, "use_bias": m.use_bias,
        "hidden_act": m.activation,
        "chunk_size": m.chunk_size, "time_step_limit": list(m.dt_limit), "time_step_min": m.dt_min,
        "time_step_max": m.dt_max, "time_step_floor": m.dt_init_floor, "layer_norm_epsilon": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings, "residual_in_fp32": config.residual_in_fp32,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id),
        "pad_token_id": config.pad_token_id, "torch_dtype": config.param_dtype,
    }


def _deepseek_v3_from_hf(d: dict) -> DeepseekV3Config:
    """Translate transformers' ``DeepseekV3Config`` JSON (dense models only): every field is read, refused,
    or in ``IGNORED``."""
    refuse_quantized(DeepseekV3Config, d)
    layers = d["num_hidden_layers"]
    dense = d.get("first_k_dense_replace", 3)
    if dense is not None and dense < layers and d.get("n_routed_experts"):
        raise ConfigError(f"DeepseekV3Config: first_k_dense_replace={dense} < num_hidden_layers={layers}: "
                          "MoE layers are not supported (set first_k_dense_replace to the layer count)")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        raise ConfigError(f"DeepseekV3Config: num_key_value_heads={d['num_key_value_heads']} != "
                          f"num_attention_heads={heads}: kv_b_proj makes one K/V per head")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    attention = MLAConfig(
        d_model=d["hidden_size"], n_heads=heads, kv_groups=heads, q_lora_rank=d.get("q_lora_rank"),
        kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        q_latent_norm=d.get("q_lora_rank") is not None, kv_latent_norm=True, norm_eps=1e-6,
        rope_theta=float(rope_theta),
        rope_scaling=rope_from_hf(rope, d.get("max_position_embeddings", 4096)),
        rope_interleave=bool(d.get("rope_interleave", True)), attention_bias=bool(d.get("attention_bias", False)),
    )
    eos = d.get("eos_token_id")
    return DeepseekV3Config(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_hidden_layers=layers, attention=attention, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), hidden_act=d.get("hidden_act", "silu"),
        bos_token_id=d.get("bos_token_id"), eos_token_id=() if eos is None else eos,
        pad_token_id=d.get("pad_token_id"),
    )

def _deepseek_v3_to_hf(config: DeepseekV3Config) -> dict:
    a = config.attention
    if a.kv_groups != a.n_heads or a.kv_latent_norm is False or a.q_latent_norm != (a.q_lora_rank is not None):
        raise ConfigError("DeepseekV3Config: transformers' DeepseekV3 needs kv_groups == n_heads and the latent "
                          "norms (kv always, q with q_lora_rank)")
    rope = {"rope_type": a.rope_scaling.rope_type, "rope_theta": a.rope_theta}
    if a.rope_scaling.rope_type != "default":
        rope.update({k: v for k, v in dataclasses.asdict(a.rope_scaling).items()
                     if k != "rope_type" and v is not None})
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim, "first_k_dense_replace": config.num_hidden_layers, "n_routed_experts": 1,
        "rope_parameters": rope, "rope_interleave": a.rope_interleave, "attention_bias": a.attention_bias,
        "rms_norm_eps": config.rms_norm_eps, "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id), "pad_token_id": config.pad_token_id,
        "torch_dtype": config.param_dtype,
    }


# transformers' Llama/Mistral config fields that from_hf does not read, and why that is right
_LLAMA = {
    **BOOKKEEPING,
    "attention_dropout": "training regularisation; zebrax runs without dropout",
    "pretraining_tp": "tensor-parallel slices of the same matmuls (transformers 5 ignores it too)",
}
_MAMBA2 = {
    **BOOKKEEPING,
    "time_step_rank": "dt comes from in_proj; transformers' forward does not read it",
    "rescale_prenorm_residual": "initialisation of new weights only",
    "norm_before_gate": "transformers 4.x field its forward ignored (the norm gates first)",
    "rms_norm": "transformers 4.x field its forward ignored (always RMSNorm)",
}
_dense_only = "MoE layers are refused (first_k_dense_replace < num_hidden_layers), so it is never read"
_DEEPSEEK_V3 = {
    **BOOKKEEPING,
    **dict.fromkeys(("moe_intermediate_size", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                     "n_group", "topk_group", "num_experts_per_tok", "norm_topk_prob", "output_router_logits"),
                    _dense_only),
    "num_mtp_layers": "multi-token-prediction modules are not part of transformers' forward",
    "num_nextn_predict_layers": "as num_mtp_layers",
    "head_dim": "derived (= qk_rope_head_dim)", "qk_head_dim": "derived (= qk_nope + qk_rope)",
    "attention_dropout": "training regularisation; zebrax runs without dropout",
    "pretraining_tp": "tensor-parallel slices of the same matmuls",
}

# transformers' fields each architecture does not read, and why that is right
IGNORED = {LlamaConfig: _LLAMA, Mamba2LMConfig: _MAMBA2, DeepseekV3Config: _DEEPSEEK_V3}
_FROM = {LlamaConfig: _llama_from_hf, Mamba2LMConfig: _mamba2_from_hf, DeepseekV3Config: _deepseek_v3_from_hf}
_TO = {LlamaConfig: _llama_to_hf, Mamba2LMConfig: _mamba2_to_hf, DeepseekV3Config: _deepseek_v3_to_hf}


def from_hf(cls: type, d: dict):
    """The ``cls`` (LlamaConfig, Mamba2LMConfig or DeepseekV3Config) of a transformers ``config.json`` dict."""
    return _FROM[cls](d)


def to_hf(config) -> dict:
    """The transformers ``config.json`` dict of a LlamaConfig, Mamba2LMConfig or DeepseekV3Config (``in_transformers``);
    ConfigError for a config transformers has no model of (a hybrid: ``zebrax export`` writes its own layout)."""
    if not in_transformers(config):
        raise ConfigError(f"{type(config).__name__}: transformers has no model of it (it has Llama, Mamba2 and "
                          f"DeepSeek-V3); a hybrid exports in AMD's, MambaInLlama's or zebrax's layout")
    return _TO[type(config)](config)


def in_transformers(config) -> bool:
    """Whether transformers has a model of ``config`` that ``to_hf`` describes."""
    return type(config) in _TO

"""The architectures zebrax converts: transformers ``model_type`` → (config translation, tensor map)."""

from __future__ import annotations

from zebrax.config import DeepseekV3Config, HybridConfig, LlamaConfig, Mamba2LMConfig
from zebrax.convert.mapping import CONV, FLAT, LINEAR, LINEAR_2, SAME, TensorMap
from zebrax.mixers import kinds

LAYOUTS = {"linear": LINEAR, "linear_2": LINEAR_2, "same": SAME, "flat": FLAT, "conv": CONV}


def mixer_tensors(name: str, module: str) -> dict:
    """A registered kind's tensors (``MixerKind.hf_tensors``) stored under ``<module>.`` in a layer."""
    k = kinds()[name]
    return {f"{module}.{hf}": ((k.scope, *path), LAYOUTS[layout]) for hf, (path, layout) in k.hf_tensors.items()}


LLAMA = TensorMap(
    top_level={
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), SAME),
        "model.norm.weight": (("norm", "scale"), SAME),
        "lm_head.weight": (("lm_head", "kernel"), LINEAR),
    },
    per_layer={
        "input_layernorm.weight": (("input_layernorm", "scale"), SAME),
        "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), SAME),
        **mixer_tensors("attention", "self_attn"),
        **{f"mlp.{p}_proj.weight": (("mlp", f"{p}_proj", "kernel"), LINEAR) for p in ("gate", "up", "down")},
        **{f"mlp.{p}_proj.bias": (("mlp", f"{p}_proj", "bias"), FLAT) for p in ("gate", "up", "down")},
    },
    layer_prefix="model.layers",
)

MAMBA2 = TensorMap(
    top_level={
        "backbone.embeddings.weight": (("embed_tokens", "embedding"), SAME),
        "backbone.norm_f.weight": (("norm", "scale"), SAME),
        "lm_head.weight": (("lm_head", "kernel"), LINEAR),
    },
    per_layer={
        "norm.weight": (("norm", "scale"), SAME),
        **mixer_tensors("mamba2", "mixer"),
    },
    layer_prefix="backbone.layers",
    aliases={"backbone.embedding.weight": "backbone.embeddings.weight"},  # mamba_ssm's name
)

_MLP_AND_NORMS = {k: v for k, v in LLAMA.per_layer.items() if not k.startswith("self_attn.")}
DEEPSEEK_V3 = TensorMap(
    top_level=LLAMA.top_level,
    per_layer={
        **_MLP_AND_NORMS,
        "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), LINEAR),
        "self_attn.q_a_proj.weight": (("self_attn", "q_a_proj", "kernel"), LINEAR),
        "self_attn.q_a_proj.bias": (("self_attn", "q_a_proj", "bias"), SAME),
        "self_attn.q_a_layernorm.weight": (("self_attn", "q_a_layernorm", "scale"), SAME),
        "self_attn.q_b_proj.weight": (("self_attn", "q_b_proj", "kernel"), LINEAR),
        "self_attn.kv_a_proj_with_mqa.weight": (("self_attn", "kv_a_proj_with_mqa", "kernel"), LINEAR),
        "self_attn.kv_a_proj_with_mqa.bias": (("self_attn", "kv_a_proj_with_mqa", "bias"), SAME),
        "self_attn.kv_a_layernorm.weight": (("self_attn", "kv_a_layernorm", "scale"), SAME),
        "self_attn.kv_b_proj.weight": (("self_attn", "kv_b_proj"), LINEAR),
        "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), LINEAR_2),
        "self_attn.o_proj.bias": (("self_attn", "o_proj", "bias"), SAME),
    },
    layer_prefix="model.layers",
)

def hybrid_map() -> TensorMap:
    """A hybrid's HF layout (the reference code's, ``convert/hybrid.py``): Llama blocks whose mixer is stored under its
    kind's ``hf_module``: ``mla.*`` (AMD), ``mamba.*``, the kept ``self_attn.*`` (MambaInLlama), ``linear_attn.*``
    (Gated DeltaNet), and every other registered kind's; the head is always stored."""
    return TensorMap(
        top_level=LLAMA.top_level,
        per_layer={**LLAMA.per_layer,
                   **{t: v for k in kinds().values() for t, v in mixer_tensors(k.name, k.hf_module).items()}},
        layer_prefix="model.layers",
    )


# transformers model_type → (zebrax config class, tensor map)
ARCHITECTURES = {
    "llama": (LlamaConfig, LLAMA),
    "mistral": (LlamaConfig, LLAMA),
    "mamba2": (Mamba2LMConfig, MAMBA2),
    "deepseek_v3": (DeepseekV3Config, DEEPSEEK_V3),
}


def tensor_map(config) -> TensorMap:
    """The tensor map of a zebrax config's model type (a hybrid's, of the kinds registered now)."""
    if isinstance(config, HybridConfig):
        return hybrid_map()
    return {LlamaConfig: LLAMA, Mamba2LMConfig: MAMBA2, DeepseekV3Config: DEEPSEEK_V3}[type(config)]

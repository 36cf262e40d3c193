"""Multi-head Latent Attention: the attention kind of the Zebra recipe, made from the teacher's attention by SVD."""

from zebrax.mixers.base import MixerKind
from zebrax.mixers.mla.config import MLAConfig
from zebrax.mixers.mla.init import mla_from_attention, recipe
from zebrax.mixers.mla.layer import MLAttention
from zebrax.ops.attention import AttentionImpl

KIND = MixerKind(
    name="mla", letter="L", title="MLA", family="attention",
    config=MLAConfig, module=MLAttention, scope="self_attn", op="attention",
    impls=tuple(i.value for i in AttentionImpl), inputs=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa"),
    outputs=("o_proj",), from_attention=mla_from_attention, recipe=recipe,
    summary=("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"),
    hf_module="mla",  # AMD's layout (convert/hybrid.py)
    hf_tensors={"q_a_proj.weight": (("q_a_proj", "kernel"), "linear"),
                "q_a_layernorm.weight": (("q_a_layernorm", "scale"), "same"),
                "q_b_proj.weight": (("q_b_proj", "kernel"), "linear"),
                "kv_a_proj_with_mqa.weight": (("kv_a_proj_with_mqa", "kernel"), "linear"),
                "kv_a_layernorm.weight": (("kv_a_layernorm", "scale"), "same"),
                "kv_b_proj.weight": (("kv_b_proj",), "linear"),
                "out_proj.weight": (("o_proj", "kernel"), "linear_2")},
    axes={"q_lora": "fsdp", "kv_lora": "fsdp", "kv_latent": None},  # q_b/kv_b have no embed axis: fsdp takes these
)

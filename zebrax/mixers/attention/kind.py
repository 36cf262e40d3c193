"""The teacher's own mixer, grouped-query attention with RoPE: layers that keep the teacher's attention."""

from zebrax.mixers.attention.config import AttentionConfig
from zebrax.mixers.attention.layer import Attention
from zebrax.mixers.base import MixerKind
from zebrax.ops.attention import AttentionImpl

KIND = MixerKind(
    name="attention", letter="A", title="attention", family="attention",
    config=AttentionConfig, width=None, module=Attention, scope="self_attn", op="attention",
    impls=tuple(i.value for i in AttentionImpl), inputs=("q_proj", "k_proj", "v_proj"), outputs=("o_proj",),
    teacher=True, hf_module="self_attn",
    hf_tensors={**{f"{p}_proj.weight": ((f"{p}_proj", "kernel"), "linear") for p in "qkv"},
                **{f"{p}_proj.bias": ((f"{p}_proj", "bias"), "flat") for p in "qkv"},
                "o_proj.weight": (("o_proj", "kernel"), "linear_2"), "o_proj.bias": (("o_proj", "bias"), "flat")},
)

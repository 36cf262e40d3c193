"""The record of ``nope``."""

from tests.kinds.nope.config import NoPEConfig
from tests.kinds.nope.init import from_attention, recipe
from tests.kinds.nope.layer import NoPEAttention
from zebrax.mixers.base import MixerKind
from zebrax.ops.attention import AttentionImpl

KIND = MixerKind(
    name="nope", letter="N", title="NoPE attention", family="attention", config=NoPEConfig, module=NoPEAttention,
    scope="self_attn", op="attention", impls=tuple(i.value for i in AttentionImpl),
    inputs=("q_proj", "k_proj", "v_proj"), outputs=("o_proj",), from_attention=from_attention, recipe=recipe,
    hf_module="nope_attn",
    hf_tensors={**{f"{p}_proj.weight": ((f"{p}_proj", "kernel"), "linear") for p in "qkv"},
                "o_proj.weight": (("o_proj", "kernel"), "linear_2")},
)

"""Gated DeltaNet: a linear kind (Qwen3-Next's, HyLo's), made from the teacher's attention weights as Mamba2 is."""

from zebrax.mixers.base import MixerKind
from zebrax.mixers.gdn.config import GatedDeltaConfig
from zebrax.mixers.gdn.init import gated_delta_from_attention, recipe
from zebrax.mixers.gdn.layer import IMPLS, GatedDeltaMixer

KIND = MixerKind(
    name="gdn", letter="D", title="Gated DeltaNet", family="linear",
    config=GatedDeltaConfig, module=GatedDeltaMixer, scope="mixer", op="gated_delta",
    impls=IMPLS, inputs=("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"), outputs=("out_proj",),
    from_attention=gated_delta_from_attention, recipe=recipe,
    hf_module="linear_attn",  # Qwen3-Next's name for its Gated DeltaNet layers
    hf_tensors={**{f"{p}_proj.weight": ((f"{p}_proj", "kernel"), "linear") for p in "qkvgab"},
                "conv1d.weight": (("conv_kernel",), "conv"), "dt_bias": (("dt_bias",), "same"),
                "A_log": (("A_log",), "same"), "norm.weight": (("norm", "scale"), "same"),
                "out_proj.weight": (("out_proj", "kernel"), "linear_2")},
)

"""Mamba2 (the SSD scan): the linear kind of the Zebra recipe, made from the teacher's attention weights."""

from zebrax.mixers.base import MixerKind
from zebrax.mixers.mamba2.config import Mamba2Config
from zebrax.mixers.mamba2.init import mamba2_from_attention, recipe
from zebrax.mixers.mamba2.layer import Mamba2Mixer
from zebrax.ops.ssd import SSDImpl

KIND = MixerKind(
    name="mamba2", letter="S", title="Mamba2", family="linear",
    config=Mamba2Config, module=Mamba2Mixer, scope="mixer", op="ssd",
    impls=tuple(i.value for i in SSDImpl), inputs=("in_proj",), outputs=("out_proj",),
    from_attention=mamba2_from_attention, recipe=recipe,
    hf_module="mamba",  # AMD's and MambaInLlama's layout; transformers' Mamba2 calls it mixer
    hf_tensors={"in_proj.weight": (("in_proj", "kernel"), "linear"), "in_proj.bias": (("in_proj", "bias"), "same"),
                "conv1d.weight": (("conv_kernel",), "conv"), "conv1d.bias": (("conv_bias",), "same"),
                "dt_bias": (("dt_bias",), "same"), "A_log": (("A_log",), "same"), "D": (("D",), "same"),
                "norm.weight": (("norm", "scale"), "same"), "out_proj.weight": (("out_proj", "kernel"), "linear"),
                "out_proj.bias": (("out_proj", "bias"), "same")},
    axes={"ssm_in": None, "ssm_inner": "tensor"},  # in_proj's [z ; xBC ; dt] is never split
)

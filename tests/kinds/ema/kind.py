"""The record of ``ema``."""

from tests.kinds.ema.config import EMAConfig
from tests.kinds.ema.init import from_attention, recipe
from tests.kinds.ema.layer import EMAMixer
from zebrax.mixers.base import MixerKind

KIND = MixerKind(
    name="ema", letter="E", title="EMA", family="linear", config=EMAConfig, module=EMAMixer, scope="mixer",
    op="ema", impls=("reference", "auto"), inputs=("v_proj", "a_proj"), outputs=("o_proj",),
    from_attention=from_attention, recipe=recipe, hf_module="ema",
    hf_tensors={"v_proj.weight": (("v_proj", "kernel"), "linear"), "a_proj.weight": (("a_proj", "kernel"), "linear"),
                "o_proj.weight": (("o_proj", "kernel"), "linear_2")},
)

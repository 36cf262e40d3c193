"""zebrax: Zebra-Llama hybrids in JAX/Flax.

    zebrax.convert(src, dst)      HF safetensors / .bin / GGUF Llama → zebrax checkpoint
    zebrax.build(teacher, dst, mla_layers=[…])   a Zebra-Llama hybrid initialised from the teacher
    model = zebrax.load(dst)      model.logits(tokens), model.generate(tokens, max_new_tokens=…),
                                  model.chat("…"), model.cache_bytes_per_token()
    zebrax.describe(dst_or_preset)   layers, parameters and decode cache of a checkpoint or preset
    zebrax.compile("kd", topology="v5p-16", teacher=…, student=…)   a step compiled for a TPU slice, here

``describe`` and ``compile`` are programs of ``zebrax.app``, imported when first used: importing the library loads
none of its applications.
"""

from zebrax.platform import quiet_libtpu

quiet_libtpu()  # before JAX starts: without a TPU here, libtpu (if installed) stays silent

from zebrax import select
from zebrax.api import Model, build, convert, load
from zebrax.config import HybridConfig, LlamaConfig, RopeScaling
from zebrax.errors import CheckpointError, ConfigError, ConversionError, ZebraxError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "ConversionError", "HybridConfig", "LlamaConfig", "Model", "RopeScaling",
    "ZebraxError", "build", "compile", "convert", "describe", "load", "select",
]


def __getattr__(name: str):
    """``describe`` and ``compile``, imported from ``zebrax.app`` on first use."""
    if name == "describe":
        from zebrax.app.info import describe

        return describe
    if name == "compile":
        from zebrax.app.aot import compile

        return compile
    raise AttributeError(f"module 'zebrax' has no attribute {name!r}")

"""The mixer kinds a layer can hold. Each kind is declared once, in its own module, as one ``MixerKind`` record
(``KIND = MixerKind(...)``); every table that depends on the kinds — the config classes a plan accepts, the letters
of a layer map, the decoder's modules, the ops and their implementations, the logical-axis rules, the
initialisation from a teacher's attention, the names in the reference code's checkpoints — is derived from these
records. A new kind is its own files plus one line in ``KIND_MODULES``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

from zebrax.errors import ConfigError

# the modules that declare a kind (``KIND``), in the order the tables list them
KIND_MODULES = (
    "zebrax.layers.attention",
    "zebrax.layers.mla",
    "zebrax.layers.mamba2",
    "zebrax.layers.gated_delta",
)


@dataclasses.dataclass(frozen=True)
class MixerKind:
    """One kind of mixer.

    - ``name``: its name in plans and configs (``"mamba2"``); ``letter``: its letter in a layer map (``"S"``);
      ``title``: what people call it (``"Mamba2"``).
    - ``config``: its config class; ``module``: its Flax module, constructed ``(config, dtype, param_dtype, impl)``,
      called ``(x, slots, cache) -> (y, cache)``, with ``init_cache(config, batch, max_len, dtype)``; ``scope``: the
      name of its parameters inside a layer (``self_attn`` or ``mixer``).
    - ``op``: the op whose implementation it takes (kinds may share one), ``impls`` that op's implementations.
    - ``from_attention``: ``"module:function"`` making its parameters from a teacher layer's attention,
      ``(attention params, AttentionConfig, config, key) -> (params, report)``; None for the teacher's own kind.
    - ``recipe``: the config a Llama teacher's layers take as this kind, ``(LlamaConfig) -> config`` (None where
      the recipe has arguments of its own: MLA's ranks, in ``recipe.from_teacher``).
    - ``hf_module``: its module's name in a hybrid's HF checkpoint (``model.layers.{i}.<hf_module>.*``) and
      ``hf_tensors`` its tensors there: HF name under the module → (our path under ``scope``, layout).
    - ``axes``: the logical-axis rules of axis names only it uses (``zebrax.sharding.RULES``).
    """

    name: str
    letter: str
    title: str
    config: type
    module: type
    scope: str
    op: str
    impls: tuple[str, ...]
    hf_module: str
    hf_tensors: dict[str, tuple[tuple[str, ...], Any]]
    from_attention: str | None = None
    recipe: Callable | None = None
    axes: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def initialise(self, attention: dict, teacher, config, key) -> tuple[dict, dict]:
        """This kind's parameters from a teacher layer's attention parameters (``from_attention``)."""
        if self.from_attention is None:
            raise ConfigError(f"mixer {self.name!r} is not made from a teacher's attention")
        module, function = self.from_attention.split(":")
        return getattr(importlib.import_module(module), function)(attention, teacher, config, key)


@functools.cache
def kinds() -> dict[str, MixerKind]:
    """Every registered kind by name, in ``KIND_MODULES`` order."""
    out = {}
    for path in KIND_MODULES:
        kind = importlib.import_module(path).KIND
        if kind.name in out or kind.letter in {k.letter for k in out.values()}:
            raise ConfigError(f"{path}: mixer {kind.name!r} (letter {kind.letter!r}) is registered twice")
        out[kind.name] = kind
    return out


def kind(name: str) -> MixerKind:
    """The kind named ``name``; ConfigError listing the registered ones otherwise."""
    found = kinds().get(name)
    if found is None:
        raise ConfigError(f"mixer {name!r} is not one of {sorted(kinds())}")
    return found


def legend(layer_map: str) -> str:
    """What the letters of ``layer_map`` stand for: ``"L MLA, S Mamba2"``."""
    return ", ".join(f"{k.letter} {k.title}" for k in kinds().values() if k.letter in layer_map)


def ops() -> dict[str, tuple[str, ...]]:
    """Each op the kinds run → its implementations, in ``KIND_MODULES`` order."""
    return {k.op: k.impls for k in kinds().values()}

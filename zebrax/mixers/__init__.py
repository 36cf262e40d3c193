"""The mixer kinds a layer can hold, and the registry of them.

Each kind is a folder of this package (``attention/``, ``mla/``, ``mamba2/``, ``gdn/``: ``config.py``, ``layer.py``,
``init.py``, ``kind.py``) whose ``kind.py`` declares one ``MixerKind`` record (``zebrax.mixers.base``). The registry
imports each record by name below; every table that depends on the kinds is derived from the records, never listed
by hand. A new kind is its folder plus one line here (or, from outside the package, one ``register`` call).
"""

from __future__ import annotations

from zebrax.errors import ConfigError
from zebrax.mixers.attention.kind import KIND as ATTENTION
from zebrax.mixers.base import MixerKind
from zebrax.mixers.gdn.kind import KIND as GATED_DELTANET
from zebrax.mixers.mamba2.kind import KIND as MAMBA2
from zebrax.mixers.mla.kind import KIND as MLA

_KINDS: dict[str, MixerKind] = {}


def register(new: MixerKind) -> MixerKind:
    """Add a kind to the registry (``ConfigError`` when its name, letter or HF module name is taken); returns it."""
    for field in ("name", "letter", "hf_module"):
        taken = [k.name for k in _KINDS.values() if getattr(k, field) == getattr(new, field)]
        if taken:
            raise ConfigError(f"mixer {new.name!r}: its {field} {getattr(new, field)!r} is taken by {taken[0]!r}")
    if new.teacher and any(k.teacher for k in _KINDS.values()):
        raise ConfigError(f"mixer {new.name!r}: the teacher's own kind is registered already")
    _KINDS[new.name] = new
    return new


for _kind in (ATTENTION, MLA, MAMBA2, GATED_DELTANET):
    register(_kind)


def kinds() -> dict[str, MixerKind]:
    """Every registered kind by name, in the order registered."""
    return dict(_KINDS)


def kind(name: str) -> MixerKind:
    """The kind named ``name``; ConfigError listing the registered ones otherwise."""
    found = _KINDS.get(name)
    if found is None:
        raise ConfigError(f"mixer {name!r} is not one of {sorted(_KINDS)}")
    return found


def teacher_kind() -> MixerKind:
    """The teacher's own kind (grouped-query attention)."""
    return next(k for k in _KINDS.values() if k.teacher)


def legend(layer_map: str) -> str:
    """What the letters of ``layer_map`` stand for: ``"L MLA, S Mamba2"``."""
    return ", ".join(f"{k.letter} {k.title}" for k in _KINDS.values() if k.letter in layer_map)


def ops() -> dict[str, tuple[str, ...]]:
    """Each op the kinds run → its implementations, in the order registered."""
    return {k.op: k.impls for k in _KINDS.values()}


__all__ = ["MixerKind", "kind", "kinds", "legend", "ops", "register", "teacher_kind"]

"""Ops with one signature and several implementations behind an ``impl`` argument, and ``Impls``: the choice
of implementation for each op a model runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from zebrax.errors import InvalidArgument
from zebrax.ops.attention import AttentionImpl, attention, latent_attention
from zebrax.ops.ssd import SSDImpl, ssd, ssd_decode_step


@dataclasses.dataclass(frozen=True)
class Impls:
    """The implementation of each op a model runs (``attention``: GQA and MLA, ``AttentionImpl``; ``ssd``: the Mamba2
    scan, ``SSDImpl``; every op of a registered mixer kind, ``zebrax.mixers.ops()``), read as ``impls.ssd``; an op
    not chosen runs ``auto``. Each mixer receives its own op's choice, so no setting can hand an SSD name to
    attention."""

    chosen: tuple[tuple[str, str], ...] = ()

    def __getattr__(self, op: str) -> str:
        if op.startswith("_") or op not in _ops():
            raise AttributeError(op)
        return dict(self.chosen).get(op, "auto")

    @classmethod
    def parse(cls, impl: str | Mapping[str, str] | Impls, ops: tuple[str, ...] | None = None) -> Impls:
        """``"pallas"`` (every op in ``ops``, default every op), ``{"attention": "reference", "ssd": "chunked"}``, or
        an ``Impls``; InvalidArgument names a value that is not an implementation of its op."""
        known = _ops()
        ops = tuple(known) if ops is None else ops
        if isinstance(impl, str):
            impl = dict.fromkeys(ops, impl)
        elif isinstance(impl, cls):
            impl = dict(impl.chosen)
        elif not isinstance(impl, Mapping) or set(impl) - set(known):
            raise InvalidArgument(f"impl={impl!r}: expected a name or a mapping from {sorted(known)} to names")
        for op in ops:
            if impl.get(op, "auto") not in known[op]:
                raise InvalidArgument(f"impl={impl[op]!r} is not one of {known[op]} for the {op} op")
        return cls(tuple(sorted((op, name) for op, name in impl.items() if name != "auto")))


def _ops() -> dict[str, tuple[str, ...]]:
    from zebrax.mixers import ops

    return ops()


__all__ = ["AttentionImpl", "Impls", "SSDImpl", "attention", "latent_attention", "ssd", "ssd_decode_step"]

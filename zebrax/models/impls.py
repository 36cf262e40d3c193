"""``Impls``: the implementation of each op a model runs, one of the op's own (``zebrax.mixers.ops``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from zebrax.errors import InvalidArgument
from zebrax.mixers import ops


@dataclasses.dataclass(frozen=True)
class Impls:
    """The implementation of each op a model runs (``attention``: GQA and MLA, ``AttentionImpl``; ``ssd``: the Mamba2
    scan, ``SSDImpl``; every op of a registered mixer kind, ``zebrax.mixers.ops()``), read as ``impls.ssd``; an op
    not chosen runs ``auto``. Each mixer receives its own op's choice, so no setting can hand an SSD name to
    attention."""

    chosen: tuple[tuple[str, str], ...] = ()

    def __getattr__(self, op: str) -> str:
        if op.startswith("_") or op not in ops():
            raise AttributeError(op)
        return dict(self.chosen).get(op, "auto")

    @classmethod
    def parse(cls, impl: str | Mapping[str, str] | Impls, used: tuple[str, ...] | None = None) -> Impls:
        """``"pallas"`` (every op in ``used``, default every op), ``{"attention": "reference", "ssd": "chunked"}``, or
        an ``Impls``; InvalidArgument names a value that is not an implementation of its op."""
        known = ops()
        used = tuple(known) if used is None else used
        if isinstance(impl, str):
            impl = dict.fromkeys(used, impl)
        elif isinstance(impl, cls):
            impl = dict(impl.chosen)
        elif not isinstance(impl, Mapping) or set(impl) - set(known):
            raise InvalidArgument(f"impl={impl!r}: expected a name or a mapping from {sorted(known)} to names")
        for op in used:
            if impl.get(op, "auto") not in known[op]:
                raise InvalidArgument(f"impl={impl[op]!r} is not one of {known[op]} for the {op} op")
        return cls(tuple(sorted((op, name) for op, name in impl.items() if name != "auto")))

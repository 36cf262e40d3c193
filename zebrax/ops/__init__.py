"""Ops with one signature and several implementations behind an ``impl`` argument, and ``Impls``: the choice
of implementation for each op a model runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from zebrax.errors import InvalidArgument
from zebrax.ops.attention import AttentionImpl, attention, latent_attention
from zebrax.ops.ssd import SSDImpl, ssd, ssd_decode_step

OP_IMPLS = {"attention": AttentionImpl, "ssd": SSDImpl}


@dataclasses.dataclass(frozen=True)
class Impls:
    """The implementation of each op: ``attention`` (GQA and MLA, ``AttentionImpl``) and ``ssd`` (the Mamba2
    scan, ``SSDImpl``). Each mixer receives its own op's choice, so no setting can hand an SSD name to attention."""

    attention: str = "auto"
    ssd: str = "auto"

    @classmethod
    def parse(cls, impl: str | Mapping[str, str] | Impls, ops: tuple[str, ...] = tuple(OP_IMPLS)) -> Impls:
        """``"pallas"`` (every op in ``ops``), ``{"attention": "reference", "ssd": "chunked"}``, or an ``Impls``;
        InvalidArgument names a value that is not an implementation of its op."""
        if isinstance(impl, str):
            impl = dict.fromkeys(ops, impl)
        elif isinstance(impl, cls):
            impl = dataclasses.asdict(impl)
        elif not isinstance(impl, Mapping) or set(impl) - set(OP_IMPLS):
            raise InvalidArgument(f"impl={impl!r}: expected a name or a mapping from {sorted(OP_IMPLS)} to names")
        for op in ops:
            choices = tuple(i.value for i in OP_IMPLS[op])
            if impl.get(op, "auto") not in choices:
                raise InvalidArgument(f"impl={impl[op]!r} is not one of {choices} for the {op} op")
        return cls(**impl)


__all__ = ["AttentionImpl", "Impls", "SSDImpl", "attention", "latent_attention", "ssd", "ssd_decode_step"]

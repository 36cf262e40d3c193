"""The config of ``nope``: grouped-query attention of its own width, without positions (NoPE)."""

from __future__ import annotations

import dataclasses

from zebrax.checks import require, require_positive


@dataclasses.dataclass(frozen=True)
class NoPEConfig:
    d_model: int = 48
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16

    def __post_init__(self):
        require_positive(self, "d_model", "n_heads", "n_kv_heads", "head_dim")
        require(self.n_heads % self.n_kv_heads == 0, self, "n_kv_heads must divide n_heads")

"""The config of ``ema``: ``n_heads`` heads of ``head_dim`` channels, each a moving average of ``v``."""

from __future__ import annotations

import dataclasses

from zebrax.checks import require_positive


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    d_model: int = 48
    n_heads: int = 4
    head_dim: int = 16

    def __post_init__(self):
        require_positive(self, "d_model", "n_heads", "head_dim")

"""The teacher's grouped-query attention: its config."""

from __future__ import annotations

import dataclasses

from zebrax.checks import RopeScaling, require, require_positive


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Grouped-query attention with RoPE (the teacher's mixer): ``n_heads`` query heads share ``n_kv_heads`` key
    and value heads of ``head_dim``; under YaRN, cos and sin carry its attention factor."""

    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    attention_bias: bool = False

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        require_positive(self, "n_heads", "n_kv_heads", "head_dim")
        require(self.n_heads % self.n_kv_heads == 0, self,
                f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0, self, f"head_dim={self.head_dim} must be even for RoPE")
        require(self.rope_theta > 0, self, f"rope_theta={self.rope_theta} must be > 0")

"""Multi-head Latent Attention: its config."""

from __future__ import annotations

import dataclasses

from zebrax.checks import RopeScaling, require, require_positive


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V3 form, METHOD §2).

    ``q = W_qb · [RMSNorm] · W_qa x`` (or a full ``q_proj`` when ``q_lora_rank`` is None), split per head into
    ``q_nope`` and ``q_pe``; ``[c_kv ; k_pe] = W_kva x`` with one shared RoPE key; ``[k_nope ; v] = W_kvb c_kv``
    in ``kv_groups`` groups (= n_heads for DeepSeek, the teacher's KV heads for Zebra), repeated to the heads.
    The decode cache holds ``kv_lora_rank + qk_rope_head_dim`` values per token.
    """

    d_model: int = 2048
    n_heads: int = 32
    kv_groups: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    q_latent_norm: bool = False
    kv_latent_norm: bool = False
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    rope_interleave: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        require_positive(self, "d_model", "n_heads", "kv_groups", "kv_lora_rank", "qk_nope_head_dim",
                         "qk_rope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            require_positive(self, "q_lora_rank")
        require(self.n_heads % self.kv_groups == 0, self,
                f"kv_groups={self.kv_groups} must divide n_heads={self.n_heads}")
        require(self.qk_rope_head_dim % 2 == 0, self, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        require(self.norm_eps > 0 and self.rope_theta > 0, self,
                f"norm_eps={self.norm_eps} and rope_theta={self.rope_theta} must be > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

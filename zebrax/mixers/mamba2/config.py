"""The Mamba2 mixer: its config."""

from __future__ import annotations

import dataclasses

from zebrax.checks import check_activation, require, require_positive

GATED_NORM_EPS = 1e-5  # the Zebra recipe's Mamba2 gated RMSNorm (the reference code fixes it)


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """One Mamba2 mixer (METHOD §3), covering both shapes in use.

    Standard Mamba2 (mamba_ssm, transformers): x has ``n_heads`` heads of ``head_dim``; B and C have
    ``n_groups`` groups of ``d_state``. Zebra's attention-shaped variant sets ``xb_heads`` (the teacher's
    KV heads): x and B then have ``xb_heads`` heads, like V and K, repeated to the heads and groups after
    the conv; C has ``n_groups = n_heads`` groups, like Q. ``in_proj`` rows: ``[z, x, B, C, dt]``.
    The gated RMSNorm normalises each of the ``n_groups`` groups of y.
    """

    d_model: int = 768
    d_inner: int = 1536
    n_heads: int = 24
    head_dim: int = 64
    d_state: int = 128
    n_groups: int = 1
    xb_heads: int | None = None
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    activation: str = "silu"

    def __post_init__(self):
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))
        require_positive(self, "d_model", "d_inner", "n_heads", "head_dim", "d_state", "n_groups", "conv_kernel",
                         "chunk_size")
        require(
            self.n_heads * self.head_dim == self.d_inner,
            self,
            f"n_heads={self.n_heads} x head_dim={self.head_dim} = {self.n_heads * self.head_dim} "
            f"!= d_inner={self.d_inner}",
        )
        require(self.n_heads % self.n_groups == 0, self,
                f"n_groups={self.n_groups} must divide n_heads={self.n_heads}")
        if self.xb_heads is not None:
            require_positive(self, "xb_heads")
            require(self.n_heads % self.xb_heads == 0 and self.n_groups % self.xb_heads == 0, self,
                    f"xb_heads={self.xb_heads} must divide n_heads={self.n_heads} and n_groups={self.n_groups}")
        require(0 <= self.dt_limit[0] < self.dt_limit[1], self, f"dt_limit={self.dt_limit} must be (low, high), "
                "0 <= low < high")
        require(0 < self.dt_min <= self.dt_max, self, f"need 0 < dt_min={self.dt_min} <= dt_max={self.dt_max}")
        require(0 < self.A_init_range[0] <= self.A_init_range[1], self,
                f"A_init_range={self.A_init_range} must be (low, high) with 0 < low <= high")
        require(self.norm_eps > 0, self, f"norm_eps={self.norm_eps} must be > 0")
        check_activation(self, "activation")

    @property
    def x_heads(self) -> int:
        """Heads of x before repetition (n_heads, or xb_heads in the attention-shaped variant)."""
        return self.xb_heads or self.n_heads

    @property
    def b_groups(self) -> int:
        """Groups of B before repetition (n_groups, or xb_heads in the attention-shaped variant)."""
        return self.xb_heads or self.n_groups

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C."""
        return self.x_heads * self.head_dim + (self.b_groups + self.n_groups) * self.d_state

    def in_proj_sizes(self) -> dict[str, int]:
        """Widths of the ``in_proj`` output, in row order."""
        return {"z": self.d_inner, "x": self.x_heads * self.head_dim, "B": self.b_groups * self.d_state,
                "C": self.n_groups * self.d_state, "dt": self.n_heads}

"""The Gated DeltaNet mixer: its config."""

from __future__ import annotations

import dataclasses

from zebrax.checks import check_activation, require, require_positive


@dataclasses.dataclass(frozen=True)
class GatedDeltaConfig:
    """One Gated DeltaNet mixer: ``n_heads`` state heads of ``head_k_dim`` × ``head_v_dim``; q, k and v have
    ``q_heads``, ``k_heads`` and ``v_heads`` heads (each dividing ``n_heads``; default: q and v on every head, k as
    q), the gate ``z`` and ``a``, ``b`` one per state head. ``dt_*`` and ``A_init_range`` initialise ``dt_bias`` and
    ``A_log`` as Mamba2's are; ``norm_eps`` is the output norm's, ``l2_eps`` that of q's and k's L2 norm."""

    d_model: int = 768
    n_heads: int = 12
    head_k_dim: int = 64
    head_v_dim: int = 64
    q_heads: int | None = None
    k_heads: int | None = None
    v_heads: int | None = None
    conv_kernel: int = 4
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-6
    l2_eps: float = 1e-6
    activation: str = "silu"

    def __post_init__(self):
        object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))
        for name, default in (("q_heads", self.n_heads), ("k_heads", self.q_heads or self.n_heads),
                              ("v_heads", self.n_heads)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        require_positive(self, "d_model", "n_heads", "head_k_dim", "head_v_dim", "q_heads", "k_heads", "v_heads",
                         "conv_kernel", "chunk_size")
        for name in ("q_heads", "k_heads", "v_heads"):
            require(self.n_heads % getattr(self, name) == 0, self,
                    f"{name}={getattr(self, name)} must divide n_heads={self.n_heads}")
        require(0 < self.dt_min <= self.dt_max, self, f"need 0 < dt_min={self.dt_min} <= dt_max={self.dt_max}")
        require(0 < self.A_init_range[0] <= self.A_init_range[1], self,
                f"A_init_range={self.A_init_range} must be (low, high) with 0 < low <= high")
        require(self.norm_eps > 0 and self.l2_eps > 0, self, "norm_eps and l2_eps must be > 0")
        check_activation(self, "activation")

    def conv_sizes(self) -> dict[str, int]:
        """Widths of the conv's channels, in order: q, k, v."""
        return {"q": self.q_heads * self.head_k_dim, "k": self.k_heads * self.head_k_dim,
                "v": self.v_heads * self.head_v_dim}

    @property
    def conv_dim(self) -> int:
        return sum(self.conv_sizes().values())

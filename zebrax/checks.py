"""The ground floor every config stands on: the validation helpers (errors that name the config class and the
field), the dtypes a model may compute and store in, and ``RopeScaling``, which the attention kinds share."""

from __future__ import annotations

import dataclasses
from typing import Any

from zebrax.errors import ConfigError
from zebrax.layers.activations import ACTIVATIONS

DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def require(ok: bool, cfg: Any, message: str) -> None:
    """Raise ConfigError naming the config class when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}: {message}")


def require_counts(where: str, **values) -> None:
    """InvalidArgument naming the first argument that is not an integer >= 1 (or a list holding one) — the sizes
    a function is given (a benchmark's lengths, a measure's chunk)."""
    from zebrax.errors import InvalidArgument

    for name, value in values.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in items):
            raise InvalidArgument(f"{where}: {name}={value!r} must be an integer >= 1"
                                  f"{' (each of them)' if isinstance(value, (list, tuple)) else ''}")


def require_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(isinstance(value, int) and value > 0, cfg, f"{name}={value!r} must be a positive integer")


def normalise_token_ids(cfg: Any) -> None:
    """eos_token_id as a tuple (chat models stop on several ids), checked against vocab_size; dtypes checked."""
    eos = cfg.eos_token_id
    object.__setattr__(cfg, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos or ()))
    for tok in cfg.eos_token_id:
        require(0 <= tok < cfg.vocab_size, cfg, f"eos_token_id {tok} is outside vocab_size={cfg.vocab_size}")
    for name in ("dtype", "param_dtype"):
        require(getattr(cfg, name) in DTYPES, cfg, f"{name}={getattr(cfg, name)!r} is not one of {DTYPES}")


def check_activation(cfg: Any, name: str) -> None:
    value = getattr(cfg, name)
    require(value in ACTIVATIONS, cfg, f"{name}={value!r} is not an activation zebrax computes; "
            f"known: {', '.join(sorted(ACTIVATIONS))}")


def unknown_fields(cls, d: dict) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - {"model_type"})
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}; valid fields are {sorted(known)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` is Llama-3.1/3.2's; ``linear`` divides every frequency; ``yarn`` is
    DeepSeek's YaRN (``beta_fast``/``beta_slow`` ramp; cos/sin scaled by ``attention_factor``, by default
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` or ``0.1·ln(factor) + 1``; the softmax scale
    multiplied by ``mscale(factor, mscale_all_dim)²`` when ``mscale_all_dim`` is set)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        require(self.rope_type in ROPE_TYPES, self, f"rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
        require(self.factor > 0, self, f"factor={self.factor} must be > 0")
        if self.rope_type == "llama3":
            require(
                self.high_freq_factor > self.low_freq_factor > 0,
                self,
                f"llama3 needs high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}",
            )
            require_positive(self, "original_max_position_embeddings")
        if self.rope_type == "yarn":
            require_positive(self, "original_max_position_embeddings")
            require(self.beta_fast > self.beta_slow > 0, self,
                    f"yarn needs beta_fast > beta_slow > 0, got beta_fast={self.beta_fast}, beta_slow={self.beta_slow}")

"""Frozen model configurations, validated in ``__post_init__``.

A config plus a pytree of parameters is a model. Configs are plain data: they serialise to JSON
(``to_dict``/``from_dict``) beside every checkpoint, and ``from_hf_dict``/``to_hf_dict`` translate
the transformers ``config.json`` of the same architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zebrax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
ROPE_TYPES = ("default", "linear", "llama3")


def require(ok: bool, cfg: Any, message: str) -> None:
    """Raise ConfigError naming the config class when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}: {message}")


def require_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(isinstance(value, int) and value > 0, cfg, f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3`` is Llama-3.1/3.2's; ``linear`` divides every frequency."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

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

    @classmethod
    def from_hf_dict(cls, d: dict | None) -> RopeScaling:
        d = dict(d or {})
        rope_type = d.get("rope_type", d.get("type", "default"))
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family decoder: pre-norm blocks of GQA attention and a SwiGLU MLP.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters.
    ``eos_token_id`` is a tuple: chat models stop on several ids.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    model_type = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            require(
                self.hidden_size % self.num_attention_heads == 0,
                self,
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly",
            )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id or ()))
        require_positive(
            self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            self,
            f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
            f"{self.num_attention_heads}",
        )
        require(self.head_dim % 2 == 0, self, f"head_dim={self.head_dim} must be even for RoPE")
        require(self.rms_norm_eps > 0, self, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        require(self.rope_theta > 0, self, f"rope_theta={self.rope_theta} must be > 0")
        for name in ("dtype", "param_dtype"):
            require(getattr(self, name) in DTYPES, self, f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
        for tok in self.eos_token_id:
            require(0 <= tok < self.vocab_size, self, f"eos_token_id {tok} is outside vocab_size={self.vocab_size}")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return {"model_type": self.model_type, **d}

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        d = dict(d)
        d.pop("model_type", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {unknown}; valid fields are {sorted(known)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict) -> LlamaConfig:
        """Translate a transformers ``config.json`` (4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=RopeScaling.from_hf_dict(rope),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=() if eos is None else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict:
        rope = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope.update(
                {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k != "rope_type"}
            )
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]

"""Frozen model configurations, validated in ``__post_init__``.

A config plus a pytree of parameters is a model. Configs are plain data: they serialise to JSON
(``to_dict``/``from_dict``) beside every checkpoint; ``zebrax.convert.hf_config`` translates the transformers
``config.json`` of the same architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from zebrax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
GATED_NORM_EPS = 1e-5  # the Zebra recipe's Mamba2 gated RMSNorm (the reference code fixes it)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def require(ok: bool, cfg: Any, message: str) -> None:
    """Raise ConfigError naming the config class when ``ok`` is false."""
    if not ok:
        raise ConfigError(f"{type(cfg).__name__}: {message}")


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
    from zebrax.layers.activations import ACTIVATIONS

    value = getattr(cfg, name)
    require(value in ACTIVATIONS, cfg, f"{name}={value!r} is not an activation zebrax computes; "
            f"known: {', '.join(sorted(ACTIVATIONS))}")


def unknown_fields(cls, d: dict) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known - {"model_type"})
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown fields {unknown}; valid fields are {sorted(known)}")


class ModelConfig:
    """What every model config shares: ``replace`` and the JSON round trip saved beside checkpoints.
    ``nested`` names the fields that hold another config (rebuilt from dicts in ``__post_init__``)."""

    model_type: ClassVar[str]
    nested: ClassVar[dict[str, type]] = {}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def layer_map(self) -> str:
        """One letter per layer, its kind's (``zebrax.mixers``): ``A`` GQA attention, ``L`` MLA (latent attention),
        ``S`` Mamba2 (state space), ``D`` Gated DeltaNet."""
        from zebrax.mixers import kind

        return "".join(kind(spec.mixer).letter for spec in self.plan())

    def describe(self) -> str:
        """``LlamaConfig(num_hidden_layers=…, hidden_size=…, …)``: the identifying sizes, for error messages."""
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.summary().items())})"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        return {"model_type": self.model_type, **d}

    @classmethod
    def from_dict(cls, d: dict):
        unknown_fields(cls, d)
        for name, sub in cls.nested.items():
            if isinstance(d.get(name), dict):
                unknown_fields(sub, d[name])
        return cls(**{k: v for k, v in d.items() if k != "model_type"})


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


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
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
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    model_type = "llama"
    nested = {"rope_scaling": RopeScaling}
    residual_in_fp32 = False  # the residual stream stays in the compute dtype
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
        normalise_token_ids(self)
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
        check_activation(self, "hidden_act")

    def plan(self) -> tuple[LayerSpec, ...]:
        """Every layer: GQA attention and the MLP."""
        attention = AttentionConfig(self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                                    self.rope_theta, self.rope_scaling, self.attention_bias)
        return (LayerSpec("attention", attention),) * self.num_hidden_layers

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def summary(self) -> dict:
        """The sizes that identify the model, by field name (for `zebrax info` and error messages)."""
        names = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "intermediate_size", "vocab_size")
        return {n: getattr(self, n) for n in names}

def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


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


@dataclasses.dataclass(frozen=True)
class Mamba2LMConfig(ModelConfig):
    """A pure Mamba2 language model (transformers' ``Mamba2ForCausalLM``): blocks of
    ``h = h + Mixer(RMSNorm(h))``, no MLP; final RMSNorm and LM head."""

    vocab_size: int = 50280
    num_hidden_layers: int = 24
    mixer: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    residual_in_fp32: bool = True
    bos_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (0,)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    model_type = "mamba2"
    nested = {"mixer": Mamba2Config}
    def __post_init__(self):
        if isinstance(self.mixer, dict):
            object.__setattr__(self, "mixer", Mamba2Config(**self.mixer))
        normalise_token_ids(self)
        require_positive(self, "vocab_size", "num_hidden_layers")
        require(self.rms_norm_eps > 0, self, f"rms_norm_eps={self.rms_norm_eps} must be > 0")

    @property
    def hidden_size(self) -> int:
        return self.mixer.d_model

    def plan(self) -> tuple[LayerSpec, ...]:
        """Every layer: the Mamba2 mixer alone (no MLP)."""
        return (LayerSpec("mamba2", self.mixer, mlp=False),) * self.num_hidden_layers

    def summary(self) -> dict:
        """The sizes that identify the model, by field name (for `zebrax info` and error messages)."""
        m = self.mixer
        return {"num_hidden_layers": self.num_hidden_layers, "d_model": m.d_model, "d_inner": m.d_inner,
                "n_heads": m.n_heads, "head_dim": m.head_dim, "d_state": m.d_state, "n_groups": m.n_groups,
                "xb_heads": m.xb_heads, "vocab_size": self.vocab_size}

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


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(ModelConfig):
    """A dense DeepSeek-V3-family model (every layer a SwiGLU MLP, no MoE): Llama's pre-norm blocks with
    MLA attention. transformers' ``DeepseekV3ForCausalLM`` with ``first_k_dense_replace >= num_hidden_layers``;
    also the format of MLA models made by other tools (TransMLA)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    attention: MLAConfig = dataclasses.field(default_factory=MLAConfig)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    model_type = "deepseek_v3"
    nested = {"attention": MLAConfig}
    residual_in_fp32 = False
    def __post_init__(self):
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", MLAConfig(**self.attention))
        normalise_token_ids(self)
        require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "max_position_embeddings")
        require(self.attention.d_model == self.hidden_size, self,
                f"attention.d_model={self.attention.d_model} must equal hidden_size={self.hidden_size}")
        require(self.rms_norm_eps > 0, self, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        check_activation(self, "hidden_act")

    def plan(self) -> tuple[LayerSpec, ...]:
        """Every layer: MLA and the MLP."""
        return (LayerSpec("mla", self.attention),) * self.num_hidden_layers

    def summary(self) -> dict:
        a = self.attention
        return {"num_hidden_layers": self.num_hidden_layers, "hidden_size": self.hidden_size, "n_heads": a.n_heads,
                "kv_groups": a.kv_groups, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
                "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
                "v_head_dim": a.v_head_dim, "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size}

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a decoder: which mixer (a registered kind, ``zebrax.mixers``: ``attention``, ``mla``,
    ``mamba2``, ``gdn``), its config, and whether the block has an MLP (``h = h + Mixer(RMSNorm(h)); h = h +
    MLP(RMSNorm(h))``, or the first half alone)."""

    mixer: str
    config: Any
    mlp: bool = True

    def __post_init__(self):
        from zebrax.mixers import kinds

        require(self.mixer in kinds(), self, f"mixer={self.mixer!r} is not one of {sorted(kinds())}")
        want = kinds()[self.mixer].config
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", want(**self.config))
        require(isinstance(self.config, want), self,
                f"a {self.mixer!r} layer needs a {want.__name__}, got {type(self.config).__name__}")


@dataclasses.dataclass(frozen=True)
class HybridConfig(ModelConfig):
    """A Zebra-Llama hybrid: the teacher's Llama blocks (pre-norm, SwiGLU MLP) whose mixer is, layer by layer, any
    registered kind (``mixers``, one name per layer: ``mla``, ``mamba2``, ``gdn`` or the teacher's own
    ``attention``). A layer runs its kind's config: ``attention`` is the teacher's, the others are in ``configs`` and
    read as ``config.mla``, ``config.mamba2``, …; in JSON each is a field named after its kind. ``layer_configs``
    gives single layers a config of their own kind that differs (``(layer, config)`` pairs: per-layer MLA ranks, as
    AMD's ``layer_rank_list``); ``plan()`` is what each layer runs. ``recipe.from_teacher`` derives the configs
    by the Zebra recipe."""

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    mixers: tuple[str, ...] = ("mla", "mamba2")
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    configs: tuple[tuple[str, Any], ...] = (("mamba2", Mamba2Config()), ("mla", MLAConfig()))
    layer_configs: tuple[tuple[int, Any], ...] = ()
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    model_type = "zebra_hybrid"
    nested = {"attention": AttentionConfig}
    residual_in_fp32 = False

    def __post_init__(self):
        from zebrax.mixers import kinds

        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        configs = dict(self.configs)
        unknown = sorted(set(configs) - set(kinds()) | {"attention"} & set(configs))
        require(not unknown, self, f"configs {unknown} are not of mixer kinds other than attention "
                f"({sorted(set(kinds()) - {'attention'})})")
        for name, cfg in configs.items():
            cls = kinds()[name].config
            configs[name] = cls(**cfg) if isinstance(cfg, dict) else cfg
            require(isinstance(configs[name], cls), self,
                    f"{name} needs a {cls.__name__}, got {type(configs[name]).__name__}")
        object.__setattr__(self, "configs", tuple(sorted(configs.items())))
        object.__setattr__(self, "mixers", tuple(self.mixers))
        normalise_token_ids(self)
        require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")
        require(len(self.mixers) > 0, self, "mixers must name at least one layer")
        unknown = sorted({m for m in self.mixers if m not in kinds()})
        require(not unknown, self, f"mixers {unknown} are not among {sorted(kinds())}")
        missing = sorted({m for m in self.mixers if m != "attention"} - set(configs))
        require(not missing, self, f"no config for the {missing} layers")
        for name in sorted(set(self.mixers) - {"attention"}):
            d_model = configs[name].d_model
            require(d_model == self.hidden_size, self, f"{name}.d_model={d_model} must equal hidden_size="
                    f"{self.hidden_size}")
        object.__setattr__(self, "layer_configs", self._own_configs())
        require(self.rms_norm_eps > 0, self, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        check_activation(self, "hidden_act")

    def _own_configs(self) -> tuple[tuple[int, Any], ...]:
        """``layer_configs`` checked (a layer once, in range, not attention, its kind's config class, the model's
        width) and made configs, in layer order."""
        from zebrax.mixers import kinds

        own = {}
        for entry in self.layer_configs:
            require(isinstance(entry, (tuple, list)) and len(entry) == 2, self,
                    f"layer_configs holds {entry!r}; expected (layer, config) pairs")
            i, cfg = entry
            require(isinstance(i, int) and 0 <= i < len(self.mixers) and i not in own, self,
                    f"layer_configs: layer {i!r} is not a layer 0..{len(self.mixers) - 1} given once")
            mixer = self.mixers[i]
            require(mixer != "attention", self, f"layer_configs: layer {i} is attention, which runs the teacher's")
            cls = kinds()[mixer].config
            own[i] = cls(**cfg) if isinstance(cfg, dict) else cfg
            require(isinstance(own[i], cls), self, f"layer_configs: layer {i} is {mixer}, which needs a "
                    f"{cls.__name__}, got {type(own[i]).__name__}")
            require(own[i].d_model == self.hidden_size, self, f"layer_configs: layer {i} has d_model="
                    f"{own[i].d_model}, not hidden_size={self.hidden_size}")
        return tuple(sorted(own.items()))

    def __getattr__(self, name: str):
        """``config.mla``, ``config.mamba2``, …: the config of each kind in ``configs``."""
        configs = dict(self.__dict__.get("configs", ()))
        if name.startswith("_") or name not in configs:
            raise AttributeError(f"{type(self).__name__} has no attribute or mixer config {name!r}")
        return configs[name]

    def replace(self, **changes) -> HybridConfig:
        """``dataclasses.replace``, where a kind's name (``mla=…``) replaces that kind's config."""
        kind_changes = {k: changes.pop(k) for k in list(changes) if k not in self.__dataclass_fields__}
        if kind_changes:
            changes["configs"] = tuple({**dict(changes.get("configs", self.configs)), **kind_changes}.items())
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["configs"]
        if self.layer_configs:
            d["layer_configs"] = [[i, dataclasses.asdict(cfg)] for i, cfg in self.layer_configs]
        else:
            del d["layer_configs"]  # the JSON of a hybrid without them is what it always was
        return {**d, **{name: dataclasses.asdict(cfg) for name, cfg in self.configs}}

    @classmethod
    def from_dict(cls, d: dict) -> HybridConfig:
        from zebrax.mixers import kinds

        d = dict(d)
        configs = {name: d.pop(name) for name in list(d) if name in kinds() and name != "attention"}
        for name, sub in configs.items():
            unknown_fields(kinds()[name].config, sub)
        mixers = d.get("mixers", ())
        for entry in d.get("layer_configs", ()):
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict) \
                    and isinstance(entry[0], int) and 0 <= entry[0] < len(mixers) and mixers[entry[0]] in kinds():
                unknown_fields(kinds()[mixers[entry[0]]].config, entry[1])
        return super().from_dict({**d, "configs": tuple(configs.items()),
                                  "layer_configs": tuple(tuple(e) for e in d.get("layer_configs", ()))})

    @property
    def num_hidden_layers(self) -> int:
        return len(self.mixers)

    def plan(self) -> tuple[LayerSpec, ...]:
        own = dict(self.layer_configs)
        return tuple(LayerSpec(m, own.get(i) or getattr(self, m)) for i, m in enumerate(self.mixers))

    def linear_kinds(self) -> tuple[str, ...]:
        """The kinds of its layers other than attention and MLA (``mamba2``, ``gdn``), in layer order."""
        return tuple(dict.fromkeys(m for m in self.mixers if m not in ("attention", "mla")))

    def layers_of(self, mixer: str) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.mixers) if m == mixer)

    def teacher_cache_values_per_token(self) -> int:
        """Values the all-attention teacher caches per token: layers × 2 × KV heads × head_dim."""
        return self.num_hidden_layers * 2 * self.attention.n_kv_heads * self.attention.head_dim

    def summary(self) -> dict:
        mla = dict(self.configs).get("mla")
        ranks = {} if mla is None else {"kv_lora_rank": mla.kv_lora_rank, "q_lora_rank": mla.q_lora_rank,
                                        "qk_rope_head_dim": mla.qk_rope_head_dim}
        return {"num_hidden_layers": self.num_hidden_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": self.attention.n_heads, "num_key_value_heads": self.attention.n_kv_heads,
                **ranks, "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size}

    def check_teacher(self, teacher) -> None:
        """ConfigError unless ``teacher`` is a Llama of this hybrid's shape (layers, width, heads, head_dim)."""
        if not isinstance(teacher, LlamaConfig):
            raise ConfigError(f"HybridConfig: the teacher must be a Llama-shaped model (LlamaConfig), got "
                              f"{type(teacher).__name__}")
        a = self.attention
        ours = (self.num_hidden_layers, self.hidden_size, a.n_heads, a.n_kv_heads, a.head_dim)
        theirs = (teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads,
                  teacher.num_key_value_heads, teacher.head_dim)
        if ours != theirs:
            raise ConfigError(f"HybridConfig: made for a teacher with (layers, hidden, heads, KV heads, head_dim) = "
                              f"{ours}; this teacher has {theirs}")

    def on_teacher(self, teacher: LlamaConfig) -> HybridConfig:
        """This hybrid's layout and mixer settings on another checkpoint of the same shape (a preset made from a
        published config, applied to the teacher actually loaded): vocabulary, token ids, dtypes, RoPE base and
        the teacher's attention come from ``teacher``; a teacher of another shape is an error."""
        self.check_teacher(teacher)
        return self.replace(
            vocab_size=teacher.vocab_size, intermediate_size=teacher.intermediate_size,
            attention=AttentionConfig(teacher.num_attention_heads, teacher.num_key_value_heads, teacher.head_dim,
                                      teacher.rope_theta, teacher.rope_scaling, teacher.attention_bias),
            **({"mla": dataclasses.replace(self.mla, rope_theta=teacher.rope_theta)} if "mla" in dict(self.configs)
               else {}),
            rms_norm_eps=teacher.rms_norm_eps, max_position_embeddings=teacher.max_position_embeddings,
            tie_word_embeddings=teacher.tie_word_embeddings, mlp_bias=teacher.mlp_bias, hidden_act=teacher.hidden_act,
            bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id,
            dtype=teacher.dtype, param_dtype=teacher.param_dtype,
        )

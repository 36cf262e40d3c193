"""Frozen model configurations, validated in ``__post_init__``: the Llama teacher, the pure Mamba2 LM, dense
DeepSeek-V3, and the hybrid of any registered mixer kinds (``HybridConfig``), each a plan of layers (``LayerSpec``).

A config plus a pytree of parameters is a model. Configs are plain data: they serialise to JSON
(``to_dict``/``from_dict``) beside every checkpoint; ``zebrax.convert.hf_config`` translates the transformers
``config.json`` of the same architecture. A mixer kind's own config lives in its folder (``zebrax.mixers``) and is
imported here only so that ``zebrax.config`` names every config a user writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from zebrax.checks import (
    DTYPES,
    RopeScaling,
    check_activation,
    dtype_bytes,
    normalise_token_ids,
    require,
    require_positive,
    unknown_fields,
)
from zebrax.errors import ConfigError
from zebrax.mixers import kind, kinds
from zebrax.mixers.attention.config import AttentionConfig
from zebrax.mixers.gdn.config import GatedDeltaConfig
from zebrax.mixers.mamba2.config import GATED_NORM_EPS, Mamba2Config
from zebrax.mixers.mla.config import MLAConfig

__all__ = ["DTYPES", "GATED_NORM_EPS", "AttentionConfig", "DeepseekV3Config", "GatedDeltaConfig", "HybridConfig",
           "LayerSpec", "LlamaConfig", "Mamba2Config", "Mamba2LMConfig", "MLAConfig", "ModelConfig", "RopeScaling",
           "dtype_bytes", "yarn_extended"]


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
        return (LayerSpec("attention", self.attention_config()),) * self.num_hidden_layers

    def attention_config(self) -> AttentionConfig:
        """Its attention layers' config: the one definition a hybrid's ``attention`` (its teacher's) is taken from."""
        return AttentionConfig(self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.rope_theta,
                               self.rope_scaling, self.attention_bias)

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
    """One layer of a decoder: which mixer (a registered kind, ``zebrax.mixers``), its config, and whether the block
    has an MLP (``h = h + Mixer(RMSNorm(h)); h = h + MLP(RMSNorm(h))``, or the first half alone)."""

    mixer: str
    config: Any
    mlp: bool = True

    def __post_init__(self):
        require(self.mixer in kinds(), self, f"mixer={self.mixer!r} is not one of {sorted(kinds())}")
        want = kind(self.mixer).config
        if isinstance(self.config, dict):
            object.__setattr__(self, "config", want(**self.config))
        require(isinstance(self.config, want), self,
                f"a {self.mixer!r} layer needs a {want.__name__}, got {type(self.config).__name__}")


def _own_kinds() -> dict:
    """The kinds whose layers carry a config of their own in a hybrid (every kind but the teacher's)."""
    return {name: k for name, k in kinds().items() if not k.teacher}


@dataclasses.dataclass(frozen=True)
class HybridConfig(ModelConfig):
    """A Zebra-Llama hybrid: the teacher's Llama blocks (pre-norm, SwiGLU MLP) whose mixer is, layer by layer, any
    registered kind (``mixers``, one name per layer: ``mla``, ``mamba2``, ``gdn`` or the teacher's own
    ``attention``). The teacher's kind runs the teacher's config (``attention``); every other kind its config in
    ``configs``, read as ``config.mla``, ``config.mamba2``, … (in JSON each is a field named after its kind).
    ``layer_configs`` gives single layers a config of their own kind that differs (``(layer, config)`` pairs:
    per-layer MLA ranks, as AMD's ``layer_rank_list``); ``plan()`` is what each layer runs.
    ``recipe.from_teacher`` derives the configs by the Zebra recipe."""

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
        if isinstance(self.attention, dict):
            object.__setattr__(self, "attention", AttentionConfig(**self.attention))
        own = _own_kinds()
        configs = dict(self.configs)
        unknown = sorted(set(configs) - set(own))
        require(not unknown, self, f"configs {unknown} are not of mixer kinds with a config of their own "
                f"({sorted(own)})")
        for name, cfg in configs.items():
            configs[name] = self._made(name, cfg, name)
        object.__setattr__(self, "configs", tuple(sorted(configs.items())))
        object.__setattr__(self, "mixers", tuple(self.mixers))
        normalise_token_ids(self)
        require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings")
        require(len(self.mixers) > 0, self, "mixers must name at least one layer")
        unknown = sorted({m for m in self.mixers if m not in kinds()})
        require(not unknown, self, f"mixers {unknown} are not among {sorted(kinds())}")
        missing = sorted({m for m in self.mixers if m in own} - set(configs))
        require(not missing, self, f"no config for the {missing} layers")
        object.__setattr__(self, "layer_configs", self._own_configs())
        require(self.rms_norm_eps > 0, self, f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        check_activation(self, "hidden_act")

    def _made(self, name: str, cfg, where: str):
        """``cfg`` (a config or a dict of one) as kind ``name``'s config, checked: its class, and its width (the
        kind's ``width`` field) the model's."""
        cls = kind(name).config
        cfg = cls(**cfg) if isinstance(cfg, dict) else cfg
        require(isinstance(cfg, cls), self, f"{where} is a {name} config, which needs a {cls.__name__}, got "
                f"{type(cfg).__name__}")
        width = kind(name).width
        if width is not None:
            require(getattr(cfg, width) == self.hidden_size, self, f"{where}: {name}.{width}={getattr(cfg, width)} "
                    f"must equal hidden_size={self.hidden_size}")
        return cfg

    def _own_configs(self) -> tuple[tuple[int, Any], ...]:
        """``layer_configs`` checked (a layer once, in range, of a kind with a config of its own, that kind's config
        class, the model's width) and made configs, in layer order."""
        own = {}
        for entry in self.layer_configs:
            require(isinstance(entry, (tuple, list)) and len(entry) == 2, self,
                    f"layer_configs holds {entry!r}; expected (layer, config) pairs")
            i, cfg = entry
            require(isinstance(i, int) and 0 <= i < len(self.mixers) and i not in own, self,
                    f"layer_configs: layer {i!r} is not a layer 0..{len(self.mixers) - 1} given once")
            mixer = self.mixers[i]
            require(not kind(mixer).teacher, self, f"layer_configs: layer {i} is {mixer}, which runs the teacher's")
            own[i] = self._made(mixer, cfg, f"layer_configs: layer {i}")
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
        own = _own_kinds()
        d = dict(d)
        configs = {name: d.pop(name) for name in list(d) if name in own}
        for name, sub in configs.items():
            unknown_fields(own[name].config, sub)
        mixers = d.get("mixers", ())
        for entry in d.get("layer_configs", ()):
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict) \
                    and isinstance(entry[0], int) and 0 <= entry[0] < len(mixers) and mixers[entry[0]] in own:
                unknown_fields(own[mixers[entry[0]]].config, entry[1])
        return super().from_dict({**d, "configs": tuple(configs.items()),
                                  "layer_configs": tuple(tuple(e) for e in d.get("layer_configs", ()))})

    @property
    def num_hidden_layers(self) -> int:
        return len(self.mixers)

    def plan(self) -> tuple[LayerSpec, ...]:
        own = dict(self.layer_configs)
        return tuple(LayerSpec(m, self.attention if kind(m).teacher else own.get(i) or getattr(self, m))
                     for i, m in enumerate(self.mixers))

    def linear_kinds(self) -> tuple[str, ...]:
        """The kinds of its layers of the linear family (``mamba2``, ``gdn``), in layer order."""
        return tuple(dict.fromkeys(m for m in self.mixers if kind(m).linear))

    def layers_of(self, mixer: str) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.mixers) if m == mixer)

    def all_of(self, mixer: str) -> HybridConfig:
        """This hybrid with every layer ``mixer`` (a student of it: ``all_of("mla")``, ``all_of("gdn")``), the
        layers' own configs of that kind kept."""
        return self.replace(mixers=(mixer,) * self.num_hidden_layers,
                            layer_configs=tuple((i, c) for i, c in self.layer_configs if self.mixers[i] == mixer))

    def teacher_cache_values_per_token(self) -> int:
        """Values the all-attention teacher caches per token: layers × 2 × KV heads × head_dim."""
        return self.num_hidden_layers * 2 * self.attention.n_kv_heads * self.attention.head_dim

    def summary(self) -> dict:
        a = self.attention
        kinds_own = {f: getattr(cfg, f) for name, cfg in self.configs for f in kind(name).summary}
        return {"num_hidden_layers": self.num_hidden_layers, "hidden_size": self.hidden_size,
                "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, **kinds_own,
                "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size}

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
        published config, applied to the teacher actually loaded): vocabulary, token ids, dtypes, the teacher's
        attention and the RoPE base of every kind that rotates (a ``rope_theta`` field) come from ``teacher``; a
        teacher of another shape is an error."""
        self.check_teacher(teacher)
        rotates = {name: dataclasses.replace(cfg, rope_theta=teacher.rope_theta) for name, cfg in self.configs
                   if hasattr(cfg, "rope_theta")}
        return self.replace(
            vocab_size=teacher.vocab_size, intermediate_size=teacher.intermediate_size,
            attention=teacher.attention_config(), **rotates,
            rms_norm_eps=teacher.rms_norm_eps, max_position_embeddings=teacher.max_position_embeddings,
            tie_word_embeddings=teacher.tie_word_embeddings, mlp_bias=teacher.mlp_bias, hidden_act=teacher.hidden_act,
            bos_token_id=teacher.bos_token_id, eos_token_id=teacher.eos_token_id, pad_token_id=teacher.pad_token_id,
            dtype=teacher.dtype, param_dtype=teacher.param_dtype,
        )


def yarn_extended(config: LlamaConfig | HybridConfig, length: int) -> LlamaConfig | HybridConfig:
    """``config`` (a Llama or a hybrid) with every rotation stretched by YaRN to reach ``length`` tokens, and
    ``max_position_embeddings`` at least ``length``: the RoPE of each layer config that has one (GQA's heads, MLA's
    shared key) whose reach is shorter takes YaRN of factor ``length / original``, where the reach of a YaRN config
    is ``factor × original_max_position_embeddings`` (its other settings kept) and that of plain RoPE the model's
    ``max_position_embeddings`` (its trained context, then the original). A config that reaches ``length`` already
    comes back equal; a ``linear`` or ``llama3`` scaling is refused (YaRN over them is not defined here)."""
    trained = config.max_position_embeddings

    def stretched(scaling: RopeScaling) -> RopeScaling:
        if scaling.rope_type == "yarn":
            original = scaling.original_max_position_embeddings
            reach = scaling.factor * original
            return scaling if reach >= length else dataclasses.replace(scaling, factor=length / original)
        if scaling.rope_type == "default":
            return scaling if trained >= length else RopeScaling("yarn", factor=length / trained,
                                                                 original_max_position_embeddings=trained)
        raise ConfigError(f"yarn_extended: the RoPE scaling {scaling.rope_type!r} cannot be stretched by YaRN; "
                          f"only plain RoPE and YaRN can")

    def layer(cfg):
        return dataclasses.replace(cfg, rope_scaling=stretched(cfg.rope_scaling)) if hasattr(cfg, "rope_scaling") \
            else cfg

    longest = max(trained, length)
    if isinstance(config, LlamaConfig):
        return config.replace(rope_scaling=stretched(config.rope_scaling), max_position_embeddings=longest)
    if isinstance(config, HybridConfig):
        return config.replace(attention=layer(config.attention),
                              configs=tuple((n, layer(c)) for n, c in config.configs),
                              layer_configs=tuple((i, layer(c)) for i, c in config.layer_configs),
                              max_position_embeddings=longest)
    raise ConfigError(f"yarn_extended: expected a LlamaConfig or a HybridConfig, got {type(config).__name__}")

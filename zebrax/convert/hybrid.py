"""Hybrid checkpoints of the reference code (INTEROP.md): AMD's Zebra-Llama (``hybrid_config.json``: MLA + Mamba2)
and MambaInLlama (``mamba_config.json``: kept attention + Mamba2), both beside the base model's ``config.json``; and
zebrax's own layout for every other mix (``zebra_hybrid.json``: the ``HybridConfig``), read back by zebrax alone.

Their tensors (``model.layers.{i}.mla.*``, ``.mamba.*``, ``.self_attn.*``) map onto our parameter names in
``architectures.hybrid_map``; this module translates their JSON both ways, as their code reads it: their loaders build
a dataclass from the file (a missing key takes the dataclass default, an unknown key is an error) and pass
``ssm_cfg`` to their Mamba2 constructor as keyword arguments. Both files' layouts equal ours row for row: MLA heads
``[q_nope; q_pe]`` with interleaved RoPE pairs, ``kv_b_proj`` per group ``[k_nope; v]``, Mamba2 ``in_proj`` rows
``[z, x, B, C, dt]`` and conv channels ``[x, B, C]`` with x and B repeated after the conv.

What their code fixes rather than reads: the Mamba2 gated norm's eps (``GATED_NORM_EPS``, the recipe's too), the
MLA latent norms' eps (``LATENT_NORM_EPS``), bias-free MLPs. Their blocks take ``rms_norm_eps``, ``hidden_act`` and
``intermediate_size`` from the layout file, the final norm its eps from ``config.json`` (MambaInLlama's kept
attention layers are the base model's own); zebrax has one value of each, so the files must agree where both feed a
layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from zebrax.config import GATED_NORM_EPS, HybridConfig, LlamaConfig, Mamba2Config, MLAConfig, RopeScaling
from zebrax.convert.hf_config import from_hf, to_hf
from zebrax.errors import ConfigError, ConversionError
from zebrax.layers.rope import attention_factor, yarn_mscale
from zebrax.recipe import from_teacher

# hybrid_config.json: AMD's dataclass fields in file order, with the defaults their loader gives a missing key
AMD_DEFAULTS = {
    "hidden_size": 4096, "intermediate_size": 18432, "hidden_act": "silu", "n_layer": 32, "mla_layers": [],
    "rms_norm_eps": 1e-5, "num_attention_heads": 32, "num_key_value_heads": 8, "kv_lora_rank": 128,
    "q_lora_rank": 1536, "use_lora_layer_norm": False, "use_full_kv_head": False, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "qkv_rank_divisor": 8, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
    "rope_type": "yarn", "d_model": 2560, "ssm_cfg": {}, "d_inner": None, "d_xb": 2560,
}
# fields of theirs beyond the dataclass's: SVD-init options, and the per-layer ranks that init records (written
# when a hybrid's MLA layers differ in rank)
AMD_LEGACY = {"use_fixed_rank_for_first_and_last_block": False, "layer_rank_list": {}, "q_energy_ratio": None,
              "kv_energy_ratio": None}
# mamba_config.json: MambaInLlama's dataclass, in file order, with its defaults
MIL_DEFAULTS = {"d_model": 2560, "ssm_cfg": {}, "rms_norm_eps": 1e-5, "vocab_size": None, "d_inner": None,
                "d_xb": 2560, "intermediate_size": 10240, "hidden_act": "silu", "n_layer": 32, "attn_layers": []}
AMD_FIELDS, MIL_FIELDS = tuple(AMD_DEFAULTS), tuple(MIL_DEFAULTS)
# ssm_cfg: keyword arguments of their Mamba2 constructor, with its defaults
SSM_DEFAULTS = {
    "d_state": 128, "d_conv": 4, "conv_init": None, "expand": 2, "headdim": 64, "d_ssm": None, "ngroups": 1,
    "A_init_range": [1, 16], "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False, "dt_min": 0.001,
    "dt_max": 0.1, "dt_init_floor": 1e-4, "dt_limit": [0.0, math.inf], "repeat_kv_before_conv": False,
    "bias": False, "conv_bias": True, "chunk_size": 256, "use_mem_eff_path": True,
}
# ssm_cfg switches to other computations than zebrax's Mamba2: the only value zebrax reads
SSM_FIXED = {"D_has_hdim": (False, "D per head"), "rmsnorm": (True, "the gated RMSNorm"),
             "norm_before_gate": (False, "the norm after the gate"),
             "repeat_kv_before_conv": (False, "x and B repeated after the conv")}
LATENT_NORM_EPS = 1e-6  # their MLA's latent norms (use_lora_layer_norm)
BLOCK_FIELDS = ("intermediate_size", "hidden_act", "rms_norm_eps")  # what every block of the layout file reads
LAYOUT_FILES = {"amd": "hybrid_config.json", "mambainllama": "mamba_config.json", "zebrax": "zebra_hybrid.json"}
LAYOUT_KINDS = {"amd": {"mla", "mamba2"}, "mambainllama": {"attention", "mamba2"}}  # the mixers their code holds
BIN_WEIGHTS = "pytorch_model.bin"


def detect(directory: Path) -> str | None:
    """``"amd"``, ``"mambainllama"``, ``"zebrax"`` or None (a plain HF checkpoint)."""
    found = [name for name, f in LAYOUT_FILES.items() if (directory / f).is_file()]
    if len(found) > 1:
        raise ConversionError(f"{directory}: holds {' and '.join(LAYOUT_FILES[f] for f in found)}; a hybrid has one "
                              "layout file")
    return found[0] if found else None


def weight_files(directory: Path) -> list[Path]:
    """The files their loaders read: ``pytorch_model.bin`` when present (tried first), else every
    ``*.safetensors`` in the directory."""
    if (directory / BIN_WEIGHTS).is_file():
        return [directory / BIN_WEIGHTS]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise ConversionError(f"{directory}: no weights their loaders read ({BIN_WEIGHTS} or *.safetensors)")
    return found


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def _fields(path: Path, d: dict, defaults: dict) -> dict:
    """The file's fields over their dataclass defaults; an unknown field is an error, as in their loaders."""
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ConversionError(f"{path}: unknown fields {unknown}; expected {list(defaults)}")
    return {**defaults, **d}


def _mamba2(path: Path, d: dict) -> Mamba2Config:
    """Their Mamba2 from ``d_model``, ``d_inner``, ``d_xb`` and ``ssm_cfg``: heads = groups = ``ngroups``,
    head_dim = ``d_state``, x and B in ``d_xb / d_state`` heads."""
    ssm = d["ssm_cfg"]
    if not isinstance(ssm, dict) or "ngroups" not in ssm:
        raise ConversionError(f"{path}: ssm_cfg without ngroups (a Mamba1 layer?) is not supported")
    unknown = sorted(set(ssm) - set(SSM_DEFAULTS))
    if unknown:
        raise ConversionError(f"{path}: ssm_cfg has unknown keys {unknown}; their Mamba2 takes {list(SSM_DEFAULTS)}")
    s = {**SSM_DEFAULTS, **ssm}
    for key, (value, what) in SSM_FIXED.items():
        if s[key] != value:
            raise ConversionError(f"{path}: ssm_cfg {key}={s[key]!r} is not supported (zebrax computes {what}, "
                                  f"{key}={value!r})")
    d_inner = d["d_inner"] if d["d_inner"] is not None else s["expand"] * d["d_model"]
    groups, d_state, d_xb = s["ngroups"], s["d_state"], d["d_xb"]
    ok = (s["d_ssm"] in (None, d_inner) and d_inner % s["headdim"] == 0 and d_inner == groups * d_state
          and d_xb % d_state == 0 and d_inner % d_xb == 0)
    if not ok:
        raise ConversionError(f"{path}: d_inner={d_inner}, d_xb={d_xb}, ssm_cfg {ssm}: their Mamba2 needs d_inner = "
                              f"ngroups·d_state, divisible by headdim ({s['headdim']}) and by d_xb, d_xb a multiple "
                              "of d_state, and d_ssm unset or d_inner")
    try:
        return Mamba2Config(
            d_model=d["d_model"], d_inner=d_inner, n_heads=groups, head_dim=d_state, d_state=d_state, n_groups=groups,
            xb_heads=d_xb // d_state, conv_kernel=s["d_conv"], use_conv_bias=bool(s["conv_bias"]),
            use_bias=bool(s["bias"]), chunk_size=s["chunk_size"], dt_limit=tuple(s["dt_limit"]), dt_min=s["dt_min"],
            dt_max=s["dt_max"], dt_init_floor=s["dt_init_floor"], A_init_range=tuple(s["A_init_range"]),
            norm_eps=GATED_NORM_EPS)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: ssm_cfg {ssm}: {e}") from None


def _rope(path: Path, r) -> RopeScaling:
    """AMD's MLA RoPE from ``rope_scaling`` as their attention reads it: none, ``linear``, or DeepSeek's YaRN (keys
    ``original_max_position_embeddings`` 4096, ``beta_fast`` 32, ``beta_slow`` 1, ``mscale`` 1, ``mscale_all_dim`` 0
    when absent; cos and sin times ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``, the softmax scale
    times ``mscale(factor, mscale_all_dim)²`` when that is non-zero). Older snapshots say ``llama3``, which their
    attention does not build; training used YaRN with the same factor and original length."""
    if r is None:
        return RopeScaling()
    if not isinstance(r, dict) or "rope_type" not in r or "factor" not in r:
        raise ConversionError(f"{path}: rope_scaling {r!r}: their attention reads its rope_type and factor")
    kind, factor = r["rope_type"], float(r["factor"])
    if kind == "linear" and not r.get("mscale_all_dim"):
        return RopeScaling("linear", factor=factor)
    if kind not in ("yarn", "llama3"):
        raise ConversionError(f"{path}: rope_scaling rope_type={kind!r}"
                              f"{' with mscale_all_dim' if kind == 'linear' else ''} is not supported (zebrax reads "
                              "none, linear and yarn)")
    mscale, mscale_all_dim = float(r.get("mscale", 1.0)), float(r.get("mscale_all_dim", 0.0))
    return RopeScaling(
        "yarn", factor=factor, original_max_position_embeddings=int(r.get("original_max_position_embeddings", 4096)),
        beta_fast=float(r.get("beta_fast", 32.0)), beta_slow=float(r.get("beta_slow", 1.0)), mscale=mscale,
        mscale_all_dim=mscale_all_dim or None,
        attention_factor=yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))


def _ranks(path: Path, d: dict, mla_layers: list[int]) -> dict[int, tuple[int, int]]:
    """(q_lora_rank, kv_lora_rank) of each MLA layer. Their attention constructor, run layer by layer, overwrites
    the config's ranks with ``layer_rank_list[str(i)]`` where it has an entry, so a layer without one takes the last
    entry before it (or the file's ranks)."""
    if not isinstance(d["layer_rank_list"], dict):
        raise ConversionError(f"{path}: layer_rank_list must be an object of per-layer ranks")
    q, kv, ranks = d["q_lora_rank"], d["kv_lora_rank"], {}
    for i in sorted(mla_layers):
        entry = d["layer_rank_list"].get(str(i))
        if entry is not None:
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), int) and entry[k] > 0
                                                    for k in ("q_rank", "kv_rank"))):
                raise ConversionError(f"{path}: layer_rank_list[{str(i)!r}] = {entry!r}: expected "
                                      f"{{'q_rank': int, 'kv_rank': int}}, both positive")
            q, kv = entry["q_rank"], entry["kv_rank"]
        ranks[i] = (q, kv)
    return ranks


def _mla(path: Path, d: dict, mla_layers: list[int]) -> tuple[MLAConfig, dict[int, MLAConfig]]:
    """The MLA layers' config (the first MLA layer's ranks) and the configs of the layers whose ranks differ."""
    divisor, q, kv, heads, kv_heads = (d[k] for k in ("qkv_rank_divisor", "q_lora_rank", "kv_lora_rank",
                                                      "num_attention_heads", "num_key_value_heads"))
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (divisor, q, kv, heads, kv_heads))
    if not ints or divisor % 8 or q % divisor or kv % divisor or heads % kv_heads:
        raise ConversionError(f"{path}: qkv_rank_divisor={divisor}, q_lora_rank={q}, kv_lora_rank={kv}, "
                              f"num_attention_heads={heads}, num_key_value_heads={kv_heads}: their config needs "
                              "positive integers, the divisor a multiple of 8 dividing both ranks, and KV heads "
                              "dividing the heads")
    ranks = _ranks(path, d, mla_layers)
    q_rank, kv_rank = next(iter(ranks.values()), (q, kv))
    norms = bool(d["use_lora_layer_norm"])
    mla = MLAConfig(
        d_model=d["hidden_size"], n_heads=heads, kv_groups=heads if d["use_full_kv_head"] else kv_heads,
        q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"], q_latent_norm=norms,
        kv_latent_norm=norms, norm_eps=LATENT_NORM_EPS, rope_theta=float(d["rope_theta"]),
        rope_scaling=_rope(path, d["rope_scaling"]), rope_interleave=True, attention_bias=bool(d["attention_bias"]))
    return mla, {i: dataclasses.replace(mla, q_lora_rank=r_q, kv_lora_rank=r_kv) for i, (r_q, r_kv) in ranks.items()
                 if (r_q, r_kv) != (q_rank, kv_rank)}


def _layers(path: Path, name: str, layers, n: int) -> list[int]:
    if not isinstance(layers, list) or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n
                                           for i in layers):
        raise ConversionError(f"{path}: {name}={layers!r}: expected a list of layer indices in 0..{n - 1}")
    return layers


def config_from_files(directory: Path, layout: str, tied: bool) -> HybridConfig:
    """A ``HybridConfig`` from the base ``config.json`` and the layout's file. ``tied``: the file holds no head."""
    base_file, layout_file = directory / "config.json", directory / LAYOUT_FILES[layout]
    if layout == "zebrax":  # zebrax's own: the HybridConfig itself
        try:
            return HybridConfig.from_dict(_read(layout_file)).replace(tie_word_embeddings=tied)
        except (ConfigError, TypeError) as e:
            raise ConversionError(f"{layout_file}: {e}") from None
    base = _read(base_file)
    try:
        teacher = from_hf(LlamaConfig, {**base, "model_type": "llama", "tie_word_embeddings": tied})
    except KeyError as e:
        raise ConversionError(f"{base_file}: missing key {e}") from None
    except ConfigError as e:
        raise ConversionError(f"{base_file}: {e}") from None
    d = _fields(layout_file, _read(layout_file), {**AMD_DEFAULTS, **AMD_LEGACY} if layout == "amd" else MIL_DEFAULTS)
    n, kind = teacher.num_hidden_layers, "mla" if layout == "amd" else "attention"
    try:
        if d["n_layer"] != n:
            raise ConversionError(f"{layout_file}: n_layer={d['n_layer']} disagrees with {base_file} "
                                  f"(num_hidden_layers={n})")
        name = "mla_layers" if layout == "amd" else "attn_layers"
        special = _layers(layout_file, name, d[name], n)
        mamba = [i for i in range(n) if i not in special]
        widths = {"d_model": bool(mamba), "hidden_size": layout == "amd" and bool(special)}
        for name in (k for k, used in widths.items() if used and d[k] != teacher.hidden_size):
            raise ConversionError(f"{layout_file}: {name}={d[name]} disagrees with {base_file} "
                                  f"(hidden_size={teacher.hidden_size})")
        # the blocks' settings: the layout file's where its layers use them; the final norm takes its eps from the
        # base config, and MambaInLlama's kept attention layers are wholly the base model's
        block = {k: d[k] for k in BLOCK_FIELDS} if layout == "amd" or mamba else {}
        shared = ("rms_norm_eps",) if layout == "amd" or not special else BLOCK_FIELDS
        uses = "the blocks, the final norm" if layout == "amd" else "the Mamba2 layers, the attention layers and " \
            "the final norm"
        for name in (k for k in shared if k in block and block[k] != getattr(teacher, k)):
            raise ConversionError(f"{layout_file}: {name}={block[name]!r} but {base_file}: {name}="
                                  f"{getattr(teacher, name)!r}; their code uses each ({uses}), zebrax one value")
        teacher = dataclasses.replace(teacher, **block)
        config = from_teacher(teacher, mla_layers="none",
                                           attention_layers=special if kind == "attention" else ())
        mla, own = _mla(layout_file, d, special) if kind == "mla" else (config.mla, {})
        return config.replace(
            mixers=tuple(kind if i in special else "mamba2" for i in range(n)), mla=mla,
            mamba2=_mamba2(layout_file, d) if mamba else config.mamba2, layer_configs=tuple(own.items()))
    except KeyError as e:
        raise ConversionError(f"{layout_file}: missing key {e}") from None
    except ConfigError as e:
        raise ConversionError(f"{layout_file}: {e}") from None


def layout_of(config: HybridConfig) -> str:
    """The layout a hybrid fits: MLA + Mamba2 → AMD's; attention + Mamba2 → MambaInLlama's; any other mix (MLA with
    attention, Gated DeltaNet) → zebrax's own (``zebra_hybrid.json``: the ``HybridConfig``, tensors under each kind's
    ``hf_module``), which only zebrax reads."""
    return next((layout for layout, held in LAYOUT_KINDS.items() if set(config.mixers) <= held), "zebrax")


def _their_rope(m: MLAConfig) -> dict | None:
    """``rope_scaling`` for which AMD's attention computes our MLA's frequencies, cos/sin factor and softmax scale
    (``_rope`` read backwards); ConfigError where it cannot."""
    r = m.rope_scaling
    if r.rope_type == "default":
        return None
    if r.rope_type == "linear":
        return {"rope_type": "linear", "factor": r.factor}
    if r.rope_type != "yarn" or not r.truncate:
        raise ConfigError(f"export: AMD's MLA computes no RoPE scaling {r.rope_type!r}"
                          f"{'' if r.rope_type != 'yarn' else ' without truncate'} (none, linear or yarn)")
    mscale_all_dim, want = r.mscale_all_dim or 0.0, attention_factor(r)
    mscale = r.mscale if r.mscale is not None else 1.0
    if yarn_mscale(r.factor, mscale) / yarn_mscale(r.factor, mscale_all_dim) != want:
        # their cos/sin factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim): solve for mscale
        mscale = (want * yarn_mscale(r.factor, mscale_all_dim) - 1) / (0.1 * math.log(r.factor)) if r.factor > 1 \
            else math.nan
        if not math.isclose(yarn_mscale(r.factor, mscale) / yarn_mscale(r.factor, mscale_all_dim), want,
                            rel_tol=1e-12):
            raise ConfigError(f"export: AMD's YaRN cannot put the factor {want} on cos and sin at factor {r.factor}")
    return {"factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings,
            "rope_type": "yarn", "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "mscale": mscale,
            "mscale_all_dim": mscale_all_dim}


def _ssm_cfg(m: Mamba2Config) -> dict:
    """Their Mamba2's keyword arguments for ours: the shape, then what differs from their defaults."""
    ours = {"d_conv": m.conv_kernel, "conv_bias": m.use_conv_bias, "bias": m.use_bias, "dt_limit": list(m.dt_limit)}
    return {"expand": 1, "ngroups": m.n_groups, "d_state": m.d_state,
            **{k: v for k, v in ours.items() if v != SSM_DEFAULTS[k]}}


def files_for(config: HybridConfig, layout: str, name_or_path: str) -> dict[str, dict]:
    """``{filename: JSON}`` of the layout: the base model's ``config.json`` and the layout's file, exactly their
    fields."""
    if layout not in LAYOUT_FILES:
        raise ConfigError(f"export: format {layout!r} is not one of {sorted(LAYOUT_FILES)} or 'hf'")
    a = config.attention
    base = to_hf(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=a.attention_bias, mlp_bias=config.mlp_bias, hidden_act=config.hidden_act,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        param_dtype=config.param_dtype,
    ))
    if layout == "zebrax":
        return {"config.json": base, "zebra_hybrid.json": config.to_dict()}
    m, mb = dict(config.configs).get("mla"), config.mamba2  # ``check_exportable``: a Mamba2 config, AMD's an MLA one
    common = {"d_inner": mb.d_inner, "d_xb": mb.x_heads * mb.head_dim}
    if layout == "mambainllama":
        base["_name_or_path"] = name_or_path
        return {"config.json": base, "mamba_config.json": {
            "d_model": config.hidden_size, "ssm_cfg": _ssm_cfg(mb), "rms_norm_eps": config.rms_norm_eps,
            "vocab_size": config.vocab_size, **common, "intermediate_size": config.intermediate_size,
            "hidden_act": config.hidden_act, "n_layer": config.num_hidden_layers,
            "attn_layers": list(config.layers_of("attention"))}}
    values = {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act, "n_layer": config.num_hidden_layers,
        "mla_layers": list(config.layers_of("mla")),
        "rms_norm_eps": config.rms_norm_eps, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_groups,
        "kv_lora_rank": m.kv_lora_rank, "q_lora_rank": m.q_lora_rank, "use_lora_layer_norm": m.kv_latent_norm,
        "use_full_kv_head": False, "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim, "qk_nope_head_dim": m.qk_nope_head_dim, "qkv_rank_divisor": 8,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": m.rope_theta,
        "rope_scaling": _their_rope(m) if "mla" in config.mixers else None,
        "attention_bias": m.attention_bias, "attention_dropout": 0.0, "rope_type": "yarn",
        "d_model": config.hidden_size, "ssm_cfg": {**_ssm_cfg(mb), "repeat_kv_before_conv": False}, **common,
    }
    layout_fields = {k: values[k] for k in AMD_FIELDS}
    if config.layer_configs:  # per-layer ranks: every MLA layer's, as their SVD initialisation records them
        layout_fields["layer_rank_list"] = {str(i): {"q_rank": s.config.q_lora_rank, "kv_rank": s.config.kv_lora_rank}
                                            for i, s in enumerate(config.plan()) if s.mixer == "mla"}
    return {"config.json": base, "hybrid_config.json": layout_fields}


def check_exportable(config: HybridConfig, layout: str) -> None:
    """What their layouts cannot hold, by name (``files_for`` writes the rest so their code computes ours): a layout
    not theirs, layers of a kind their code has not (Gated DeltaNet), the settings below; zebrax's own holds every
    hybrid."""
    if layout not in LAYOUT_FILES:
        raise ConfigError(f"export: format {layout!r} is not one of {sorted(LAYOUT_FILES)}: transformers has no model "
                          f"of a hybrid, so a hybrid exports in one of these layouts")
    if layout == "zebrax":
        return
    foreign = sorted(set(config.mixers) - LAYOUT_KINDS[layout])
    if foreign:
        raise ConfigError(f"export: the {layout} layout holds {' and '.join(sorted(LAYOUT_KINDS[layout]))} layers; "
                          f"this hybrid's {config.layer_map()} has {', '.join(foreign)} layers (--format zebrax holds "
                          f"every mix)")
    configs = dict(config.configs)
    missing = sorted(k for k in ("mla", "mamba2") if k not in configs and (k == "mamba2" or layout == "amd"))
    if missing:
        raise ConfigError(f"export: the {layout} layout holds a {' and a '.join(missing)} config, which this hybrid "
                          f"has not")
    m, mb = configs.get("mla"), configs["mamba2"]
    wrong = {}
    if config.mlp_bias:
        wrong["mlp_bias"] = (True, "their MLPs have no biases")
    if "mamba2" in config.mixers:
        shaped = mb.n_heads == mb.n_groups and mb.head_dim == mb.d_state and mb.xb_heads is not None
        checks = {"mamba2.norm_eps": (mb.norm_eps, mb.norm_eps == GATED_NORM_EPS,
                                      f"their Mamba2's gated norm has eps {GATED_NORM_EPS}"),
                  "mamba2.activation": (mb.activation, mb.activation == "silu", "their conv activation is silu"),
                  "mamba2.d_inner": (mb.d_inner, mb.d_inner % SSM_DEFAULTS["headdim"] == 0,
                                     f"their Mamba2 asserts d_inner % {SSM_DEFAULTS['headdim']} == 0"),
                  "mamba2 shape": ((mb.n_heads, mb.n_groups, mb.head_dim, mb.d_state, mb.xb_heads), shaped,
                                   "theirs is attention-shaped: heads = groups, head_dim = d_state, x/B heads set")}
        wrong.update({k: (v, why) for k, (v, ok, why) in checks.items() if not ok})
    for i, own in config.layer_configs:  # their layouts hold per-layer MLA ranks, nothing else per layer
        ranks = {"q_lora_rank": own.q_lora_rank, "kv_lora_rank": own.kv_lora_rank}
        if layout != "amd" or dataclasses.replace(own, **{k: getattr(m, k) for k in ranks}) != m:
            wrong[f"layer_configs[{i}]"] = (own, "their layouts hold per-layer MLA ranks (AMD's layer_rank_list), "
                                                 "no other per-layer setting")
        for name, rank in ranks.items():
            if not isinstance(rank, int) or rank % 8:
                wrong[f"layer {i} {name}"] = (rank, "their config asserts a multiple of 8 (qkv_rank_divisor)")
    if layout == "amd":
        for name in ("kv_lora_rank", "q_lora_rank"):
            if not isinstance(getattr(m, name), int) or getattr(m, name) % 8:
                wrong[f"mla.{name}"] = (getattr(m, name), "their config asserts a multiple of 8 (qkv_rank_divisor)")
    if layout == "amd" and "mla" in config.mixers:
        checks = {"mla.rope_interleave": (m.rope_interleave, m.rope_interleave, "theirs rotates interleaved pairs"),
                  "mla latent norms": ((m.q_latent_norm, m.kv_latent_norm), m.q_latent_norm == m.kv_latent_norm,
                                       "their use_lora_layer_norm puts both or neither"),
                  "mla.norm_eps": (m.norm_eps, m.norm_eps == LATENT_NORM_EPS or not m.kv_latent_norm,
                                   f"their latent norms have eps {LATENT_NORM_EPS}")}
        wrong.update({k: (v, why) for k, (v, ok, why) in checks.items() if not ok})
        _their_rope(m)
    if wrong:
        raise ConfigError("export: the " + layout + " layout cannot hold " + "; ".join(
            f"{k}={v!r} ({why})" for k, (v, why) in wrong.items()))

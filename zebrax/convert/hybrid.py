"""Hybrid checkpoints of the reference code (INTEROP.md): AMD's Zebra-Llama (``hybrid_config.json``: MLA + Mamba2)
and MambaInLlama (``mamba_config.json``: kept attention + Mamba2), both beside the base model's ``config.json``.

Their tensors (``model.layers.{i}.mla.*``, ``.mamba.*``, ``.self_attn.*``) map onto our parameter names in
``architectures.HYBRID``; this module translates their JSON both ways. Both files' layouts equal ours row for row:
MLA heads ``[q_nope; q_pe]`` with interleaved RoPE pairs, ``kv_b_proj`` per group ``[k_nope; v]``, Mamba2
``in_proj`` rows ``[z, x, B, C, dt]`` and conv channels ``[x, B, C]`` with x and B repeated after the conv.
"""

from __future__ import annotations

import json
from pathlib import Path

from zebrax.config import HybridConfig, LlamaConfig
from zebrax.errors import ConfigError, ConversionError

AMD_FIELDS = (  # hybrid_config.json, in file order
    "hidden_size", "intermediate_size", "hidden_act", "n_layer", "mla_layers", "rms_norm_eps", "num_attention_heads",
    "num_key_value_heads", "kv_lora_rank", "q_lora_rank", "use_lora_layer_norm", "use_full_kv_head",
    "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "qkv_rank_divisor", "max_position_embeddings", "rope_theta",
    "rope_scaling", "attention_bias", "attention_dropout", "rope_type", "d_model", "ssm_cfg", "d_inner", "d_xb",
)
AMD_LEGACY = ("use_fixed_rank_for_first_and_last_block", "layer_rank_list", "q_energy_ratio", "kv_energy_ratio")
MIL_FIELDS = ("d_model", "ssm_cfg", "rms_norm_eps", "vocab_size", "d_inner", "d_xb", "intermediate_size",
              "hidden_act", "n_layer", "attn_layers")
LAYOUT_FILES = {"amd": "hybrid_config.json", "mambainllama": "mamba_config.json"}


def detect(directory: Path) -> str | None:
    """``"amd"``, ``"mambainllama"`` or None (a plain HF checkpoint)."""
    found = [name for name, f in LAYOUT_FILES.items() if (directory / f).is_file()]
    if len(found) > 1:
        raise ConversionError(f"{directory}: holds both hybrid_config.json and mamba_config.json")
    return found[0] if found else None


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def _ssm(path: Path, ssm: dict, heads: int, head_dim: int, d_inner: int, d_xb: int) -> dict:
    """Our Mamba2 overrides from their ``ssm_cfg``; anything but the attention-shaped variant is refused."""
    if not isinstance(ssm, dict) or "ngroups" not in ssm:
        raise ConversionError(f"{path}: ssm_cfg without ngroups (a Mamba1 layer?) is not supported")
    want = {"expand": 1, "ngroups": heads, "d_state": head_dim, "repeat_kv_before_conv": False}
    wrong = {k: ssm[k] for k, v in want.items() if k in ssm and ssm[k] != v}
    extra = sorted(set(ssm) - set(want))
    if wrong or extra or d_inner != heads * head_dim or d_xb % head_dim:
        raise ConversionError(f"{path}: ssm_cfg {ssm}, d_inner={d_inner}, d_xb={d_xb}: zebrax reads the attention-"
                              f"shaped Mamba2 (expand 1, ngroups = heads = {heads}, d_state = head_dim = {head_dim}, "
                              "x/B repeated after the conv)")
    return {"xb_heads": d_xb // head_dim}


def config_from_files(directory: Path, layout: str, tied: bool) -> HybridConfig:
    """A ``HybridConfig`` from the base ``config.json`` and the layout's file. ``tied``: the file holds no head."""
    base_file, layout_file = directory / "config.json", directory / LAYOUT_FILES[layout]
    base, d = _read(base_file), _read(layout_file)
    known = AMD_FIELDS + AMD_LEGACY if layout == "amd" else MIL_FIELDS
    unknown = sorted(set(d) - set(known))
    if unknown:  # their loaders build a dataclass from the file: an unknown key is an error there too
        raise ConversionError(f"{layout_file}: unknown fields {unknown}; expected {list(known)}")
    try:
        teacher = LlamaConfig.from_hf_dict({**base, "model_type": "llama", "tie_word_embeddings": tied,
                                            "vocab_size": d.get("vocab_size") or base["vocab_size"]})
        n = d["n_layer"]
        if n != teacher.num_hidden_layers or d.get("d_model", d.get("hidden_size")) != teacher.hidden_size:
            raise ConversionError(f"{layout_file}: n_layer={n}, d_model={d.get('d_model')} disagree with "
                                  f"{base_file} ({teacher.num_hidden_layers} layers of {teacher.hidden_size})")
        mamba2 = _ssm(layout_file, d["ssm_cfg"], teacher.num_attention_heads, teacher.head_dim, d["d_inner"],
                      d["d_xb"])
        if layout == "mambainllama":
            return HybridConfig.from_teacher(teacher, mla_layers="none", attention_layers=list(d["attn_layers"]),
                                             mamba2=mamba2)
        if d.get("layer_rank_list"):
            raise ConversionError(f"{layout_file}: layer_rank_list (a rank per layer) is not supported")
        rope = d.get("rope_scaling") or {}
        mla = {"qk_nope_head_dim": d["qk_nope_head_dim"], "v_head_dim": d["v_head_dim"],
               "rope_theta": float(d["rope_theta"]), "attention_bias": bool(d.get("attention_bias", False)),
               "q_latent_norm": bool(d.get("use_lora_layer_norm")),
               "kv_latent_norm": bool(d.get("use_lora_layer_norm"))}
        if d.get("use_full_kv_head"):
            mla["kv_groups"] = teacher.num_attention_heads
        return HybridConfig.from_teacher(
            teacher, mla_layers=list(d["mla_layers"]), kv_lora_rank=d["kv_lora_rank"], q_lora_rank=d["q_lora_rank"],
            qk_rope_head_dim=d["qk_rope_head_dim"], rope_factor=float(rope.get("factor", 1.0)),
            # older snapshots say llama3; training used YaRN with the same factor and original length
            rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
            mla=mla, mamba2=mamba2)
    except KeyError as e:
        raise ConversionError(f"{layout_file}: missing key {e}") from None
    except ConfigError as e:
        raise ConversionError(f"{layout_file}: {e}") from None


def layout_of(config: HybridConfig) -> str:
    """The reference layout a hybrid fits: MLA + Mamba2 → AMD's; attention + Mamba2 → MambaInLlama's."""
    kinds = set(config.mixers)
    if kinds <= {"mla", "mamba2"}:
        return "amd"
    if kinds <= {"attention", "mamba2"}:
        return "mambainllama"
    raise ConfigError(f"export: layers {config.layer_map()} mix MLA and attention; neither AMD's nor MambaInLlama's "
                      "layout holds both")


def files_for(config: HybridConfig, layout: str, name_or_path: str) -> dict[str, dict]:
    """``{filename: JSON}`` of the layout: the base model's ``config.json`` and the layout's file, exactly their
    fields."""
    if layout not in LAYOUT_FILES:
        raise ConfigError(f"export: format {layout!r} is not one of {sorted(LAYOUT_FILES)} or 'hf'")
    if layout_of(config) != layout and not set(config.mixers) <= {"mamba2"}:
        raise ConfigError(f"export: layers {config.layer_map()} do not fit the {layout} layout")
    a, m, mb = config.attention, config.mla, config.mamba2
    base = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=a.attention_bias, mlp_bias=config.mlp_bias, hidden_act=config.hidden_act,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        param_dtype=config.param_dtype,
    ).to_hf_dict()
    ssm = {"expand": 1, "ngroups": a.n_heads, "d_state": a.head_dim}
    common = {"d_inner": mb.d_inner, "d_xb": mb.x_heads * mb.head_dim}
    if layout == "mambainllama":
        base["_name_or_path"] = name_or_path
        return {"config.json": base, "mamba_config.json": {
            "d_model": config.hidden_size, "ssm_cfg": ssm, "rms_norm_eps": config.rms_norm_eps,
            "vocab_size": config.vocab_size, **common, "intermediate_size": config.intermediate_size,
            "hidden_act": config.hidden_act, "n_layer": config.num_hidden_layers,
            "attn_layers": list(config.layers_of("attention"))}}
    r = m.rope_scaling
    values = {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act, "n_layer": config.num_hidden_layers,
        "mla_layers": list(config.layers_of("mla")),
        "rms_norm_eps": config.rms_norm_eps, "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "kv_lora_rank": m.kv_lora_rank, "q_lora_rank": m.q_lora_rank, "use_lora_layer_norm": m.kv_latent_norm,
        "use_full_kv_head": m.kv_groups == a.n_heads != a.n_kv_heads, "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim, "qk_nope_head_dim": m.qk_nope_head_dim, "qkv_rank_divisor": 8,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": m.rope_theta,
        "rope_scaling": {"factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings,
                         "rope_type": "yarn"},
        "attention_bias": m.attention_bias, "attention_dropout": 0.0, "rope_type": "yarn",
        "d_model": config.hidden_size, "ssm_cfg": {**ssm, "repeat_kv_before_conv": False}, **common,
    }
    return {"config.json": base, "hybrid_config.json": {k: values[k] for k in AMD_FIELDS}}


def check_exportable(config: HybridConfig, layout: str) -> None:
    """What their layouts cannot hold."""
    m = config.mla
    if layout == "amd" and "mla" in config.mixers and (
            not m.rope_interleave or m.rope_scaling.rope_type != "yarn" or m.q_latent_norm != m.kv_latent_norm
            or m.q_lora_rank is None or m.rope_scaling.beta_fast != 32 or m.rope_scaling.beta_slow != 1):
        raise ConfigError("export: AMD's MLA has interleaved YaRN (beta 32/1) RoPE, a low-rank query and both "
                          "latent norms or neither")
    if config.mamba2.use_bias:
        raise ConfigError("export: their Mamba2 has no in/out projection biases")

"""AMD's Zebra-Llama and MambaInLlama checkpoints in, ours out (INTEROP.md). A tiny checkpoint is written in their
layout with random weights; its logits are computed independently in PyTorch, from the files as their code reads them
(their dataclasses' defaults for a missing key, their weights file, AMD's YaRN, their Mamba2's fixed gated-norm eps),
with transformers' DeepseekV3 attention (MLA, kv_b expanded from groups to heads), Mamba2 mixer (x and B rows
repeated to every head) and Llama attention / MLP / RMSNorm as the layers; zebrax must match (fp32, 1e-4). Export is
checked the same way — its files through that forward against zebrax's logits — and re-imports bit-identically, with
exactly their files, keys and fields."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import zebrax
from tests.helpers import assert_nothing_left, assert_one_line_error, convert_cli, random_model
from zebrax import checkpoint
from zebrax.config import LlamaConfig
from zebrax.convert.export import export
from zebrax.convert.hybrid import AMD_FIELDS, MIL_FIELDS
from zebrax.errors import ConfigError
from zebrax.recipe import from_teacher

V, D, FF, H, G, HD, N = 101, 64, 96, 4, 2, 16, 4  # vocab, hidden, MLP, heads, KV heads, head_dim, layers
R_Q, R_KV, ROPE, NOPE = 40, 24, 8, 8
BASE = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=H,
            num_key_value_heads=G, head_dim=HD, rms_norm_eps=1e-5, max_position_embeddings=256,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=3,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
YARN = {"factor": 4.0, "original_max_position_embeddings": 16, "rope_type": "yarn"}
LAYOUTS = {"amd": [0, 2], "mambainllama": [1, 3]}
DROP = object()  # a field value: leave the key out of the file
HEAD_SCALE = 0.1  # logits of std ~1: float32 rounding stays well inside the 1e-4 the forwards must agree to

# What their loaders give a missing key: AMD's HybridConfig, MambaInLlama's MambaConfig and their Mamba2's keyword
# arguments (hybrid/hybrid_config.py, mamba2/hybrid_mamba_config.py, hybrid_mamba2_layer.py)
THEIR_DEFAULTS = {
    "amd": {"hidden_size": 4096, "intermediate_size": 18432, "hidden_act": "silu", "n_layer": 32, "mla_layers": [],
            "rms_norm_eps": 1e-5, "num_attention_heads": 32, "num_key_value_heads": 8, "kv_lora_rank": 128,
            "q_lora_rank": 1536, "use_lora_layer_norm": False, "use_fixed_rank_for_first_and_last_block": False,
            "use_full_kv_head": False, "layer_rank_list": {}, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "qk_nope_head_dim": 128, "q_energy_ratio": None, "kv_energy_ratio": None, "qkv_rank_divisor": 8,
            "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
            "attention_dropout": 0.0, "rope_type": "yarn", "d_model": 2560, "ssm_cfg": {}, "d_inner": None,
            "d_xb": 2560},
    "mambainllama": {"d_model": 2560, "ssm_cfg": {}, "rms_norm_eps": 1e-5, "vocab_size": None, "d_inner": None,
                     "d_xb": 2560, "intermediate_size": 10240, "hidden_act": "silu", "n_layer": 32,
                     "attn_layers": []},
}
THEIR_SSM = {"d_state": 128, "d_conv": 4, "expand": 2, "ngroups": 1, "dt_limit": (0.0, math.inf), "bias": False,
             "conv_bias": True}
GATED_EPS, LATENT_EPS = 1e-5, 1e-6  # fixed in their Mamba2 and their MLA


def rand(*shape, scale=0.3):
    return torch.randn(*shape) * scale


def layout_fields(layout: str, special: list[int]) -> dict:
    """The fixture's layout file: every field, as the released files write them."""
    ssm = {"expand": 1, "ngroups": H, "d_state": HD}
    if layout == "amd":
        return {"hidden_size": D, "intermediate_size": FF, "hidden_act": "silu", "n_layer": N, "mla_layers": special,
                "rms_norm_eps": 1e-5, "num_attention_heads": H, "num_key_value_heads": G, "kv_lora_rank": R_KV,
                "q_lora_rank": R_Q, "use_lora_layer_norm": False, "use_full_kv_head": False,
                "qk_rope_head_dim": ROPE, "v_head_dim": HD, "qk_nope_head_dim": NOPE, "qkv_rank_divisor": 8,
                "max_position_embeddings": 256, "rope_theta": 10000.0, "rope_scaling": dict(YARN),
                "attention_bias": False, "attention_dropout": 0.0, "rope_type": "yarn", "d_model": D,
                "ssm_cfg": {**ssm, "repeat_kv_before_conv": False}, "d_inner": H * HD, "d_xb": G * HD}
    return {"d_model": D, "ssm_cfg": ssm, "rms_norm_eps": 1e-5, "vocab_size": None, "d_inner": H * HD,
            "d_xb": G * HD, "intermediate_size": FF, "hidden_act": "silu", "n_layer": N, "attn_layers": special}


def merge(d: dict, changes: dict) -> dict:
    """``d`` with ``changes`` (nested dicts merged, DROP removes a key)."""
    out = dict(d)
    for k, v in changes.items():
        if v is DROP:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def their_config(directory) -> dict:
    """The files as their code reads them: ``layout``, ``base`` (a transformers LlamaConfig), ``h`` (the layout
    file over its dataclass defaults), ``ssm`` (ssm_cfg over their Mamba2's defaults), ``d_inner``, ``special``
    (MLA or attention layers) and ``ranks`` {MLA layer: (q_lora_rank, kv_lora_rank)}."""
    layout = "amd" if (directory / "hybrid_config.json").is_file() else "mambainllama"
    name = "hybrid_config.json" if layout == "amd" else "mamba_config.json"
    h = {**THEIR_DEFAULTS[layout], **json.loads((directory / name).read_text())}
    base = transformers.LlamaConfig(**json.loads((directory / "config.json").read_text()))
    ssm = {**THEIR_SSM, **h["ssm_cfg"]}
    special = h["mla_layers"] if layout == "amd" else h["attn_layers"]
    ranks, q, kv = {}, h.get("q_lora_rank"), h.get("kv_lora_rank")
    for i in range(h["n_layer"]):  # their attention constructor overwrites the shared config's ranks, layer by layer
        if layout == "amd" and i in special:
            if str(i) in h["layer_rank_list"]:
                q, kv = h["layer_rank_list"][str(i)]["q_rank"], h["layer_rank_list"][str(i)]["kv_rank"]
            ranks[i] = (q, kv)
    d_inner = h["d_inner"] if h["d_inner"] is not None else ssm["expand"] * h["d_model"]
    return dict(layout=layout, base=base, h=h, ssm=ssm, d_inner=d_inner, special=special, ranks=ranks)


def write_layout(directory, layout: str, special: list[int], fields: dict | None = None, base: dict | None = None,
                 weights: str = "model.safetensors", seed: int = 0) -> dict:
    """A random checkpoint in AMD's (``special`` = MLA layers) or MambaInLlama's (``special`` = attention layers)
    layout, its layout file changed by ``fields`` and its base config by ``base``; the tensors' shapes follow the
    files as their code reads them. Returns the state dict."""
    directory.mkdir()
    hf = merge(transformers.LlamaConfig(**BASE).to_dict(), base or {})
    if layout == "amd":
        hf["rope_parameters"] = {"rope_theta": 10000.0, **YARN}  # the released files carry the base's RoPE, unused
    (directory / "config.json").write_text(json.dumps(hf))
    name = "hybrid_config.json" if layout == "amd" else "mamba_config.json"
    (directory / name).write_text(json.dumps(merge(layout_fields(layout, special), fields or {})))
    c = their_config(directory)
    h, ssm, d_inner = c["h"], c["ssm"], c["d_inner"]
    torch.manual_seed(seed)
    state = {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": 1 + rand(D, scale=0.1),
             "lm_head.weight": rand(V, D, scale=HEAD_SCALE)}
    for i in range(N):
        p = f"model.layers.{i}."
        ff = FF if layout == "mambainllama" and i in special else h["intermediate_size"]
        state.update({p + "input_layernorm.weight": 1 + rand(D, scale=0.1),
                      p + "post_attention_layernorm.weight": 1 + rand(D, scale=0.1),
                      p + "mlp.gate_proj.weight": rand(ff, D), p + "mlp.up_proj.weight": rand(ff, D),
                      p + "mlp.down_proj.weight": rand(D, ff, scale=0.2)})
        if i in special and layout == "amd":
            (r_q, r_kv), heads = c["ranks"][i], h["num_attention_heads"]
            groups = heads if h["use_full_kv_head"] else h["num_key_value_heads"]
            rope, nope, dv = h["qk_rope_head_dim"], h["qk_nope_head_dim"], h["v_head_dim"]
            state.update({p + "mla.q_a_proj.weight": rand(r_q, D, scale=0.2),
                          p + "mla.q_b_proj.weight": rand(heads * (nope + rope), r_q, scale=0.2),
                          p + "mla.kv_a_proj_with_mqa.weight": rand(r_kv + rope, D, scale=0.2),
                          p + "mla.kv_b_proj.weight": rand(groups * (nope + dv), r_kv, scale=0.2),
                          p + "mla.out_proj.weight": rand(D, heads * dv, scale=0.2)})
        elif i in special:
            state.update({p + "self_attn.q_proj.weight": rand(H * HD, D, scale=0.2),
                          p + "self_attn.k_proj.weight": rand(G * HD, D, scale=0.2),
                          p + "self_attn.v_proj.weight": rand(G * HD, D, scale=0.2),
                          p + "self_attn.o_proj.weight": rand(D, H * HD, scale=0.2)})
        else:
            heads, d_xb = ssm["ngroups"], h["d_xb"]
            conv_dim = d_inner + 2 * d_xb
            state.update({p + "mamba.in_proj.weight": rand(2 * d_inner + 2 * d_xb + heads, D, scale=0.2),
                          p + "mamba.conv1d.weight": rand(conv_dim, 1, ssm["d_conv"]),
                          p + "mamba.dt_bias": rand(heads) - 2,
                          p + "mamba.A_log": torch.log(torch.rand(heads) * 15 + 1),
                          p + "mamba.D": 1 + rand(heads, scale=0.1),
                          p + "mamba.norm.weight": 1 + rand(d_inner, scale=0.1),
                          p + "mamba.out_proj.weight": rand(D, d_inner, scale=0.2)})
            if ssm["conv_bias"]:
                state[p + "mamba.conv1d.bias"] = rand(conv_dim)
            if ssm["bias"]:
                state.update({p + "mamba.in_proj.bias": rand(2 * d_inner + 2 * d_xb + heads, scale=0.2),
                              p + "mamba.out_proj.bias": rand(D, scale=0.2)})
    if weights.endswith(".bin"):
        torch.save(state, directory / weights)
    else:
        save_file(state, str(directory / weights), metadata={"format": "pt"})
    return state


def their_weights(directory) -> dict:
    """What their loaders read: ``pytorch_model.bin`` when present, else every ``*.safetensors``."""
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", weights_only=True)
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def repeat_groups(w: torch.Tensor, groups: int, rows: int, heads: int) -> torch.Tensor:
    """Rows in ``groups`` blocks of ``rows`` → each block repeated for its heads/groups heads (GQA's mapping)."""
    return w.view(groups, rows, *w.shape[1:]).repeat_interleave(heads // groups, dim=0).reshape(-1, *w.shape[1:])


def amd_rope(h: dict, length: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """cos and sin ``[1, length, d_rope]`` and the softmax scale of AMD's MLA (hybrid_mla_layer.py): no scaling,
    ``linear`` or DeepSeek's YaRN with their defaults for the keys ``rope_scaling`` leaves out."""
    dim, base, r = h["qk_rope_head_dim"], h["rope_theta"], h["rope_scaling"]
    t = torch.arange(length, dtype=torch.float32)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    cos_sin_scale, softmax_scale = 1.0, (h["qk_nope_head_dim"] + dim) ** -0.5

    def get_mscale(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r is not None:
        factor = r["factor"]
        if r["rope_type"] == "linear":
            t = t / factor
        else:
            original, fast, slow = (r.get(k, v) for k, v in (("original_max_position_embeddings", 4096),
                                                                ("beta_fast", 32), ("beta_slow", 1)))
            corr = lambda rot: dim * math.log(original / (rot * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
            low, high = max(math.floor(corr(fast)), 0), min(math.ceil(corr(slow)), dim - 1)
            high = high + 0.001 if low == high else high
            extrapolate = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
            inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
            cos_sin_scale = get_mscale(factor, r.get("mscale", 1)) / get_mscale(factor, r.get("mscale_all_dim", 0))
        if r.get("mscale_all_dim", 0):
            softmax_scale *= get_mscale(factor, r["mscale_all_dim"]) ** 2
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
    return (emb.cos() * cos_sin_scale)[None], (emb.sin() * cos_sin_scale)[None], softmax_scale


def mla_layer(h: dict, ranks: tuple[int, int], state: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RMSNorm

    (r_q, r_kv), heads = ranks, h["num_attention_heads"]
    groups = heads if h["use_full_kv_head"] else h["num_key_value_heads"]
    nope, dv = h["qk_nope_head_dim"], h["v_head_dim"]
    config = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=r_q, kv_lora_rank=r_kv,
        qk_rope_head_dim=h["qk_rope_head_dim"], qk_nope_head_dim=nope, v_head_dim=dv, rope_interleave=True,
        attention_bias=h["attention_bias"], first_k_dense_replace=N, num_hidden_layers=N)
    config._attn_implementation = "eager"
    attn = DeepseekV3Attention(config, 0)
    attn.q_a_layernorm, attn.kv_a_layernorm = ((DeepseekV3RMSNorm(r_q, LATENT_EPS), DeepseekV3RMSNorm(r_kv, LATENT_EPS))
                                               if h["use_lora_layer_norm"] else (torch.nn.Identity(),) * 2)
    attn.q_a_proj.weight.copy_(state[p + "mla.q_a_proj.weight"])
    attn.q_b_proj.weight.copy_(state[p + "mla.q_b_proj.weight"])
    attn.kv_a_proj_with_mqa.weight.copy_(state[p + "mla.kv_a_proj_with_mqa.weight"])
    attn.kv_b_proj.weight.copy_(repeat_groups(state[p + "mla.kv_b_proj.weight"], groups, nope + dv, heads))
    attn.o_proj.weight.copy_(state[p + "mla.out_proj.weight"])
    cos, sin, attn.scaling = amd_rope(h, x.shape[1])
    length = x.shape[1]
    return attn(x, (cos, sin), torch.full((length, length), float("-inf")).triu(1)[None, None])[0]


def mamba_layer(c: dict, state: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    h, ssm, d_inner = c["h"], c["ssm"], c["d_inner"]
    heads, d_state, d_xb = ssm["ngroups"], ssm["d_state"], h["d_xb"]
    xb = d_xb // d_state
    assert d_inner % D == 0, "transformers' Mamba2 has d_inner = expand · hidden_size"
    config = transformers.Mamba2Config(
        hidden_size=D, num_heads=heads, head_dim=d_state, state_size=d_state, n_groups=heads, expand=d_inner // D,
        conv_kernel=ssm["d_conv"], use_conv_bias=ssm["conv_bias"], use_bias=ssm["bias"], layer_norm_epsilon=GATED_EPS,
        time_step_limit=tuple(ssm["dt_limit"]), num_hidden_layers=N, chunk_size=8)
    mixer = Mamba2Mixer(config, 0)
    sizes = [d_inner, d_xb, d_xb, d_inner, heads]
    for name in ("weight", "bias") if ssm["bias"] else ("weight",):
        z, xs, b, cc, dt = state[p + f"mamba.in_proj.{name}"].split(sizes)
        expanded = [z, repeat_groups(xs, xb, d_state, heads), repeat_groups(b, xb, d_state, heads), cc, dt]
        getattr(mixer.in_proj, name).copy_(torch.cat(expanded))
    for name in ("weight", "bias") if ssm["conv_bias"] else ("weight",):
        cx, cb, cc = state[p + f"mamba.conv1d.{name}"].split([d_xb, d_xb, d_inner])
        getattr(mixer.conv1d, name).copy_(torch.cat([repeat_groups(cx, xb, d_state, heads),
                                                     repeat_groups(cb, xb, d_state, heads), cc]))
    for name in ("dt_bias", "A_log", "D"):
        getattr(mixer, name).copy_(state[p + f"mamba.{name}"])
    mixer.norm.weight.copy_(state[p + "mamba.norm.weight"])
    mixer.out_proj.weight.copy_(state[p + "mamba.out_proj.weight"])
    if ssm["bias"]:
        mixer.out_proj.bias.copy_(state[p + "mamba.out_proj.bias"])
    return mixer(x)


def reference_logits(directory, tokens: np.ndarray, rounding: np.random.Generator | None = None) -> np.ndarray:
    """INTEROP.md's forward of the checkpoint in ``directory``, from transformers' layers: the blocks' norms, MLP
    and activation from the layout file, the final norm from ``config.json``; MambaInLlama's attention layers are
    the base model's. ``rounding``: every weight first moved by a random relative error as large as float32's
    rounding (``2**-24``), drawn from this generator."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

    c = their_config(directory)
    dtype = torch.get_default_dtype()  # assert_their_forward: float64
    state = {k: w.to(dtype) if w.is_floating_point() else w for k, w in their_weights(directory).items()}
    if rounding is not None:
        state = {k: w * (1 + 2.0 ** -24 * torch.from_numpy(rounding.uniform(-1, 1, w.shape)).to(dtype))
                 if w.is_floating_point() else w for k, w in state.items()}
    base, h, special = c["base"], c["h"], c["special"]
    base._attn_implementation = "eager"
    t = torch.from_numpy(tokens)
    length = t.shape[1]
    positions = torch.arange(length)[None]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    x = state["model.embed_tokens.weight"][t]
    with torch.no_grad():
        for i in range(N):
            p = f"model.layers.{i}."
            theirs = not (c["layout"] == "mambainllama" and i in special)  # a layer their code builds
            block = transformers.LlamaConfig(**{**base.to_dict(), **{k: h[k] for k in (
                "intermediate_size", "hidden_act", "rms_norm_eps")}}) if theirs else base
            norm = LlamaRMSNorm(D, eps=block.rms_norm_eps)
            norm.weight.copy_(state[p + "input_layernorm.weight"])
            if i in special and c["layout"] == "amd":
                a = mla_layer(h, c["ranks"][i], state, p, norm(x))
            elif i in special:
                attn = LlamaAttention(base, i)
                for name in "qkvo":
                    getattr(attn, f"{name}_proj").weight.copy_(state[p + f"self_attn.{name}_proj.weight"])
                a = attn(norm(x), LlamaRotaryEmbedding(base)(x, positions), mask)[0]
            else:
                a = mamba_layer(c, state, p, norm(x))
            x = x + a
            norm.weight.copy_(state[p + "post_attention_layernorm.weight"])
            mlp = LlamaMLP(block)
            for name in ("gate", "up", "down"):
                getattr(mlp, f"{name}_proj").weight.copy_(state[p + f"mlp.{name}_proj.weight"])
            x = x + mlp(norm(x))
        final = LlamaRMSNorm(D, eps=base.rms_norm_eps)
        final.weight.copy_(state["model.norm.weight"])
        return (final(x) @ state["lm_head.weight"].T).numpy()


def assert_their_forward(directory, model, tokens):
    """zebrax's fp32 logits, compiled as a user's are (XLA's optimisations on, as they are off in the quick tier),
    within 1e-4 of their forward computed in float64, the exact value (each fp32 implementation strays about 3e-5
    from it).

    1e-4 is ten times how far the exact value moves when the weights move as much as fp32 rounds them (under 1e-5
    at a well-conditioned position). An ill-conditioned position gets the same factor over its own spread: no fp32
    forward can promise 1e-4 there. (ngroups_8_biases has one: a group of 8 channels of a Mamba2 layer's gated
    output has a mean square of 7e-6, under the norm's eps of 1e-5, so the norm multiplies that group's rounding
    errors by 240; the exact value there moves 9e-5 with the weights, and zebrax's fp32 strays 1e-4 to 3e-4,
    their own 4e-5, depending on the CPU and on XLA's optimisations.)"""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # their modules' parameters, and the weights copied into them
    try:
        want = reference_logits(directory, tokens)
        assert want.dtype == np.float64 and want.std() > 0.3
        before = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", False)
        try:
            error = np.abs(model.logits(tokens) - want).max(-1)  # [B, L]: the worst logit of each position
        finally:
            jax.config.update("jax_disable_most_optimizations", before)
        tolerance = np.full(error.shape, 1e-4)
        if (error > tolerance).any():
            rounding = np.random.default_rng(0)
            spread = np.max([np.abs(reference_logits(directory, tokens, rounding) - want).max(-1) for _ in range(4)], 0)
            tolerance = np.maximum(tolerance, 10 * spread)
    finally:
        torch.set_default_dtype(default)
    bad = np.argwhere(error > tolerance)
    assert not len(bad), (f"{len(bad)} of {error.size} positions beyond tolerance, e.g. {tuple(bad[0])}: "
                          f"{error[tuple(bad[0])]:.3g} > {tolerance[tuple(bad[0])]:.3g}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_their_checkpoints_convert_and_compute_their_forward(tmp_path, rng, layout):
    write_layout(tmp_path / "theirs", layout, LAYOUTS[layout])
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    model = zebrax.load(tmp_path / "ours")
    kind = "mla" if layout == "amd" else "attention"
    assert model.config.layers_of(kind) == tuple(LAYOUTS[layout]) and not model.config.tie_word_embeddings
    assert_their_forward(tmp_path / "theirs", model, rng.integers(0, V, (2, 40)))  # 40 > YaRN's original 16


# name -> (layout, layout-file changes, base-config changes): files their loaders accept, each computing something
# else than the plain fixture
VARIANTS = {
    # AMD's attention reads these YaRN keys: beta 4/2 moves the ramp (over 4096 original positions, where it starts
    # at another pair than beta 32/1's); mscale = mscale_all_dim = 1 (DeepSeek-V3's) puts
    # the factor on the softmax scale instead of cos/sin; mscale_all_dim alone scales both
    "yarn_beta": ("amd", {"rope_scaling": {"beta_fast": 4, "beta_slow": 2, "original_max_position_embeddings": 4096}},
                  {}),
    "yarn_mscale_both": ("amd", {"rope_scaling": {"mscale": 1.0, "mscale_all_dim": 1.0}}, {}),
    "yarn_mscale_all_dim": ("amd", {"rope_scaling": {"mscale_all_dim": 0.707}}, {}),
    # their Mamba2's gated norm has eps 1e-5 whatever the model's rms_norm_eps
    "amd_eps_1e-6": ("amd", {"rms_norm_eps": 1e-6}, {"rms_norm_eps": 1e-6}),
    "amd_eps_1e-2": ("amd", {"rms_norm_eps": 1e-2}, {"rms_norm_eps": 1e-2}),
    "mil_eps_1e-6": ("mambainllama", {"rms_norm_eps": 1e-6}, {"rms_norm_eps": 1e-6}),
    # missing keys take their dataclass defaults: original length 4096, d_inner = expand·d_model, …
    "amd_missing_keys": ("amd", {k: DROP for k in (
        "rope_type", "attention_bias", "attention_dropout", "use_full_kv_head", "use_lora_layer_norm",
        "qkv_rank_divisor", "max_position_embeddings", "d_inner", "hidden_act", "rms_norm_eps")} | {
        "rope_scaling": {"original_max_position_embeddings": DROP}, "ssm_cfg": {"repeat_kv_before_conv": DROP}}, {}),
    "amd_no_rope_scaling": ("amd", {"rope_scaling": DROP}, {}),
    "mil_missing_keys": ("mambainllama", {k: DROP for k in ("vocab_size", "d_inner", "hidden_act", "rms_norm_eps")},
                         {}),
    # ssm_cfg keys of their Mamba2 beyond the released ones
    "d_conv_3": ("amd", {"ssm_cfg": {"d_conv": 3}}, {}),
    "mil_d_conv_2_dt_limit": ("mambainllama", {"ssm_cfg": {"d_conv": 2, "dt_limit": [0.0, 0.05]}}, {}),
    "ngroups_8_biases": ("amd", {"ssm_cfg": {"ngroups": 8, "d_state": 8, "conv_bias": False, "bias": True}}, {}),
    # ranks: above what an SVD of the teacher could give (and a K/V group per head), per layer as their SVD init
    # records them, or inherited by a layer without an entry (their constructor overwrites the shared config)
    "ranks_above_svd_full_kv": ("amd", {"q_lora_rank": 72, "kv_lora_rank": 56, "use_full_kv_head": True}, {}),
    "layer_rank_list": ("amd", {"layer_rank_list": {"0": {"q_rank": 48, "kv_rank": 32},
                                                    "2": {"q_rank": 48, "kv_rank": 32}}}, {}),
    "layer_rank_list_inherited": ("amd", {"layer_rank_list": {"0": {"q_rank": 16, "kv_rank": 8}}}, {}),
    "layer_ranks_differ": ("amd", {"layer_rank_list": {"0": {"q_rank": 48, "kv_rank": 32},
                                                       "2": {"q_rank": 40, "kv_rank": 24}}}, {}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_their_variants_convert_and_compute_their_forward(tmp_path, rng, name):
    layout, fields, base = VARIANTS[name]
    write_layout(tmp_path / "theirs", layout, LAYOUTS[layout], fields, base)
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    assert_their_forward(tmp_path / "theirs", zebrax.load(tmp_path / "ours"), rng.integers(0, V, (2, 40)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_their_loaders_read_the_bin_when_safetensors_lie_beside_it(tmp_path, rng, layout):
    """Their local loaders load ``pytorch_model.bin`` when it exists; a ``.safetensors`` beside it is not read."""
    state = write_layout(tmp_path / "theirs", layout, LAYOUTS[layout], weights="pytorch_model.bin")
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in state.items()}
    save_file(other, str(tmp_path / "theirs" / "model.safetensors"), metadata={"format": "pt"})
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    assert_their_forward(tmp_path / "theirs", zebrax.load(tmp_path / "ours"), rng.integers(0, V, (2, 40)))


def test_every_safetensors_file_is_read_without_a_bin(tmp_path, rng):
    """Without a ``.bin``, their loaders read every ``*.safetensors`` in the folder, whatever its name."""
    state = write_layout(tmp_path / "theirs", "amd", LAYOUTS["amd"])
    layer_1 = {k: v for k, v in state.items() if k.startswith("model.layers.1.")}
    save_file({k: v for k, v in state.items() if k not in layer_1}, str(tmp_path / "theirs" / "model.safetensors"))
    save_file(layer_1, str(tmp_path / "theirs" / "mamba_layer.safetensors"))
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    assert_their_forward(tmp_path / "theirs", zebrax.load(tmp_path / "ours"), rng.integers(0, V, (2, 40)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_writes_exactly_their_layout_and_reimports_bit_identically(tmp_path, layout):
    state = write_layout(tmp_path / "theirs", layout, LAYOUTS[layout])
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    export(tmp_path / "ours", tmp_path / "exported")
    files = {p.name for p in (tmp_path / "exported").iterdir()}
    layout_file = "hybrid_config.json" if layout == "amd" else "mamba_config.json"
    assert files == {"config.json", layout_file, "model.safetensors"}
    fields = json.loads((tmp_path / "exported" / layout_file).read_text())
    assert list(fields) == list(AMD_FIELDS if layout == "amd" else MIL_FIELDS)
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert set(exported) == set(state)
    for name, w in state.items():
        np.testing.assert_array_equal(exported[name].numpy(), w.numpy())
    zebrax.convert(tmp_path / "exported", tmp_path / "again")
    a, b = zebrax.load(tmp_path / "ours"), zebrax.load(tmp_path / "again")
    assert a.config == b.config
    import jax

    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_per_layer_ranks_convert_run_and_export_as_their_layer_rank_list(tmp_path, rng):
    """AMD's layer_rank_list with MLA layers of different ranks: converted, each layer runs its own ranks (their
    forward of the files equals zebrax's), exported with the list, and converted back bit-identically."""
    ranks = {"0": {"q_rank": 48, "kv_rank": 32}, "2": {"q_rank": 40, "kv_rank": 24}}
    write_layout(tmp_path / "theirs", "amd", LAYOUTS["amd"], {"layer_rank_list": ranks})
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    ours = zebrax.load(tmp_path / "ours")
    assert [(s.config.q_lora_rank, s.config.kv_lora_rank) for s in ours.config.plan() if s.mixer == "mla"] == [
        (48, 32), (40, 24)]
    assert [i for i, _ in ours.config.layer_configs] == [2]
    tokens = rng.integers(0, V, (2, 40))
    assert_their_forward(tmp_path / "theirs", ours, tokens)
    export(tmp_path / "ours", tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "hybrid_config.json").read_text())["layer_rank_list"] == ranks
    assert_their_forward(tmp_path / "exported", ours, tokens)
    zebrax.convert(tmp_path / "exported", tmp_path / "again")
    again = zebrax.load(tmp_path / "again")
    assert again.config == ours.config
    import jax

    for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(ours.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def teacher(rms_norm_eps: float) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=H,
                       num_key_value_heads=G, head_dim=HD, rms_norm_eps=rms_norm_eps, eos_token_id=(3,),
                       max_position_embeddings=256)


@pytest.mark.parametrize("layout, eps", [("amd", 1e-6), ("mambainllama", 1e-6), ("amd", 1e-2)])
def test_exported_hybrids_compute_in_their_code_what_they_compute_in_zebrax(tmp_path, rng, layout, eps):
    """A hybrid built by the recipe from a teacher of any rms_norm_eps, exported: their forward of the files equals
    zebrax's logits (the recipe's Mamba2 gated norm has their eps, 1e-5). YaRN with its own beta and mscale values,
    MLA ranks and conv kernel exported as their code reads them."""
    special = LAYOUTS[layout]
    config = from_teacher(
        teacher(eps), mla_layers=special if layout == "amd" else [],
        attention_layers=[] if layout == "amd" else special,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, rope_factor=4.0, rope_original_max_position_embeddings=16,
        mla={"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                              "beta_fast": 8.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.5}},
        mamba2={"conv_kernel": 3})
    model = random_model(config, seed=3)
    model = zebrax.Model(config, {**model.params, "lm_head": {"kernel": model.params["lm_head"]["kernel"] * HEAD_SCALE
                                                              / 0.3}})
    with checkpoint.atomic_directory(tmp_path / "ours") as tmp:
        checkpoint.save(tmp, model.config, model.params)
    export(tmp_path / "ours", tmp_path / "exported")
    assert_their_forward(tmp_path / "exported", model, rng.integers(0, V, (2, 40)))


def test_export_refuses_what_their_code_computes_otherwise(tmp_path, capsys):
    """A Mamba2 gated-norm eps other than their fixed 1e-5, ranks their config rejects, an MLP bias: one line naming
    the setting, nothing written."""
    from zebrax.app.cli import main

    base = from_teacher(teacher(1e-6), mla_layers=[0, 2], kv_lora_rank=16, q_lora_rank=24,
                                     qk_rope_head_dim=8)
    cases = {"mamba2.norm_eps=1e-06": base.replace(mamba2=dataclasses.replace(base.mamba2, norm_eps=1e-6)),
             "mamba2.norm_eps=0.001": base.replace(mamba2=dataclasses.replace(base.mamba2, norm_eps=1e-3)),
             "mla.kv_lora_rank=12": base.replace(mla=dataclasses.replace(base.mla, kv_lora_rank=12))}
    for needle, config in cases.items():
        model = random_model(config)
        src = tmp_path / needle.replace("=", "_")
        with checkpoint.atomic_directory(src) as tmp:
            checkpoint.save(tmp, model.config, model.params)
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            export(src, tmp_path / "out")
        assert_nothing_left(tmp_path / "out")
    capsys.readouterr()
    assert_one_line_error(main(["export", str(src), str(tmp_path / "out")]), capsys.readouterr().err,
                          "mla.kv_lora_rank=12")
    assert_nothing_left(tmp_path / "out")


REFUSED = {
    # their code uses the layout file's eps in the blocks and config.json's in the final norm; zebrax has one
    "block_and_final_eps": ("amd", {"rms_norm_eps": 1e-6}, {}, "rms_norm_eps=1e-06 but"),
    "mil_mamba_and_attention_act": ("mambainllama", {"hidden_act": "gelu"}, {}, "hidden_act='gelu' but"),
    "rank_divisor": ("amd", {"kv_lora_rank": 20}, {}, "kv_lora_rank=20"),
    "ssm_norm_before_gate": ("amd", {"ssm_cfg": {"norm_before_gate": True}}, {}, "norm_before_gate=True"),
    "ssm_unknown": ("mambainllama", {"ssm_cfg": {"d_ssm_typo": 1}}, {}, "unknown keys ['d_ssm_typo']"),
    "rope_dynamic": ("amd", {"rope_scaling": {"rope_type": "dynamic"}}, {}, "rope_type='dynamic'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_zebrax_cannot_compute_as_their_code_does_fails_in_one_line(tmp_path, capsys, name):
    layout, fields, base, needle = REFUSED[name]
    write_layout(tmp_path / "theirs", layout, LAYOUTS[layout], fields, base)
    code, err = convert_cli(capsys, tmp_path / "theirs", tmp_path / "out")
    assert_one_line_error(code, err, needle)
    assert_nothing_left(tmp_path / "out")


def test_their_files_with_unknown_fields_or_missing_tensors_fail_in_one_line(tmp_path, capsys):
    from zebrax.app.cli import main

    write_layout(tmp_path / "theirs", "amd", [0, 2])
    hybrid = json.loads((tmp_path / "theirs" / "hybrid_config.json").read_text())
    (tmp_path / "theirs" / "hybrid_config.json").write_text(json.dumps({**hybrid, "mla_rank_schedule": 3}))
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "theirs"), str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "hybrid_config.json", "unknown fields ['mla_rank_schedule']")
    (tmp_path / "theirs" / "hybrid_config.json").write_text(json.dumps(hybrid))
    state = load_file(str(tmp_path / "theirs" / "model.safetensors"))
    del state["model.layers.1.mamba.A_log"]
    save_file(state, str(tmp_path / "theirs" / "model.safetensors"))
    code = main(["convert", str(tmp_path / "theirs"), str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "missing 1 tensors", "model.layers.1.mamba.A_log")
    assert_nothing_left(tmp_path / "out")

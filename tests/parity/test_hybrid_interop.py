"""AMD's Zebra-Llama and MambaInLlama checkpoints in, ours out (INTEROP.md). A tiny checkpoint is written in their
layout with random weights; its logits are computed independently in PyTorch from INTEROP.md's forward semantics,
with transformers' DeepseekV3 attention (MLA, latent norms off, kv_b expanded from groups to heads), Mamba2 mixer
(x and B rows repeated to every head) and Llama attention / MLP / RMSNorm as the layers; zebrax must match (fp32,
1e-4). Export then re-import is bit-identical, with exactly their files, keys and fields."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import zebrax
from zebrax.convert.export import export
from zebrax.convert.hybrid import AMD_FIELDS, MIL_FIELDS

V, D, FF, H, G, HD, N = 101, 64, 96, 4, 2, 16, 4  # vocab, hidden, MLP, heads, KV heads, head_dim, layers
R_Q, R_KV, ROPE, NOPE = 40, 24, 8, 8
BASE = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=H,
            num_key_value_heads=G, head_dim=HD, rms_norm_eps=1e-5, max_position_embeddings=256,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=3,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}


def rand(*shape, scale=0.3):
    return torch.randn(*shape) * scale


def write_layout(directory, layout: str, special: list[int]) -> dict:
    """A random checkpoint in AMD's (``special`` = MLA layers) or MambaInLlama's (``special`` = attention layers)
    layout; returns its state dict."""
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": 1 + rand(D, scale=0.1),
             "lm_head.weight": rand(V, D)}
    for i in range(N):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": 1 + rand(D, scale=0.1),
                      p + "post_attention_layernorm.weight": 1 + rand(D, scale=0.1),
                      p + "mlp.gate_proj.weight": rand(FF, D), p + "mlp.up_proj.weight": rand(FF, D),
                      p + "mlp.down_proj.weight": rand(D, FF, scale=0.2)})
        if i in special and layout == "amd":
            state.update({p + "mla.q_a_proj.weight": rand(R_Q, D, scale=0.2),
                          p + "mla.q_b_proj.weight": rand(H * (NOPE + ROPE), R_Q, scale=0.2),
                          p + "mla.kv_a_proj_with_mqa.weight": rand(R_KV + ROPE, D, scale=0.2),
                          p + "mla.kv_b_proj.weight": rand(G * (NOPE + HD), R_KV, scale=0.2),
                          p + "mla.out_proj.weight": rand(D, H * HD, scale=0.2)})
        elif i in special:
            state.update({p + "self_attn.q_proj.weight": rand(H * HD, D, scale=0.2),
                          p + "self_attn.k_proj.weight": rand(G * HD, D, scale=0.2),
                          p + "self_attn.v_proj.weight": rand(G * HD, D, scale=0.2),
                          p + "self_attn.o_proj.weight": rand(D, H * HD, scale=0.2)})
        else:
            conv_dim = H * HD + 2 * G * HD
            state.update({p + "mamba.in_proj.weight": rand(2 * H * HD + 2 * G * HD + H, D, scale=0.2),
                          p + "mamba.conv1d.weight": rand(conv_dim, 1, 4), p + "mamba.conv1d.bias": rand(conv_dim),
                          p + "mamba.dt_bias": rand(H) - 2, p + "mamba.A_log": torch.log(torch.rand(H) * 15 + 1),
                          p + "mamba.D": 1 + rand(H, scale=0.1), p + "mamba.norm.weight": 1 + rand(H * HD, scale=0.1),
                          p + "mamba.out_proj.weight": rand(D, H * HD, scale=0.2)})
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    base = transformers.LlamaConfig(**BASE).to_dict()
    ssm = {"expand": 1, "ngroups": H, "d_state": HD}
    if layout == "amd":
        base["rope_parameters"] = dict(YARN)  # the released files carry the base's RoPE, which feeds nothing
        hybrid = {"hidden_size": D, "intermediate_size": FF, "hidden_act": "silu", "n_layer": N, "mla_layers": special,
                  "rms_norm_eps": 1e-5, "num_attention_heads": H, "num_key_value_heads": G, "kv_lora_rank": R_KV,
                  "q_lora_rank": R_Q, "use_lora_layer_norm": False, "use_full_kv_head": False,
                  "qk_rope_head_dim": ROPE, "v_head_dim": HD, "qk_nope_head_dim": NOPE, "qkv_rank_divisor": 8,
                  "max_position_embeddings": 256, "rope_theta": 10000.0,
                  "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 16, "rope_type": "yarn"},
                  "attention_bias": False, "attention_dropout": 0.0, "rope_type": "yarn", "d_model": D,
                  "ssm_cfg": {**ssm, "repeat_kv_before_conv": False}, "d_inner": H * HD, "d_xb": G * HD}
        (directory / "hybrid_config.json").write_text(json.dumps(hybrid))
    else:
        mil = {"d_model": D, "ssm_cfg": ssm, "rms_norm_eps": 1e-5, "vocab_size": None, "d_inner": H * HD,
               "d_xb": G * HD, "intermediate_size": FF, "hidden_act": "silu", "n_layer": N, "attn_layers": special}
        (directory / "mamba_config.json").write_text(json.dumps(mil))
    (directory / "config.json").write_text(json.dumps(base))
    return state


def repeat_groups(w: torch.Tensor, groups: int, rows: int) -> torch.Tensor:
    """Rows in ``groups`` blocks of ``rows`` → each block repeated for its H/G heads (GQA's mapping)."""
    return w.view(groups, rows, *w.shape[1:]).repeat_interleave(H // groups, dim=0).reshape(-1, *w.shape[1:])


def reference_logits(state: dict, layout: str, special: list[int], tokens: np.ndarray) -> np.ndarray:
    """INTEROP.md's forward, from transformers' layers."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    llama = transformers.LlamaConfig(**BASE, hidden_act="silu")
    llama._attn_implementation = "eager"
    deepseek = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=R_Q, kv_lora_rank=R_KV,
        qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=HD, rope_parameters=dict(YARN), rope_interleave=True,
        attention_bias=False, max_position_embeddings=256, first_k_dense_replace=N, num_hidden_layers=N)
    deepseek._attn_implementation = "eager"
    mamba = transformers.Mamba2Config(hidden_size=D, num_heads=H, head_dim=HD, state_size=HD, n_groups=H, expand=1,
                                      conv_kernel=4, use_conv_bias=True, use_bias=False, layer_norm_epsilon=1e-5,
                                      num_hidden_layers=N, chunk_size=8)
    t = torch.from_numpy(tokens)
    length = t.shape[1]
    positions = torch.arange(length)[None]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    x = state["model.embed_tokens.weight"][t]
    with torch.no_grad():
        for i in range(N):
            p = f"model.layers.{i}."
            norm = LlamaRMSNorm(D, eps=1e-5)
            norm.weight.copy_(state[p + "input_layernorm.weight"])
            h = norm(x)
            if i in special and layout == "amd":
                attn = DeepseekV3Attention(deepseek, i)
                attn.q_a_layernorm, attn.kv_a_layernorm = torch.nn.Identity(), torch.nn.Identity()
                attn.q_a_proj.weight.copy_(state[p + "mla.q_a_proj.weight"])
                attn.q_b_proj.weight.copy_(state[p + "mla.q_b_proj.weight"])
                attn.kv_a_proj_with_mqa.weight.copy_(state[p + "mla.kv_a_proj_with_mqa.weight"])
                attn.kv_b_proj.weight.copy_(repeat_groups(state[p + "mla.kv_b_proj.weight"], G, NOPE + HD))
                attn.o_proj.weight.copy_(state[p + "mla.out_proj.weight"])
                a = attn(h, DeepseekV3RotaryEmbedding(deepseek)(h, positions), mask)[0]
            elif i in special:
                attn = LlamaAttention(llama, i)
                for name in "qkvo":
                    getattr(attn, f"{name}_proj").weight.copy_(state[p + f"self_attn.{name}_proj.weight"])
                a = attn(h, LlamaRotaryEmbedding(llama)(h, positions), mask)[0]
            else:
                mixer = Mamba2Mixer(mamba, 0)
                z, xs, b, c, dt = state[p + "mamba.in_proj.weight"].split([H * HD, G * HD, G * HD, H * HD, H])
                mixer.in_proj.weight.copy_(torch.cat([z, repeat_groups(xs, G, HD), repeat_groups(b, G, HD), c, dt]))
                for name in ("weight", "bias"):
                    cx, cb, cc = state[p + f"mamba.conv1d.{name}"].split([G * HD, G * HD, H * HD])
                    getattr(mixer.conv1d, name).copy_(torch.cat([repeat_groups(cx, G, HD), repeat_groups(cb, G, HD),
                                                                 cc]))
                for name in ("dt_bias", "A_log", "D"):
                    getattr(mixer, name).copy_(state[p + f"mamba.{name}"])
                mixer.norm.weight.copy_(state[p + "mamba.norm.weight"])
                mixer.out_proj.weight.copy_(state[p + "mamba.out_proj.weight"])
                a = mixer(h)
            x = x + a
            norm.weight.copy_(state[p + "post_attention_layernorm.weight"])
            mlp = LlamaMLP(llama)
            for name in ("gate", "up", "down"):
                getattr(mlp, f"{name}_proj").weight.copy_(state[p + f"mlp.{name}_proj.weight"])
            x = x + mlp(norm(x))
        final = LlamaRMSNorm(D, eps=1e-5)
        final.weight.copy_(state["model.norm.weight"])
        return (final(x) @ state["lm_head.weight"].T).numpy()


LAYOUTS = {"amd": [0, 2], "mambainllama": [1, 3]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_their_checkpoints_convert_and_compute_their_forward(tmp_path, rng, layout):
    state = write_layout(tmp_path / "theirs", layout, LAYOUTS[layout])
    zebrax.convert(tmp_path / "theirs", tmp_path / "ours")
    model = zebrax.load(tmp_path / "ours")
    kind = "mla" if layout == "amd" else "attention"
    assert model.config.layers_of(kind) == tuple(LAYOUTS[layout]) and not model.config.tie_word_embeddings
    tokens = rng.integers(0, V, (2, 40))  # 40 > YaRN's original 16 positions
    want = reference_logits(state, layout, LAYOUTS[layout], tokens)
    got = model.logits(tokens)
    assert want.std() > 0.3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


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


def test_their_files_with_unknown_fields_or_missing_tensors_fail_in_one_line(tmp_path, capsys):
    from tests.helpers import assert_nothing_left, assert_one_line_error
    from zebrax.cli import main

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

"""A checkpoint is what its tensors say, and a zebrax checkpoint's params are checked against its config.

- a head stored beside ``tie_word_embeddings=true`` is compared with the embedding: equal → tied, different →
  untied with the stored head (transformers 5 computes with it); stored RoPE frequencies must match the config;
- a GGUF's attention and MLP biases are inferred from its tensors; a GGUF or HF directory without a tokenizer
  converts with a warning;
- a ``config.json`` that disagrees with the stored params fails at load, naming the leaves.
fp32; logits against transformers within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import zebrax
from tests.helpers import assert_logits_match, assert_nothing_left, assert_one_line_error
from zebrax.app.cli import main
from zebrax.errors import CheckpointError, ZebraxWarning

TIED = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1, max_position_embeddings=128)


def _tied_llama_with_stored_head(directory: Path, head_delta: float) -> dict:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TIED)).eval()
    model.save_pretrained(directory)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + head_delta * torch.randn(64, 32)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_a_stored_head_that_differs_from_the_tied_embedding_is_kept(tmp_path, rng):
    _tied_llama_with_stored_head(tmp_path / "hf", head_delta=0.5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with pytest.warns(ZebraxWarning, match="lm_head.weight differs from the embedding"):
        zebrax.convert(tmp_path / "hf", tmp_path / "zx")
    model = zebrax.load(tmp_path / "zx")
    assert not model.config.tie_word_embeddings and "lm_head" in model.params
    assert_logits_match(model, hf, rng.integers(0, 64, (2, 17)), 1e-4)


def test_a_stored_head_equal_to_the_embedding_stays_tied(tmp_path, rng, recwarn):
    _tied_llama_with_stored_head(tmp_path / "hf", head_delta=0.0)
    zebrax.convert(tmp_path / "hf", tmp_path / "zx")
    model = zebrax.load(tmp_path / "zx")
    assert model.config.tie_word_embeddings and "lm_head" not in model.params
    assert not [w for w in recwarn if "differs" in str(w.message)]


def test_stored_rope_frequencies_must_agree_with_the_config(capsys, tiny_llama, tmp_path):
    """Older transformers saved ``rotary_emb.inv_freq``: the same frequencies convert, others are refused."""
    from zebrax.layers.rope import inv_frequencies

    src = tiny_llama("gqa_llama3_untied")[1]
    config = zebrax.load(tiny_llama("gqa_llama3_untied")[2]).config
    good = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    for name, freqs in (("same", good), ("other", good * 2)):
        hf = Path(shutil.copytree(src, tmp_path / name))
        state = transformers.LlamaForCausalLM.from_pretrained(hf).state_dict()
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.from_numpy(freqs)
        save_file({k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"))
        capsys.readouterr()
        code = main(["convert", str(hf), str(tmp_path / f"{name}.zx")])
        if name == "same":
            assert code == 0
        else:
            assert_one_line_error(code, capsys.readouterr().err, "rotary_emb.inv_freq", "other RoPE frequencies")
            assert_nothing_left(tmp_path / f"{name}.zx")


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (half-split → interleaved pairs), as its convert script applies it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf_model, extra_uint32: dict[str, int] | None = None) -> None:
    """A float32 llama GGUF of a transformers Llama, written with the ``gguf`` package as llama.cpp lays it out
    (no tokenizer metadata; the real SmolLM2 GGUF covers that)."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    for key, value in (extra_uint32 or {}).items():
        w.add_uint32(key, value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    blocks = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        if name in names:
            w.add_tensor(names[name], a)
            continue
        _, _, layer, *module, kind = name.split(".")
        module = ".".join(module)
        if module == "self_attn.q_proj":
            a = permute_rotary(a, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            a = permute_rotary(a, c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{blocks[module]}.{kind}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_biases_are_inferred_and_a_missing_tokenizer_is_only_a_warning(tmp_path, rng, capsys):
    """A llama GGUF with q/k/v/o and MLP biases and no tokenizer metadata: converts, warns about the tokenizer,
    and computes what transformers computes."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{**TIED, "tie_word_embeddings": False}, attention_bias=True, mlp_bias=True)
    hf = transformers.LlamaForCausalLM(config).eval()
    write_gguf(tmp_path / "tiny.gguf", hf)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "zx")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("zebrax: warning: ") and "no tokenizer" in err and len(err.strip().splitlines()) == 1
    model = zebrax.load(tmp_path / "zx")
    assert model.config.attention_bias and model.config.mlp_bias and model.tokenizer is None
    assert_logits_match(model, hf, rng.integers(0, 64, (2, 23)), 1e-4)
    assert main(["generate", str(tmp_path / "zx"), "--prompt", "hi"]) == 1
    assert "no tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, needle", [
    ("llama.rope.dimension_count", 4, "rotates part of each 8-wide head"),
    ("llama.expert_count", 8, "mixture-of-experts"),
])
def test_gguf_metadata_zebrax_does_not_compute_is_refused(capsys, tmp_path, key, value, needle):
    torch.manual_seed(0)
    write_gguf(tmp_path / "m.gguf", transformers.LlamaForCausalLM(transformers.LlamaConfig(**TIED)), {key: value})
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "zx")])
    assert_one_line_error(code, capsys.readouterr().err, f"{key}={value}", needle)
    assert_nothing_left(tmp_path / "zx")


def test_an_hf_directory_without_a_tokenizer_converts_and_says_so(tiny_llama, tmp_path):
    with pytest.warns(ZebraxWarning, match="no tokenizer found"):
        zebrax.convert(tiny_llama("mqa_linear_sharded")[1], tmp_path / "zx")
    assert not (tmp_path / "zx" / "tokenizer").exists()


@pytest.mark.parametrize("field, value, needles", [
    ("hidden_size", 80, ["embed_tokens/embedding (211, 72) (expected (211, 80))"]),
    ("vocab_size", 300, ["embed_tokens/embedding (211, 72) (expected (300, 72))", "lm_head/kernel"]),
    ("num_hidden_layers", 2, ["unexpected 9: layers_2/"]),
    ("num_hidden_layers", 5, ["missing 18: layers_3/"]),
    ("intermediate_size", 99, ["mlp/down_proj/kernel (100, 72) (expected (99, 72))"]),
])
def test_a_config_that_disagrees_with_the_stored_params_fails_at_load(capsys, tiny_llama, tmp_path, field, value,
                                                                       needles):
    ckpt = Path(shutil.copytree(tiny_llama("gqa_llama3_untied")[2], tmp_path / "ckpt"))
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"][field] = value
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="parameters do not match config.json") as e:
        zebrax.load(ckpt)
    for needle in needles:
        assert needle in str(e.value)
    capsys.readouterr()
    assert_one_line_error(main(["generate", str(ckpt), "--prompt", "x"]), capsys.readouterr().err,
                          f"{field}={value}", *needles)

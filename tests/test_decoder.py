"""One decoder stack over a mixer registry: plans, the mixer interface, hybrids with mixed caches, what the
blocks sow, implementations per op, positions from the cache, and the bounds of the cache. fp32."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from tests.helpers import MIXED, TEACHER, WITH_GDN, hybrid, random_model
from zebrax.cache import Cache, KVCache, LatentCache, Slots, SSMCache
from zebrax.config import AttentionConfig, LayerSpec
from zebrax.errors import ConfigError, InvalidArgument
from zebrax.generate import Generator
from zebrax.mixers import kinds
from zebrax.models import build, param_count
from zebrax.recipe import from_teacher

ATOL = 1e-5  # fp32; for whole hybrids relative to the largest logit: MLA's absorbed decode and materialised
# prefill add in different orders (|logit| reaches ~5 here)

def test_every_model_is_a_plan_over_one_registry():
    assert list(kinds()) == ["attention", "mla", "mamba2", "gdn"]
    assert "".join(k.letter for k in kinds().values()) == "ALSD"
    assert {s.mixer for s in TEACHER.plan()} == {"attention"} and all(s.mlp for s in TEACHER.plan())
    assert MIXED.layer_map() == "LSALS" and [s.mixer for s in MIXED.plan()] == ["mla", "mamba2", "attention",
                                                                               "mla", "mamba2"]
    params = random_model(MIXED).params
    assert set(params["layers_0"]) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert set(params["layers_1"]) == {"input_layernorm", "mixer", "post_attention_layernorm", "mlp"}
    with pytest.raises(ConfigError, match="mixer='rnn'"):
        LayerSpec("rnn", AttentionConfig())
    with pytest.raises(ConfigError, match="a 'mla' layer needs a MLAConfig, got AttentionConfig"):
        LayerSpec("mla", AttentionConfig())


@pytest.mark.parametrize("backend", ["cpu", "tpu"], ids=["cache", "tpu_cache"])
@pytest.mark.parametrize("name", sorted(kinds()))
def test_every_mixer_has_one_interface_and_its_cache_continues_the_full_pass(name, backend, rng):
    """Constructor ``(config, dtype, param_dtype, impl)``, call ``(x, slots, cache) -> (y, cache)``,
    ``init_cache(config, batch, max_len, dtype)``: prefill 6 tokens, then 4 one at a time = the full pass; also
    with the cache allocated as for a TPU (KV heads-major and keys last, the head dim being no multiple of 128; the
    MLA latent 128 columns wide)."""
    from zebrax.ops.auto import compiling_for

    spec = next(s for s in (*MIXED.plan(), *WITH_GDN.plan()) if s.mixer == name)
    module = kinds()[name].module(spec.config, "float32", "float32", "reference")
    x = jnp.asarray(rng.normal(size=(2, 10, 48)), jnp.float32)
    with compiling_for(backend):
        cache = Cache.init(2, 12, (kinds()[name].module.init_cache(spec.config, 2, 12, jnp.float32),))
    if name == "attention":
        g, d = spec.config.n_kv_heads, spec.config.head_dim
        assert cache.layers[0].k.shape == ((2, g, d, 12) if backend == "tpu" else (2, 12, g, d))
    slots = Slots.without_cache(jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), bool))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, slots, None))["params"]
    apply = jax.jit(lambda *a: module.apply({"params": params}, *a))
    full, none = apply(x, slots, None)
    assert none is None
    prefill = cache.slots(slots.positions[:, :6], jnp.ones((2, 6), bool))
    y, layer = apply(x[:, :6], prefill, cache.layers[0])
    np.testing.assert_allclose(y, full[:, :6], rtol=0, atol=ATOL)
    cache = cache.advance(prefill, (layer,), 6)
    for i in range(6, 10):
        step = cache.slots(jnp.full((2, 1), i), jnp.ones((2, 1), bool))
        y, layer = apply(x[:, i:i + 1], step, cache.layers[0])
        np.testing.assert_allclose(y[:, 0], full[:, i], rtol=0, atol=ATOL)
        cache = cache.advance(step, (layer,), 1)


@pytest.mark.parametrize("config", [MIXED, hybrid("all"), hybrid("none"), WITH_GDN,
                                    hybrid([0, 3], layer_ranks={3: {"kv_lora_rank": 8, "q_lora_rank": 16}})],
                         ids=["mixed", "all_mla", "all_mamba2", "with_gdn", "mla_ranks_per_layer"])
@pytest.mark.parametrize("pad", [0, 3])
def test_hybrid_prefill_then_decode_equals_the_full_pass(config, pad, rng):
    model = random_model(config)
    tokens = rng.integers(0, 97, (2, 17)).astype(np.int32)
    full = model.logits(tokens)
    assert full.std() > 0.3
    gen = Generator(model.module)
    prompt = np.concatenate([np.zeros((2, pad), np.int32), tokens[:, :9]], axis=1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones((2, 9), bool)], axis=1)
    logits, cache = gen.prefill(model.params, prompt, mask, max_len=pad + 17)
    kinds = {type(c) for c in cache.layers}
    assert kinds == {{"mla": LatentCache, "mamba2": SSMCache, "gdn": SSMCache, "attention": KVCache}[m]
                     for m in config.mixers}
    atol = ATOL * np.abs(full).max()
    np.testing.assert_allclose(logits, full[:, 8], rtol=0, atol=atol)
    step = gen.decode_step
    for i in range(9, 17):
        logits, cache = step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=atol)


def _left_padded(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = np.zeros((len(prompts), length), np.int32), np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):], mask[i, length - len(p):] = p, True
    return tokens, mask


@pytest.mark.parametrize("config", [TEACHER, MIXED, WITH_GDN], ids=["teacher", "mixed", "with_gdn"])
@pytest.mark.parametrize("chunk", [3, 8])
def test_chunked_prefill_gives_the_logits_and_caches_of_one_prefill(config, chunk, rng):
    """Left-padded rows of 22, 5 and 13 tokens in 24 slots, prefilled ``chunk`` tokens at a time (the short row's
    padding fills whole chunks; 3 is no multiple of the linear layers' chunks of 4): the last logits and every
    layer's cache (GQA keys and values, MLA latents, Mamba2 and GDN conv and SSM states) of one prefill, and decoding
    on from it gives each prompt's full forward pass alone."""
    model = random_model(config)
    prompts = [rng.integers(4, 97, n).tolist() for n in (22, 5, 13)]
    tokens, mask = _left_padded(prompts, 24)
    gen = Generator(model.module)
    one, one_cache = gen.prefill(model.params, tokens, mask, max_len=32)
    logits, cache = gen.prefill_chunked(model.params, tokens, mask, max_len=32, chunk=chunk)
    scale = np.abs(one).max()
    np.testing.assert_allclose(logits, one, rtol=0, atol=ATOL * scale)
    assert int(cache.index) == 24 and np.array_equal(cache.kv_mask, one_cache.kv_mask)
    for i, (got, want) in enumerate(zip(cache.layers, one_cache.layers, strict=True)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL * max(1.0, np.abs(b).max()), err_msg=f"layer {i}")
    nexts = rng.integers(4, 97, (3, 4)).astype(np.int32)
    for step in range(4):
        for r, p in enumerate(prompts):
            full = model.logits(np.asarray([p + nexts[r, :step].tolist()], np.int32))[0, -1]
            np.testing.assert_allclose(logits[r], full, rtol=0, atol=ATOL * scale)
        logits, cache = gen.decode_step(model.params, cache, jnp.asarray(nexts[:, step]))


def test_chunked_prefill_of_each_document_gives_the_packed_rows_logits(rng):
    """Documents of 6, 11 and 7 tokens packed into one row (``segment_ids``): each prefilled alone, 4 tokens at a
    time in a left-padded batch, ends on the logits the packed forward pass gives its last token."""
    model = random_model(MIXED)
    docs = [rng.integers(4, 97, n).tolist() for n in (6, 11, 7)]
    segments = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(docs)])[None]
    packed = np.asarray(model.module.apply({"params": model.params}, np.concatenate(docs)[None].astype(np.int32),
                                           segment_ids=segments)[0])[0]
    ends = np.cumsum([len(d) for d in docs]) - 1
    tokens, mask = _left_padded(docs, 12)
    logits, _ = Generator(model.module).prefill_chunked(model.params, tokens, mask, max_len=16, chunk=4)
    np.testing.assert_allclose(logits, packed[ends], rtol=0, atol=ATOL * np.abs(packed).max())


def test_generate_prefills_long_prompts_in_chunks(rng):
    """Past ``prefill_chunk`` tokens ``generate`` prefills in chunks: the same tokens as at once, two prefill
    programs whatever the prompt's length, and a chunk of 0 is refused in one line."""
    model = random_model(MIXED)
    prompts = [rng.integers(4, 97, n).tolist() for n in (19, 9)]
    at_once = model.generate(prompts, max_new_tokens=6, ignore_eos=True, prefill_chunk=None)
    assert model.generate(prompts, max_new_tokens=6, ignore_eos=True, prefill_chunk=4) == at_once
    gen = model.generator
    assert gen.extend._cache_size() == 1
    model.generate([p[:13] for p in prompts], max_new_tokens=6, ignore_eos=True, prefill_chunk=4)
    assert gen.extend._cache_size() == 1
    for bad in (0, -4, 2.5):
        with pytest.raises(InvalidArgument, match=f"prefill_chunk={bad!r} must be an integer >= 1"):
            model.generate(prompts, max_new_tokens=2, prefill_chunk=bad)
    with pytest.raises(InvalidArgument, match="chunk=5 does not divide the 12 tokens"):
        Generator(model.module).prefill_chunked(model.params, *_left_padded(prompts[1:], 12), max_len=16, chunk=5)


def test_hybrid_left_padded_batches_equal_one_prompt_at_a_time(rng):
    model = random_model(MIXED)
    prompts = [rng.integers(4, 97, n).tolist() for n in (3, 12, 7)]
    batched = model.generate(prompts, max_new_tokens=8, ignore_eos=True)
    for prompt, out in zip(prompts, batched, strict=True):
        assert out == model.generate([prompt], max_new_tokens=8, ignore_eos=True)[0]


def test_cache_bytes_of_a_hybrid_follow_the_formula():
    """n_mla·(r_kv + d_rope) + n_attention·2·n_kv·head_dim values per token; Mamba2 layers keep constant state."""
    for config in (MIXED, hybrid("all"), hybrid("none"), hybrid([1], attention_layers=[0, 4])):
        model = zebrax.Model(config, None)
        n_mla, n_attn = len(config.layers_of("mla")), len(config.layers_of("attention"))
        assert model.cache_bytes_per_token() == 4 * (n_mla * (12 + 8) + n_attn * 2 * 2 * 16)
        m = config.mamba2
        state = len(config.layers_of("mamba2")) * 4 * (m.conv_dim * 3 + m.n_heads * m.head_dim * m.d_state)
        assert model.cache_state_bytes() == state


def test_an_all_attention_plan_reproduces_the_teacher_bit_for_bit(tiny_llama, rng):
    teacher = zebrax.load(tiny_llama("gqa_llama3_untied")[2])
    config = from_teacher(teacher.config, mla_layers="none",
                                       attention_layers=list(range(teacher.config.num_hidden_layers)),
                                       kv_lora_rank=12, q_lora_rank=24, qk_rope_head_dim=4)
    as_hybrid = zebrax.Model(config, teacher.params)
    tokens = rng.integers(0, teacher.config.vocab_size, (2, 19))
    np.testing.assert_array_equal(as_hybrid.logits(tokens), teacher.logits(tokens))
    np.testing.assert_array_equal(as_hybrid.generate(tokens, max_new_tokens=6, ignore_eos=True),
                                  teacher.generate(tokens, max_new_tokens=6, ignore_eos=True))


def test_blocks_sow_what_layerwise_distillation_needs_only_when_asked(rng):
    model = random_model(MIXED)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 7)), jnp.int32)
    sown = jax.jit(lambda t: model.module.apply({"params": model.params}, t, mutable=["intermediates"]))
    logits, state = sown(tokens)
    inter = state["intermediates"]
    assert sorted(inter) == [f"layers_{i}" for i in range(5)]
    for i in range(5):
        layer = {k: v[0] for k, v in inter[f"layers_{i}"].items()}
        assert set(layer) == {"block_input", "mixer_output", "block_output"}
        assert layer["block_input"].shape == layer["mixer_output"].shape == (2, 7, 48)
        if i < 4:
            np.testing.assert_array_equal(layer["block_output"], inter[f"layers_{i + 1}"]["block_input"][0])
    full = model.logits(np.asarray(tokens))  # another program: other fusions
    np.testing.assert_allclose(logits[0], full, rtol=0, atol=ATOL * np.abs(full).max())
    plain = jax.jit(lambda t: model.module.apply({"params": model.params}, t))(tokens)
    assert isinstance(plain, tuple) and plain[1] is None  # nothing sown unless the collection is mutable


def test_each_op_gets_its_own_implementation():
    assert build(MIXED, {"attention": "reference", "ssd": "chunked"}).impls.ssd == "chunked"
    assert build(MIXED, "reference").impls.attention == "reference"
    with pytest.raises(InvalidArgument, match="impl='chunked' is not one of .* for the attention op"):
        build(MIXED, "chunked")  # a name of the SSD op handed to every op
    with pytest.raises(InvalidArgument, match="impl='flash' is not one of .* for the ssd op"):
        build(MIXED, {"ssd": "flash"})
    with pytest.raises(InvalidArgument, match="expected a name or a mapping"):
        build(MIXED, {"conv": "pallas"})
    assert build(hybrid("none"), "chunked").impls.ssd == "chunked"  # all-Mamba2 runs no attention


def test_positions_default_to_those_the_cache_implies(rng):
    """Without ``positions``, tokens appended to a cache continue its positions: chunked prefill equals the full
    pass (RoPE for the attention and MLA layers), with left padding in the first chunk."""
    model = random_model(MIXED)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 12)), jnp.int32)
    full = model.logits(np.asarray(tokens))
    apply = jax.jit(lambda *a, **k: model.module.apply({"params": model.params}, *a, **k))
    cache = model.module.init_cache(model.config, 2, 16)
    padded = jnp.concatenate([jnp.zeros((2, 2), jnp.int32), tokens[:, :5]], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, 2), bool), jnp.ones((2, 5), bool)], axis=1)
    first, cache = apply(padded, token_mask=mask, cache=cache)
    cache0 = cache
    second, cache = apply(tokens[:, 5:], cache=cache)
    atol = ATOL * np.abs(full).max()
    np.testing.assert_allclose(first[:, 2:], full[:, :5], rtol=0, atol=atol)
    np.testing.assert_allclose(second, full[:, 5:], rtol=0, atol=atol)
    rotated_from_zero, _ = apply(tokens[:, 5:], positions=jnp.broadcast_to(jnp.arange(7), (2, 7)), cache=cache0)
    assert np.abs(np.asarray(rotated_from_zero) - full[:, 5:]).max() > 100 * atol  # what the default avoids


def test_writing_past_the_cache_is_an_error():
    model = random_model(MIXED)
    cache = model.module.init_cache(model.config, 1, 8)
    apply = lambda t, c: model.module.apply({"params": model.params}, t, cache=c)  # noqa: E731
    _, cache = jax.jit(apply)(jnp.ones((1, 6), jnp.int32), cache)
    with pytest.raises(InvalidArgument, match="writing 3 tokens at slot 6 runs past its 8 slots"):
        apply(jnp.ones((1, 3), jnp.int32), cache)  # eagerly
    with pytest.raises(Exception, match="writing 3 tokens at slot 6 runs past its 8 slots"):
        jax.block_until_ready(jax.jit(apply)(jnp.ones((1, 3), jnp.int32), cache))
    logits, cache = jax.jit(apply)(jnp.ones((1, 2), jnp.int32), cache)  # exactly full is fine
    assert int(cache.index) == 8 and bool(jnp.all(jnp.isfinite(logits)))


# -- presets --------------------------------------------------------------------------------------
RELEASED = {  # name -> (parameters in the paper, KV cache vs the base model in %)
    "zebra-llama-1b-8mla-8m2": (1.27e9, 7.81), "zebra-llama-1b-4mla-12m2": (1.28e9, 3.91),
    "zebra-llama-3b-14mla-14m2": (3.27e9, 4.69), "zebra-llama-3b-6mla-22m2": (3.39e9, 2.01),
    "zebra-llama-8b-16mla-16m2": (8.19e9, 5.47), "zebra-llama-8b-8mla-24m2": (8.38e9, 2.73),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_presets_have_the_papers_sizes_and_cache_ratios(name):
    from zebrax import describe
    from zebrax.app.presets import preset_config

    params, kv_percent = RELEASED[name]
    info = describe(name)
    config = preset_config(name)
    assert abs(info["params"] / params - 1) < 0.015 and info["params"] == param_count(config)
    a = config.attention
    exact = len(config.layers_of("mla")) * (config.mla.kv_lora_rank + config.mla.qk_rope_head_dim) / (
        config.num_hidden_layers * 2 * a.n_kv_heads * a.head_dim)
    assert info["kv_cache_ratio"] == exact and round(100 * exact, 2) == kv_percent
    assert len(info["layers"]) == config.num_hidden_layers and info["layer_map"][0] == "L"


def test_the_released_mla_lists_are_the_presets():
    from zebrax.app.presets import preset_config

    assert preset_config("zebra-llama-1b-4mla-12m2").layers_of("mla") == (0, 5, 10, 14)
    assert preset_config("zebra-llama-3b-6mla-22m2").layers_of("mla") == (0, 5, 10, 16, 21, 26)
    assert preset_config("zebra-llama-8b-8mla-24m2").layers_of("mla") == (0, 4, 8, 12, 16, 20, 25, 30)


def test_info_json_on_a_hybrid_preset(capsys):
    import json

    from zebrax.app.cli import main

    assert main(["info", "zebra-smollm2-135m-6mla-24m2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer_map"] == "LSSSSSLSSSSLSSSSSLSSSSLSSSSSLS" and info["kv_cache_ratio"] == 6 * 96 / (30 * 384)
    assert isinstance(info["params"], int) and info["layers"].count("mla") == 6
    assert main(["info", "zebra-smollm2-135m-6mla-24m2"]) == 0
    assert "LSSSSSLSSSSLSSSSSLSSSSLSSSSSLS  (L MLA, S Mamba2)" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mla_layers=[0, 5]), "mla_layers holds 5; the teacher's layers are 0..4"),
    (dict(mla_layers=[1], attention_layers=[1]), "layers [1] are in both"),
    (dict(mla_layers="some"), "mla_layers='some'"),
    (dict(mla_layers="all", kv_lora_rank=65), "kv_lora_rank=65 must be in 1..48"),
    (dict(mla_layers="all", q_lora_rank=100), "q_lora_rank=100 must be in 1..48"),
    (dict(mla_layers="all", qk_rope_head_dim=16), "qk_rope_head_dim=16: MLA's RoPE pairs would rotate at other "
                                                  "frequencies than the teacher pairs they are taken from; for "
                                                  "head_dim=16 it must be one of [2, 4, 8]"),
])
def test_bad_hybrid_requests_fail_in_one_clear_line(kwargs, needle):
    kwargs = {"kv_lora_rank": 12, "q_lora_rank": 24, **kwargs}
    with pytest.raises(ConfigError) as e:
        from_teacher(TEACHER, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must be a Llama-shaped model"):
        from_teacher(MIXED)


def test_a_hybrid_checkpoint_round_trips(tmp_path, rng):
    from zebrax import checkpoint

    model = random_model(MIXED)
    with checkpoint.atomic_directory(tmp_path / "ckpt") as tmp:
        checkpoint.save(tmp, model.config, model.params)
    loaded = zebrax.load(tmp_path / "ckpt")
    assert loaded.config == MIXED
    tokens = rng.integers(0, 97, (1, 9))
    np.testing.assert_array_equal(loaded.logits(tokens), model.logits(tokens))


@pytest.mark.parametrize("tied", [False, True], ids=["lm_head", "tied"])
def test_under_bf16_compute_the_lm_head_accumulates_in_float32(tied):
    """bf16 operands, float32 products: the head's dot in the lowered program returns f32 from bf16 inputs (no bf16
    logits rounded up afterwards), and its logits equal a float32-accumulated product of the bf16 operands."""
    from zebrax.layers.norms import RMSNorm
    from zebrax.models.decoder import LMHead

    config = TEACHER.replace(dtype="bfloat16", tie_word_embeddings=tied)
    model = random_model(config)
    hidden = jax.random.normal(jax.random.key(1), (1, 4, config.hidden_size), jnp.bfloat16)
    head = LMHead(config)
    text = jax.jit(lambda p, h: head.apply({"params": p}, h)).lower(model.params, hidden).as_text()
    assert re.search(r"dot_general.*tensor<[^>]*bf16>, tensor<[^>]*bf16>\) -> tensor<[^>]*f32>", text), text
    logits = head.apply({"params": model.params}, hidden)
    normed = RMSNorm(config.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype).apply(
        {"params": model.params["norm"]}, hidden)
    weight = model.params["embed_tokens"]["embedding"].T if tied else model.params["lm_head"]["kernel"]
    expected = jnp.matmul(normed.astype(jnp.bfloat16), weight.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)

"""The blocked XLA attention (``impl="blocked"``, the default off the measured Pallas kernels) against the
materialised reference: outputs fp32 within 1e-5, gradients within 1e-4 (relative to each array's largest
magnitude). Small blocks make every case cross several query and key blocks, ragged tails and the causal edge.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from kernels_pallas.flash_attention import attention_reference
from kernels_pallas.mla_decode import latent_attention_reference
from tests.helpers import assert_gradients_match, close, compiled
from zebrax.ops import attention, latent_attention, latent_prefill_attention
from zebrax.ops.attention_blocked import Blocks, attention_blocked
from zebrax.ops.auto import auto_choices, pallas_is_default

# (batch, q len, k len, heads, kv heads, qk dim, v dim, q_offset, left padding of batch row 0)
CASES = {
    "prefill_ragged_gqa": (2, 37, 37, 6, 2, 12, 10, 0, 5),
    "mqa": (2, 29, 29, 8, 1, 16, 16, 0, 0),
    "mha_left_padded": (3, 24, 24, 4, 4, 8, 8, 0, 9),
    "decode_step": (2, 1, 40, 6, 3, 16, 16, 31, 4),
    "chunk_over_filled_cache": (1, 9, 40, 4, 2, 16, 12, 23, 0),
}
SMALL = Blocks(block_q=8, block_k=16)


def inputs(case, dtype=jnp.float32, seed=0):
    b, lq, lk, h, g, d, dv, offset, left = CASES[case]
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    mask = jnp.asarray(rng.random((b, lk)) > 0.1)
    if offset:  # a cache: slots past the new tokens are empty
        mask = mask & (jnp.arange(lk) < offset + lq)
    mask = mask.at[0, :left].set(False)
    return dict(q=arr(b, lq, h, d), k=arr(b, lk, g, d), v=arr(b, lk, g, dv), kv_mask=mask, q_offset=offset)


@pytest.mark.parametrize("blocks", [SMALL, Blocks()], ids=["small_blocks", "default_blocks"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_equals_reference(case, blocks):
    args = inputs(case)
    close(compiled(attention_blocked, **args, blocks=blocks), compiled(attention_reference, **args), 1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_gradients_equal_reference(case):
    assert_gradients_match(attention_blocked, inputs(case), 1e-4, blocks=SMALL)


def test_traced_offset_and_masking_rules():
    """The offset may be traced (a decode loop); a query that sees no key outputs exactly zero."""
    args = inputs("mha_left_padded")
    step = jax.jit(lambda q, k, v, m, o: attention_blocked(q, k, v, kv_mask=m, q_offset=o, blocks=SMALL))
    out = step(args["q"], args["k"], args["v"], args["kv_mask"], jnp.int32(0))
    close(out, compiled(attention_reference, **args), 1e-5)
    assert float(jnp.abs(out[0, :9]).max()) == 0.0 and float(jnp.abs(out[0, 9:]).max()) > 0


def test_bfloat16_inputs():
    args = inputs("prefill_ragged_gqa", jnp.bfloat16)
    got = compiled(attention_blocked, **args, blocks=SMALL)
    assert got.dtype == jnp.bfloat16
    close(got, compiled(attention_reference, **args), 2e-2)


def test_latent_attention_blocked_with_gradients():
    """MLA's latent: one KV head whose value is the key's first ``value_dim`` entries."""
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 3, 4, 24)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(2, 40, 24)), jnp.float32)
    kw = dict(value_dim=16, kv_mask=jnp.ones((2, 40), bool).at[1, :3].set(False), q_offset=30, scale=0.2)
    close(compiled(latent_attention, q, latent, **kw, impl="blocked"),
          compiled(latent_attention_reference, q, latent, **kw), 1e-5)
    ct = jnp.asarray(rng.normal(size=(2, 3, 4, 16)), jnp.float32)
    grads = lambda f: jax.jit(jax.grad(lambda q, lat: jnp.sum(f(q, lat, **kw) * ct), argnums=(0, 1)))(q, latent)  # noqa: E731
    blocked = lambda q, lat, **kw: latent_attention(q, lat, **kw, impl="blocked")  # noqa: E731
    for got, want in zip(grads(blocked), grads(latent_attention_reference), strict=True):
        close(got, want, 1e-4)


@pytest.mark.parametrize("packed", [False, True], ids=["left_padded", "packed"])
def test_latent_cache_decompressed_a_block_at_a_time(packed):
    """MLA's prefill chunk over its latent cache: keys and values decompressed one key block at a time inside the
    loop equal decompressing the whole cache first (fp32, 1e-5), and no ``[B, S, G, D]`` array is ever made."""
    rng = np.random.default_rng(3)
    b, lq, s, h, g, r, rope, nope, dv, offset = 2, 9, 40, 6, 2, 12, 4, 8, 10, 23
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    latent, w_kvb, q = arr(b, s, r + rope + 3), arr(r, g, nope + dv), arr(b, lq, h, nope + rope)

    def expand(lat):
        k_nope, v = jnp.split(jnp.einsum("bsc,cgd->bsgd", lat[..., :r], w_kvb), [nope], axis=-1)
        return jnp.concatenate([k_nope, jnp.broadcast_to(lat[:, :, None, r:r + rope], (*k_nope.shape[:3], rope))],
                               -1), v

    mask = jnp.asarray(rng.random((b, s)) > 0.1) & (jnp.arange(s) < offset + lq)
    kw = dict(kv_mask=mask.at[0, :3].set(False), q_offset=offset, scale=0.3,
              segment_ids=jnp.asarray(np.repeat([[1] * 14 + [2] * 12 + [3] * 14], b, 0)) if packed else None)
    want = compiled(lambda q, lat: attention_reference(q, *expand(lat), **kw), q, latent)
    blocked = lambda q, lat: attention_blocked(q, lat[:, :, None], None, expand=lambda x: expand(x[:, :, 0]),  # noqa: E731
                                               blocks=SMALL, **kw)
    close(compiled(blocked, q, latent), want, 1e-5)
    close(compiled(lambda q, lat: latent_prefill_attention(q, lat, expand, **kw, impl="blocked"), q, latent), want,
          1e-5)
    whole = [f"[{b},{n},{g},{nope + rope}]" for n in (s, 48)]  # 48: the cache padded to whole key blocks
    assert any(x in str(jax.make_jaxpr(lambda q, lat: attention_reference(q, *expand(lat), **kw))(q, latent))
               for x in whole)
    assert not any(x in str(jax.make_jaxpr(blocked)(q, latent)) for x in whole)


def test_auto_takes_no_unmeasured_kernel():
    """No Pallas kernel has been measured faster on any backend here, so ``auto`` is the XLA path everywhere."""
    for backend in ("cpu", "gpu", "tpu"):
        assert auto_choices(backend) == {"attention": "blocked", "latent_attention": "blocked", "ssd": "chunked"}
        assert not pallas_is_default("flash_attention", backend)
    args = inputs("prefill_ragged_gqa")
    np.testing.assert_array_equal(compiled(attention, **args), compiled(attention, **args, impl="blocked"))


@pytest.mark.parametrize("fixture, name", [("tiny_llama", "gqa_llama3_untied"), ("tiny_deepseek", "q_lora_yarn")])
def test_models_give_the_same_logits_and_tokens_on_every_attention_path(request, fixture, name, rng):
    ckpt = request.getfixturevalue(fixture)(name)[2]
    reference, blocked = zebrax.load(ckpt, impl="reference"), zebrax.load(ckpt, impl="blocked")
    tokens = rng.integers(4, reference.config.vocab_size, (2, 21))
    close(blocked.logits(tokens), reference.logits(tokens), 1e-5)
    prompts = [list(tokens[0, :7]), list(tokens[1, :3])]  # ragged: the second prompt is left-padded
    generate = lambda m: [list(map(int, row)) for row in m.generate(prompts, max_new_tokens=6, ignore_eos=True)]  # noqa: E731
    assert generate(blocked) == generate(reference)

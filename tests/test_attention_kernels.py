"""Attention kernels (Pallas, interpret mode on the CPU) against their references.

fp32 tolerance 1e-4 relative to each array's largest magnitude, for outputs and (flash) gradients; bf16
inputs 2e-2 against the reference on the same bf16 inputs. Both kernel forms run: the loop form (Triton's,
the CPU default) and the grid form (Mosaic's: ``backend="tpu", interpret=True``). Shapes exercise ragged
tails (lengths not multiples of the blocks, masked in the forward, never padded), the causal edge (query offsets
that cut through a block), grouped KV heads (stacked as rows), qk head dim != v head dim, both TPU layouts of k and v
(heads-major for a head dim of 128, keys-last otherwise) and fully masked queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from kernels_pallas.flash_attention import BlockSizes, KVLayout, attention_reference, flash_attention
from kernels_pallas.mla_decode import BlockSizes as DecodeBlocks
from kernels_pallas.mla_decode import latent_attention_reference, mla_decode
from tests.helpers import assert_gradients_match, close, compiled
from zebrax.errors import InvalidArgument
from zebrax.ops import attention

# (batch, q len, k len, heads, kv heads, qk dim, v dim, q_offset)
FLASH_CASES = {
    "prefill_ragged": (2, 37, 37, 6, 2, 12, 10, 0),
    "chunk_after_cache": (1, 9, 40, 4, 4, 16, 16, 23),  # 9 new queries at slots 23…31 of a 40-slot cache
    "mqa_one_query": (2, 1, 33, 8, 1, 24, 8, 32),
    "three_key_tiles": (1, 44, 300, 4, 2, 16, 8, 256),  # 44 queries after 256 cached slots: 3 tiles of 128 keys
    "lane_wide_keys": (1, 20, 150, 4, 2, 128, 64, 10),  # TPU form: k heads-major [B, G, Lk, 128], v [B, G, 64, Lk]
}


def flash_inputs(case, dtype=jnp.float32, seed=0):
    b, lq, lk, h, g, d, dv, offset = FLASH_CASES[case]
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    mask = jnp.asarray(rng.random((b, lk)) > 0.15).at[:, :2].set(False)  # queries at slots 0, 1 see nothing
    return dict(q=arr(b, lq, h, d), k=arr(b, lk, g, d), v=arr(b, lk, g, dv), kv_mask=mask, q_offset=offset)


# the loop form (Triton's; the CPU default) and the grid form (Mosaic's), at TPU tiles, interpreted
FORMS = {"loop": {}, "grid": dict(backend="tpu", interpret=True, block_sizes=BlockSizes(8, 128))}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("case", sorted(FLASH_CASES))
def test_flash_forward_equals_reference(case, form):
    args = flash_inputs(case)
    close(compiled(flash_attention, **args, **FORMS[form]), compiled(attention_reference, **args), 1e-4)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("case", sorted(FLASH_CASES))
def test_flash_gradients_equal_reference(case, form):
    assert_gradients_match(flash_attention, flash_inputs(case), 1e-4, **FORMS[form])


def test_flash_blocks_do_not_change_the_result():
    args = flash_inputs("prefill_ragged")
    small = compiled(flash_attention, **args, block_sizes=BlockSizes(16, 16))
    close(compiled(flash_attention, **args, block_sizes=BlockSizes(32, 16)), small, 1e-5)
    close(compiled(flash_attention, **args, block_sizes=BlockSizes(16, 64)), small, 1e-5)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_flash_bfloat16(form):
    """bf16 operands go into the products as they are (float32 accumulation): outputs 2e-2, gradients 3e-2."""
    args = flash_inputs("prefill_ragged", jnp.bfloat16)
    got = compiled(flash_attention, **args, **FORMS[form])
    assert got.dtype == jnp.bfloat16
    close(got, compiled(attention_reference, **args), 2e-2)
    assert_gradients_match(flash_attention, args, 3e-2, **FORMS[form])


def test_fully_masked_queries_output_zeros():
    args = flash_inputs("prefill_ragged")
    out = compiled(flash_attention, **args)
    assert float(jnp.abs(out[:, :2]).max()) == 0.0 and float(jnp.abs(out[:, 2:]).max()) > 0


# (batch, new tokens, heads, kv_lora_rank, rope dim, cache length, slot of the first new token)
DECODE_CASES = {"zebra_8b_like": (2, 1, 32, 160, 64, 300, 299), "speculative_3": (1, 3, 4, 20, 8, 130, 100),
                "tiny": (2, 1, 6, 20, 8, 75, 60)}


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
@pytest.mark.parametrize("blocks", [None, DecodeBlocks(16, 1), DecodeBlocks(32, 3)], ids=["default", "one", "three"])
def test_mla_decode_equals_reference(case, blocks):
    b, lq, h, r, rope, s, offset = DECODE_CASES[case]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, lq, h, r + rope)), jnp.float32)
    latent = jnp.asarray(rng.normal(size=(b, s, r + rope)), jnp.float32)
    mask = jnp.broadcast_to((jnp.arange(s) < offset + lq) & (jnp.arange(s) >= 2), (b, s))
    kw = dict(value_dim=r, kv_mask=mask, q_offset=offset, scale=(r + rope) ** -0.5)
    want = compiled(latent_attention_reference, q, latent, **kw)
    close(compiled(mla_decode, q, latent, **kw, block_sizes=blocks), want, 1e-4)


@pytest.mark.parametrize("case", ["zebra_8b_like", "speculative_3"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_mla_decode_tpu_form_equals_reference(case, dtype):
    """The grid form over cache tiles of 128, with two ranges; fp32 1e-4, bf16 2e-2."""
    b, lq, h, r, rope, s, offset = DECODE_CASES[case]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, lq, h, r + rope)), dtype)
    latent = jnp.asarray(rng.normal(size=(b, s, r + rope)), dtype)
    kw = dict(value_dim=r, kv_mask=jnp.ones((b, s), bool).at[:, :2].set(False), q_offset=offset,
              scale=(r + rope) ** -0.5)
    got = compiled(mla_decode, q, latent, **kw, block_sizes=DecodeBlocks(128, 2), backend="tpu", interpret=True)
    assert got.dtype == dtype
    close(got, compiled(latent_attention_reference, q, latent, **kw), 1e-4 if dtype == jnp.float32 else 2e-2)


def test_block_sizes_are_legal_by_construction():
    for backend in ("gpu", "tpu", "cpu"):
        BlockSizes.for_backend(backend).validate(backend)
        DecodeBlocks.for_backend(backend).validate(backend)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(48, 64).validate("gpu")
    with pytest.raises(ValueError, match="multiple of 128"):
        BlockSizes(128, 64).validate("tpu")
    with pytest.raises(ValueError, match="multiple of 128"):
        DecodeBlocks(64).validate("tpu")
    assert DecodeBlocks(64).splits(32768) == 16 and DecodeBlocks(64).splits(100) == 1


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_kernels_lower_for_gpu_and_tpu(platform, backend, dtype):
    """Cross-platform lowering on this CPU runs the Pallas Triton (GPU) and Mosaic (TPU) lowerings of the flash
    forward, both flash backward kernels and the decode kernel (interpret mode checks none of their rules)."""
    q, k, v = jnp.zeros((1, 200, 6, 96), dtype), jnp.zeros((1, 300, 2, 96), dtype), jnp.zeros((1, 300, 2, 64), dtype)

    def loss(q, k, v, offset):
        return flash_attention(q, k, v, q_offset=offset, backend=backend).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v, jnp.int32(5)).lower(
        lowering_platforms=(platform,)).as_text()
    assert all(name in text for name in ("flash_attention_forward", "flash_attention_dkv", "flash_attention_dq"))

    def decode(q, latent, offset):
        return mla_decode(q, latent, value_dim=160, q_offset=offset, scale=0.1, backend=backend)

    text = jax.jit(decode).trace(jnp.zeros((1, 1, 32, 224), dtype), jnp.zeros((1, 4096, 224), dtype),
                                 jnp.int32(9)).lower(lowering_platforms=(platform,)).as_text()
    assert "mla_decode" in text


@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_the_decode_kernels_take_the_cache_as_it_is_stored(platform, backend):
    """A decode step over a ragged cache (4,000 slots, bf16) lowered for a GPU and a TPU: the kernels get the cache
    arrays themselves, never a padded, transposed or converted copy (the GPU form reads power-of-two pieces and masks
    the tail). MLA: a latent 160 + 64 wide; flash attention: 2 KV heads of 64 laid out in the ``KVLayout`` a
    ``KVCache`` carries, which the kernel reads back in its own order, the two transposes one no-op (the compiled
    traffic checks are in ``test_aot``)."""

    def copies(text, shape, ops=("stablehlo.pad", "stablehlo.convert", "stablehlo.concatenate")):
        return [line for line in text.splitlines() if f"tensor<{shape}xbf16>" in line.split("->")[0]
                and any(op in line for op in ops)]

    latent = jnp.zeros((1, 4000, 224), jnp.bfloat16)
    text = jax.jit(lambda q, c, o: mla_decode(q, c, value_dim=160, q_offset=o, scale=0.1, backend=backend)).trace(
        jnp.zeros((1, 1, 32, 224), jnp.bfloat16), latent, jnp.int32(3999)).lower(
        lowering_platforms=(platform,)).as_text()
    assert "mla_decode" in text and not copies(text, "1x4000x224"), copies(text, "1x4000x224")

    layout = KVLayout.for_head_dim(64, backend)
    stored = jnp.zeros(tuple((1, 4000, 2, 64)[a] for a in layout.axes), jnp.bfloat16)
    fn = lambda q, k, v, o: flash_attention(q, layout.logical(k), layout.logical(v), q_offset=o,  # noqa: E731
                                            backend=backend)  # KVCache.keys() and .values()
    text = jax.jit(fn).trace(jnp.zeros((1, 1, 8, 64), jnp.bfloat16), stored, stored, jnp.int32(3999)).lower(
        lowering_platforms=(platform,)).as_text()
    shape = "x".join(map(str, stored.shape))
    assert "flash_attention_forward" in text and not copies(text, shape), copies(text, shape)
    if backend == "gpu":
        assert not copies(text, shape, ("stablehlo.transpose",))


def test_ops_attention_dispatches_and_checks_heads():
    args = flash_inputs("prefill_ragged")
    close(compiled(attention, **args, impl="pallas"), compiled(attention, **args, impl="reference"), 1e-4)
    with pytest.raises(InvalidArgument, match="4 KV heads must divide 6 query heads"):
        attention(args["q"], args["k"][:, :, [0, 1, 0, 1]], args["v"][:, :, [0, 1, 0, 1]])


@pytest.mark.parametrize("fixture, name", [("tiny_llama", "gqa_llama3_untied"), ("tiny_deepseek", "q_lora_yarn")])
def test_models_with_pallas_kernels_generate_what_the_reference_generates(request, fixture, name, rng):
    """The teacher's GQA and MLA prefill through flash attention; MLA decode through the latent kernel."""
    ckpt = request.getfixturevalue(fixture)(name)[2]
    reference, pallas = zebrax.load(ckpt, impl="reference"), zebrax.load(ckpt, impl="pallas")
    tokens = rng.integers(4, reference.config.vocab_size, (2, 21))
    close(pallas.logits(tokens), reference.logits(tokens), 1e-4)
    np.testing.assert_array_equal(pallas.generate(tokens[:, :7], max_new_tokens=6, ignore_eos=True),
                                  reference.generate(tokens[:, :7], max_new_tokens=6, ignore_eos=True))

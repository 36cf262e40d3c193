"""Ahead-of-time compilation for TPU slices (``zebrax.app.aot``, ``zebrax compile``): libtpu's deviceless compiler on
this CPU machine (the ``tpu_compile`` tier: fixture ``tpu_compiler``), and the topology names without it."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TEACHER, hybrid
from zebrax.errors import ConfigError, ZebraxError
from zebrax.ops.auto import compiling_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, expected", [
    ("v5p-16", ("v5p", (2, 2, 2))), ("v5p:2x2x2", ("v5p", (2, 2, 2))), ("v4-8", ("v4", (2, 2, 1))),
    ("v5e-1", ("v5e", (1, 1))), ("v5litepod-16", ("v5e", (4, 4))), ("v6e-256", ("v6e", (16, 16))),
    ("v5p-128", ("v5p", (4, 4, 4))), ("V5P:4x4x8", ("v5p", (4, 4, 8))),
])
def test_topologies_in_both_spellings(name, expected):
    from zebrax.app.tpu import parse_topology

    assert parse_topology(name) == expected


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "no v5p slice of 3 chips"), ("v5p-7", "counts TensorCores, two a chip"),
    ("v7x-8", "expected e.g. v5p-16"), ("v5p:2x2", "a v5p slice has 3 dimensions"), ("v5e-3", "no v5e slice"),
])
def test_bad_topologies_are_named(name, message):
    from zebrax.app.tpu import parse_topology

    with pytest.raises(ConfigError, match=message):
        parse_topology(name)


def _kernel_programs(dtype, length: int, dim: int):
    """(name, function, abstract inputs) of every Pallas kernel, forward and backward, for a TPU."""
    from kernels_pallas.flash_attention import flash_attention
    from kernels_pallas.mla_decode import mla_decode
    from kernels_pallas.ssd import ssd_pallas

    s = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    flash = lambda q, k, v: flash_attention(q, k, v, backend="tpu").astype(jnp.float32).sum()  # noqa: E731
    ssd = lambda x, dt, A, B, C: ssd_pallas(x, dt, A, B, C, chunk_size=256, backend="tpu")[0].astype(  # noqa: E731
        jnp.float32).sum()
    decode = lambda q, c: mla_decode(q, c, value_dim=512, scale=0.1, q_offset=length - 1, backend="tpu")  # noqa: E731
    flash_decode = lambda q, k, v: flash_attention(q, k, v, q_offset=length - 1, backend="tpu")  # noqa: E731
    attention_in = (s(1, length, 8, dim), s(1, length, 2, dim), s(1, length, 2, dim))
    ssd_in = (s(1, length, 8, dim), s(1, length, 8), s(8, dt=jnp.float32), s(1, length, 1, 128), s(1, length, 1, 128))
    return [("flash_attention", flash, attention_in), ("flash_attention_backward", jax.grad(flash, (0, 1, 2)),
                                                       attention_in),
            ("ssd", ssd, ssd_in), ("ssd_backward", jax.grad(ssd, (0, 1, 3, 4)), ssd_in),
            ("mla_decode", decode, (s(4, 1, 16, 576), s(4, length, 576))),
            ("flash_attention_decode", flash_decode, (s(2, 1, 8, dim), s(2, length, 2, dim), s(2, length, 2, dim)))]


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length, dim", [(200, 48), (2048, 128)], ids=["ragged", "production"])
def test_every_pallas_kernel_compiles_with_mosaic(tpu_compiler, topology, dtype, length, dim):
    """Mosaic accepts each kernel's TPU form (block shapes, layouts, every primitive), forward and backward: the
    compiled program holds the kernel as a TPU custom call, not an XLA fallback."""
    device = tpu_compiler.devices(topology)[0]
    placed = jax.sharding.SingleDeviceSharding(device)
    for name, fn, inputs in _kernel_programs(dtype, length, dim):
        inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed) for x in inputs]
        with compiling_for("tpu"):
            text = jax.jit(fn).trace(*inputs).lower().compile().as_text()
        assert "tpu_custom_call" in text, name


@pytest.fixture(scope="module")
def programs(tpu_compiler):
    """The tiny teacher's and hybrid's programs on an 8-chip v5e slice, (data 2, fsdp 4)."""
    student = hybrid([0, 3]).replace(dtype="bfloat16")
    mesh = {"data": 2, "fsdp": 4}
    compile = lambda program, **kw: tpu_compiler.compile(program, topology="v5e-8", mesh=mesh, **kw)  # noqa: E731
    train = dict(teacher=TEACHER, student=student, batch=16, seq_len=64, accumulate=2, remat=True,
                 compute_dtype="bfloat16")
    score = dict(teacher=TEACHER, student=student, batch=16, seq_len=64, compute_dtype="bfloat16")
    return {"kd": compile("kd", **train), "ild": compile("ild", **train), "dpo": compile("dpo", **train),
            "smart": compile("smart", **score), "eval": compile("eval", **score),
            "decode": compile("decode", model=student, batch=8, context=256),
            "prefill": compile("prefill", model=student, batch=8, seq_len=128)}


KEYS = {"fits", "hbm_bytes", "per_chip_bytes", "flops", "bytes_accessed", "seconds", "tokens_per_second", "mfu",
        "collectives", "compile_seconds"}


@pytest.mark.parametrize("program", ["kd", "ild", "dpo", "smart", "eval", "decode", "prefill"])
def test_the_tiny_programs_compile_for_eight_chips_and_fit(programs, program):
    """Each program compiles for v5e-8 and fits its 15.75 GiB; the arguments a chip are the shards of the sharded
    inputs (parameters over fsdp, rows over data × fsdp), counted independently here; FSDP gathers weights."""
    report = programs[program]
    row = json.loads(report.to_json())
    assert KEYS <= set(row) and row["fits"] and row["chips"] == 8 and row["mesh"] == {"data": 2, "fsdp": 4,
                                                                                          "tensor": 1}
    b = row["per_chip_bytes"]
    assert 0 < b["total"] < report.hbm_bytes and b["total"] >= b["temporaries"] > 0
    assert report.hbm_bytes == int(15.75 * 2**30)
    assert row["flops"] > 0 and row["seconds"] > 0 and 0 < row["mfu"] < 1 and row["tokens_per_second"] > 0
    assert row["collectives"].get("all-gather", 0) > 0
    assert "does not fit" not in str(report) and "% left" in str(report)
    assert row["hbm_traffic_bytes"] > 0
    if program == "decode":  # the traffic set against what a decode step must read: its arguments
        assert row["must_read_bytes"] == b["arguments"] and row["read_ratio"] > 0 and "HBM traffic" in str(report)


@pytest.mark.parametrize("program", ["ild", "smart"])
def test_a_gdn_recipe_compiles_for_ild_and_smart(tpu_compiler, program):
    """ILD's and SMART's students of a Gated DeltaNet recipe: from the main job's gin (``distill.linear = 'gdn'``;
    ranks for the tiny teacher; its data, which is not here, is not read) and from a GDN hybrid as ``student`` (its
    own kinds: all-MLA and all-GDN)."""
    from zebrax.app.presets import call_configurable, parse_gin

    gin = parse_gin([ROOT / "configs" / "experiments" / "smollm2_main.gin"],
                    ["distill.student = {'kv_lora_rank': 12, 'q_lora_rank': 24, 'qk_rope_head_dim': 8}"])
    exp = call_configurable(gin, "zebrax.distill")
    assert exp.linear == "gdn"
    for kw in (dict(experiment=exp), dict(student=hybrid([0, 3], linear="gdn"))):
        report = tpu_compiler.compile(program, topology="v5e-8", teacher=TEACHER, batch=8, seq_len=32, **kw)
        assert report.fits and report.flops > 0 and report.settings["students"] == "all-mla + all-gdn"


def test_compile_refuses_what_distill_refuses_and_what_does_not_apply(tpu_compiler):
    """Each in one line, before compiling: rows the mesh cannot split, a hybrid as the teacher, a student of another
    teacher, a setting the program does not take, an implementation that is none, a mesh that leaves chips out."""
    student = hybrid([0, 3])
    train = dict(topology="v5e-8", teacher=TEACHER, student=student, seq_len=64)
    cases = [
        (dict(train, batch=12), "micro-batches of 12 rows .* cannot be split over the mesh's 8 row shards"),
        (dict(train, batch=8, teacher=student), "--teacher must be a Llama .* got a HybridConfig"),
        (dict(train, batch=8, teacher=TEACHER.replace(num_hidden_layers=4)), "--student is not a hybrid of --teacher"),
        (dict(train, batch=8, context=256), "context does not apply to it"),
        (dict(train, batch=8, impl="pallas"), "impl does not apply to it"),
        (dict(topology="v5e-8", model=student, batch=8, context=64, impl="junk"), "impl='junk' is not one of"),
        (dict(topology="v5e-8", model=student, batch=8, context=64, mesh={"data": 2, "fsdp": 1}),
         "--mesh {'data': 2, 'fsdp': 1} uses 2 of the slice's 8 chips"),
        (dict(topology="v5e-8", model=student, batch=6, seq_len=64, mesh={"data": 8}),
         "prefill: micro-batches of 6 rows .* 8 row shards"),
        (dict(topology="v5e-8", model=student, batch=8, seq_len=64, chunk=16), "--seq-len .* or --context with"),
        (dict(topology="v5e-8", model=student, batch=8, context=64, program="prefill"), "or --context with --chunk"),
        (dict(topology="v5e-8", model=student, batch=8, context=64, chunk=24), "--chunk 24 must be .* divides"),
        (dict(topology="v5e-8", model=student, batch=8, context=64, chunk=16, program="decode"),
         "chunk does not apply to it"),
    ]
    for kw, message in cases:
        program = kw.pop("program", None) or ("prefill" if "chunk" in kw or "seq_len" in kw and "model" in kw
                                               else "decode" if "context" in kw and "teacher" not in kw else "kd")
        with pytest.raises(ZebraxError, match=message):
            tpu_compiler.compile(program, **kw)


def test_decode_and_prefill_default_to_a_serving_mesh(tpu_compiler):
    """Rows over data as far as the batch divides the chips, heads over tensor: a decode step then reads about what
    it must (no fsdp axis gathering the weights every step)."""
    report = tpu_compiler.compile("decode", topology="v5p-8", model=hybrid([0, 3]), batch=8, context=512)
    assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and report.read_ratio < 1.5, report
    assert tpu_compiler.serving_mesh(1, 8) == {"data": 1, "fsdp": 1, "tensor": 8}
    assert tpu_compiler.serving_mesh(6, 8) == {"data": 2, "fsdp": 1, "tensor": 4}


def test_an_accumulated_step_counts_every_micro_batch(tpu_compiler, programs):
    """The cost model counts the accumulation loop's body once; the report multiplies by its trips, so the tiny KD
    step at 16 rows has about the same FLOPs and time in two micro-batches as in one (within 15%: the optimizer's
    update is counted twice, and the two programs differ)."""
    student = hybrid([0, 3]).replace(dtype="bfloat16")
    whole = tpu_compiler.compile("kd", topology="v5e-8", mesh={"data": 2, "fsdp": 4}, teacher=TEACHER,
                                 student=student, batch=16, seq_len=64, accumulate=1, remat=True,
                                 compute_dtype="bfloat16")
    assert programs["kd"].settings["accumulate"] == 2
    assert programs["kd"].flops == pytest.approx(whole.flops, rel=0.15)
    assert programs["kd"].seconds == pytest.approx(whole.seconds, rel=0.15)


def test_the_argument_bytes_are_the_shards_of_the_inputs(tpu_compiler):
    """The compiler's argument bytes a chip equal the shard sizes of the inputs, computed from their shardings
    (1%: dimensions in whole (8, 128) tiles, so that the TPU layout pads nothing but the norms' vectors)."""
    from zebrax.app.aot import _params
    from zebrax.config import LlamaConfig
    from zebrax.sharding import MeshConfig, make_mesh

    model = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=128)
    report = tpu_compiler.compile("prefill", topology="v5e-8", mesh={"fsdp": 8}, model=model, batch=8, seq_len=128)
    params = _params(model, make_mesh(MeshConfig(fsdp=8), list(tpu_compiler.devices("v5e-8"))))
    shards = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(params))
    rows = 128 * (4 + 1)  # one row a chip: its tokens (int32) and token mask (bool)
    assert report.per_chip_bytes["arguments"] == pytest.approx(shards + rows, rel=0.01)


def test_a_step_that_does_not_fit_says_by_how_much_and_what_would_help(tpu_compiler, child_process, tmp_path):
    """KD of the tiny hybrid at 4,096 sequences of 1,024 tokens on one v5e chip: refused by the compiler (or
    compiled over its HBM); the command exits 1 with one line, and --json still prints the object."""
    from zebrax import checkpoint
    from zebrax.models import abstract_params

    for name, config in (("teacher", TEACHER), ("student", hybrid([0, 3]))):
        (tmp_path / name).mkdir()
        checkpoint.save(tmp_path / name, config, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                                              abstract_params(config)))
    out = child_process.zebrax("compile", "kd", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student",
                               "--topology", "v5e-1", "--batch", "4096", "--seq-len", "1024", "--json")
    stderr = out.stderr
    assert out.returncode == 1, stderr
    row = json.loads(out.stdout)
    assert row["fits"] is False and row["per_chip_bytes"]["total"] > row["hbm_bytes"]
    assert any("remat" in a for a in row["advice"]) and any("--accumulate 2" in a for a in row["advice"])
    assert stderr.strip().count("\n") == 0 and "kd does not fit v5e-1" in stderr and "GiB of HBM" in stderr


def test_with_libtpu_installed_an_ordinary_command_prints_nothing_from_it(tpu_compiler, child_process):
    """JAX's default platforms (libtpu among them) on this TPU-less machine: no libtpu warning on stderr."""
    out = child_process.zebrax("info", "smollm2_135m", env={"JAX_PLATFORMS": ""})
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.parametrize("length", [32768, 32000], ids=["whole-tiles", "ragged"])
def test_the_mla_decode_kernel_copies_no_cache(tpu_compiler, length):
    """A decode step of two MLA layers of the 8B preset's shape (latent 160 + 64, bf16, a 1,024-token vocabulary so
    that the cache dominates) with the Pallas kernel, compiled for v5p-8 (data 4): its temporaries stay below the
    latent cache a chip holds, at a cache length that is or is not whole tiles. The kernel used to pad the cache to
    256 columns and whole ranges in every call: 2.9× the cache in temporaries (now 0.7×)."""
    from zebrax.app.aot import model_config
    from zebrax.models import DecoderLM

    config = model_config("zebra-llama-8b-8mla-24m2").replace(mixers=("mla", "mla"), vocab_size=1024,
                                                              eos_token_id=(), bos_token_id=None, pad_token_id=None)
    report = tpu_compiler.compile("decode", topology="v5p-8", model=config, batch=8, context=length, mesh={"data": 4},
                                  impl="pallas")
    cache = jax.eval_shape(lambda: DecoderLM.init_cache(config, 8, length))
    latents = sum(layer.kv.size * layer.kv.dtype.itemsize for layer in cache.layers) // 4  # a chip's 2 rows
    assert report.per_chip_bytes["temporaries"] < latents, report.per_chip_bytes["temporaries"] / latents


@pytest.mark.parametrize("topology", ["v5p-8", "v5e-8", "v6e-8"])
@pytest.mark.parametrize("model", ["smollm2_135m", "zebra-smollm2-135m-6mla-24m2", "mamba2_130m"])
def test_a_small_presets_decode_step_reads_about_what_it_must(tpu_compiler, model, topology):
    """A decode step at 4,096 cached tokens (batch 8, the serving mesh: data 4 on v5p-8, data 8 on v5e-8 and v6e-8)
    moves 0.95–1.25× the bytes it must read (its arguments: weights, caches, states): neither the attention loops
    (counted as walking the full cache), nor the SmolLM2 tied embedding table (49152 × 576, column-major on a TPU) are
    copied each step, and v5e's and v6e's asynchronous weight-slice prefetches into VMEM count once, as the slices
    they read. Measured: 1.06, 1.05, 1.16 on v5p; 0.98, 1.00, 1.07 on v5e and v6e (8.2 and 8.6 when each prefetch
    counted its whole weight); a gather of the table made it 1.35, a ``[B, bk * G, D]`` view of the cache 1.82."""
    report = tpu_compiler.compile("decode", model=model, topology=topology, batch=8, context=4096)
    assert report.mesh["fsdp"] == 1 and 0.95 <= report.read_ratio <= 1.25, (report.mesh, report.read_ratio)


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_a_llama_8b_shaped_decode_step_reads_its_kv_cache_once(tpu_compiler, impl):
    """Two layers of Llama-3.1-8B's shape at 32,768 cached tokens (v5p-8, batch 8, data 4; the KV cache a chip
    0.54 GB beside 0.84 GB of weights), through the blocked XLA path and the flash-attention kernel: within 1.25×
    of what the step must read. The cache is heads-major on a TPU (``cache.KVCache``); stored ``[B, S, 8, 128]``
    it was relaid out every step: 1.81× (blocked) and 2.53× (flash) here."""
    from zebrax.app.aot import model_config

    config = model_config("llama3_1_8b").replace(num_hidden_layers=2, vocab_size=1024, eos_token_id=(),
                                                  bos_token_id=None, pad_token_id=None)
    report = tpu_compiler.compile("decode", model=config, topology="v5p-8", batch=8, context=32768,
                                  mesh={"data": 4}, impl=impl)
    assert report.read_ratio <= 1.25, report.read_ratio


@pytest.mark.parametrize("topology", ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
def test_keys_minor_is_how_a_tpu_lays_out_a_heads_major_cache(tpu_compiler, topology):
    """``common.keys_minor`` (which the ``KVLayout`` of ``KVCache`` and the flash kernel follows) against the layout
    the TPU client gives a ``[B, G, S, D]`` array: sequence axis minor-most exactly when D is no multiple of 128."""
    from kernels_pallas.common import keys_minor

    device = tpu_compiler.devices(topology)[0]
    for dtype in (jnp.bfloat16, jnp.float32):
        for shape in [(8, 3, 32768, 64), (8, 5, 32000, 96), (1, 3, 100, 64), (8, 8, 4096, 128), (2, 2, 4096, 256)]:
            layout = device.client.get_default_layout(np.dtype(dtype), shape, device)._xla_layout()
            assert (layout.minor_to_major()[0] == 2) == keys_minor(shape[-1], "tpu"), (shape, layout.to_string())


def test_the_flash_kernel_reads_a_keys_minor_cache_where_it_lies(tpu_compiler):
    """Two layers of SmolLM2's shape (3 KV heads of 64) at 32,768 cached tokens with the flash-attention kernel
    (v5p-8, batch 8, data 4): within 1.25× of what the step must read (measured: 1.00× for the whole model). A TPU
    keeps a ``[B, 3, S, 64]`` cache keys-minor; the kernel reads it as ``[B, 3, 64, S]`` tiles (``KVLayout``). When
    it read ``[B, 3, S, 64]`` row-major, every step relaid out the cache: 4.39× for the whole model."""
    from zebrax.app.aot import model_config

    config = model_config("smollm2_135m").replace(num_hidden_layers=2, vocab_size=1024, eos_token_id=(),
                                                   bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    report = tpu_compiler.compile("decode", model=config, topology="v5p-8", batch=8, context=32768,
                                  mesh={"data": 4}, impl="pallas")
    assert report.read_ratio <= 1.25, report.read_ratio


def test_the_mla_decode_kernel_reads_a_long_latent_cache_once(tpu_compiler):
    """SmolLM2's 15-MLA hybrid at 32,768 cached tokens with the MLA decode kernel (v5p-8, batch 8, data 4): 1.02×
    what the step must read, the latent cache allocated 128 columns wide (96 used) and read where it lies; at its
    own width a TPU keeps it keys-minor and the step relaid it out for the kernel: 2.59×."""
    report = tpu_compiler.compile("decode", model="zebra-smollm2-135m-15mla-15m2", topology="v5p-8", batch=8,
                                  context=32768, mesh={"data": 4}, impl="pallas")
    assert report.read_ratio <= 1.25, report.read_ratio


TRAFFIC_HLO = """HloModule decode_like

%in_place (p0: bf16[4,1024], p1: bf16[4,1], p2: s32[]) -> bf16[4,1024] {
  %p0 = bf16[4,1024]{1,0} parameter(0)
  %p1 = bf16[4,1]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = bf16[4,1024]{1,0} dynamic-update-slice(%p0, %p1, %zero.1, %p2)
}

%row (r0: f32[64,256], r1: s32[]) -> f32[1,256] {
  %r0 = f32[64,256]{1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %zero.2 = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%r0, %r1, %zero.2), dynamic_slice_sizes={1,256}
}

%body (state: (s32[], f32[256])) -> (s32[], f32[256]) {
  %state = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %h = f32[256]{0} get-tuple-element(%state), index=1
  %y = f32[256]{0} negate(%h)
  ROOT %next = (s32[], f32[256]{0}) tuple(%i, %y)
}

%cond (state.1: (s32[], f32[256])) -> pred[] {
  %state.1 = (s32[], f32[256]{0}) parameter(0)
  ROOT %go = pred[] constant(true)
}

ENTRY %main (c: bf16[4,1024], new: bf16[4,1], at: s32[], t: f32[64,256], v: f32[1024], x: f32[256]) -> bf16[4,1024] {
  %cache = bf16[4,1024]{1,0} parameter(0)
  %new = bf16[4,1]{1,0} parameter(1)
  %at = s32[] parameter(2)
  %t = f32[64,256]{1,0} parameter(3)
  %v = f32[1024]{0:S(1)} parameter(4)
  %x = f32[256]{0} parameter(5)
  %updated = bf16[4,1024]{1,0} fusion(%cache, %new, %at), kind=kLoop, calls=%in_place
  %picked = f32[1,256]{1,0} fusion(%t, %at), kind=kLoop, calls=%row
  %flipped = f32[1024]{0} negate(%v)
  %prefetch = ((bf16[4,1024]{1,0}), bf16[4,256]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%cache), slice={[0:4], [0:256]}
  %prefetched = bf16[4,256]{1,0:S(1)} slice-done(%prefetch)
  %start = (s32[], f32[256]{0}) tuple(%at, %x)
  %w = (s32[], f32[256]) while(%start), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  ROOT %out = bf16[4,1024]{1,0} copy(%updated)
}
"""


WALK_HLO = """HloModule walks

%walk (s: (s32[], f32[8,64], f32[64])) -> (s32[], f32[8,64], f32[64]) {
  %s = (s32[], f32[8,64]{1,0}, f32[64]{0}) parameter(0)
  %j = s32[] get-tuple-element(%s), index=0
  %buf = f32[8,64]{1,0} get-tuple-element(%s), index=1
  %acc = f32[64]{0} get-tuple-element(%s), index=2
  %zero = s32[] constant(0)
  %row = f32[1,64]{1,0} dynamic-slice(%buf, %j, %zero), dynamic_slice_sizes={1,64}
  %flat = f32[64]{0} bitcast(%row)
  %sum = f32[64]{0} add(%acc, %flat)
  ROOT %next = (s32[], f32[8,64]{1,0}, f32[64]{0}) tuple(%j, %buf, %sum)
}

%more (m: (s32[], f32[8,64], f32[64])) -> pred[] {
  %m = (s32[], f32[8,64]{1,0}, f32[64]{0}) parameter(0)
  ROOT %yes = pred[] constant(true)
}

%inner (i0: f32[16,64], i1: s32[]) -> f32[1,64] {
  %i0 = f32[16,64]{1,0} parameter(0)
  %i1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %one = f32[1,64]{1,0} dynamic-slice(%i0, %i1, %z), dynamic_slice_sizes={1,64}
}

%outer (o0: f32[16,64], o1: s32[]) -> f32[1,64] {
  %o0 = f32[16,64]{1,0} parameter(0)
  %o1 = s32[] parameter(1)
  %picked = f32[1,64]{1,0} fusion(%o0, %o1), kind=kLoop, calls=%inner
  ROOT %twice = f32[1,64]{1,0} add(%picked, %picked)
}

ENTRY %main (at: s32[], a: f32[8,64], b: f32[8,64], t: f32[16,64], acc: f32[64]) -> f32[1,64] {
  %at = s32[] parameter(0)
  %a = f32[8,64]{1,0} parameter(1)
  %b = f32[8,64]{1,0} parameter(2)
  %t = f32[16,64]{1,0} parameter(3)
  %acc0 = f32[64]{0} parameter(4)
  %state = (s32[], f32[8,64]{1,0}, f32[64]{0}) tuple(%at, %a, %acc0)
  %first = (s32[], f32[8,64]{1,0}, f32[64]{0}) while(%state), condition=%more, body=%walk
  %carried = f32[8,64]{1,0} get-tuple-element(%first), index=1
  %acc1 = f32[64]{0} get-tuple-element(%first), index=2
  %again = (s32[], f32[8,64]{1,0}, f32[64]{0}) tuple(%at, %carried, %acc1)
  %second = (s32[], f32[8,64]{1,0}, f32[64]{0}) while(%again), condition=%more, body=%walk
  %other = (s32[], f32[8,64]{1,0}, f32[64]{0}) tuple(%at, %b, %acc0)
  %third = (s32[], f32[8,64]{1,0}, f32[64]{0}) while(%other), condition=%more, body=%walk
  ROOT %nested = f32[1,64]{1,0} fusion(%t, %at), kind=kLoop, calls=%outer
}
"""


def test_a_loop_of_data_dependent_trips_walks_the_buffer_it_slices_once():
    """A loop without a known trip count counts as walking the buffer its body slices (8 rows: 8 trips); two loops
    walking the same buffer (the second gets it from the first) share those trips, a loop over another buffer has
    its own; a fusion that reads a table through a nested fusion's slice moves the slice."""
    from zebrax.app.traffic import traffic

    moved = traffic(WALK_HLO)
    trip = 2 * 64 * 4 + 3 * 64 * 4  # the row read and written, the add's two operands and result
    by_op = [(op, b) for b, op, _ in moved]
    assert by_op[:6] == [("dynamic-slice", 4 * 512), ("add", 4 * 768), ("dynamic-slice", 4 * 512), ("add", 4 * 768),
                         ("dynamic-slice", 8 * 512), ("add", 8 * 768)]
    assert by_op[6] == ("fusion", 64 * 4 + 64 * 4 + 4)  # the row read, the result written, the index read
    assert sum(b for _, b in by_op[:6]) == 2 * 8 * trip


def test_hbm_traffic_counts_what_each_instruction_moves():
    """The rules of ``zebrax.app.traffic`` on a hand-written program: a cache updated in place moves its update, a row
    picked from a table moves the row, an array in VMEM (``S(1)``) moves nothing, an asynchronous slice into VMEM
    (v5e's and v6e's weight prefetches) moves the slice once, a loop body counts once a trip."""
    from zebrax.app.traffic import hbm_traffic, traffic

    rows = traffic(TRAFFIC_HLO)
    assert [op for _, op, _ in rows] == ["fusion", "fusion", "negate", "slice-start", "slice-done", "negate", "copy"]
    update = 4 * 1 * 2
    assert rows[0][0] == update + update + 4  # the update read and written, the slot read
    assert rows[1][0] == 256 * 4 + 256 * 4 + 4  # the row read and written, the index read
    assert rows[2][0] == 1024 * 4  # written to HBM; its operand is in VMEM
    assert rows[3][0] == 0 and rows[4][0] == 4 * 256 * 2  # an async slice into VMEM: the slice read, once
    assert rows[5][0] == 10 * 2 * 256 * 4
    assert rows[6][0] == 2 * 4 * 1024 * 2  # a copy reads and writes
    assert hbm_traffic(TRAFFIC_HLO) == sum(b for b, _, _ in traffic(TRAFFIC_HLO))


def test_a_chunked_prefill_holds_a_chunk_not_the_prompt(tpu_compiler):
    """The tiny hybrid's prompt of 2,048 tokens on v5e-8 (batch 8, data 8): fed 128 tokens at a time, the step that
    appends the last chunk to the full cache has under 3/4 of the one-shot prefill's temporaries (a chunk's
    activations against the whole prompt's), its cost is counted for the 16 chunks (tokens: the whole prompt), and
    it donates the cache it updates."""
    student = hybrid([0, 3], attention_layers=[2]).replace(dtype="bfloat16")
    kw = dict(topology="v5e-8", model=student, batch=8)
    whole = tpu_compiler.compile("prefill", seq_len=2048, **kw)
    chunked = tpu_compiler.compile("prefill", context=2048, chunk=128, **kw)
    assert chunked.fits and chunked.settings == {"batch": 8, "context": 2048, "chunk": 128, "dtype": "bfloat16"}
    assert chunked.tokens == whole.tokens == 8 * 2048
    b = chunked.per_chip_bytes
    assert b["temporaries"] < 0.75 * whole.per_chip_bytes["temporaries"], (b, whole.per_chip_bytes)
    assert b["total"] < b["arguments"] + b["outputs"] + b["temporaries"]  # the cache, donated, is counted once
    one = tpu_compiler.compile("prefill", context=128, chunk=128, **kw)
    assert chunked.flops > 4 * one.flops  # sixteen chunks, each against a longer cache


def test_a_decode_cache_is_split_over_rows_and_kv_heads(tpu_compiler):
    """A Llama of 2 kv heads (dimensions in whole TPU tiles) at 8,192 cached tokens, batch 2, rows over data 2: with
    its heads over tensor 2 (v5e:2x2) a chip holds half the KV cache it holds without (v5e:2x1); the arguments a chip
    beyond its weights' shards differ by exactly that quarter of the cache (1%)."""
    from zebrax.app.aot import _params
    from zebrax.config import LlamaConfig
    from zebrax.models import DecoderLM
    from zebrax.sharding import MeshConfig, make_mesh

    model = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=128, dtype="bfloat16",
                        max_position_embeddings=8192)
    held = {}
    for topology, tensor in (("v5e:2x2", 2), ("v5e:2x1", 1)):
        mesh = {"data": 2, "fsdp": 1, "tensor": tensor}
        report = tpu_compiler.compile("decode", topology=topology, model=model, batch=2, context=8192, mesh=mesh)
        params = _params(model, make_mesh(MeshConfig(**mesh), list(tpu_compiler.devices(topology))))
        weights = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                      for x in jax.tree.leaves(params))
        held[tensor] = report.per_chip_bytes["arguments"] - weights
    with compiling_for("tpu"):
        cache = jax.eval_shape(lambda: DecoderLM.init_cache(model, 2, 8192))
    kv = sum(x.size * x.dtype.itemsize for layer in cache.layers for x in (layer.k, layer.v))
    assert held[1] - held[2] == pytest.approx(kv / 4, rel=0.01), (held, kv)


def test_the_attention_a_prefill_report_adds_is_every_growing_cache_layers_causal_products():
    """Query i scores and weighs i + 1 keys, two FLOPs a multiply-add: the tiny teacher's 5 GQA layers of 4 heads of
    16, and of the MIXED hybrid (MLA, Mamba2, GQA, MLA, Mamba2) only its 2 MLA layers (4 heads, qk 16 = 8 + 8 rope,
    v 16) and 1 GQA layer. Each MLA layer also decompresses (r 12, 2 groups, nope 8 + v 16) the whole key blocks
    each query block visits: the cache of 8 slots is one block, so 8 keys for the prompt at once and 8 for each of
    its 4 chunks of 2; and 1,024 tokens in chunks of 256 decompress, in blocks of 512, 512 keys for each of the first
    two chunks and 1,024 for each of the last two."""
    from tests.helpers import MIXED
    from zebrax.app.aot import attention_flops

    pairs = sum(i + 1 for i in range(8))  # keys scored by a row of 8 tokens, causally
    assert attention_flops(TEACHER, 3, 8) == 3 * 5 * 2 * pairs * 4 * (16 + 16)
    attention = 3 * 3 * 2 * pairs * 4 * (16 + 16)
    decompress = 3 * 2 * 2 * 12 * 2 * (8 + 16)  # a key, in both MLA layers of the 3 rows
    assert attention_flops(MIXED, 3, 8) == attention + decompress * 8
    assert attention_flops(MIXED, 3, 8, chunk=2) == attention + decompress * 4 * 8
    assert attention_flops(TEACHER, 3, 8, chunk=2) == attention_flops(TEACHER, 3, 8)
    long = 3 * 3 * 1024 * 1025 * 4 * (16 + 16)
    assert attention_flops(MIXED, 3, 1024, chunk=256) == long + decompress * (512 + 512 + 1024 + 1024)

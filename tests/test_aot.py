"""Ahead-of-time compilation for TPU slices (``zebrax.aot``, ``zebrax compile``): libtpu's deviceless compiler on
this CPU machine (the ``tpu_compile`` tier: fixture ``tpu_compiler``), and the topology names without it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TEACHER, hybrid
from zebrax.errors import ConfigError


@pytest.mark.parametrize("name, expected", [
    ("v5p-16", ("v5p", (2, 2, 2))), ("v5p:2x2x2", ("v5p", (2, 2, 2))), ("v4-8", ("v4", (2, 2, 1))),
    ("v5e-1", ("v5e", (1, 1))), ("v5litepod-16", ("v5e", (4, 4))), ("v6e-256", ("v6e", (16, 16))),
    ("v5p-128", ("v5p", (4, 4, 4))), ("V5P:4x4x8", ("v5p", (4, 4, 8))),
])
def test_topologies_in_both_spellings(name, expected):
    from zebrax.aot import parse_topology

    assert parse_topology(name) == expected


@pytest.mark.parametrize("name, message", [
    ("v5p-6", "no v5p slice of 3 chips"), ("v5p-7", "counts TensorCores, two a chip"),
    ("v7x-8", "expected e.g. v5p-16"), ("v5p:2x2", "a v5p slice has 3 dimensions"), ("v5e-3", "no v5e slice"),
])
def test_bad_topologies_are_named(name, message):
    from zebrax.aot import parse_topology

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
    attention_in = (s(1, length, 8, dim), s(1, length, 2, dim), s(1, length, 2, dim))
    ssd_in = (s(1, length, 8, dim), s(1, length, 8), s(8, dt=jnp.float32), s(1, length, 1, 128), s(1, length, 1, 128))
    return [("flash_attention", flash, attention_in), ("flash_attention_backward", jax.grad(flash, (0, 1, 2)),
                                                       attention_in),
            ("ssd", ssd, ssd_in), ("ssd_backward", jax.grad(ssd, (0, 1, 3, 4)), ssd_in),
            ("mla_decode", decode, (s(4, 1, 16, 576), s(4, length, 576)))]


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
        with tpu_compiler.compiling_for("tpu"):
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


def test_the_argument_bytes_are_the_shards_of_the_inputs(tpu_compiler):
    """The compiler's argument bytes a chip equal the shard sizes of the inputs, computed from their shardings
    (1%: dimensions in whole (8, 128) tiles, so that the TPU layout pads nothing but the norms' vectors)."""
    from zebrax.aot import _params
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

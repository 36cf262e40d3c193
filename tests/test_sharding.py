"""Sharding by name: the rules table on every parameter of a hybrid, the mesh, a KD run on 8 simulated CPU devices
(data 2 × fsdp 2 × tensor 2) that logs the losses of the single-device run, and two processes (jax.distributed) that
agree with one (fp32, rtol 1e-3)."""

from __future__ import annotations

import json

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tests.helpers import MIXED, WITH_GDN
from zebrax.errors import ConfigError
from zebrax.models import abstract_params
from zebrax.sharding import AXES, MeshConfig, param_shardings, partition_spec

MESH = AbstractMesh((1, 2, 2), AXES)


def test_rules_shard_heads_and_width_and_never_split_concatenations():
    assert partition_spec(("embed", "heads", "head_dim"), (48, 4, 16), MESH) == PartitionSpec("fsdp", "tensor", None)
    assert partition_spec(("heads", "head_dim", "embed"), (4, 16, 48), MESH) == PartitionSpec("tensor", None, "fsdp")
    assert partition_spec(("vocab", "embed"), (97, 48), MESH) == PartitionSpec(None, "fsdp")  # 97: kept whole
    assert partition_spec(("embed", "ssm_in"), (48, 200), MESH) == PartitionSpec("fsdp", None)  # [z ; xBC ; dt]
    assert partition_spec(("conv", "ssm_conv"), (4, 96), MESH) == PartitionSpec(None, None)  # [x ; B ; C]
    with pytest.raises(ConfigError, match="no rule for the logical axis 'bogus'"):
        partition_spec(("bogus",), (4,), MESH)


@pytest.mark.parametrize("config", [MIXED, WITH_GDN], ids=["mla-mamba2-gqa", "mla-gdn-gqa"])
def test_a_cache_splits_rows_and_heads_never_the_sequence(config):
    """Rows over (data, fsdp) where they divide (4 rows: yes; 3: whole); GQA's 2 kv heads and the linear mixers'
    state heads over tensor; MLA's latent (no head axis) and every sequence axis whole; the conv's concatenated
    channels whole."""
    from zebrax.cache import KVCache, LatentCache, SSMCache
    from zebrax.models.decoder import DecoderLM
    from zebrax.sharding import BATCH, cache_shardings

    P = PartitionSpec  # noqa: N806
    for batch, rows in ((4, BATCH), (3, None)):
        cache = jax.eval_shape(lambda b=batch: DecoderLM.init_cache(config, b, 64))
        shardings = cache_shardings(cache, MESH)
        assert shardings.index.spec == P() and shardings.kv_mask.spec == P(rows, None)
        for layer, spec in zip(cache.layers, shardings.layers, strict=True):
            if isinstance(layer, KVCache):
                assert spec.k.spec == spec.v.spec == P(rows, None, "tensor", None)
            elif isinstance(layer, LatentCache):
                assert spec.kv.spec == P(rows, None, None)
            else:
                assert isinstance(layer, SSMCache) and layer.ssm.shape[1] % 2 == 0
                assert spec.conv.spec == P(rows, None, None) and spec.ssm.spec == P(rows, "tensor", None, None)


def test_every_parameter_of_a_hybrid_gets_its_rule():
    """MIXED is L S A L S: MLA, Mamba2 and attention layers (vocab 97 divides by nothing: kept whole)."""
    shardings = param_shardings(MIXED, abstract_params(MIXED), MESH)
    specs = {jax.tree_util.keystr(k): v.spec for k, v in jax.tree.leaves_with_path(shardings)}
    P = PartitionSpec  # noqa: N806
    expected = {
        "['embed_tokens']['embedding']": P(None, "fsdp"), "['lm_head']['kernel']": P("fsdp", None),
        "['layers_0']['self_attn']['q_b_proj']['kernel']": P("fsdp", "tensor", None),  # no embed axis: the latent's
        "['layers_0']['self_attn']['kv_b_proj']": P("fsdp", "tensor", None),
        "['layers_0']['self_attn']['o_proj']['kernel']": P("tensor", None, "fsdp"),
        "['layers_1']['mixer']['in_proj']['kernel']": P("fsdp", None),
        "['layers_1']['mixer']['conv_kernel']": P(None, None), "['layers_1']['mixer']['A_log']": P("tensor"),
        "['layers_1']['mixer']['out_proj']['kernel']": P("tensor", "fsdp"),
        "['layers_2']['self_attn']['k_proj']['kernel']": P("fsdp", "tensor", None),
        "['layers_2']['mlp']['down_proj']['kernel']": P("tensor", "fsdp"),
    }
    assert {k: specs[k] for k in expected} == expected
    assert len(specs) == len(jax.tree.leaves(abstract_params(MIXED)))


def test_mesh_sizes():
    assert MeshConfig().shape(8) == (1, 8, 1)
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 16 devices; 8 are visible"):
        MeshConfig(data=2, fsdp=4, tensor=2).shape(8)
    with pytest.raises(ConfigError, match="at most one -1"):
        MeshConfig(data=-1, fsdp=-1).shape(8)


RUN = r'''
import json, sys
import jax, numpy as np
from tests.helpers import MIXED, TEACHER, random_model
from zebrax import data
from zebrax.distill import TrainConfig, kd_objective, train
from zebrax.init import init_hybrid
from zebrax.models import build
from zebrax.sharding import MeshConfig, make_mesh, param_shardings

assert len(jax.devices()) == 8, jax.devices()
teacher = random_model(TEACHER, seed=2)
student, _ = init_hybrid(TEACHER, teacher.params, MIXED, jax.random.key(0))
rng = np.random.default_rng(0)
rows = {"tokens": rng.integers(0, 97, (32, 16)).astype(np.int32), "token_mask": np.ones((32, 16), bool),
        "loss_mask": np.ones((32, 16), bool)}
cfg = TrainConfig(steps=5, batch_size=8, accumulate=2, learning_rate=2e-3, log_every=1, checkpoint_every=3)
out = {}
for name, mesh_cfg in (("one", None), ("2x2x2", MeshConfig(2, 2, 2))):
    mesh = None if mesh_cfg is None else make_mesh(mesh_cfg)
    shardings = None if mesh is None else (param_shardings(MIXED, student, mesh),
                                           param_shardings(TEACHER, teacher.params, mesh))
    workdir = sys.argv[1] + "/" + name
    train("kd", kd_objective(build(TEACHER), build(MIXED)), student, teacher.params, data.batches(rows, 8, 0), cfg,
          workdir, tokens_of=lambda b: 1, mesh=mesh, shardings=shardings)
    out[name] = [json.loads(line)["loss"] for line in open(workdir + "/metrics.jsonl")]
print(json.dumps(out))
'''


EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def test_a_sharded_run_on_8_devices_logs_the_single_device_losses(child_process, tmp_path):
    """With gradient accumulation over 2 micro-batches."""
    proc = child_process.python("-c", RUN, tmp_path, env=EIGHT_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(losses["one"]) == 5 and losses["one"][-1] < losses["one"][0]
    assert losses["2x2x2"] == pytest.approx(losses["one"], rel=1e-3), losses


MODELS = r'''
import json
import jax, numpy as np
from tests.helpers import MIXED, TEACHER, hybrid, random_model
from zebrax import Model
from zebrax.evaluate import evaluate
from zebrax.init import init_hybrid
from zebrax.models import abstract_params
from zebrax.select import scores
from zebrax.sharding import MeshConfig, make_mesh, param_shardings

mesh = make_mesh(MeshConfig(fsdp=8))
teacher = random_model(TEACHER, seed=2)
t_sharded = Model(TEACHER, teacher.params, mesh=mesh)
r = np.random.default_rng(0)
tokens = r.integers(0, 97, (8, 24)).astype(np.int32)
rows = {"tokens": tokens, "token_mask": np.ones(tokens.shape, bool), "loss_mask": r.random(tokens.shape) < 0.8}
out, whole = {}, []


def check_whole(name, params):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if leaf.nbytes > 4096 and max(s.data.nbytes for s in leaf.addressable_shards) == leaf.nbytes:
            whole.append(name + jax.tree_util.keystr(path))


def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) / (1 + np.abs(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


students = {}
for name, config in (("mixed", MIXED), ("mla", hybrid([0, 1, 2, 3, 4])), ("mamba2", hybrid([]))):
    host = init_hybrid(TEACHER, jax.device_get(teacher.params), config, jax.random.key(0))[0]
    sharded = init_hybrid(TEACHER, t_sharded.params, config, jax.random.key(0),
                          param_shardings(config, abstract_params(config), mesh))[0]
    check_whole("init " + name, sharded)
    out["init " + name] = diff(jax.device_get(sharded), host)
    students[name] = (Model(config, host), Model(config, sharded, mesh=mesh))
one, eight = students["mixed"]
check_whole("model", eight.params)
out["logits"] = diff(eight.logits(tokens), one.logits(tokens))
out["generate"] = int(np.any(eight.generate(tokens[:, :8], max_new_tokens=6, ignore_eos=True)
                             != one.generate(tokens[:, :8], max_new_tokens=6, ignore_eos=True)))
evals = [evaluate(m.module, m.params, rows, teacher=t.module, teacher_params=t.params, mesh=m.mesh)
         for m, t in ((one, teacher), (eight, t_sharded))]
out["evaluate"] = diff([evals[1]["kl"], evals[1]["perplexity"]], [evals[0]["kl"], evals[0]["perplexity"]])
smart = [scores(t, students["mla"][i], students["mamba2"][i], tokens)["kl"] for i, t in ((0, teacher), (1, t_sharded))]
out["smart"] = diff(smart[1], smart[0])
print(json.dumps({"diff": out, "whole": whole}))
'''


def test_models_students_evaluation_and_smart_under_a_mesh_are_those_of_one_device(child_process):
    """On 8 simulated devices (fsdp 8): the students made shard by shard from a sharded teacher equal those made
    on the host (fp32, exactly), a ``Model`` with a mesh gives the logits (1e-4) and greedy tokens of one device, and
    the evaluation and SMART's per-layer KL with a mesh are those without (1e-5); no parameter over 4 KiB is whole
    on a device."""
    proc = child_process.python("-c", MODELS, env=EIGHT_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["whole"] == [], out["whole"]
    # logits 1e-4: one device's own logits of these large random weights move 2.5e-5 between batch shapes
    tolerance = {"init mixed": 0.0, "init mla": 0.0, "init mamba2": 0.0, "logits": 1e-4, "generate": 0,
                 "evaluate": 1e-5, "smart": 1e-5}
    assert out["diff"].keys() == tolerance.keys()
    for name, d in out["diff"].items():
        assert d <= tolerance[name], (name, d)


BENCHES = r'''
import json
import jax, numpy as np
from tests.helpers import TEACHER, random_model
from zebrax import Model
from zebrax.app import bench, bench_decode
from zebrax.distill import trainer
from zebrax.sharding import MeshConfig, make_mesh

mesh = make_mesh(MeshConfig(fsdp=8))
teacher = random_model(TEACHER, seed=2)
sharded = Model(TEACHER, teacher.params, mesh=mesh)
seen, whole = set(), []


def check_whole(name, tree):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if leaf.nbytes > 4096 and max(s.data.nbytes for s in leaf.addressable_shards) == leaf.nbytes:
            whole.append(name + jax.tree_util.keystr(path))


def spy(module, name, check):
    original = getattr(module, name)

    def spied(*args, **kw):
        seen.add(name)
        check(*args)
        return original(*args, **kw)

    setattr(module, name, spied)


spy(trainer, "placed_step", lambda optimizer, params, frozen, *_: (check_whole("train student", params),
                                                                   check_whole("train teacher", frozen)))
spy(bench_decode, "time_zebrax", lambda model, tokens, *_: check_whole(f"decode {model.config.layer_map()}",
                                                                       model.params))
RECIPE = dict(kv_lora_rank=12, q_lora_rank=24, qk_rope_head_dim=8)
one, eight = (bench_decode.build_hybrid(t, "zebra", num_mla=2, recipe=RECIPE) for t in (teacher, sharded))
init = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(jax.device_get(eight.params)), jax.tree.leaves(one.params)))
decode = bench_decode.bench_decode(sharded, contexts=(16,), batches=(1, 8), models=("teacher", "zebra"), num_mla=2,
                                   recipe=RECIPE, new_tokens=2, repeats=1)
train = bench.bench_train(sharded, batch=8, seq_len=16, steps=1, num_mla=2, recipe=RECIPE)
forward = bench.bench_forward(sharded, batch=8, seq_len=16, repeats=1)
print(json.dumps({"seen": sorted(seen), "whole": whole, "init": init, "decode": decode["rows"], "train": train,
                  "forward": forward["zebrax_tokens_per_s"]}))
'''


def test_the_benchmarks_run_under_a_mesh(child_process):
    """On 8 simulated devices (fsdp 8): `bench decode`, `bench train` and `bench forward` of a teacher loaded with a
    mesh time every zebrax model sharded over it (the hybrids made shard by shard, equal to those made on the host;
    the KD step's student and teacher sharded); no parameter over 4 KiB is whole on a device."""
    proc = child_process.python("-c", BENCHES, env=EIGHT_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["seen"] == ["placed_step", "time_zebrax"] and out["whole"] == [], out
    assert out["init"] == 0.0
    assert {(r["model"], r["batch"]) for r in out["decode"]} == {(m, b) for m in ("teacher", "zebra") for b in (1, 8)}
    assert all(r["prefill_s"] > 0 for r in out["decode"])
    assert out["train"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and out["train"]["tokens_per_sec"] > 0
    assert out["forward"] > 0


KERNELS = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from zebrax.ops import attention, latent_attention, ssd
from zebrax.sharding import MeshConfig, make_mesh

mesh = make_mesh(MeshConfig(2, 2, 2))
r = np.random.default_rng(0)
normal = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
mask = np.arange(32)[None] >= np.array([0, 3, 0, 5])[:, None]  # left padding
R, H = ("data", "fsdp"), "tensor"  # rows over data × fsdp, heads over tensor
ops = {  # name: (op, args, each argument's PartitionSpec)
    "attention": (lambda q, k, v, m: attention(q, k, v, kv_mask=m, impl="pallas"),
                  (normal(4, 32, 4, 16), normal(4, 32, 2, 16), normal(4, 32, 2, 8), mask),
                  (P(R, None, H), P(R, None, H), P(R, None, H), P(R))),
    "latent_attention": (lambda q, c, m: latent_attention(q, c, value_dim=12, kv_mask=m, q_offset=28, scale=0.3,
                                                          impl="pallas"),
                         (normal(4, 4, 4, 16), normal(4, 32, 16), mask), (P(R, None, H), P(R), P(R))),
    "ssd": (lambda x, dt, A, B, C: ssd(x, jax.nn.softplus(dt), -jnp.exp(A), B, C, chunk_size=8, impl="pallas")[0],
            (normal(4, 32, 4, 8), normal(4, 32, 4), normal(4), normal(4, 32, 2, 8), normal(4, 32, 2, 8)),
            (P(R, None, H), P(R, None, H), P(H), P(R, None, H), P(R, None, H))),
}
out = {}
for name, (op, args, specs) in ops.items():
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs)]
    loss = lambda *a: jnp.sum(op(*a) ** 2)  # noqa: E731
    floats = tuple(i for i, x in enumerate(args) if x.dtype == np.float32)
    step = jax.jit(jax.value_and_grad(loss, argnums=floats) if name != "latent_attention" else loss)
    want = step(*args)
    gathers = {"plain": step.lower(*sharded).compile().as_text().count("all-gather")}
    with jax.set_mesh(mesh):
        got = step(*sharded)
        gathers["per_shard"] = step.lower(*sharded).compile().as_text().count("all-gather")
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1 + np.abs(np.asarray(b)))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    out[name] = {"diff": diff, **gathers}
print(json.dumps(out))
'''


def test_pallas_kernels_run_on_each_shard_without_gathering_their_operands(child_process):
    """Under a mesh (``jax.set_mesh``), each op's Pallas kernel (interpret mode here) runs on every device's rows and
    heads: the compiled step holds no all-gather, where the same step without the mesh gathers the operands; values
    and gradients equal the unsharded call (fp32, 1e-5 relative)."""
    proc = child_process.python("-c", KERNELS, env=EIGHT_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, got in out.items():
        assert got["plain"] > 0 and got["per_shard"] == 0, (name, got)
        assert got["diff"] < 1e-5, (name, got)


MULTI = r'''
import json, sys
from zebrax.hosts import distributed
port, n, i, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
distributed(f"localhost:{port}" if n > 1 else None, n if n > 1 else None, i if n > 1 else None)
import jax, numpy as np
from tests.helpers import MIXED, TEACHER, random_model
from zebrax import data
from zebrax.distill import TrainConfig, kd_objective, train
from zebrax.init import init_hybrid
from zebrax.models import build
from zebrax.sharding import MeshConfig, make_mesh, param_shardings
from zebrax.hosts import gather

teacher = random_model(TEACHER, seed=2)
student, _ = init_hybrid(TEACHER, teacher.params, MIXED, jax.random.key(0))
rng = np.random.default_rng(0)
rows = {"tokens": rng.integers(0, 97, (32, 16)).astype(np.int32), "token_mask": np.ones((32, 16), bool),
        "loss_mask": np.ones((32, 16), bool)}
mesh = make_mesh(MeshConfig())  # every device of every process on fsdp
shardings = (param_shardings(MIXED, student, mesh), param_shardings(TEACHER, teacher.params, mesh))
cfg = TrainConfig(steps=4, batch_size=8, learning_rate=2e-3, log_every=1, checkpoint_every=2)


class Half:
    """This process's rows of the global batch of 8 (process i holds rows 8i/n … 8(i+1)/n), so that both runs see
    the same global batches."""

    def __init__(self):
        self.it = data.batches(rows, 8, 0)
        self.get_state, self.set_state = self.it.get_state, self.it.set_state

    def __next__(self):
        n, i = jax.process_count(), jax.process_index()
        return {k: v[8 * i // n: 8 * (i + 1) // n] for k, v in next(self.it).items()}


batches = Half()
params = train("kd", kd_objective(build(TEACHER), build(MIXED)), student, teacher.params, batches, cfg, workdir,
               tokens_of=lambda b: 1, mesh=mesh, shardings=shardings)
norm = float(sum(np.sum(np.asarray(p, np.float64) ** 2) for p in jax.tree.leaves(gather(params))))
if jax.process_index() == 0:
    print(json.dumps({"devices": len(jax.devices()), "norm": norm,
                      "losses": [json.loads(line)["loss"] for line in open(workdir + "/metrics.jsonl")]}))
'''


def test_two_processes_run_a_sharded_step_and_agree_with_one(child_process, tmp_path):
    """jax.distributed on localhost, CPU collectives through gloo: 2 processes × 1 device, each holding its half of
    every global batch, log the losses of one process with 2 devices and end with its parameters."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [child_process.python("-c", MULTI, port, 2, i, tmp_path / "two", wait=False) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    one = child_process.python("-c", MULTI, 0, 1, 0, tmp_path / "one",
                               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert one.returncode == 0, one.stderr[-2000:]
    one = json.loads(one.stdout.strip().splitlines()[-1])
    assert two["devices"] == one["devices"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3) and len(two["losses"]) == 4
    assert two["norm"] == pytest.approx(one["norm"], rel=1e-5)


JOINED = '''
from zebrax.hosts import detected_cluster, distributed
cluster = detected_cluster()
distributed()
import jax
print(cluster, jax.process_count(), jax.process_index(), jax.device_count())
'''


def test_a_slurm_job_joins_one_run_with_no_flags(child_process):
    """Two processes with a SLURM job's variables (one node, localhost) join one ``jax.distributed`` run through JAX's
    own detection; without them a process runs alone."""
    import random

    job = {"SLURM_JOB_ID": str(random.randrange(1, 4000)), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "SLURM_LOCALID": "0"}
    procs = [child_process.python("-c", JOINED, wait=False, env={**job, "SLURM_PROCID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    seen = sorted(o[0].split()[-4:] for o in outs)  # cluster, processes, this process, devices in the run
    assert seen == [["slurm", "2", "0", "2"], ["slurm", "2", "1", "2"]], seen
    alone = child_process.python("-c", JOINED)
    assert alone.returncode == 0 and alone.stdout.split()[-4:] == ["None", "1", "0", "1"], alone.stderr[-2000:]


PIPELINE = '''
import json, sys
from pathlib import Path
from zebrax.app.cli import main

workdir, mesh_binding, processes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]  # processes: port, count, index
args = ["distill", "--gin_file", "configs/experiments/tiny_cpu.gin", "--workdir", str(workdir)]
for binding in ["teacher/TrainConfig.steps = 20", "ild/TrainConfig.steps = 4", "kd/TrainConfig.steps = 4",
                "dpo/TrainConfig.steps = 2", *([mesh_binding] if mesh_binding else [])]:
    args += ["--gin_param", binding]
for stage in ("teacher", "ild", "kd", "dpo"):  # rows a mesh of 8 splits
    args += ["--gin_param", f"{stage}/TrainConfig.batch_size = 8"]
if processes:
    args += ["--coordinator", f"localhost:{processes[0]}", "--num-processes", processes[1],
             "--process-id", processes[2]]
assert main(args) == 0  # joins the run first (jax.distributed), as a user's command does

import jax
from zebrax.distill.stages import load
from zebrax.sharding import MeshConfig, make_mesh

whole = []  # leaves over 4 KiB that a device holds whole, restored as the run restores them
mesh = make_mesh(MeshConfig(fsdp=jax.device_count())) if mesh_binding else None
for stage in ("teacher", "ild/mla", "ild/linear", "hybrid", "kd", "dpo"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(load(workdir / stage, mesh)[1]):
        leaf = leaf if isinstance(leaf, jax.Array) else jax.device_put(leaf)  # a host array (no mesh) on the device
        if leaf.nbytes > 4096 and max(s.data.nbytes for s in leaf.addressable_shards) == leaf.nbytes:
            whole.append(stage + jax.tree_util.keystr(path))
print(json.dumps({"whole": whole, "devices": jax.device_count(), "processes": jax.process_count()}))
'''


def test_the_tiny_pipeline_on_eight_devices_and_on_two_processes_is_the_pipeline_on_one(child_process, tmp_path):
    """The tiny experiment (short: teacher, ILD, SMART, KD, DPO, eval) with ``distill.mesh = {'fsdp': 8}`` on 8
    simulated CPU devices, and on 2 processes × 4 devices (``--coordinator``, ``--num-processes``, ``--process-id``):
    the losses of one device (1e-5 relative), the same SMART choice and evaluation (1e-5), and every stage output —
    written by each process, its own shards — restored into its shardings with no leaf over 4 KiB whole on a device
    (on one device every such leaf is whole: the check can fail)."""
    import socket

    def results(name, outs):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logged = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in lines]
        return ([json.loads(out.split("\n")[-2]) for out in outs], logged,
                json.loads((tmp_path / name / "smart.json").read_text()),
                json.loads((tmp_path / name / "eval.json").read_text()))

    def run(name, binding, devices):
        out = child_process.python("-c", PIPELINE, tmp_path / name, binding,
                                   env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
        assert out.returncode == 0, out.stderr[-3000:]
        return results(name, [out.stdout])

    def run_two(name, binding):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        procs = [child_process.python("-c", PIPELINE, tmp_path / name, binding, port, 2, i, wait=False,
                                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
                 for i in range(2)]
        outs = [p.communicate(timeout=1800) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-3000:] for o in outs]
        return results(name, [o[0] for o in outs])

    one, logged_one, smart_one, eval_one = run("one", "", 1)
    assert one[0]["whole"], one
    for outs, logged, smart, evals in (run("eight", "distill.mesh = {'fsdp': 8}", 8),
                                       run_two("two_by_four", "distill.mesh = {'fsdp': 8}")):
        assert all(o["devices"] == 8 and o["whole"] == [] for o in outs), outs
        assert len(logged) == len(logged_one)
        for a, b in zip(logged, logged_one, strict=True):
            assert a.keys() == b.keys() and a["step"] == b["step"] and a["stage"] == b["stage"]
            for k in ("loss", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5), (outs[0]["processes"], a["stage"], a["step"], k)
        assert smart["mla_layers"] == smart_one["mla_layers"]
        for name in eval_one:
            assert evals[name]["kl"] == pytest.approx(eval_one[name]["kl"], rel=1e-5, abs=1e-7), name
            assert evals[name]["perplexity"] == pytest.approx(eval_one[name]["perplexity"], rel=1e-5), name

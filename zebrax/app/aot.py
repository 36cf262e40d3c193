"""Ahead-of-time compilation of the method's programs for a TPU slice, on any machine (``tpu.py``: the slice, the
compile and its report). Nothing is allocated or run.

Programs: ``ild``, ``kd``, ``dpo`` (the training steps exactly as ``zebrax distill`` builds them:
``objectives.stage_objective``, ``trainer.make_optimizer``, ``trainer.jitted_step``, the parameter shardings of
``zebrax.sharding``), ``smart`` and ``eval`` (``select.swap_kl``, ``evaluate.batch_sums``), ``prefill`` and
``decode`` (``generate.Generator``'s, at a given context). Each is its owner's own step, given sharded
``jax.ShapeDtypeStruct`` inputs.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from zebrax.app.tpu import Report, compile_program, devices
from zebrax.errors import ConfigError

PROGRAMS = ("ild", "kd", "dpo", "smart", "eval", "prefill", "decode")
TRAINING = ("ild", "kd", "dpo")
SCORING = ("smart", "eval")  # forward passes of the teacher and the students over rows
GENERATION = ("prefill", "decode")
# the settings each program takes (``compile``'s keywords); any other given is refused, not ignored
SETTINGS = {
    **dict.fromkeys(TRAINING, ("teacher", "student", "batch", "seq_len", "accumulate", "remat", "compute_dtype",
                               "loss_chunk", "experiment")),
    **dict.fromkeys(SCORING, ("teacher", "student", "batch", "seq_len", "compute_dtype", "experiment")),
    "prefill": ("model", "batch", "seq_len", "context", "chunk", "compute_dtype", "impl"),
    "decode": ("model", "batch", "context", "compute_dtype", "impl"),
}


def model_config(name):
    """A model's config from a zebrax checkpoint or a preset name (``llama3_1_8b``), no weights read; a config
    object is returned as it is."""
    from zebrax import checkpoint
    from zebrax.app.presets import preset_config

    if not isinstance(name, (str, os.PathLike)):
        return name
    return checkpoint.load_config(name) if checkpoint.is_checkpoint(name) else preset_config(str(name))


def _sharded(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _params(config, mesh):
    """A model's parameters as sharded ``ShapeDtypeStruct``s, by the rules of ``zebrax.sharding``."""
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    params = abstract_params(config)
    return _sharded(params, param_shardings(config, params, mesh))


def _rows(fields: dict, batch: int, length: int, mesh) -> dict:
    from zebrax.sharding import batch_sharding

    return {k: jax.ShapeDtypeStruct((batch, length), dtype, sharding=batch_sharding(mesh, 2))
            for k, dtype in fields.items()}


def _advice(exp, stage: str, mesh) -> list[str]:
    """What would lower a training step's memory a chip, most effective first."""
    from zebrax.models.decoder import remat_policy
    from zebrax.sharding import row_shards

    cfg = getattr(exp, stage)
    shards = row_shards(mesh)
    out = [] if remat_policy(exp.remat) == "full" else [
        "--remat (full): the students keep only each block's input for the backward pass"]
    if cfg.batch_size // cfg.accumulate > shards and cfg.batch_size % (2 * cfg.accumulate) == 0:
        out.append(f"--accumulate {2 * cfg.accumulate}: micro-batches of {cfg.batch_size // cfg.accumulate // 2} "
                   f"sequences")
    out.append("a larger slice (more fsdp), or --mesh tensor=N: the weights and activations split further")
    return out


def _hybrid(program: str, student, teacher):
    """``student``, checked: a hybrid of ``teacher``'s shape."""
    from zebrax.config import HybridConfig

    if student is None or not isinstance(student, HybridConfig):
        raise ConfigError(f"compile {program}: --student must be a Zebra-Llama hybrid (a preset such as "
                          f"zebra-llama-8b-8mla-24m2, or a checkpoint); got {type(student).__name__}")
    try:
        student.check_teacher(teacher)
    except ConfigError as e:
        raise ConfigError(f"compile {program}: --student is not a hybrid of --teacher: {e}") from None
    return student


def _students(program: str, exp, teacher, student) -> dict:
    """The two students ILD trains and SMART scores: the hybrid's attention kind and its linear kind (MLA and Mamba2,
    or Gated DeltaNet) in every layer, its settings of each; without a hybrid, the experiment's recipe."""
    from zebrax.distill.inputs import STUDENTS, students_of
    from zebrax.mixers import kind

    if student is None:
        return {n: students_of(exp, teacher, layers) for n, layers in STUDENTS.items()}
    student = _hybrid(program, student, teacher)
    attention = [m for m in dict.fromkeys(student.mixers) if not kind(m).teacher and not kind(m).linear]
    linear = student.linear_kinds()
    if len(attention) != 1 or len(linear) != 1:
        raise ConfigError(f"compile {program}: --student {student.layer_map()} has no single attention kind and "
                          f"linear kind to make the two students of")
    return {"mla": student.all_of(attention[0]), "linear": student.all_of(linear[0])}


def _named_students(students: dict) -> str:
    """``"all-mla + all-gdn"``: the kinds of the two students, for the report."""
    return " + ".join(f"all-{c.mixers[0]}" for c in students.values())


def _check_rows(program: str, batch: int, accumulate: int, mesh) -> None:
    """ConfigError unless the mesh's row shards divide each micro-batch (as ``zebrax distill`` refuses)."""
    from zebrax.sharding import row_shards

    shards, micro = row_shards(mesh), batch // accumulate
    if micro % shards:
        raise ConfigError(f"compile {program}: micro-batches of {micro} rows (batch {batch}, accumulate "
                          f"{accumulate}) cannot be split over the mesh's {shards} row shards (data × fsdp); make "
                          f"the batch a multiple of {shards * accumulate}, or give a mesh with fewer row shards")


def _scoring(program: str, exp, teacher, student, mesh, topology: str, batch: int) -> Report:
    """SMART's scoring pass (one swap; it runs once per layer and once with none) or the evaluation's batch sums
    (perplexity and KL to the teacher) over ``batch`` rows of ``exp.seq_len`` tokens."""
    from zebrax.evaluate import batch_sums
    from zebrax.models import build
    from zebrax.select import swap_kl, swap_params
    from zebrax.sharding import batch_sharding, replicated

    _check_rows(program, batch, 1, mesh)
    compute = lambda c: c.replace(dtype=exp.compute_dtype)  # noqa: E731
    rows = _rows({"tokens": jnp.int32, "token_mask": bool, "loss_mask": bool}, batch, exp.seq_len, mesh)
    if program == "eval":
        student = _hybrid(program, student, teacher)
        fn = batch_sums(build(compute(student)), build(compute(teacher)))
        args = (_params(student, mesh), _params(teacher, mesh), rows["tokens"], rows["token_mask"], rows["loss_mask"])
    else:
        s = _students(program, exp, teacher, student)
        students = _named_students(s)
        fn = jax.jit(swap_kl(compute(s["mla"]), compute(s["linear"])))
        logits = jax.ShapeDtypeStruct((batch, exp.seq_len, teacher.vocab_size), jnp.float32,
                                      sharding=batch_sharding(mesh, 3))
        x = jax.ShapeDtypeStruct((batch, exp.seq_len, teacher.hidden_size), jnp.dtype(exp.compute_dtype),
                                 sharding=batch_sharding(mesh, 3))  # the all-linear student's input to the swap
        swap = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
        args = (swap_params(_params(s["mla"], mesh), _params(s["linear"], mesh), teacher.num_hidden_layers),
                rows["tokens"], x, logits, swap)
    settings = {"batch": batch, "seq_len": exp.seq_len, "compute_dtype": exp.compute_dtype,
                **({} if program == "eval" else {"students": students})}
    return compile_program(fn, args, program=program, topology=topology, mesh=mesh, tokens=batch * exp.seq_len,
                           settings=settings)


def _training(stage: str, exp, teacher, student, mesh, topology: str) -> Report:
    from zebrax.distill.objectives import stage_objective
    from zebrax.distill.trainer import jitted_step, make_optimizer, state_shardings
    from zebrax.sharding import replicated

    cfg = getattr(exp, stage)
    _check_rows(stage, cfg.batch_size, cfg.accumulate, mesh)
    trained = _students(stage, exp, teacher, student) if stage == "ild" else {"": _hybrid(stage, student, teacher)}
    objective = stage_objective(exp, stage, teacher, trained)
    params = {n: _params(c, mesh) for n, c in trained.items()}
    params = params[""] if "" in params else params
    frozen = _params(teacher if stage != "dpo" else student, mesh)
    optimizer = make_optimizer(cfg, params)
    p_sh = jax.tree.map(lambda x: x.sharding, params)
    o_sh = state_shardings(optimizer, params, p_sh, mesh)
    opt_state = _sharded(jax.eval_shape(optimizer.init, params), o_sh)
    fields = {"tokens": jnp.int32, "token_mask": bool, "loss_mask": bool, **({"segment_ids": jnp.int32}
                                                                              if exp.pack and stage != "dpo" else {})}
    if stage == "dpo":
        fields = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in fields.items()}
    batch = _rows(fields, cfg.batch_size, exp.seq_len, mesh)
    step = jitted_step(objective, optimizer, cfg.accumulate,
                       (p_sh, o_sh, jax.tree.map(lambda x: x.sharding, frozen), replicated(mesh)))
    tokens = cfg.batch_size * exp.seq_len * (2 if stage == "dpo" else 1)
    settings = {"batch": cfg.batch_size, "seq_len": exp.seq_len, "accumulate": cfg.accumulate, "remat": exp.remat,
                "compute_dtype": exp.compute_dtype, "loss_chunk": exp.loss_chunk,
                **({"students": _named_students(trained)} if stage == "ild" else {})}
    return compile_program(step, (params, opt_state, frozen, batch), program=stage, topology=topology, mesh=mesh,
                           repeats=cfg.accumulate,
                           tokens=tokens, settings=settings, advice=_advice(exp, stage, mesh))


def attention_flops(config, batch: int, length: int, chunk: int | None = None) -> float:
    """FLOPs of the causal attention of ``batch`` prompts of ``length`` tokens (in chunks of ``chunk``) over every
    layer whose cache grows: the query at position i scores and weighs i + 1 keys, two FLOPs a multiply-add, so a
    layer costs batch · length · (length + 1) · heads · (qk dim + v dim). An MLA layer adds the decompression of
    the keys it visits, ``[k_nope ; v] = W_kvb c_kv`` (2 · r · G · (nope + dv) a key), as
    ``ops.latent_prefill_attention`` does it over a cache of ``length`` slots: every query block (``Blocks``, a
    chunk's at most) decompresses each whole key block up to its end's."""
    from zebrax.mixers import kind
    from zebrax.ops.attention_blocked import Blocks

    step = chunk or length
    bq, bk = min(Blocks().block_q, step), min(Blocks().block_k, length)
    key_blocks = -(-length // bk)
    keys_visited = bk * sum(min(-(-(start + end) // bk), key_blocks)
                            for start in range(0, length, step) for end in range(bq, step + bq, bq)
                            if end - bq < min(step, length - start))
    total = 0
    for spec in config.plan():
        if kind(spec.mixer).linear:
            continue
        c = spec.config
        qk, v = getattr(c, "qk_head_dim", None) or c.head_dim, getattr(c, "v_head_dim", None) or c.head_dim
        total += batch * length * (length + 1) * c.n_heads * (qk + v)
        if hasattr(c, "kv_lora_rank"):
            total += batch * keys_visited * 2 * c.kv_lora_rank * c.kv_groups * (c.qk_nope_head_dim + c.v_head_dim)
    return float(total)


def _generation(program: str, config, mesh, topology: str, batch: int, length: int, impl, chunk: int | None = None
                ) -> Report:
    """The generator's own steps, traced for the slice: ``Generator.prefill`` of ``length`` tokens;
    ``Generator.extend``, a chunked prefill's step (``chunk`` tokens appended to a cache of ``length`` slots, the last
    and largest chunk; its cost counted ``length / chunk`` times, the whole prompt's); ``Generator.decode_step`` at a
    cache of ``length`` slots. The caches as a TPU allocates them, split by ``sharding.cache_shardings``."""
    from zebrax.generate import Generator
    from zebrax.models import build
    from zebrax.ops.auto import compiling_for
    from zebrax.sharding import batch_sharding, cache_shardings, replicated, row_shards

    generator = Generator(build(config, impl))
    params = _params(config, mesh)
    settings = {"batch": batch, "context" if program == "decode" or chunk else "seq_len": length,
                **({"chunk": chunk} if chunk else {}), "dtype": config.dtype}
    attention = attention_flops(config, batch, length, chunk) / mesh.size  # a prefill's, a chip's share
    if program == "prefill" and chunk is None:
        _check_rows(program, batch, 1, mesh)
        args = (params, *_rows({"tokens": jnp.int32, "token_mask": bool}, batch, length, mesh).values())
        return compile_program(generator.prefill, args, static={"max_len": length}, program=program,
                               topology=topology, mesh=mesh, tokens=batch * length, settings=settings,
                               attention_flops=attention)
    with compiling_for("tpu"):  # the caches as a TPU allocates them (``cache.KVCache``, ``cache.LatentCache``)
        cache = jax.eval_shape(lambda: type(generator.module).init_cache(config, batch, length))
    cache = _sharded(cache, cache_shardings(cache, mesh))
    by_rows = lambda ndim: batch_sharding(mesh, ndim) if batch % row_shards(mesh) == 0 else replicated(mesh)  # noqa: E731
    if program == "prefill":
        new = {k: jax.ShapeDtypeStruct((batch, chunk), dtype, sharding=by_rows(2))
               for k, dtype in (("tokens", jnp.int32), ("token_mask", bool))}
        return compile_program(generator.extend, (params, cache, new["tokens"], new["token_mask"]), program=program,
                               topology=topology, mesh=mesh, tokens=batch * length, settings=settings,
                               repeats=length // chunk, attention_flops=attention)
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_rows(1))
    return compile_program(generator.decode_step, (params, cache, tokens), program=program, topology=topology,
                           mesh=mesh, tokens=batch, settings=settings, reads_arguments=True)


def serving_mesh(batch: int, chips: int) -> dict:
    """The default mesh of ``prefill`` and ``decode``: the rows over as many chips as divide the batch (``data``),
    the heads over the rest (``tensor``). No axis shards the weights' embed dimension (``fsdp``), which a decode step
    would gather whole every step (a read ratio of 8 on v5p-8 against 0.98 with ``data=4``)."""
    data = math.gcd(batch, chips)
    return {"data": data, "fsdp": 1, "tensor": chips // data}


def _mesh(program: str, mesh: dict | None, chips: list, batch) -> object:
    """The mesh over every chip of the slice: ``mesh`` (``MeshConfig`` fields), or the program's default (training
    and scoring: every chip on fsdp; prefill and decode: ``serving_mesh``); ConfigError for one that leaves chips
    out or does not tile them."""
    from zebrax.sharding import MeshConfig, make_mesh

    if mesh is None and program in GENERATION and isinstance(batch, int) and batch >= 1:
        mesh = serving_mesh(batch, len(chips))
    try:
        config = MeshConfig(**(mesh or {}))
        shape = config.shape(len(chips))
    except TypeError:
        raise ConfigError(f"compile: mesh={mesh!r}: expected sizes of data, fsdp, tensor") from None
    if math.prod(shape) != len(chips):
        raise ConfigError(f"compile {program}: --mesh {mesh} uses {math.prod(shape)} of the slice's {len(chips)} "
                          f"chips; give sizes whose product is {len(chips)} (or one -1)")
    return make_mesh(config, chips)


def compile(program: str, *, topology: str, teacher=None, student=None, model=None, mesh: dict | None = None,
            batch: int | None = None, seq_len: int | None = None, context: int | None = None,
            accumulate: int | None = None, remat: bool | str | None = None, compute_dtype: str | None = None,
            loss_chunk: int | None = None, experiment=None, impl="auto", chunk: int | None = None) -> Report:
    """Compile one program of the method for a TPU ``topology`` (``"v5p-16"``, ``"v5p:2x2x2"``) on this machine,
    nothing run, and report its memory a chip, the cost model's time and its collectives (``Report``).

    Training programs (``ild``, ``kd``, ``dpo``): ``teacher`` (a Llama) and ``student`` (a hybrid of it) are presets,
    checkpoints (their configs only) or config objects; ``experiment`` a ``distill`` ``Experiment`` (its objective
    settings, optimizer, remat, compute dtype, batch and ``accumulate`` of the stage; without ``student``, its recipe
    makes ILD's students); ``batch``, ``seq_len``, ``accumulate``, ``remat``, ``compute_dtype``, ``loss_chunk``
    override it. Scoring (``smart``: SMART's pass with one layer swapped; ``eval``: perplexity and KL to the
    teacher): ``teacher`` and ``student``, ``batch`` rows of ``seq_len`` tokens. Generation (``prefill``: ``seq_len``
    tokens at once, or a ``context``-token prompt ``chunk`` tokens at a time, the step that appends the last chunk
    with the whole prompt's cost; ``decode``: one step at a ``context``-token cache): ``model``, and ``impl`` the
    ops' implementations as ``models.build`` takes them ("pallas", ``{"attention": "pallas"}``; default "auto": what
    ``auto`` runs on a TPU; a kernel that compiles is not one measured faster, and the cost model's time is an
    estimate). ``mesh``: ``MeshConfig`` fields over every chip of the slice (default: all on fsdp for training and
    scoring, ``serving_mesh`` for prefill and decode). A setting the program does not take is refused
    (``SETTINGS``)."""
    from zebrax.config import LlamaConfig
    from zebrax.distill.experiment import Experiment

    if program not in PROGRAMS:
        raise ConfigError(f"compile: program {program!r} is not one of {', '.join(PROGRAMS)}")
    given = dict(teacher=teacher, student=student, model=model, batch=batch, seq_len=seq_len, context=context,
                 accumulate=accumulate, remat=remat, compute_dtype=compute_dtype, loss_chunk=loss_chunk,
                 experiment=experiment, impl=None if impl == "auto" else impl, chunk=chunk)
    stray = [k for k, v in given.items() if v is not None and k not in SETTINGS[program]]
    if stray:
        raise ConfigError(f"compile {program}: {', '.join(stray)} do{'es' * (len(stray) == 1)} not apply to it (it "
                          f"takes {', '.join(SETTINGS[program])})")
    chips = list(devices(topology))
    mesh = _mesh(program, mesh, chips, batch)
    if program in TRAINING + SCORING:
        if teacher is None:
            raise ConfigError(f"compile {program}: --teacher (a preset or a checkpoint) is required")
        teacher = model_config(teacher)
        if not isinstance(teacher, LlamaConfig):
            raise ConfigError(f"compile {program}: --teacher must be a Llama (the model distilled from), got a "
                              f"{type(teacher).__name__}")
        student = student and model_config(student)
        exp = experiment if experiment is not None else Experiment()
        if program in SCORING:
            if not (isinstance(batch, int) and batch >= 1):
                raise ConfigError(f"compile {program}: --batch must be an integer >= 1 (got {batch!r})")
            exp = dataclasses.replace(exp, **{k: v for k, v in (("seq_len", seq_len), ("compute_dtype", compute_dtype))
                                              if v is not None})
            return _scoring(program, exp, teacher, student, mesh, topology, batch)
        cfg = getattr(exp, program)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (("batch_size", batch), ("accumulate", accumulate))
                                          if v is not None})
        changes = {"seq_len": seq_len, "remat": remat, "compute_dtype": compute_dtype, "loss_chunk": loss_chunk}
        exp = dataclasses.replace(exp, **{program: cfg}, **{k: v for k, v in changes.items() if v is not None})
        return _training(program, exp, teacher, student, mesh, topology)
    if model is None:
        raise ConfigError(f"compile {program}: --model (a preset or a checkpoint) is required")
    config = model_config(model)
    if compute_dtype is not None:
        config = config.replace(dtype=compute_dtype)
    if program == "prefill" and (context is None) != (chunk is None) or chunk is not None and seq_len is not None:
        raise ConfigError("compile prefill: give --seq-len (a prompt at once) or --context with --chunk (a prompt "
                          "that many tokens at a time), not both")
    length = seq_len if program == "prefill" and chunk is None else context
    if not (isinstance(batch, int) and batch >= 1 and isinstance(length, int) and length >= 1):
        what = "--seq-len" if program == "prefill" and chunk is None else "--context"
        raise ConfigError(f"compile {program}: --batch and {what} must be integers >= 1 (got {batch!r}, {length!r})")
    if chunk is not None and not (isinstance(chunk, int) and chunk >= 1 and length % chunk == 0):
        raise ConfigError(f"compile prefill: --chunk {chunk!r} must be an integer >= 1 that divides --context {length}")
    return _generation(program, config, mesh, topology, batch, length, impl, chunk)

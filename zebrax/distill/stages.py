"""The pipeline's stages (METHOD §6), run in the order an ``Experiment`` lists them (``Experiment.stages``).

A stage has a name, the artefacts of earlier stages it reads, the one it writes in the work directory, the rows of
``eval.json`` it adds, and the ``Experiment`` fields that are its settings. A stage whose artefact is written is
skipped; the stage in progress resumes from its latest complete checkpoint.

    stage     reads                writes                  evaluates                settings
    teacher   —                    teacher/ (tiny only)    teacher                  teacher, tiny_teacher, …
    students  teacher              (in memory)             —                        student, linear, …
    ild       teacher, students    ild/{mla,linear}/       —                        ild, ild_kind, …
    smart     teacher, students    smart.json              —                        num_mla, smart_rows, placement, …
    hybrid    students, smart      hybrid/                 initialised, after_ild   —
    kd        teacher, hybrid      kd/                     after_kd                 kd, kd_direction, …
    kd_long   teacher, kd          kd_long/                after_kd_long            kd_long, kd_long_seq_len, …
    dpo       hybrid               dpo/                    after_dpo                dpo, dpo_beta, preferences

The students stage makes the all-MLA and the all-linear (Mamba2 or GDN: ``linear``) student from the teacher, again
on every run (the same seed, the same students). Without ``ild`` in the list, SMART and the hybrid take the students
as they are initialised. ``WORKDIR/stages.json`` holds the list the run follows, each stage with its settings;
``zebrax run``'s report reads it.

Runs that agree on a stage share it: given a ``shared`` directory (``zebrax ablate``), a stage's artefact is kept
there under its key (``Run.key``: the settings of the stages up to it and the fields no stage claims), and a later
run with the same key copies it instead of doing the work again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, data, files
from zebrax.config import yarn_extended
from zebrax.distill.inputs import STUDENTS, calibration, documents, parts
from zebrax.distill.objectives import counted, lm_objective, real_tokens, stage_objective
from zebrax.distill.trainer import train
from zebrax.distill.workdir import finished, load, record_hashes, save, sharded, shardings, write_text
from zebrax.errors import ConfigError, InvalidArgument, ZebraxError, warn
from zebrax.hosts import sync
from zebrax.sharding import on_device

PLACEMENTS = ("smart", "uniform", "reverse")
RECORD = "stages.json"
LEGACY_STUDENTS = {"linear": "mamba2"}  # the linear student's directory in runs written before it was ``linear``


def say(text: str) -> None:
    print(f"[zebrax distill] {text}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Run:
    """What the stages of one run share: the experiment, its claimed work directory, what ``pipeline._prepare`` read
    and checked (``inputs``), and what the stages made so far."""

    exp: object  # pipeline.Experiment
    workdir: Path
    inputs: object  # pipeline._Inputs
    stages: tuple  # the Stage objects of exp.stages
    shared: Path | None = None  # finished stages' artefacts by key (``reuse``, ``share``), or None
    t_params: dict | None = None
    students: dict = dataclasses.field(default_factory=dict)  # name → (config, params) as initialised
    evals: dict = dataclasses.field(default_factory=dict)

    @property
    def mesh(self):
        return self.inputs.mesh

    @property
    def parts(self) -> tuple:
        return self.inputs.parts

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.stages)

    def evaluate(self, name: str, config, params) -> None:
        """``eval.json``'s row ``name``: KL(teacher ‖ model) and perplexity on the held-out rows (once)."""
        from zebrax.evaluate import evaluate as measure
        from zebrax.models import build

        if name in self.evals:
            return
        row = measure(build(config), params, self.parts[0], teacher=build(self.inputs.t_config),
                      teacher_params=self.t_params, mesh=self.mesh)
        if not all(math.isfinite(row[k]) for k in ("kl", "perplexity")):
            raise ZebraxError(f"{name}: KL(teacher ‖ model) {row['kl']}, perplexity {row['perplexity']} on the "
                              f"held-out rows: the model computes non-finite values; nothing is written to eval.json")
        self.evals[name] = row
        write_text(self.workdir / "eval.json", json.dumps(self.evals, indent=2))
        say(f"{name}: KL(teacher ‖ model) {row['kl']:.4f}, perplexity {row['perplexity']:.2f}")

    def key(self, stage: Stage) -> str:
        """What decides ``stage``'s artefact (``decision``) and the content of every data file read (a path names no
        content), as a SHA-256."""
        names = [s.name for s in self.stages[:self.stages.index(stage) + 1]]
        text = json.dumps({**decision(json.loads(self.exp.to_json()), names), "data_sha256": self.inputs.hashes},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def reuse(self, stage: Stage) -> bool:
        """Copy ``stage``'s artefact from ``shared`` when a run of the same key wrote it there; True if it did."""
        source = None if self.shared is None else self.shared / self.key(stage) / stage.writes
        if source is None or not source.exists():
            return False
        say(f"{stage.name}: reused from {source.parent} (a run that agrees on it)")
        files.copy_tree(source, self.workdir / stage.writes, link=True)
        return True

    def share(self, stage: Stage) -> None:
        """Copy ``stage``'s finished artefact to ``shared`` under its key (for the next run that agrees)."""
        if self.shared is not None and jax.process_index() == 0 and (self.workdir / stage.writes).exists():
            target = self.shared / self.key(stage) / stage.writes
            if not target.exists():
                files.copy_tree(self.workdir / stage.writes, target, link=True)

    def trained_students(self) -> dict:
        """The students SMART scores and the hybrid is made of: ILD's (``ild/mla``, ``ild/linear``; a run written
        before the linear student was ``linear`` has it in ``ild/mamba2``), or without ILD the initialised ones."""
        if not self.has("ild"):
            return self.students
        found = {}
        for name in STUDENTS:
            path, legacy = self.workdir / "ild" / name, self.workdir / "ild" / LEGACY_STUDENTS.get(name, name)
            if not checkpoint.is_checkpoint(path) and checkpoint.is_checkpoint(legacy):
                path = legacy
            found[name] = load(path, self.mesh)
        return found


class Stage:
    """One step of the pipeline (the module docstring's table): ``name``, the stages it ``reads`` from, the artefact
    it ``writes`` (a path in the work directory). ``run`` is called on every run of the experiment; it does the
    work unless ``done`` (the artefact is written) or another run's can be reused, then adds its rows to
    ``eval.json``."""

    name: str = ""
    reads: tuple[str, ...] = ()
    evaluates: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # the Experiment fields it reads

    @property
    def writes(self) -> str:
        return self.name

    def done(self, run: Run) -> bool:
        return files.committed(run.workdir / self.writes)

    def work(self, run: Run) -> None:
        raise NotImplementedError

    def after(self, run: Run) -> None:
        """What follows on every run, done or not: its evaluations, what later stages take from it."""

    def run(self, run: Run) -> None:
        if not self.done(run) and not run.reuse(self):
            self.work(run)
            run.share(self)
        self.after(run)

    def record(self, fields: dict) -> dict:
        """This stage of an experiment whose fields are ``fields`` (``experiment.json``'s plain form)."""
        return {"stage": self.name, "reads": list(self.reads), "writes": self.writes, "evaluates": list(self.evaluates),
                "settings": {f: fields[f] for f in self.settings}}

    def begun(self, workdir: Path, rows) -> bool:
        """Something of it is in ``workdir``: its artefact (whole or, on an object store, not yet committed), a
        checkpoint of it in progress, or one of its rows among ``rows`` (``eval.json``'s)."""
        return ((workdir / self.writes).exists() or (workdir / "checkpoints" / self.name).exists()
                or any(r in rows for r in self.evaluates))


def decision(fields: dict, names) -> dict:
    """What decides the artefact of the last of the stages ``names`` (the plan up to it) in an experiment whose fields
    are ``fields``, besides the data's content: those stages' settings and the fields no stage claims (mesh, …)."""
    claimed = {f for s in STAGES.values() for f in s.settings}
    return {"common": {k: v for k, v in fields.items() if k not in claimed | {"stages"}},
            "stages": [STAGES[n]().record(fields) for n in names]}


def disagreement(workdir: Path, old: dict, new: dict) -> str | None:
    """Why experiment ``new`` may not take over the work directory that experiment ``old`` (both as plain fields)
    wrote: the first stage ``old`` has begun there that ``new`` does not list, or whose decision (its settings, an
    earlier stage's, a field no stage claims) differs; None when none does: stages added after those begun, or
    changes to stages not begun, take the work directory over."""
    old_plan, new_plan = _names(old), _names(new)
    rows = json.loads((workdir / "eval.json").read_text()) if (workdir / "eval.json").exists() else {}
    for i, name in enumerate(old_plan):
        if not STAGES[name]().begun(workdir, rows):
            continue
        if name not in new_plan:
            return f"stage {name!r} is begun there, and not in distill.stages now"
        there, now = decision(old, old_plan[:i + 1]), decision(new, new_plan[:new_plan.index(name) + 1])
        if there != now:
            field = _first_difference(there, now)
            return f"stage {name!r} is begun there, and {field} differs"
    return None


def _names(fields: dict) -> tuple[str, ...]:
    return tuple(fields["stages"]) if fields["stages"] is not None else method(bool(fields["preferences"]))


def _first_difference(there: dict, now: dict) -> str:
    """The stages before it, if they differ, else the field whose value differs between two decisions."""
    if [s["stage"] for s in there["stages"]] != [s["stage"] for s in now["stages"]]:
        return (f"the stages up to it ({[s['stage'] for s in there['stages']]} there, "
                f"{[s['stage'] for s in now['stages']]} now)")
    a = {**there["common"], **{k: v for s in there["stages"] for k, v in s["settings"].items()}}
    b = {**now["common"], **{k: v for s in now["stages"] for k, v in s["settings"].items()}}
    return next(f"{k} ({a.get(k)!r} there, {b.get(k)!r} now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


class Teacher(Stage):
    """The teacher's parameters: read from its checkpoint, or for ``teacher="tiny"`` a random tiny Llama trained on
    the data first (next-token cross-entropy, ``tiny_teacher``). Its replies to ``generation_prompts``, when asked
    for, are written before the data is split."""

    name, evaluates = "teacher", ("teacher",)
    settings = ("teacher", "tiny_teacher", "tiny_layers", "data", "generation_prompts", "generation", "seq_len",
                "pack", "seed")

    def done(self, run: Run) -> bool:
        return run.exp.teacher != "tiny" or (files.committed(run.workdir / "teacher")
                                             and checkpoint.is_checkpoint(run.workdir / "teacher"))

    def work(self, run: Run) -> None:
        import flax.linen as nn

        from zebrax.models import build

        exp, config = run.exp, run.inputs.t_config
        rows = run.inputs.rows
        rows = data.pack(rows, exp.seq_len) if exp.pack and isinstance(rows, dict) else rows
        say(f"tiny teacher: {exp.tiny_teacher.steps} steps of next-token training on the data")
        module = build(config)
        params = nn.unbox(module.init(jax.random.key(exp.seed), np.zeros((1, 1), np.int32)))["params"]
        params = train("teacher", lm_objective(module), params, None,
                       data.batches(rows, exp.tiny_teacher.batch_size, exp.seed + 3, **process_share()),
                       exp.tiny_teacher, run.workdir, tokens_of=real_tokens, counted_of=counted,
                       **sharded(run.mesh, {"": (config, params)}, None))
        save(run.workdir, "teacher", {"": (config, params)}, None)
        finished(run.workdir, "teacher")

    def after(self, run: Run) -> None:
        from zebrax.api import Model
        exp = run.exp
        params = load(run.workdir / "teacher" if exp.teacher == "tiny" else exp.teacher, run.mesh)[1]
        run.t_params = params if run.mesh is not None else on_device(params)
        if exp.generation_prompts:
            say(f"teacher-made data: {exp.generation_prompts} → {exp.generated_data}")
            data.generate_data(Model(run.inputs.t_config, run.t_params, run.inputs.codec.tokenizer, mesh=run.mesh),
                               exp.generation_prompts, exp.generated_data, **exp.generation)
            if jax.process_index() == 0:
                record_hashes(run.workdir, {exp.generated_data: data.sha256(exp.generated_data)})
        if run.inputs.parts is None:
            with files.warnings_after_success():
                rows = documents(exp, run.inputs.codec, run.inputs.files)
                run.inputs.parts = parts(exp, rows, run.inputs.files)
        run.evaluate("teacher", run.inputs.t_config, run.t_params)


class Students(Stage):
    """The all-MLA and the all-linear student, initialised from the teacher (``init.init_hybrid``): MLA by SVD, the
    linear mixers from the attention weights; the kinds in ``random_init`` at random instead (their modules' own
    initialisation), for the ablation."""

    name, reads = "students", ("teacher",)
    settings = ("student", "linear", "linear_config", "random_init", "seed")

    def done(self, run: Run) -> bool:
        return False  # in memory: made on every run

    def work(self, run: Run) -> None:
        from zebrax.init import init_hybrid

        run.students = {name: (config, init_hybrid(run.inputs.t_config, run.t_params, config,
                                                   jax.random.key(run.exp.seed), shardings(config, run.mesh),
                                                   random=run.exp.random_init)[0])
                        for name, config in run.inputs.students.items()}


class ILD(Stage):
    """Stage 1 (METHOD §6): both students at once, each layer fed the teacher's input, learning its output."""

    name, reads = "ild", ("teacher", "students")
    settings = ("ild", "ild_kind", "split", "compute_dtype", "remat")

    def work(self, run: Run) -> None:
        exp, students = run.exp, run.students
        say(f"ILD: {exp.ild.steps} steps of {exp.ild.batch_size} × {exp.seq_len} tokens, both students at once")
        objective = stage_objective(exp, "ild", run.inputs.t_config, {n: c for n, (c, _) in students.items()})
        params = train("ild", objective, {n: p for n, (_, p) in students.items()}, run.t_params,
                       data.batches(run.parts[1], exp.ild.batch_size, exp.seed, **process_share()), exp.ild,
                       run.workdir, tokens_of=real_tokens,
                       **sharded(run.mesh, students, (run.inputs.t_config, run.t_params)))
        save(run.workdir, "ild", {n: (students[n][0], params[n]) for n in students}, run.inputs.tokenizer)
        finished(run.workdir, "ild")


class Smart(Stage):
    """Where the MLA layers go (METHOD §5), by ``placement``: ``"smart"`` (SMART's scores on held-out rows, the
    placement of the largest total score), ``"reverse"`` (the same scores and rule, the smallest total: the
    placement SMART likes least) or ``"uniform"`` (``select.uniform``: evenly spaced from layer 0, no scoring)."""

    name, reads, writes = "smart", ("teacher", "students"), "smart.json"
    settings = ("num_mla", "smart_rows", "placement", "split")  # it scores on the held-out part

    def done(self, run: Run) -> bool:
        return (run.workdir / self.writes).exists()

    def work(self, run: Run) -> None:
        from zebrax.api import Model
        from zebrax.select import place, scores, uniform

        exp, n_layers = run.exp, run.inputs.t_config.num_hidden_layers
        if exp.placement == "uniform":
            result = {"placement": "uniform", "mla_layers": uniform(n_layers, exp.num_mla)}
        else:
            say(f"SMART: scoring {n_layers} layers")
            students = run.trained_students()
            result = scores(Model(run.inputs.t_config, run.t_params, mesh=run.mesh),
                            Model(*students["mla"], mesh=run.mesh), Model(*students["linear"], mesh=run.mesh),
                            calibration(run.parts[0], exp.seq_len)[:exp.smart_rows or None])
            sign = -1.0 if exp.placement == "reverse" else 1.0
            result["placement"] = exp.placement
            result["mla_layers"] = place([sign * s for s in result["scores"]], exp.num_mla)
        write_text(run.workdir / self.writes, json.dumps(result, indent=2))
        sync("smart")


class Hybrid(Stage):
    """The hybrid assembled from the students at the placed MLA layers (``init.assemble``); evaluated as assembled
    from the initialised students, and (after ILD) from the ILD-trained ones."""

    name, reads = "hybrid", ("students", "smart")
    evaluates = ("initialised", "after_ild")

    def work(self, run: Run) -> None:
        from zebrax.init import assemble

        students = run.trained_students()
        save(run.workdir, "hybrid", {"": assemble(students["mla"], students["linear"], self.mla_layers(run))},
             run.inputs.tokenizer)

    def after(self, run: Run) -> None:
        from zebrax.init import assemble
        from zebrax.mixers import legend

        run.evaluate("initialised", *assemble(run.students["mla"], run.students["linear"], self.mla_layers(run)))
        config, params = load(run.workdir / "hybrid", run.mesh)
        say(f"hybrid: layers {config.layer_map()} ({legend(config.layer_map())})")
        if run.has("ild"):
            run.evaluate("after_ild", config, params)

    @staticmethod
    def mla_layers(run: Run) -> list[int]:
        return json.loads((run.workdir / "smart.json").read_text())["mla_layers"]


class KD(Stage):
    """Stage 2 (METHOD §6): the hybrid learns the teacher's next-token distributions (``kd_direction`` KL)."""

    name, reads, evaluates = "kd", ("teacher", "hybrid"), ("after_kd",)
    settings = ("kd", "kd_direction", "kd_temperature", "kd_normalize", "kd_ce_weight", "kd_top_k", "split",
                "compute_dtype", "remat", "loss_chunk")

    def work(self, run: Run) -> None:
        self.distil(run, run.exp, "hybrid", run.parts[2], run.exp.seed + 1)

    def distil(self, run: Run, exp, source: str, kd_rows, seed: int, configs=lambda c: c) -> None:
        """KD of the model ``source`` of the work directory on ``kd_rows`` by ``exp``'s KD settings (``exp.kd``,
        ``exp.seq_len``), written to ``self.name``; ``configs`` changes the student's and the teacher's configs
        (RoPE stretched past the teacher's context)."""
        config, params = load(run.workdir / source, run.mesh)
        config, t_config = configs(config), configs(run.inputs.t_config)
        stored = self.stored_logits(run, exp, kd_rows)
        say(f"{self.name.upper().replace('_', ' ')}: {exp.kd.steps} steps of {exp.kd.batch_size} × {exp.seq_len} "
            f"tokens" + (f", from the teacher's stored top-{exp.kd_top_k} logits" if stored else ""))
        objective = stage_objective(exp, "kd", t_config, {"": config})
        kd_data = data.batches(kd_rows.with_teacher_topk(exp.kd_top_k) if stored else kd_rows, exp.kd.batch_size,
                               seed, **process_share())
        params = train(self.name, objective, params, None if stored else run.t_params, kd_data, exp.kd, run.workdir,
                       tokens_of=real_tokens, counted_of=counted,
                       **sharded(run.mesh, {"": (config, params)}, None if stored else (t_config, run.t_params)))
        save(run.workdir, self.name, {"": (config, params)}, run.inputs.tokenizer)
        finished(run.workdir, self.name)

    @staticmethod
    def stored_logits(run: Run, exp, kd_rows) -> bool:
        """Whether KD takes the teacher's top-k logits a corpus stores (``zebrax teacher-logits``) and runs without
        the teacher: ``kd_top_k`` > 0 and at most the ``k`` stored, and stored from this run's teacher (its
        ``checkpoint.content_sha256``), else ConfigError; a warning when ``kd_top_k`` asks more than is stored (the
        teacher runs)."""
        from zebrax import corpus

        if not (isinstance(kd_rows, corpus.Corpus) and kd_rows.topk and exp.kd_top_k):
            return False
        if exp.kd_top_k > kd_rows.topk:
            warn(f"distill.kd_top_k = {exp.kd_top_k}: {kd_rows.path} stores the teacher's top {kd_rows.topk} logits, "
                 f"fewer; KD runs the teacher to take its top {exp.kd_top_k}")
            return False
        theirs = kd_rows.manifest[corpus.TOPK].get("teacher_sha256")
        ours = checkpoint.content_sha256(run.workdir / "teacher" if exp.teacher == "tiny" else exp.teacher)
        if theirs != ours:
            made_by = kd_rows.manifest[corpus.TOPK].get("teacher") or "a teacher it does not name"
            raise ConfigError(f"{kd_rows.path}: its stored logits are not distill.teacher = {exp.teacher!r}'s (they "
                              f"are {made_by}'s{'' if theirs else ', unidentified'}); store this teacher's (zebrax "
                              f"teacher-logits), or set distill.kd_top_k = 0")
        return True

    def after(self, run: Run) -> None:
        run.evaluate(self.evaluates[0], *load(run.workdir / self.name, run.mesh))


class KDLong(KD):
    """A second KD at a longer context: the KD model trained on rows of ``kd_long_seq_len`` tokens, by ``kd_long``'s
    settings (the KD loss settings are KD's): the documents of ``long_data``, one a row (``inputs.long_rows``, read
    and checked before any work), or without them the KD part's documents cut to, and packed into, such rows (short
    documents packed side by side: no token sees further back than its own document). Rows past the teacher's
    context stretch the RoPE of the teacher and of the student by YaRN to their length (``config.yarn_extended``;
    the student keeps it). Evaluated on the same held-out rows as every model."""

    name, reads, evaluates = "kd_long", ("teacher", "kd"), ("after_kd_long",)
    settings = (*KD.settings, "kd_long", "kd_long_seq_len", "data", "pack", "long_data")

    def work(self, run: Run) -> None:
        exp = dataclasses.replace(run.exp, seq_len=run.exp.kd_long_seq_len, kd=run.exp.kd_long,  # KD's at the length
                                  stages=tuple(n for n in run.exp.plan() if n != self.name), long_data=())
        with files.warnings_after_success():
            if run.inputs.long is not None:
                kd_rows = run.inputs.long
            else:
                rows = documents(exp, run.inputs.codec, run.inputs.files)
                kd_rows = parts(exp, rows, run.inputs.files)[2]
        length, trained = exp.seq_len, run.inputs.t_config.max_position_embeddings
        if length > trained:
            say(f"KD LONG: rows of {length} tokens, past the teacher's {trained}: YaRN of factor {length / trained:g} "
                f"on the RoPE of the teacher and of the hybrid's layers that rotate (config.yarn_extended)")
        self.distil(run, exp, "kd", kd_rows, exp.seed + 4, configs=lambda c: yarn_extended(c, length))


class DPO(Stage):
    """Stage 3 (METHOD §6): DPO on ``preferences``, the model before it (the last KD's, else the hybrid) the
    frozen reference."""

    name, reads, evaluates = "dpo", ("hybrid",), ("after_dpo",)
    settings = ("dpo", "dpo_beta", "preferences", "compute_dtype", "remat", "loss_chunk")

    def work(self, run: Run) -> None:
        exp = run.exp
        config, params = load(run.workdir / final_model(n for n in exp.plan() if n != "dpo"), run.mesh)
        say(f"DPO: {exp.dpo.steps} steps of {exp.dpo.batch_size} pairs, β = {exp.dpo_beta}")
        params = train("dpo", stage_objective(exp, "dpo", run.inputs.t_config, {"": config}), params, params,
                       data.batches(run.inputs.pairs, exp.dpo.batch_size, exp.seed + 2, **process_share()), exp.dpo,
                       run.workdir, tokens_of=real_tokens, counted_of=counted,
                       **sharded(run.mesh, {"": (config, params)}, (config, params)))
        save(run.workdir, "dpo", {"": (config, params)}, run.inputs.tokenizer)
        finished(run.workdir, "dpo")

    def after(self, run: Run) -> None:
        run.evaluate("after_dpo", *load(run.workdir / "dpo", run.mesh))


STAGES = {s.name: s for s in (Teacher, Students, ILD, Smart, Hybrid, KD, KDLong, DPO)}
MODELS = ("dpo", "kd_long", "kd", "hybrid")  # the stages that write the hybrid, latest first


def method(preferences: bool) -> tuple[str, ...]:
    """The method's stages (METHOD §6); DPO when there are preference pairs."""
    return ("teacher", "students", "ild", "smart", "hybrid", "kd", *(("dpo",) if preferences else ()))


def plan(names) -> tuple[Stage, ...]:
    """The Stage objects of a list of stage names, checked: each known, once, and each reading only what a stage
    before it writes (InvalidArgument naming the stage and what it misses)."""
    names = tuple(names)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise InvalidArgument(f"stages {list(names)}: {unknown[0]!r} is not a stage (expected some of "
                              f"{', '.join(STAGES)})")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"stages {list(names)}: a stage is listed twice")
    stages, written = [], set()
    for n in names:
        stage = STAGES[n]()
        missing = [r for r in stage.reads if r not in written]
        if missing:
            raise InvalidArgument(f"stages {list(names)}: {n!r} reads {missing[0]!r}, which no stage before it "
                                  f"writes")
        written.add(n)
        stages.append(stage)
    if not any(s.name in MODELS for s in stages):
        raise InvalidArgument(f"stages {list(names)}: no stage makes the hybrid (expected 'hybrid' among them)")
    return tuple(stages)


def final_model(names) -> str:
    """The work directory's model the run ends with: the last of DPO, the KDs and the assembled hybrid it runs."""
    names = set(names)
    return next(m for m in MODELS if m in names)


def final_evaluation(names, evals: dict) -> str:
    """The row of ``eval.json`` that measures the last model of a run of the stages ``names``."""
    return [e for n in names for e in STAGES[n].evaluates if e in evals][-1]


def run_stages(run: Run) -> dict:
    """Every stage of ``run.stages`` in order (``Stage.run``); returns ``eval.json``'s content."""
    path = run.workdir / "eval.json"
    run.evals = json.loads(path.read_text()) if path.exists() else {}
    fields = json.loads(run.exp.to_json())
    write_text(run.workdir / RECORD, json.dumps([s.record(fields) for s in run.stages], indent=2))
    for stage in run.stages:
        stage.run(run)
    return run.evals


def process_share() -> dict:
    return dict(process_index=jax.process_index(), process_count=jax.process_count())

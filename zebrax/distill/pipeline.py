"""The Zebra-Llama pipeline in one resumable run (METHOD §6): teacher → all-MLA and all-Mamba2 students → ILD (both
students in one step) → SMART on held-out rows → the assembled hybrid → KD → DPO (when preference data is given).
Each is a stage of ``zebrax.distill.stages``; an ``Experiment`` lists the ones it runs (``Experiment.stages``).

Everything that can be checked from the settings and the files is checked before any work: the ``Experiment``'s
fields (``__post_init__``), the teacher's config and tokenizer, the students' configs, SMART's placement, the mesh,
and every data file (records, and the tokens their loss counts once cut to ``seq_len``). Everything then lands in one
work directory, which one run at a time holds (``locked``):

    experiment.json          the run's ``Experiment``; a different one is refused (config.gin: its gin form)
    data_sha256.json         the SHA-256 of every data file read; a file changed since is refused
    .lock                    held (``flock``) by the run in progress; it names the process
    teacher/                 the teacher made for ``teacher="tiny"`` (a random tiny Llama)
    checkpoints/STAGE/       orbax checkpoints of the stage in progress (params, optimizer, data position),
                             removed once the stage's output is written
    ild/{mla,mamba2}/        the ILD-trained students        (zebrax checkpoints, each written atomically)
    stages.json              the stages the run follows, in order, each with its settings (``stages``)
    smart.json               SMART's scores and the MLA layers
    hybrid/  kd/  dpo/       the assembled hybrid, and after KD and DPO
    eval.json                KL(teacher ‖ model) and perplexity on the held-out rows, per model
    metrics.jsonl            one line per logged step; tensorboard/STAGE/ event files

``WORKDIR`` may be an object store's URI (``gs://bucket/run``, with ``pip install zebrax[gcs]``): there a stage's
output is written in place and finished once its ``commit_success.txt`` is (``checkpoint.committed``), metrics.jsonl
is rewritten whole at each log, and nothing locks the directory.

A finished stage is one whose output exists; re-running the same command skips it and resumes the stage in
progress from its latest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import inspect
import json
import os
import socket
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, corpus, data
from zebrax.config import DTYPES, LlamaConfig
from zebrax.distill import stages as stage_list
from zebrax.distill.kd import check_top_k
from zebrax.distill.losses import ILD_KINDS, KL_DIRECTIONS, NORMALIZE
from zebrax.distill.stages import PLACEMENTS, STUDENTS
from zebrax.distill.trainer import TrainConfig, check_choice, check_int, check_number, check_strings
from zebrax.distill.workdir import check_counted, documents, hashes_agree, parts, record_hashes, write_text
from zebrax.errors import ConfigError, InvalidArgument, ZebraxError
from zebrax.mixers import kinds
from zebrax.models.decoder import REMAT_POLICIES
from zebrax.recipe import arguments, from_teacher
from zebrax.sharding import MeshConfig, make_mesh, row_shards, sync

# the teacher of ``teacher="tiny"``: SmolLM2's shape scaled down (GQA 4/2, head_dim 16), bytes as tokens, first
# trained on the run's data (``Experiment.tiny_teacher``) so that it has distributions worth distilling
TINY_TEACHER = LlamaConfig(vocab_size=data.ByteCodec.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           bos_token_id=data.ByteCodec.bos, eos_token_id=(data.ByteCodec.eos,),
                           max_position_embeddings=1024, tie_word_embeddings=True)
RECORD, LOCK = "experiment.json", ".lock"


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A distillation run.

    - ``teacher``: a zebrax Llama checkpoint, or ``"tiny"`` (a random tiny Llama first trained on ``data`` by
      ``tiny_teacher``'s settings, next-token cross-entropy).
    - ``data``: text/chat files for ILD, KD and the held-out rows, or one corpus ``zebrax tokenize`` made (read by
      row as training needs it; its ``seq_len``, packing and tokenizer are the run's); ``generation_prompts``: a
      prompt file the teacher
      answers first (``generate_data`` with the ``generation`` settings), its replies cached in ``generated_data``
      (reused by every later run) and added to ``data``.
    - ``pack``: several documents per training row of ``seq_len`` tokens, kept apart by segment ids (the held-out
      rows stay one document each); ``split``: the fractions of documents (held-out, ILD, KD).
    - ``preferences``: DPO pairs (none: no DPO).
    - ``compute_dtype``: the dtype teacher and students compute in during training ("bfloat16": bf16 matmuls,
      float32 master weights, optimizer state, LM heads and losses); ``remat``: the students recompute each
      block's activations in the backward pass (True or "full": keeping only its input; a policy of
      ``models.decoder.REMAT_POLICIES`` keeps those projections too; ILD trains one layer at a time and never
      needs it); ``loss_chunk``: KD's and DPO's LM heads and losses run that many
      tokens at a time, rematerialised (``losses.token_chunks``; 0: the whole row), so no step holds
      ``[B, L, vocab]`` logits — the same values.
    - ``mesh``: ``MeshConfig`` fields (``data``, ``fsdp``, ``tensor``; ``{}``: one device): the training steps run
      sharded over it by the rules of ``zebrax.sharding``, teacher included.
    - ``stages``: the stages to run, in order (``distill.stages``: teacher, students, ild, smart, hybrid, kd,
      dpo); ``None``: the method's (``stages.method``: all of them, DPO when ``preferences`` are given). An
      ablation leaves one out (no ``ild``: SMART and the hybrid take the initialised students).
    - ``student``: ``recipe.from_teacher`` arguments for both students (ranks, RoPE, ``linear``: "mamba2" or
      "gdn", …); ``random_init``: mixer kinds ("mla", "mamba2", "gdn") initialised at random instead of from the
      teacher's attention (MLPs, norms and embeddings are still copied); ``num_mla``: MLA layers placed;
      ``placement``: where (``stages.Smart``: "smart", "uniform" or "reverse"); ``smart_rows``: SMART scores on
      the first that many rows of ``seq_len`` held-out tokens (0: all of them); ``tiny_layers``: the tiny
      teacher's layers.
    - KD: ``kd_direction``, ``kd_temperature``, ``kd_normalize`` (``"token"``: the mean over counted tokens, the
      default, so the loss scale does not move with lengths and padding; ``"sequence"``: the reference code's sum
      over tokens divided by the batch), ``kd_ce_weight``, ``kd_top_k`` (> 0: the KL against the teacher's top-k
      tokens only, renormalised; read from the corpus when ``zebrax teacher-logits`` stored that many there, and
      the KD step then runs without the teacher).
    - ``kd_long``, ``kd_long_seq_len``: the settings and the context of a second KD (the stage ``kd_long``, when
      ``stages`` lists it), on the KD documents cut to the longer rows.
    """

    teacher: str = "tiny"
    tiny_teacher: TrainConfig = TrainConfig(steps=200, learning_rate=3e-3, warmup_ratio=0.05)
    tiny_layers: int = 4
    stages: tuple[str, ...] | None = None
    data: tuple[str, ...] = ()
    generation_prompts: str = ""
    generated_data: str = ""
    generation: dict = dataclasses.field(default_factory=dict)
    preferences: tuple[str, ...] = ()
    seq_len: int = 128
    pack: bool = True
    split: tuple[float, float, float] = (0.05, 0.19, 0.76)
    seed: int = 0
    mesh: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"
    remat: bool | str = False
    loss_chunk: int = 512
    student: dict = dataclasses.field(default_factory=dict)
    random_init: tuple[str, ...] = ()
    num_mla: int = 2
    placement: str = "smart"
    smart_rows: int = 0
    ild_kind: str = "l2"
    kd_direction: str = "forward"
    kd_temperature: float = 1.0
    kd_normalize: str = "token"
    kd_ce_weight: float = 0.0
    kd_top_k: int = 0
    dpo_beta: float = 0.01
    ild: TrainConfig = TrainConfig()
    kd: TrainConfig = TrainConfig()
    kd_long: TrainConfig = TrainConfig()
    kd_long_seq_len: int = 0
    dpo: TrainConfig = TrainConfig(learning_rate=5e-7, warmup_ratio=0.1)

    def __post_init__(self):
        """Each field's type and range (ConfigError naming the field and its value), and that the data files
        exist; what needs the teacher or the files' content is checked by ``run`` before any work."""
        if not (isinstance(self.teacher, str) and self.teacher):
            raise ConfigError(f"distill.teacher = {self.teacher!r}: expected 'tiny' or a zebrax Llama checkpoint")
        for name in ("tiny_teacher", "ild", "kd", "kd_long", "dpo"):
            if not isinstance(getattr(self, name), TrainConfig):
                raise ConfigError(f"distill.{name} = {getattr(self, name)!r}: expected a TrainConfig "
                                  f"(e.g. @{name.removeprefix('tiny_')}/TrainConfig())")
        check_strings("distill.data", self.data, empty=True)
        check_strings("distill.preferences", self.preferences, empty=True)
        for name in ("generation_prompts", "generated_data"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"distill.{name} = {getattr(self, name)!r}: expected a file path (a string)")
        for name, files in (("data", self.data), ("preferences", self.preferences),
                            ("generation_prompts", (self.generation_prompts,) if self.generation_prompts else ())):
            for f in files:
                if not Path(f).is_file() and not (name == "data" and corpus.is_corpus(f)):
                    raise ConfigError(f"distill.{name}: {f}: no such data file (in {Path.cwd()})")
        if any(corpus.is_corpus(f) for f in self.data) and (len(self.data) > 1 or self.generation_prompts):
            raise ConfigError(f"distill.data = {self.data!r}: a tokenized corpus is the whole of the data "
                              f"(tokenize the other files, and the teacher's replies, into it)")
        if bool(self.generation_prompts) != bool(self.generated_data):
            raise ConfigError(f"distill.generation_prompts = {self.generation_prompts!r} and distill.generated_data "
                              f"= {self.generated_data!r}: one needs the other (the teacher's replies to the prompts "
                              f"are written to, and reused from, generated_data)")
        if self.generation_prompts and self.teacher == "tiny":
            raise ConfigError("distill.generation_prompts: the tiny teacher has no chat template to answer prompts "
                              "with; give its data in distill.data")
        self._check_generation()
        check_int("distill.seq_len", self.seq_len, 2)
        if not isinstance(self.pack, bool):
            raise ConfigError(f"distill.pack = {self.pack!r}: expected True or False")
        if not (isinstance(self.remat, bool) or self.remat in ("none", *REMAT_POLICIES)):
            raise ConfigError(f"distill.remat = {self.remat!r}: expected True, False, 'none' or one of "
                              f"{', '.join(REMAT_POLICIES)}")
        if not (isinstance(self.split, (tuple, list)) and len(self.split) == 3):
            raise ConfigError(f"distill.split = {self.split!r}: expected 3 fractions (held-out, ILD, KD)")
        for i, fraction in enumerate(self.split):
            check_number(f"distill.split[{i}]", fraction, 0.0, 1.0, open_low=True)
        check_int("distill.seed", self.seed, 0)
        if not (isinstance(self.mesh, dict) and set(self.mesh) <= {f.name for f in dataclasses.fields(MeshConfig)}):
            raise ConfigError(f"distill.mesh = {self.mesh!r}: expected a dict of mesh sizes "
                              f"(data, fsdp, tensor), e.g. {{'data': 2, 'fsdp': -1}}")
        for axis, size in self.mesh.items():
            check_int(f"distill.mesh[{axis!r}]", size, -1)
        check_choice("distill.compute_dtype", self.compute_dtype, DTYPES)
        check_int("distill.loss_chunk", self.loss_chunk, 0)
        recipe = set(arguments()) - {"mla_layers"}
        if not (isinstance(self.student, dict) and set(self.student) <= recipe):
            raise ConfigError(f"distill.student = {self.student!r}: expected a dict of recipe.from_teacher "
                              f"arguments ({', '.join(sorted(recipe))})")
        check_strings("distill.random_init", self.random_init, empty=True)
        check_int("distill.num_mla", self.num_mla, 1)
        check_choice("distill.placement", self.placement, PLACEMENTS)
        check_int("distill.smart_rows", self.smart_rows, 0)
        check_int("distill.tiny_layers", self.tiny_layers, 2)
        if self.stages is not None:
            check_strings("distill.stages", self.stages)
        try:
            stage_list.plan(self.plan())
        except InvalidArgument as e:
            raise ConfigError(f"distill.{e}") from None
        check_int("distill.kd_long_seq_len", self.kd_long_seq_len, 0)
        if "kd_long" in self.plan() and not self.kd_long_seq_len > self.seq_len:
            raise ConfigError(f"distill.kd_long_seq_len = {self.kd_long_seq_len}: the second KD (stage 'kd_long') "
                              f"needs a context longer than distill.seq_len = {self.seq_len}")
        if "kd_long" in self.plan() and any(corpus.is_corpus(f) for f in self.data):
            raise ConfigError(f"distill.stages: 'kd_long' cuts the documents to kd_long_seq_len, but "
                              f"distill.data = {self.data!r} is a corpus, tokenized at its own seq_len")
        if "dpo" in self.plan() and not self.preferences:
            raise ConfigError(f"distill.stages = {self.stages!r}: 'dpo' needs preference pairs (distill.preferences)")
        check_choice("distill.ild_kind", self.ild_kind, ILD_KINDS)
        check_choice("distill.kd_direction", self.kd_direction, KL_DIRECTIONS)
        check_number("distill.kd_temperature", self.kd_temperature, 0.0, open_low=True)
        check_choice("distill.kd_normalize", self.kd_normalize, NORMALIZE)
        check_number("distill.kd_ce_weight", self.kd_ce_weight, 0.0)
        check_int("distill.kd_top_k", self.kd_top_k, 0)
        check_top_k(self.kd_top_k, self.kd_direction, self.kd_temperature)
        check_number("distill.dpo_beta", self.dpo_beta, 0.0, open_low=True)

    def plan(self) -> tuple[str, ...]:
        """The names of the stages this experiment runs, in order."""
        return tuple(self.stages) if self.stages is not None else stage_list.method(bool(self.preferences))

    def _check_generation(self) -> None:
        """``generation``: ``data.generate_data``'s sampling settings."""
        known = {name for name, p in inspect.signature(data.generate_data).parameters.items()
                 if p.kind is p.KEYWORD_ONLY}
        if not (isinstance(self.generation, dict) and set(self.generation) <= known):
            raise ConfigError(f"distill.generation = {self.generation!r}: expected a dict of generate_data settings "
                              f"({', '.join(sorted(known))})")
        for name, value in self.generation.items():
            where = f"distill.generation[{name!r}]"
            if name in ("temperature", "top_p"):
                check_number(where, value, 0.0, 1.0 if name == "top_p" else np.inf, open_low=name == "top_p")
            else:
                check_int(where, value, 0 if name == "seed" else 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=list)


def _lock(workdir: Path) -> int:
    """An exclusive ``flock`` on ``WORKDIR/.lock``, the file naming this process; ConfigError naming the process
    that holds it. The lock ends with the descriptor, or with the process however it ends (``kill -9`` too)."""
    path = workdir / LOCK
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"{path}: cannot create it ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not named itself yet"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"{path}: cannot lock it ({e.strerror or e})") from None
        raise ConfigError(f"{workdir}: in use by another run ({holder}); wait for it to end, or use another "
                          f"--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def locked(workdir: str | os.PathLike):
    """Hold the work directory for the block: one run at a time writes it (``WORKDIR/.lock``, created with the
    directory); ConfigError naming the holder (pid and host) if another run holds it. In a multi-host run process 0
    locks for all (the others share its run). An object store (``gs://``) has no lock: one run at a time there is
    the user's (a pod's scheduler runs one job a name)."""
    workdir = checkpoint.as_path(workdir)
    fd, refusal = None, None
    if jax.process_index() == 0 and checkpoint.is_local(workdir):
        try:
            fd = _lock(workdir)
        except ConfigError as e:
            refusal = e
    if jax.process_count() > 1:  # every process learns whether process 0 holds it
        from jax.experimental import multihost_utils

        if not int(multihost_utils.broadcast_one_to_all(np.int32(refusal is None))) and refusal is None:
            refusal = ConfigError(f"{workdir}: process 0 could not lock it (its error says why)")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _claimed(workdir: Path, exp: Experiment, hashes: dict[str, str]):
    """The work directory, held (``locked``) for the block: it holds this experiment made from the same data, or
    is new; anything else is refused and left untouched. Every process decides from the directory as it was;
    process 0 decides again once it holds the lock, and writes the records."""
    sync("claim")
    _check_claim(workdir, exp, hashes)
    sync("claimed")
    with locked(workdir):
        if jax.process_index() == 0:
            if _check_claim(workdir, exp, hashes):
                write_text(workdir / RECORD, exp.to_json())
            record_hashes(workdir, hashes)
        sync("recorded")
        yield


def _check_claim(workdir: Path, exp: Experiment, hashes: dict[str, str]) -> bool:
    """True for a new work directory; ConfigError for another experiment's, one made from data that has changed
    since, or a foreign one."""
    record = workdir / RECORD
    if record.exists():  # a field added since the record was written counts at its default
        old = {**json.loads(Experiment().to_json()), **json.loads(record.read_text())}
        new = json.loads(exp.to_json())
        if old != new:
            diff = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise ConfigError(f"{workdir}: written by a different experiment ({diff}: {old.get(diff)!r} there, "
                              f"{new.get(diff)!r} now); use another --workdir")
        hashes_agree(workdir, hashes)
        return False
    if workdir.exists() and any(p.name != LOCK for p in workdir.iterdir()):
        raise ConfigError(f"{workdir}: exists and is not a zebrax distill work directory; use another --workdir")
    return True


def _teacher_config(exp: Experiment) -> tuple:
    """(config, codec, tokenizer dir or None) of the teacher, from its checkpoint's config.json and tokenizer/ (its
    parameters are not read)."""
    if exp.teacher == "tiny":
        return TINY_TEACHER.replace(num_hidden_layers=exp.tiny_layers), data.ByteCodec(), None
    config = checkpoint.load_config(exp.teacher)
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"{exp.teacher}: the teacher must be a Llama checkpoint, this one is {type(config).__name__}")
    tokenizer = checkpoint.tokenizer_dir(exp.teacher)
    if tokenizer is None:
        raise ConfigError(f"{exp.teacher}: has no tokenizer/ to turn the data into tokens")
    from zebrax.api import load_tokenizer

    return config, data.TokenizerCodec(load_tokenizer(exp.teacher)), tokenizer


def _pairs(exp: Experiment, codec) -> dict:
    """The DPO pairs of ``exp.preferences`` as rows, checked: some pair counts loss tokens in both replies."""
    pairs = data.load_rows(exp.preferences, codec, exp.seq_len, preference=True)
    check_counted(np.minimum(data.counted(pairs, "chosen_"), data.counted(pairs, "rejected_")),
                   f"distill.preferences ({', '.join(exp.preferences)})", exp.seq_len, "pairs")
    return pairs


def _generated(exp: Experiment) -> bool:
    """The teacher's replies to every prompt are in ``exp.generated_data`` (the prompts are read, and checked)."""
    prompts = data.read_prompts(exp.generation_prompts)
    done = data.replies(exp.generated_data)
    return all(i in done for i in range(len(prompts)))


@dataclasses.dataclass
class _Inputs:
    """What ``_prepare`` read and checked before any work."""

    t_config: LlamaConfig
    codec: object  # data.ByteCodec or data.TokenizerCodec
    tokenizer: Path | None  # the teacher's tokenizer/, copied into every model written
    students: dict  # {"mla", "mamba2"} → HybridConfig
    mesh: object  # a jax Mesh, or None: one device
    files: tuple[str, ...]  # the data files, the teacher's replies included
    parts: tuple | None  # the held-out, ILD and KD rows; None until the teacher has answered every prompt
    rows: dict | None  # the documents of ``files`` (what the tiny teacher learns)
    pairs: dict | None  # the DPO pairs
    hashes: dict  # file → SHA-256 of the files read


@contextlib.contextmanager
def _about(exp: Experiment, field: str):
    """A ZebraxError raised in the block names the ``Experiment`` field it comes from, and its value."""
    try:
        yield
    except ZebraxError as e:
        raise ConfigError(f"distill.{field} = {getattr(exp, field)!r}: {e}") from None


def _prepare(exp: Experiment) -> _Inputs:
    """Everything the settings and the files can tell, before any work: the teacher's config and tokenizer, the
    students' configs, SMART's placement, the mesh, every data file's records and the tokens their loss counts,
    the split. (The teacher's replies, when still to be written, are checked once written.)"""
    from zebrax.select import place

    t_config, codec, tokenizer = _teacher_config(exp)
    with _about(exp, "student"):
        students = {name: from_teacher(t_config, mla_layers=layers, **exp.student)
                    for name, layers in STUDENTS.items()}
    with _about(exp, "num_mla"):
        place([0.0] * t_config.num_hidden_layers, exp.num_mla)  # SMART can place num_mla layers
    with _about(exp, "random_init"):
        known = set(kinds()) & {m for c in students.values() for m in c.mixers}
        if not set(exp.random_init) <= known:
            raise ConfigError(f"expected some of the students' mixer kinds ({', '.join(sorted(known))})")
    with _about(exp, "mesh"):
        if jax.process_count() > 1 and not exp.mesh:
            raise ConfigError(f"a run of {jax.process_count()} processes shards over a mesh of all their devices: "
                              f"give one, e.g. {{'fsdp': -1}}")
        mesh = make_mesh(MeshConfig(**exp.mesh)) if exp.mesh else None
    if mesh is not None:
        _check_rows_divide(exp, row_shards(mesh))
    answered = not exp.generation_prompts or _generated(exp)  # the teacher has replied to every prompt
    if jax.process_count() > 1 and not answered:
        raise ConfigError(f"distill.generation_prompts = {exp.generation_prompts!r}: the teacher answers prompts in "
                          f"one process; run once without the other processes to write {exp.generated_data}, or "
                          f"tokenize the replies into a corpus (zebrax tokenize)")
    pairs = _pairs(exp, codec) if exp.preferences else None
    files = (*exp.data, exp.generated_data) if exp.generation_prompts else exp.data
    rows = split = None
    if answered:
        rows = documents(exp, codec, files)
        split = parts(exp, rows, files)
    hashes = {f: data.sha256(Path(f) / corpus.MANIFEST if corpus.is_corpus(f) else f)
              for f in (*exp.data, *exp.preferences, exp.generation_prompts) if f}
    return _Inputs(t_config=t_config, codec=codec, tokenizer=tokenizer, students=students, mesh=mesh,
                   files=files, parts=split, rows=rows, pairs=pairs, hashes=hashes)


def _check_rows_divide(exp: Experiment, shards: int) -> None:
    """ConfigError naming the stage whose micro-batches the mesh cannot split into ``shards`` equal parts of rows."""
    trained = {"ild": exp.ild, "kd": exp.kd, "kd_long": exp.kd_long, "dpo": exp.dpo, "teacher": exp.tiny_teacher}
    names = set(exp.plan()) - ({"teacher"} if exp.teacher != "tiny" else set())
    for name, cfg in ((n, c) for n, c in trained.items() if n in names):
        micro = cfg.batch_size // cfg.accumulate
        if micro % shards:
            raise ConfigError(f"{name}/TrainConfig.batch_size = {cfg.batch_size} (accumulate {cfg.accumulate}): "
                              f"micro-batches of {micro} rows, which distill.mesh = {exp.mesh!r} cannot split over "
                              f"its {shards} row shards (data × fsdp); make it a multiple of {shards}")


def run(exp: Experiment, workdir: str | os.PathLike, *, config_text: str | None = None,
        shared: str | os.PathLike | None = None) -> dict:
    """Run (or resume) every stage; returns ``eval.json``'s content. ``config_text``: the resolved gin config, written
    to ``WORKDIR/config.gin``; ``shared``: a directory of stages finished by runs that agree on them
    (``stages.Run.reuse``). Everything is checked (``_prepare``) before the work directory is touched."""
    workdir = checkpoint.as_path(workdir)
    with checkpoint.warnings_after_success():  # a refused experiment says one thing, why
        inputs = _prepare(exp)
    with _claimed(workdir, exp, inputs.hashes):
        if config_text is not None:
            write_text(workdir / "config.gin", config_text)
        return stage_list.run_stages(stage_list.Run(exp, workdir, inputs, stage_list.plan(exp.plan()),
                                                    shared=None if shared is None else Path(shared)))

"""The Zebra-Llama pipeline in one resumable run (METHOD §6): teacher → all-MLA and all-Mamba2 students → ILD (both
students in one step) → SMART on held-out rows → the assembled hybrid → KD → DPO (when preference data is given).

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
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, corpus, data
from zebrax.config import DTYPES, HybridConfig, LlamaConfig
from zebrax.distill.dpo import dpo_objective
from zebrax.distill.ild import ild_objective
from zebrax.distill.kd import check_top_k, kd_objective
from zebrax.distill.losses import ILD_KINDS, KL_DIRECTIONS, NORMALIZE
from zebrax.distill.trainer import TrainConfig, check_choice, check_int, check_number, check_strings, train
from zebrax.errors import ConfigError, InvalidArgument, ZebraxError, warn
from zebrax.mixers import legend
from zebrax.models.decoder import REMAT_POLICIES
from zebrax.sharding import MeshConfig, make_mesh, row_shards, sync

# the teacher of ``teacher="tiny"``: SmolLM2's shape scaled down (GQA 4/2, head_dim 16), bytes as tokens, first
# trained on the run's data (``Experiment.tiny_teacher``) so that it has distributions worth distilling
TINY_TEACHER = LlamaConfig(vocab_size=data.ByteCodec.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           bos_token_id=data.ByteCodec.bos, eos_token_id=(data.ByteCodec.eos,),
                           max_position_embeddings=1024, tie_word_embeddings=True)
STUDENTS = {"mla": "all", "mamba2": "none"}  # the two students ILD trains: name → mla_layers
RECORD, HASHES, LOCK = "experiment.json", "data_sha256.json", ".lock"


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
    - ``student``: ``HybridConfig.from_teacher`` arguments for both students (ranks, RoPE, …); ``num_mla``: MLA
      layers SMART places; ``smart_rows``: SMART scores on the first that many rows of ``seq_len`` held-out tokens
      (0: all of them).
    - KD: ``kd_direction``, ``kd_temperature``, ``kd_normalize`` (``"token"``: the mean over counted tokens, the
      default, so the loss scale does not move with lengths and padding; ``"sequence"``: the reference code's sum
      over tokens divided by the batch), ``kd_ce_weight``, ``kd_top_k`` (> 0: the KL against the teacher's top-k
      tokens only, renormalised; read from the corpus when ``zebrax teacher-logits`` stored that many there, and
      the KD step then runs without the teacher).
    """

    teacher: str = "tiny"
    tiny_teacher: TrainConfig = TrainConfig(steps=200, learning_rate=3e-3, warmup_ratio=0.05)
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
    num_mla: int = 2
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
    dpo: TrainConfig = TrainConfig(learning_rate=5e-7, warmup_ratio=0.1)

    def __post_init__(self):
        """Each field's type and range (ConfigError naming the field and its value), and that the data files
        exist; what needs the teacher or the files' content is checked by ``run`` before any work."""
        if not (isinstance(self.teacher, str) and self.teacher):
            raise ConfigError(f"distill.teacher = {self.teacher!r}: expected 'tiny' or a zebrax Llama checkpoint")
        for name in ("tiny_teacher", "ild", "kd", "dpo"):
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
        recipe = set(HybridConfig.recipe_arguments()) - {"mla_layers"}
        if not (isinstance(self.student, dict) and set(self.student) <= recipe):
            raise ConfigError(f"distill.student = {self.student!r}: expected a dict of HybridConfig.from_teacher "
                              f"arguments ({', '.join(sorted(recipe))})")
        check_int("distill.num_mla", self.num_mla, 1)
        check_int("distill.smart_rows", self.smart_rows, 0)
        check_choice("distill.ild_kind", self.ild_kind, ILD_KINDS)
        check_choice("distill.kd_direction", self.kd_direction, KL_DIRECTIONS)
        check_number("distill.kd_temperature", self.kd_temperature, 0.0, open_low=True)
        check_choice("distill.kd_normalize", self.kd_normalize, NORMALIZE)
        check_number("distill.kd_ce_weight", self.kd_ce_weight, 0.0)
        check_int("distill.kd_top_k", self.kd_top_k, 0)
        check_top_k(self.kd_top_k, self.kd_direction, self.kd_temperature)
        check_number("distill.dpo_beta", self.dpo_beta, 0.0, open_low=True)

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


def _say(text: str) -> None:
    print(f"[zebrax distill] {text}", file=sys.stderr, flush=True)


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
                _write_text(workdir / RECORD, exp.to_json())
            _record_hashes(workdir, hashes)
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
        _hashes_agree(workdir, hashes)
        return False
    if workdir.exists() and any(p.name != LOCK for p in workdir.iterdir()):
        raise ConfigError(f"{workdir}: exists and is not a zebrax distill work directory; use another --workdir")
    return True


def _hashes_agree(workdir: Path, hashes: dict[str, str]) -> dict[str, str]:
    """The work directory's record of data hashes with ``hashes`` added; ConfigError naming a file whose content
    differs from the one the work directory was made from."""
    path = workdir / HASHES
    old = json.loads(path.read_text()) if path.exists() else {}
    for f in sorted(set(old) & set(hashes)):
        if old[f] != hashes[f]:
            raise ConfigError(f"{workdir}: written from other data ({f}: sha256 {old[f][:12]} there, "
                              f"{hashes[f][:12]} now: the file has changed); use another --workdir")
    return {**old, **hashes}


def _record_hashes(workdir: Path, hashes: dict[str, str]) -> None:
    """Add ``hashes`` to the work directory's record (refused if one differs)."""
    merged = _hashes_agree(workdir, hashes)
    path = workdir / HASHES
    if not path.exists() or json.loads(path.read_text()) != merged:
        _write_text(path, json.dumps(merged, indent=2, sort_keys=True))


def _write_text(path: Path, text: str) -> None:
    """Atomically, by process 0 only."""
    if jax.process_index() != 0:
        return
    checkpoint.write_text_atomic(path, text)


def _save(workdir: Path, name: str, models: dict[str, tuple], tokenizer: Path | None) -> None:
    """``{sub: (config, params)}`` → ``WORKDIR/name[/sub]`` as one atomic directory ("" = ``name`` itself), written
    by every process, each the shards its devices hold (no host gathers a model); every process returns once it is
    committed."""
    with checkpoint.atomic_directory_of_all(workdir / name, what="stage output") as tmp:
        for sub, (config, params) in models.items():
            target = tmp / sub if sub else tmp
            target.mkdir(exist_ok=True)
            checkpoint.save(target, config, params)
            if tokenizer is not None and jax.process_index() == 0:
                checkpoint.copy_tree(tokenizer, target / "tokenizer")


def _finished(workdir: Path, stage: str) -> None:
    """A stage's output is written: its resumption checkpoints and compiled steps are no longer needed."""
    jax.clear_caches()
    if jax.process_index() == 0:
        checkpoint.remove_tree(workdir / "checkpoints" / stage)
    sync(f"finished {stage}")


def _shardings(config, mesh):
    """The ``NamedSharding`` tree of a model ``config`` over ``mesh`` (``sharding.param_shardings``); None without."""
    if mesh is None:
        return None
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    return param_shardings(config, abstract_params(config), mesh)


def _load(path: Path, mesh=None) -> tuple:
    """(config, params) of a checkpoint; with a ``mesh``, the parameters restored straight into their shardings
    (``_shardings``): no device, and no host, holds a whole model."""
    config = checkpoint.load_config(path)
    return config, checkpoint.load_params(path, config, _shardings(config, mesh))


def _lm_objective(model):
    """Next-token cross-entropy over counted positions: how the tiny teacher learns the data."""
    from zebrax.distill.losses import ce_loss

    def objective(params, _, batch):
        tokens, token_mask = batch["tokens"], batch["token_mask"].astype(bool)
        logits = model.apply({"params": params}, tokens, token_mask=token_mask, segment_ids=batch.get("segment_ids"))[0]
        counted = batch["loss_mask"][:, :-1].astype(bool) & data.next_in_document(batch)
        ce = ce_loss(logits[:, :-1], tokens[:, 1:], counted)
        return ce, {"ce": ce}

    return objective


def _teacher_config(exp: Experiment) -> tuple:
    """(config, codec, tokenizer dir or None) of the teacher, from its checkpoint's config.json and tokenizer/ (its
    parameters are not read)."""
    if exp.teacher == "tiny":
        return TINY_TEACHER, data.ByteCodec(), None
    config = checkpoint.load_config(exp.teacher)
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"{exp.teacher}: the teacher must be a Llama checkpoint, this one is {type(config).__name__}")
    tokenizer = checkpoint.tokenizer_dir(exp.teacher)
    if tokenizer is None:
        raise ConfigError(f"{exp.teacher}: has no tokenizer/ to turn the data into tokens")
    from zebrax.api import load_tokenizer

    return config, data.TokenizerCodec(load_tokenizer(exp.teacher)), tokenizer


def _teacher(exp: Experiment, config, workdir: Path, mesh, rows: dict | None):
    """The teacher's parameters; for ``teacher="tiny"`` first trained on the document ``rows`` of ``exp.data``."""
    if exp.teacher == "tiny":
        path = workdir / "teacher"
        if not (checkpoint.committed(path) and checkpoint.is_checkpoint(path)):
            import flax.linen as nn

            from zebrax.models import build

            rows = data.pack(rows, exp.seq_len) if exp.pack and isinstance(rows, dict) else rows
            _say(f"tiny teacher: {exp.tiny_teacher.steps} steps of next-token training on the data")
            module = build(config)
            params = nn.unbox(module.init(jax.random.key(exp.seed), np.zeros((1, 1), np.int32)))["params"]
            params = train("teacher", _lm_objective(module), params, None,
                           data.batches(rows, exp.tiny_teacher.batch_size, exp.seed + 3, **_process_share()),
                           exp.tiny_teacher, workdir, tokens_of=_real_tokens, counted_of=_counted,
                           **_sharded(mesh, {"": (config, params)}, None))
            _save(workdir, "teacher", {"": (config, params)}, None)
            _finished(workdir, "teacher")
        return _load(path, mesh)[1]
    return _load(exp.teacher, mesh)[1]


def _check_counted(counts: np.ndarray, what: str, seq_len: int, noun: str = "documents") -> None:
    """``counts`` ``[N]``: the loss tokens of each of ``what``'s documents (or pairs). DataError when none counts
    any; a warning when some do not."""
    _check_none_counted(int(np.sum(counts == 0)), len(counts), what, seq_len, noun)


def _check_none_counted(none: int, total: int, what: str, seq_len: int, noun: str = "documents") -> None:
    """``none`` of ``what``'s ``total`` documents count a loss token: ``_check_counted`` from the counts alone."""
    if none == total:
        raise data.DataError(f"{what}: none of its {total} {noun} counts a loss token once cut to "
                             f"distill.seq_len = {seq_len} (a chat record counts its last reply only: each is cut "
                             f"off, or empty); raise distill.seq_len or shorten the prompts")
    if none:
        warn(f"{what}: {none} of its {total} {noun} count no loss token once cut to distill.seq_len = "
             f"{seq_len} (their replies are cut off, or empty); they add nothing to the loss")


def _documents(exp: Experiment, codec, files: tuple[str, ...]):
    """Every document of ``files`` as a row ``{field: [N, L]}``, or the rows of a tokenized corpus
    (``corpus.Corpus``), checked: some count a loss token; a corpus matches the run's ``seq_len``, packing and
    tokenizer."""
    if not files:
        raise data.DataError("distill.data: no data files given")
    if corpus.is_corpus(files[0]):
        rows = corpus.Corpus(files[0])
        m = rows.manifest
        for what, theirs, ours in (("seq_len", rows.seq_len, exp.seq_len), ("pack", rows.packed, exp.pack),
                                   ("the vocabulary size", m["vocab_size"], codec.vocab_size)):
            if theirs != ours:
                raise ConfigError(f"distill.data: {files[0]} was tokenized with {what} {theirs!r}, the run's is "
                                  f"{ours!r} (distill.{'seq_len' if what == 'seq_len' else 'pack'} or the teacher's "
                                  f"tokenizer); tokenize it again or change the setting")
        _check_none_counted(m["documents_counting_none"], m["documents"], f"distill.data ({files[0]})", exp.seq_len)
        return rows
    rows = data.load_rows(files, codec, exp.seq_len)
    _check_counted(data.counted(rows), f"distill.data ({', '.join(files)})", exp.seq_len)
    return rows


def _parts(exp: Experiment, rows: dict, files: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """The held-out, ILD and KD rows (the last two packed with ``exp.pack``), checked: the held-out and KD parts
    count loss tokens (KL and KD have something to measure and learn), and the held-out rows fill a row of
    ``seq_len`` for SMART."""
    held, ild_rows, kd_rows = data.split(rows, exp.split, exp.seed)
    tokenized = isinstance(rows, corpus.Corpus)
    if tokenized:  # the held-out rows in memory (evaluation, SMART); training reads the others as it goes
        held = held.take(range(len(held)))
    for i, (name, part) in enumerate((("held-out", held), ("ILD", ild_rows), ("KD", kd_rows))):
        if name != "ILD" and not (tokenized and name == "KD"):  # ILD matches every real token
            _check_counted(data.counted(part), f"the {name} part (distill.split[{i}]) of distill.data "
                                               f"({', '.join(files)})", exp.seq_len)
    _calibration(held, exp.seq_len)
    if exp.pack and not tokenized:  # the held-out rows stay one document each
        ild_rows, kd_rows = data.pack(ild_rows, exp.seq_len), data.pack(kd_rows, exp.seq_len)
    return held, ild_rows, kd_rows


def _pairs(exp: Experiment, codec) -> dict:
    """The DPO pairs of ``exp.preferences`` as rows, checked: some pair counts loss tokens in both replies."""
    pairs = data.load_rows(exp.preferences, codec, exp.seq_len, preference=True)
    _check_counted(np.minimum(data.counted(pairs, "chosen_"), data.counted(pairs, "rejected_")),
                   f"distill.preferences ({', '.join(exp.preferences)})", exp.seq_len, "pairs")
    return pairs


def _generated(exp: Experiment) -> bool:
    """The teacher's replies to every prompt are in ``exp.generated_data`` (the prompts are read, and checked)."""
    prompts = data.read_prompts(exp.generation_prompts)
    done = data.replies(exp.generated_data)
    return all(i in done for i in range(len(prompts)))


def _sharded(mesh, trained: dict, frozen: tuple | None) -> dict:
    """``train``'s ``mesh`` and ``shardings`` keywords: ``trained`` = {name: (config, params)} (one entry with name
    "" for a single model), ``frozen`` = (config, params) or None."""
    if mesh is None:
        return {}
    from zebrax.sharding import param_shardings

    sh = {n: param_shardings(c, p, mesh) for n, (c, p) in trained.items()}
    return {"mesh": mesh, "shardings": (sh[""] if "" in sh else sh,
                                        None if frozen is None else param_shardings(*frozen, mesh))}


def _process_share() -> dict:
    return dict(process_index=jax.process_index(), process_count=jax.process_count())


def _compute(exp: Experiment, config, *, trained: bool):
    """The module a training step runs: ``config`` computing in ``exp.compute_dtype`` (its parameters stay in
    ``config.param_dtype``), with remat for a trained model when ``exp.remat``."""
    from zebrax.models import build

    return build(config.replace(dtype=exp.compute_dtype), remat=trained and exp.remat)


def _chunk(exp: Experiment) -> int:
    """``exp.loss_chunk`` where it divides ``seq_len`` (else the largest divisor below it), 0 for whole rows."""
    if not exp.loss_chunk or exp.loss_chunk >= exp.seq_len:
        return 0
    return max(c for c in range(1, exp.loss_chunk + 1) if exp.seq_len % c == 0)


def stage_objective(exp: Experiment, stage: str, teacher, trained: dict) -> Callable:
    """The objective a training stage of ``exp`` runs (``trainer`` form): ``stage`` "ild", "kd" or "dpo";
    ``teacher`` the teacher's config; ``trained`` {name: config} of what the stage trains (ILD: both students;
    KD and DPO: {"": the hybrid}). ``zebrax.aot`` compiles the same objective."""
    if stage == "ild":
        return ild_objective(_compute(exp, teacher, trained=False),
                             {n: _compute(exp, c, trained=True) for n, c in trained.items()}, kind=exp.ild_kind)
    if stage == "kd":
        return kd_objective(_compute(exp, teacher, trained=False), _compute(exp, trained[""], trained=True),
                            direction=exp.kd_direction, temperature=exp.kd_temperature, normalize=exp.kd_normalize,
                            ce_weight=exp.kd_ce_weight, top_k=exp.kd_top_k, chunk=_chunk(exp))
    if stage == "dpo":
        return dpo_objective(_compute(exp, trained[""], trained=True), beta=exp.dpo_beta, chunk=_chunk(exp))
    raise InvalidArgument(f"stage={stage!r}: expected 'ild', 'kd' or 'dpo'")


def _real_tokens(batch: dict) -> int:
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("token_mask")))


def _counted(batch: dict) -> int:
    """The tokens a batch's loss counts (``data.counted``; both replies of DPO pairs)."""
    return int(sum(data.counted(batch, k.removesuffix("loss_mask")).sum() for k in batch if k.endswith("loss_mask")))


def _calibration(rows: dict, seq_len: int) -> np.ndarray:
    """The held-out rows' real tokens, concatenated and cut into full rows (SMART scores without padding)."""
    stream = np.concatenate([t[m] for t, m in zip(rows["tokens"], rows["token_mask"], strict=True)])
    n = len(stream) // seq_len
    if n == 0:
        raise ZebraxError(f"SMART: the held-out rows hold {len(stream)} tokens, fewer than one row of {seq_len}; "
                          f"raise the held-out fraction of Experiment.split")
    return stream[: n * seq_len].reshape(n, seq_len)


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
        students = {name: HybridConfig.from_teacher(t_config, mla_layers=layers, **exp.student)
                    for name, layers in STUDENTS.items()}
    with _about(exp, "num_mla"):
        place([0.0] * t_config.num_hidden_layers, exp.num_mla)  # SMART can place num_mla layers
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
    rows = parts = None
    if answered:
        rows = _documents(exp, codec, files)
        parts = _parts(exp, rows, files)
    hashes = {f: data.sha256(Path(f) / corpus.MANIFEST if corpus.is_corpus(f) else f)
              for f in (*exp.data, *exp.preferences, exp.generation_prompts) if f}
    return _Inputs(t_config=t_config, codec=codec, tokenizer=tokenizer, students=students, mesh=mesh,
                   files=files, parts=parts, rows=rows, pairs=pairs, hashes=hashes)


def _check_rows_divide(exp: Experiment, shards: int) -> None:
    """ConfigError naming the stage whose micro-batches the mesh cannot split into ``shards`` equal parts of rows."""
    stages = {"ild": exp.ild, "kd": exp.kd, **({"teacher": exp.tiny_teacher} if exp.teacher == "tiny" else {}),
              **({"dpo": exp.dpo} if exp.preferences else {})}
    for name, cfg in stages.items():
        micro = cfg.batch_size // cfg.accumulate
        if micro % shards:
            raise ConfigError(f"{name}/TrainConfig.batch_size = {cfg.batch_size} (accumulate {cfg.accumulate}): "
                              f"micro-batches of {micro} rows, which distill.mesh = {exp.mesh!r} cannot split over "
                              f"its {shards} row shards (data × fsdp); make it a multiple of {shards}")


def run(exp: Experiment, workdir: str | os.PathLike, *, config_text: str | None = None) -> dict:
    """Run (or resume) every stage; returns ``eval.json``'s content. ``config_text``: the resolved gin config, written
    to ``WORKDIR/config.gin``. Everything is checked (``_prepare``) before the work directory is touched."""
    workdir = checkpoint.as_path(workdir)
    with checkpoint.warnings_after_success():  # a refused experiment says one thing, why
        inputs = _prepare(exp)
    with _claimed(workdir, exp, inputs.hashes):
        if config_text is not None:
            _write_text(workdir / "config.gin", config_text)
        return _stages(exp, workdir, inputs)


def _stages(exp: Experiment, workdir: Path, inputs: _Inputs) -> dict:
    """Every stage in the claimed work directory; a stage whose output is there is skipped."""
    from zebrax.api import Model
    from zebrax.evaluate import evaluate as measure
    from zebrax.init import assemble, init_hybrid
    from zebrax.models import build
    from zebrax.select import place, scores

    t_config, mesh, tokenizer = inputs.t_config, inputs.mesh, inputs.tokenizer
    t_params = _teacher(exp, t_config, workdir, mesh, inputs.rows)
    teacher = build(t_config)
    if mesh is None:
        t_params = jax.device_put(t_params)
    if exp.generation_prompts:
        _say(f"teacher-made data: {exp.generation_prompts} → {exp.generated_data}")
        data.generate_data(Model(t_config, t_params, inputs.codec.tokenizer, mesh=mesh), exp.generation_prompts,
                           exp.generated_data, **exp.generation)
        if jax.process_index() == 0:
            _record_hashes(workdir, {exp.generated_data: data.sha256(exp.generated_data)})
    if inputs.parts is None:
        with checkpoint.warnings_after_success():
            inputs.parts = _parts(exp, _documents(exp, inputs.codec, inputs.files), inputs.files)
    held, ild_rows, kd_rows = inputs.parts
    shard = _process_share()
    evals_path = workdir / "eval.json"
    evals = json.loads(evals_path.read_text()) if evals_path.exists() else {}

    def evaluate(name: str, config, params) -> None:
        if name not in evals:
            evals[name] = measure(build(config), params, held, teacher=teacher, teacher_params=t_params, mesh=mesh)
            _write_text(evals_path, json.dumps(evals, indent=2))
            _say(f"{name}: KL(teacher ‖ model) {evals[name]['kl']:.4f}, perplexity {evals[name]['perplexity']:.2f}")

    evaluate("teacher", t_config, t_params)
    students = {name: (config, init_hybrid(t_config, t_params, config, jax.random.key(exp.seed),
                                           _shardings(config, mesh))[0])
                for name, config in inputs.students.items()}

    if not checkpoint.committed(workdir / "ild"):
        _say(f"ILD: {exp.ild.steps} steps of {exp.ild.batch_size} × {exp.seq_len} tokens, both students at once")
        objective = stage_objective(exp, "ild", t_config, {n: c for n, (c, _) in students.items()})
        params = train("ild", objective, {n: p for n, (_, p) in students.items()}, t_params,
                       data.batches(ild_rows, exp.ild.batch_size, exp.seed, **shard), exp.ild, workdir,
                       tokens_of=_real_tokens, **_sharded(mesh, students, (t_config, t_params)))
        _save(workdir, "ild", {n: (students[n][0], params[n]) for n in students}, tokenizer)
        _finished(workdir, "ild")
    ild = {n: _load(workdir / "ild" / n, mesh) for n in students}

    if not (workdir / "smart.json").exists():
        _say(f"SMART: scoring {t_config.num_hidden_layers} layers")
        result = scores(Model(t_config, t_params, mesh=mesh), Model(*ild["mla"], mesh=mesh),
                        Model(*ild["mamba2"], mesh=mesh),
                        _calibration(held, exp.seq_len)[:exp.smart_rows or None])
        result["mla_layers"] = place(result["scores"], exp.num_mla)
        _write_text(workdir / "smart.json", json.dumps(result, indent=2))
        sync("smart")
    mla_layers = json.loads((workdir / "smart.json").read_text())["mla_layers"]
    evaluate("initialised", *assemble(students["mla"], students["mamba2"], mla_layers))
    if not checkpoint.committed(workdir / "hybrid"):
        _save(workdir, "hybrid", {"": assemble(ild["mla"], ild["mamba2"], mla_layers)}, tokenizer)
    h_config, h_params = _load(workdir / "hybrid", mesh)
    _say(f"hybrid: layers {h_config.layer_map()} ({legend(h_config.layer_map())})")
    evaluate("after_ild", h_config, h_params)

    if not checkpoint.committed(workdir / "kd"):
        # a corpus holding the teacher's top-k logits (``zebrax teacher-logits``) for kd_top_k: KD without the teacher
        stored = isinstance(kd_rows, corpus.Corpus) and 0 < exp.kd_top_k == kd_rows.topk
        _say(f"KD: {exp.kd.steps} steps of {exp.kd.batch_size} × {exp.seq_len} tokens"
             + (f", from the teacher's stored top-{exp.kd_top_k} logits" if stored else ""))
        objective = stage_objective(exp, "kd", t_config, {"": h_config})
        kd_data = data.batches(kd_rows.with_teacher_topk() if stored else kd_rows, exp.kd.batch_size, exp.seed + 1,
                               **shard)
        params = train("kd", objective, h_params, None if stored else t_params, kd_data, exp.kd, workdir,
                       tokens_of=_real_tokens, counted_of=_counted,
                       **_sharded(mesh, {"": (h_config, h_params)}, None if stored else (t_config, t_params)))
        _save(workdir, "kd", {"": (h_config, params)}, tokenizer)
        _finished(workdir, "kd")
    kd_params = _load(workdir / "kd", mesh)[1]
    evaluate("after_kd", h_config, kd_params)

    if exp.preferences:
        if not checkpoint.committed(workdir / "dpo"):
            _say(f"DPO: {exp.dpo.steps} steps of {exp.dpo.batch_size} pairs, β = {exp.dpo_beta}")
            reference = kd_params if mesh is not None else jax.device_put(kd_params)
            params = train("dpo", stage_objective(exp, "dpo", t_config, {"": h_config}), kd_params,
                           reference,
                           data.batches(inputs.pairs, exp.dpo.batch_size, exp.seed + 2, **shard), exp.dpo, workdir,
                           tokens_of=_real_tokens, counted_of=_counted,
                           **_sharded(mesh, {"": (h_config, kd_params)}, (h_config, kd_params)))
            _save(workdir, "dpo", {"": (h_config, params)}, tokenizer)
            _finished(workdir, "dpo")
        evaluate("after_dpo", h_config, _load(workdir / "dpo", mesh)[1])
    return evals

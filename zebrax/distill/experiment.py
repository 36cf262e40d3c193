"""A distillation run's settings: ``Experiment``, every field checked when it is made (the files it names are
checked by ``inputs.prepare``, before any work).
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np

from zebrax import data
from zebrax.checks import DTYPES
from zebrax.distill import stages as stage_list
from zebrax.distill.objectives import check_top_k
from zebrax.distill.stages import PLACEMENTS
from zebrax.distill.trainer import TrainConfig, check_choice, check_int, check_number, check_strings
from zebrax.errors import ConfigError, InvalidArgument
from zebrax.losses import ILD_KINDS, KL_DIRECTIONS, NORMALIZE
from zebrax.mixers import kind, kinds
from zebrax.models.decoder import REMAT_POLICIES
from zebrax.recipe import arguments
from zebrax.sharding import MeshConfig


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
    - ``student``: ``recipe.from_teacher`` arguments for both students (MLA's ranks and RoPE, ``mla={…}``, …);
      ``linear``: the linear student's kind ("mamba2" or "gdn": the hybrid's layers that are not MLA), and
      ``linear_config`` fields of its config to override (``{'chunk_size': 16}``), whatever the kind;
      ``random_init``: mixer kinds ("mla", "mamba2", "gdn") initialised at random instead of from the
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
      ``stages`` lists it), on ``long_data`` (files of long documents, one a row: ``zebrax long-docs``) or, without
      it, on the KD documents cut to the longer rows.
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
    linear: str = "mamba2"
    linear_config: dict = dataclasses.field(default_factory=dict)
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
    long_data: tuple[str, ...] = ()
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
        check_strings("distill.long_data", self.long_data, empty=True)
        for name in ("generation_prompts", "generated_data"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"distill.{name} = {getattr(self, name)!r}: expected a file path (a string)")
        for name, files in (("data", self.data), ("preferences", self.preferences), ("long_data", self.long_data)):
            twice = sorted({f for f in files if files.count(f) > 1})
            if twice:
                raise ConfigError(f"distill.{name} names {twice[0]} twice; each file is read once")
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
        self._check_students()
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
        if self.long_data and "kd_long" not in self.plan():
            raise ConfigError(f"distill.long_data = {self.long_data!r}: only the stage 'kd_long' reads it, and "
                              f"distill.stages = {self.stages!r} has none")
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

    def _check_students(self) -> None:
        """``student``: ``recipe.from_teacher`` arguments but the layers' (ConfigError naming the field that now says
        what ``student`` said); ``linear``: a kind of the linear family; ``linear_config``: fields of its config."""
        if not isinstance(self.student, dict):
            raise ConfigError(f"distill.student = {self.student!r}: expected a dict of recipe.from_teacher arguments")
        linear_kinds = {k.name for k in kinds().values() if k.linear}
        moved = {"linear": "distill.linear", **dict.fromkeys(linear_kinds, "distill.linear_config")}
        for name in sorted(set(self.student) & set(moved)):
            raise ConfigError(f"distill.student[{name!r}]: the linear student's kind and settings are bound on their "
                              f"own: {moved[name]} = {self.student[name]!r}")
        recipe = set(arguments()) - {"mla_layers", "layers", *moved}
        if not set(self.student) <= recipe:
            raise ConfigError(f"distill.student = {self.student!r}: expected a dict of recipe.from_teacher "
                              f"arguments ({', '.join(sorted(recipe))})")
        check_choice("distill.linear", self.linear, tuple(sorted(linear_kinds)))
        fields = {f.name for f in dataclasses.fields(kind(self.linear).config)}
        if not (isinstance(self.linear_config, dict) and set(self.linear_config) <= fields):
            raise ConfigError(f"distill.linear_config = {self.linear_config!r}: expected fields of "
                              f"{kind(self.linear).config.__name__} ({', '.join(sorted(fields))})")

    def recipe(self) -> dict:
        """The ``recipe.from_teacher`` arguments both students are made with (but their layers)."""
        return {**self.student, "linear": self.linear, self.linear: self.linear_config}

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

    @staticmethod
    def from_record(record: dict) -> dict:
        """A work directory's ``experiment.json`` as this version writes it: a record written before the linear kind
        was bound on its own (``student['linear']``, ``student['mamba2']``) says it with ``linear`` and
        ``linear_config``, so that its run resumes."""
        record = dict(record)
        student = dict(record.get("student") or {})
        if "linear" in student or any(k in student for k in kinds() if kind(k).linear):
            linear = student.pop("linear", "mamba2")
            settings = student.pop(linear, {})
            for name in [k for k in student if k in kinds() and kind(k).linear]:
                student.pop(name)  # a linear kind's settings that no student used
            record.update(student=student, linear=linear, linear_config=settings)
        return record

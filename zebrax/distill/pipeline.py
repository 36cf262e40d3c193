"""The Zebra-Llama pipeline in one resumable run (METHOD §6): teacher → all-MLA and all-Mamba2 students → ILD (both
students in one step) → SMART on held-out rows → the assembled hybrid → KD → DPO (when preference data is given).

Everything lands in one work directory:

    experiment.json          the run's ``Experiment``; a different one is refused (config.gin: its gin form)
    teacher/                 the teacher made for ``teacher="tiny"`` (a random tiny Llama)
    checkpoints/STAGE/       orbax checkpoints of the stage in progress (params, optimizer, data position),
                             removed once the stage's output is written
    ild/{mla,mamba2}/        the ILD-trained students        (zebrax checkpoints, each written atomically)
    smart.json               SMART's scores and the MLA layers
    hybrid/  kd/  dpo/       the assembled hybrid, and after KD and DPO
    eval.json                KL(teacher ‖ model) and perplexity on the held-out rows, per model
    metrics.jsonl            one line per logged step; tensorboard/STAGE/ event files

A finished stage is one whose output exists; re-running the same command skips it and resumes the stage in
progress from its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, data
from zebrax.config import HybridConfig, LlamaConfig
from zebrax.distill.dpo import dpo_objective
from zebrax.distill.ild import ild_objective
from zebrax.distill.kd import kd_objective
from zebrax.distill.trainer import TrainConfig, train
from zebrax.errors import ConfigError, ZebraxError
from zebrax.sharding import MeshConfig, make_mesh

# the teacher of ``teacher="tiny"``: SmolLM2's shape scaled down (GQA 4/2, head_dim 16), bytes as tokens, first
# trained on the run's data (``Experiment.tiny_teacher``) so that it has distributions worth distilling
TINY_TEACHER = LlamaConfig(vocab_size=data.ByteCodec.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           bos_token_id=data.ByteCodec.bos, eos_token_id=(data.ByteCodec.eos,),
                           max_position_embeddings=1024, tie_word_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A distillation run.

    - ``teacher``: a zebrax Llama checkpoint, or ``"tiny"`` (a random tiny Llama first trained on ``data`` by
      ``tiny_teacher``'s settings, next-token cross-entropy).
    - ``data``: text/chat files for ILD, KD and the held-out rows; ``generation_prompts``: a prompt file the teacher
      answers first (``generate_data`` with the ``generation`` settings), its replies cached in ``generated_data``
      (reused by every later run) and added to ``data``.
    - ``pack``: several documents per training row of ``seq_len`` tokens, kept apart by segment ids (the held-out
      rows stay one document each); ``split``: the fractions of documents (held-out, ILD, KD).
    - ``preferences``: DPO pairs (none: no DPO).
    - ``compute_dtype``: the dtype teacher and students compute in during training ("bfloat16": bf16 matmuls,
      float32 master weights, optimizer state, LM heads and losses); ``remat``: the students recompute each
      block's activations in the backward pass.
    - ``mesh``: ``MeshConfig`` fields (``data``, ``fsdp``, ``tensor``; ``{}``: one device): the training steps run
      sharded over it by the rules of ``zebrax.sharding``, teacher included.
    - ``student``: ``HybridConfig.from_teacher`` arguments for both students (ranks, RoPE, …); ``num_mla``: MLA
      layers SMART places; ``smart_rows``: SMART scores on the first that many rows of ``seq_len`` held-out tokens
      (0: all of them).
    - KD: ``kd_direction``, ``kd_temperature``, ``kd_normalize`` (``"token"``: the mean over counted tokens, the
      default, so the loss scale does not move with lengths and padding; ``"sequence"``: the reference code's sum
      over tokens divided by the batch), ``kd_ce_weight``, ``kd_top_k`` (> 0: the KL against the teacher's top-k
      tokens only, renormalised).
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
    remat: bool = False
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=list)


def _say(text: str) -> None:
    print(f"[zebrax distill] {text}", file=sys.stderr, flush=True)


def _sync(tag: str) -> None:
    """Every process of a multi-host run reaches this point before any goes on (files written by process 0 are
    then there for all)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def _claim(workdir: Path, exp: Experiment) -> None:
    """The work directory holds this experiment, or is new; anything else is refused and left untouched. Every
    process decides from the directory as it was; process 0 writes."""
    _sync("claim")
    fresh = _check_claim(workdir, exp)
    _sync("claimed")
    if fresh:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_text(workdir / "experiment.json", exp.to_json())
    _sync("recorded")


def _check_claim(workdir: Path, exp: Experiment) -> bool:
    """True for a new work directory; ConfigError for another experiment's or a foreign one."""
    record = workdir / "experiment.json"
    if record.exists():  # a field added since the record was written counts at its default
        old = {**json.loads(Experiment().to_json()), **json.loads(record.read_text())}
        new = json.loads(exp.to_json())
        if old != new:
            diff = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise ConfigError(f"{workdir}: written by a different experiment ({diff}: {old.get(diff)!r} there, "
                              f"{new.get(diff)!r} now); use another --workdir")
        return False
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"{workdir}: exists and is not a zebrax distill work directory; use another --workdir")
    return True


def _write_text(path: Path, text: str) -> None:
    """Atomically, by process 0 only."""
    if jax.process_index() != 0:
        return
    checkpoint.write_text_atomic(path, text)


def _save(workdir: Path, name: str, models: dict[str, tuple], tokenizer: Path | None) -> None:
    """``{sub: (config, params)}`` → ``WORKDIR/name[/sub]`` as one atomic directory ("" = ``name`` itself), written
    by process 0 from the parameters gathered off every host."""
    from zebrax.sharding import gather

    models = {sub: (config, gather(params)) for sub, (config, params) in models.items()}
    if jax.process_index() == 0:
        with checkpoint.atomic_directory(workdir / name, what="stage output") as tmp:
            for sub, (config, params) in models.items():
                target = tmp / sub if sub else tmp
                target.mkdir(exist_ok=True)
                checkpoint.save(target, config, params)
                if tokenizer is not None:
                    shutil.copytree(tokenizer, target / "tokenizer")
    _sync(f"saved {name}")


def _finished(workdir: Path, stage: str) -> None:
    """A stage's output is written: its resumption checkpoints and compiled steps are no longer needed."""
    jax.clear_caches()
    if jax.process_index() == 0:
        shutil.rmtree(workdir / "checkpoints" / stage, ignore_errors=True)
    _sync(f"finished {stage}")


def _load(path: Path) -> tuple:
    config = checkpoint.load_config(path)
    return config, checkpoint.load_params(path, config)


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


def _teacher(exp: Experiment, workdir: Path, mesh):
    """(config, params, codec, tokenizer dir or None)."""
    if exp.teacher == "tiny":
        path, codec = workdir / "teacher", data.ByteCodec()
        if not checkpoint.is_checkpoint(path):
            import flax.linen as nn

            from zebrax.models import build

            rows = data.load_rows(exp.data, codec, exp.seq_len)
            rows = data.pack(rows, exp.seq_len) if exp.pack else rows
            _say(f"tiny teacher: {exp.tiny_teacher.steps} steps of next-token training on the data")
            module = build(TINY_TEACHER)
            params = nn.unbox(module.init(jax.random.key(exp.seed), np.zeros((1, 1), np.int32)))["params"]
            params = train("teacher", _lm_objective(module), params, None,
                           data.batches(rows, exp.tiny_teacher.batch_size, exp.seed + 3, **_process_share()),
                           exp.tiny_teacher, workdir, tokens_of=_real_tokens,
                           **_sharded(mesh, {"": (TINY_TEACHER, params)}, None))
            _save(workdir, "teacher", {"": (TINY_TEACHER, params)}, None)
            _finished(workdir, "teacher")
        config, params = _load(path)
        return config, params, codec, None
    config, params = _load(Path(exp.teacher))
    if not isinstance(config, LlamaConfig):
        raise ConfigError(f"{exp.teacher}: the teacher must be a Llama checkpoint, this one is {type(config).__name__}")
    tokenizer = checkpoint.tokenizer_dir(exp.teacher)
    if tokenizer is None:
        raise ConfigError(f"{exp.teacher}: has no tokenizer/ to turn the data into tokens")
    from zebrax.api import load_tokenizer

    return config, params, data.TokenizerCodec(load_tokenizer(exp.teacher)), tokenizer


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


def _real_tokens(batch: dict) -> int:
    return int(sum(np.sum(v) for k, v in batch.items() if k.endswith("token_mask")))


def _calibration(rows: dict, seq_len: int) -> np.ndarray:
    """The held-out rows' real tokens, concatenated and cut into full rows (SMART scores without padding)."""
    stream = np.concatenate([t[m] for t, m in zip(rows["tokens"], rows["token_mask"], strict=True)])
    n = len(stream) // seq_len
    if n == 0:
        raise ZebraxError(f"SMART: the held-out rows hold {len(stream)} tokens, fewer than one row of {seq_len}; "
                          f"raise the held-out fraction of Experiment.split")
    return stream[: n * seq_len].reshape(n, seq_len)


def run(exp: Experiment, workdir: str | os.PathLike, *, config_text: str | None = None) -> dict:
    """Run (or resume) every stage; returns ``eval.json``'s content. ``config_text``: the resolved gin config, written
    to ``WORKDIR/config.gin``."""
    from zebrax.api import Model
    from zebrax.evaluate import evaluate as measure
    from zebrax.init import assemble, init_hybrid
    from zebrax.models import build
    from zebrax.select import place, scores

    workdir = Path(workdir).absolute()
    _claim(workdir, exp)
    if config_text is not None:
        _write_text(workdir / "config.gin", config_text)
    mesh = make_mesh(MeshConfig(**exp.mesh)) if exp.mesh else None
    t_config, t_params, codec, tokenizer = _teacher(exp, workdir, mesh)
    teacher = build(t_config)
    t_params = jax.device_put(t_params)
    files = exp.data
    if exp.generation_prompts:
        if not exp.generated_data or tokenizer is None:
            raise ConfigError("distill.generation_prompts needs distill.generated_data (where the replies go) and a "
                              "teacher with a chat template")
        _say(f"teacher-made data: {exp.generation_prompts} → {exp.generated_data}")
        data.generate_data(Model(t_config, t_params, codec.tokenizer), exp.generation_prompts, exp.generated_data,
                           **exp.generation)
        files = (*files, exp.generated_data)
    held, ild_rows, kd_rows = data.split(data.load_rows(files, codec, exp.seq_len), exp.split, exp.seed)
    if exp.pack:  # the held-out rows stay one document each
        ild_rows, kd_rows = data.pack(ild_rows, exp.seq_len), data.pack(kd_rows, exp.seq_len)
    shard = _process_share()
    evals_path = workdir / "eval.json"
    evals = json.loads(evals_path.read_text()) if evals_path.exists() else {}

    def evaluate(name: str, config, params) -> None:
        if name not in evals:
            evals[name] = measure(build(config), params, held, teacher=teacher, teacher_params=t_params)
            _write_text(evals_path, json.dumps(evals, indent=2))
            _say(f"{name}: KL(teacher ‖ model) {evals[name]['kl']:.4f}, perplexity {evals[name]['perplexity']:.2f}")

    evaluate("teacher", t_config, t_params)
    students = {}
    for name, layers in (("mla", "all"), ("mamba2", "none")):
        config = HybridConfig.from_teacher(t_config, mla_layers=layers, **exp.student)
        students[name] = (config, init_hybrid(t_config, t_params, config, jax.random.key(exp.seed))[0])

    if not (workdir / "ild").exists():
        _say(f"ILD: {exp.ild.steps} steps of {exp.ild.batch_size} × {exp.seq_len} tokens, both students at once")
        objective = ild_objective(_compute(exp, t_config, trained=False),
                                  {n: _compute(exp, c, trained=True) for n, (c, _) in students.items()},
                                  kind=exp.ild_kind)
        params = train("ild", objective, {n: p for n, (_, p) in students.items()}, t_params,
                       data.batches(ild_rows, exp.ild.batch_size, exp.seed, **shard), exp.ild, workdir,
                       tokens_of=_real_tokens, **_sharded(mesh, students, (t_config, t_params)))
        _save(workdir, "ild", {n: (students[n][0], params[n]) for n in students}, tokenizer)
        _finished(workdir, "ild")
    ild = {n: _load(workdir / "ild" / n) for n in students}

    if not (workdir / "smart.json").exists():
        _say(f"SMART: scoring {t_config.num_hidden_layers} layers")
        result = scores(Model(t_config, t_params), Model(*ild["mla"]), Model(*ild["mamba2"]),
                        _calibration(held, exp.seq_len)[:exp.smart_rows or None])
        result["mla_layers"] = place(result["scores"], exp.num_mla)
        _write_text(workdir / "smart.json", json.dumps(result, indent=2))
        _sync("smart")
    mla_layers = json.loads((workdir / "smart.json").read_text())["mla_layers"]
    evaluate("initialised", *assemble(students["mla"], students["mamba2"], mla_layers))
    if not (workdir / "hybrid").exists():
        _save(workdir, "hybrid", {"": assemble(ild["mla"], ild["mamba2"], mla_layers)}, tokenizer)
    h_config, h_params = _load(workdir / "hybrid")
    _say(f"hybrid: layers {h_config.layer_map()} (L MLA, S Mamba2)")
    evaluate("after_ild", h_config, h_params)

    if not (workdir / "kd").exists():
        _say(f"KD: {exp.kd.steps} steps of {exp.kd.batch_size} × {exp.seq_len} tokens")
        objective = kd_objective(_compute(exp, t_config, trained=False), _compute(exp, h_config, trained=True),
                                 direction=exp.kd_direction, temperature=exp.kd_temperature,
                                 normalize=exp.kd_normalize, ce_weight=exp.kd_ce_weight, top_k=exp.kd_top_k)
        params = train("kd", objective, h_params, t_params, data.batches(kd_rows, exp.kd.batch_size, exp.seed + 1,
                                                                          **shard), exp.kd, workdir,
                       tokens_of=_real_tokens, **_sharded(mesh, {"": (h_config, h_params)}, (t_config, t_params)))
        _save(workdir, "kd", {"": (h_config, params)}, tokenizer)
        _finished(workdir, "kd")
    kd_params = _load(workdir / "kd")[1]
    evaluate("after_kd", h_config, kd_params)

    if exp.preferences:
        if not (workdir / "dpo").exists():
            _say(f"DPO: {exp.dpo.steps} steps of {exp.dpo.batch_size} pairs, β = {exp.dpo_beta}")
            pairs = data.load_rows(exp.preferences, codec, exp.seq_len, preference=True)
            reference = jax.device_put(kd_params)
            params = train("dpo", dpo_objective(_compute(exp, h_config, trained=True), beta=exp.dpo_beta), kd_params,
                           reference,
                           data.batches(pairs, exp.dpo.batch_size, exp.seed + 2, **shard), exp.dpo, workdir,
                           tokens_of=_real_tokens, **_sharded(mesh, {"": (h_config, kd_params)}, (h_config, kd_params)))
            _save(workdir, "dpo", {"": (h_config, params)}, tokenizer)
            _finished(workdir, "dpo")
        evaluate("after_dpo", h_config, _load(workdir / "dpo")[1])
    return evals

"""Everything a run reads, prepared and checked before any work: the teacher's config and tokenizer, the students'
configs, the mesh, the data files (their records, the tokens their loss counts once cut to ``seq_len``), the split
into held-out, ILD and KD rows, the DPO pairs (``prepare``); and the same preparation of a longer context for the
second KD (``documents``, ``parts``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, corpus, data
from zebrax.config import LlamaConfig
from zebrax.errors import ConfigError, ZebraxError, warn
from zebrax.mixers import kinds
from zebrax.recipe import from_teacher
from zebrax.sharding import MeshConfig, make_mesh, row_shards

# the teacher of ``teacher="tiny"``: SmolLM2's shape scaled down (GQA 4/2, head_dim 16), bytes as tokens, first
# trained on the run's data (``Experiment.tiny_teacher``) so that it has distributions worth distilling
TINY_TEACHER = LlamaConfig(vocab_size=data.ByteCodec.vocab_size, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           bos_token_id=data.ByteCodec.bos, eos_token_id=(data.ByteCodec.eos,),
                           max_position_embeddings=1024, tie_word_embeddings=True)
STUDENTS = {"mla": "all", "linear": "none"}  # the two students ILD trains: name → their MLA layers


@contextlib.contextmanager
def about(exp, field: str):
    """A ZebraxError raised in the block names the ``Experiment`` field it comes from, and its value."""
    try:
        yield
    except ZebraxError as e:
        raise ConfigError(f"distill.{field} = {getattr(exp, field)!r}: {e}") from None


def _teacher_config(exp) -> tuple:
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


def _pairs(exp, codec) -> dict:
    """The DPO pairs of ``exp.preferences`` as rows, checked: some pair counts loss tokens in both replies."""
    pairs = data.load_rows(exp.preferences, codec, exp.seq_len, preference=True)
    check_counted(np.minimum(data.counted(pairs, "chosen_"), data.counted(pairs, "rejected_")),
                   f"distill.preferences ({', '.join(exp.preferences)})", exp.seq_len, "pairs")
    return pairs


def _generated(exp) -> bool:
    """The teacher's replies to every prompt are in ``exp.generated_data`` (the prompts are read, and checked)."""
    prompts = data.read_prompts(exp.generation_prompts)
    done = data.replies(exp.generated_data)
    return all(i in done for i in range(len(prompts)))


@dataclasses.dataclass
class Inputs:
    """What ``prepare`` read and checked before any work."""

    t_config: LlamaConfig
    codec: object  # data.ByteCodec or data.TokenizerCodec
    tokenizer: Path | None  # the teacher's tokenizer/, copied into every model written
    students: dict  # {"mla", "linear"} → HybridConfig
    mesh: object  # a jax Mesh, or None: one device
    files: tuple[str, ...]  # the data files, the teacher's replies included
    parts: tuple | None  # the held-out, ILD and KD rows; None until the teacher has answered every prompt
    rows: dict | None  # the documents of ``files`` (what the tiny teacher learns)
    pairs: dict | None  # the DPO pairs
    hashes: dict  # file → SHA-256 of the files read
    long: dict | None = None  # the rows of ``long_data`` (``long_rows``), for the stage ``kd_long``


def prepare(exp) -> Inputs:
    """Everything the settings and the files can tell, before any work: the data files are there, the teacher's
    config and tokenizer, the students' configs, SMART's placement, the mesh, every data file's records and the
    tokens their loss counts, the split. (The teacher's replies, when still to be written, are checked once
    written.) ``exp``: an ``Experiment``."""
    from zebrax.select import place

    check_files(exp)
    t_config, codec, tokenizer = _teacher_config(exp)
    students = {name: students_of(exp, t_config, layers) for name, layers in STUDENTS.items()}
    with about(exp, "num_mla"):
        place([0.0] * t_config.num_hidden_layers, exp.num_mla)  # SMART can place num_mla layers
    with about(exp, "random_init"):
        known = set(kinds()) & {m for c in students.values() for m in c.mixers}
        if not set(exp.random_init) <= known:
            raise ConfigError(f"expected some of the students' mixer kinds ({', '.join(sorted(known))})")
    with about(exp, "mesh"):
        if jax.process_count() > 1 and not exp.mesh:
            raise ConfigError(f"a run of {jax.process_count()} processes shards over a mesh of all their devices: "
                              f"give one, e.g. {{'fsdp': -1}}")
        mesh = make_mesh(MeshConfig(**exp.mesh)) if exp.mesh else None
    if mesh is not None:
        check_rows_divide(exp, row_shards(mesh))
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
              for f in (*exp.data, *exp.preferences, *exp.long_data, exp.generation_prompts) if f}
    if exp.teacher != "tiny":  # the teacher by its content: a checkpoint replaced at its path is another teacher
        hashes[exp.teacher] = checkpoint.content_sha256(exp.teacher)
    long = long_rows(exp, codec) if exp.long_data and "kd_long" in exp.plan() else None
    return Inputs(t_config=t_config, codec=codec, tokenizer=tokenizer, students=students, mesh=mesh,
                   files=files, parts=split, rows=rows, pairs=pairs, hashes=hashes, long=long)


def students_of(exp, teacher: LlamaConfig, mla_layers) -> object:
    """The student of ``exp``'s recipe on ``teacher`` with MLA at ``mla_layers`` ("all": the MLA student; "none":
    the linear student), ConfigError naming the field whose setting the teacher's shape refuses."""
    with about(exp, "student"):
        return from_teacher(teacher, mla_layers=mla_layers, **exp.recipe())


def check_files(exp) -> None:
    """ConfigError naming a data file of ``exp`` that is not there, or a corpus given beside other data."""
    for name, files in (("data", exp.data), ("preferences", exp.preferences), ("long_data", exp.long_data),
                        ("generation_prompts", (exp.generation_prompts,) if exp.generation_prompts else ())):
        for f in files:
            if not Path(f).is_file() and not (name == "data" and corpus.is_corpus(f)):
                raise ConfigError(f"distill.{name}: {f}: no such data file (in {Path.cwd()})")
    if any(corpus.is_corpus(f) for f in exp.data) and (len(exp.data) > 1 or exp.generation_prompts):
        raise ConfigError(f"distill.data = {exp.data!r}: a tokenized corpus is the whole of the data "
                          f"(tokenize the other files, and the teacher's replies, into it)")
    if "kd_long" in exp.plan() and not exp.long_data and any(corpus.is_corpus(f) for f in exp.data):
        raise ConfigError(f"distill.stages: 'kd_long' cuts the documents to kd_long_seq_len, but "
                          f"distill.data = {exp.data!r} is a corpus, tokenized at its own seq_len")


def check_rows_divide(exp, shards: int) -> None:
    """ConfigError naming the stage whose micro-batches the mesh cannot split into ``shards`` equal parts of rows."""
    trained = {"ild": exp.ild, "kd": exp.kd, "kd_long": exp.kd_long, "dpo": exp.dpo, "teacher": exp.tiny_teacher}
    names = set(exp.plan()) - ({"teacher"} if exp.teacher != "tiny" else set())
    for name, cfg in ((n, c) for n, c in trained.items() if n in names):
        micro = cfg.batch_size // cfg.accumulate
        if micro % shards:
            raise ConfigError(f"{name}/TrainConfig.batch_size = {cfg.batch_size} (accumulate {cfg.accumulate}): "
                              f"micro-batches of {micro} rows, which distill.mesh = {exp.mesh!r} cannot split over "
                              f"its {shards} row shards (data × fsdp); make it a multiple of {shards}")


def check_counted(counts: np.ndarray, what: str, seq_len: int, noun: str = "documents") -> None:
    """``counts`` ``[N]``: the loss tokens of each of ``what``'s documents (or pairs). DataError when none counts
    any; a warning when some do not."""
    check_none_counted(int(np.sum(counts == 0)), len(counts), what, seq_len, noun)


def check_none_counted(none: int, total: int, what: str, seq_len: int, noun: str = "documents") -> None:
    """``none`` of ``what``'s ``total`` documents count a loss token: ``check_counted`` from the counts alone."""
    if none == total:
        raise data.DataError(f"{what}: none of its {total} {noun} counts a loss token once cut to "
                             f"distill.seq_len = {seq_len} (a chat record counts its last reply only: each is cut "
                             f"off, or empty); raise distill.seq_len or shorten the prompts")
    if none:
        warn(f"{what}: {none} of its {total} {noun} count no loss token once cut to distill.seq_len = "
             f"{seq_len} (their replies are cut off, or empty); they add nothing to the loss")


def documents(exp, codec, files: tuple[str, ...]):
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
        if m.get("tokenizer_sha256") is None:
            warn(f"distill.data: {files[0]} records no identity of its tokenizer (tokenized before zebrax recorded "
                 f"one); only its vocabulary size is checked against the teacher's")
        elif m["tokenizer_sha256"] != codec.sha256():
            raise ConfigError(f"distill.data: {files[0]} was tokenized by another tokenizer than the teacher's "
                              f"({m.get('tokenizer') or 'unnamed'}, of the same vocabulary size): its ids are other "
                              f"words; tokenize it again with the teacher (zebrax tokenize --teacher)")
        check_none_counted(m["documents_counting_none"], m["documents"], f"distill.data ({files[0]})", exp.seq_len)
        return rows
    rows = data.load_rows(files, codec, exp.seq_len)
    check_counted(data.counted(rows), f"distill.data ({', '.join(files)})", exp.seq_len)
    return rows


def parts(exp, rows: dict, files: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """The held-out, ILD and KD rows (the last two packed with ``exp.pack``), checked: the held-out and KD parts
    count loss tokens (KL and KD have something to measure and learn), and the held-out rows fill a row of
    ``seq_len`` for SMART."""
    held, ild_rows, kd_rows = data.split(rows, exp.split, exp.seed)
    tokenized = isinstance(rows, corpus.Corpus)
    if tokenized:  # the held-out rows in memory (evaluation, SMART); training reads the others as it goes
        held = held.take(range(len(held)))
    for i, (name, part) in enumerate((("held-out", held), ("ILD", ild_rows), ("KD", kd_rows))):
        if name != "ILD" and not (tokenized and name == "KD"):  # ILD matches every real token
            check_counted(data.counted(part), f"the {name} part (distill.split[{i}]) of distill.data "
                                               f"({', '.join(files)})", exp.seq_len)
    calibration(held, exp.seq_len)
    if exp.pack and not tokenized:  # the held-out rows stay one document each
        ild_rows, kd_rows = data.pack(ild_rows, exp.seq_len), data.pack(kd_rows, exp.seq_len)
    return held, ild_rows, kd_rows


def long_rows(exp, codec) -> dict:
    """The documents of ``distill.long_data``, one a row of ``kd_long_seq_len`` tokens (cut there, never packed),
    checked: each fills at least half its row (a context-extension stage learns from long documents, not from short
    ones padded: ``zebrax long-docs`` makes them) and counts loss tokens."""
    files, length = exp.long_data, exp.kd_long_seq_len
    rows = data.load_rows(files, codec, length)
    tokens = rows["token_mask"].sum(axis=1)
    short = np.flatnonzero(tokens < length // 2)
    if short.size:
        raise ConfigError(f"distill.long_data ({', '.join(files)}): document {short[0]} has {tokens[short[0]]} "
                          f"tokens, under half of distill.kd_long_seq_len = {length} ({short.size} of "
                          f"{len(tokens)} are); give documents about as long as the rows (zebrax long-docs)")
    check_counted(data.counted(rows), f"distill.long_data ({', '.join(files)})", length)
    return rows


def calibration(rows: dict, seq_len: int) -> np.ndarray:
    """The held-out rows' real tokens, concatenated and cut into full rows (SMART scores without padding)."""
    stream = np.concatenate([t[m] for t, m in zip(rows["tokens"], rows["token_mask"], strict=True)])
    n = len(stream) // seq_len
    if n == 0:
        raise ZebraxError(f"SMART: the held-out rows hold {len(stream)} tokens, fewer than one row of {seq_len}; "
                          f"raise the held-out fraction of Experiment.split")
    return stream[: n * seq_len].reshape(n, seq_len)

"""What a distillation run keeps in its work directory and reads from its data files, shared by the pipeline
(``pipeline``: the checks before any work, the claim of the directory) and its stages (``stages``): records written
atomically by process 0, the SHA-256 of every data file read, and the run's documents with their split into
held-out, ILD and KD parts."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, corpus, data
from zebrax.errors import ConfigError, ZebraxError, warn

HASHES = "data_sha256.json"


def write_text(path: Path, text: str) -> None:
    """Atomically, by process 0 only."""
    if jax.process_index() != 0:
        return
    checkpoint.write_text_atomic(path, text)


def hashes_agree(workdir: Path, hashes: dict[str, str]) -> dict[str, str]:
    """The work directory's record of data hashes with ``hashes`` added; ConfigError naming a file whose content
    differs from the one the work directory was made from."""
    path = workdir / HASHES
    old = json.loads(path.read_text()) if path.exists() else {}
    for f in sorted(set(old) & set(hashes)):
        if old[f] != hashes[f]:
            raise ConfigError(f"{workdir}: written from other data ({f}: sha256 {old[f][:12]} there, "
                              f"{hashes[f][:12]} now: the file has changed); use another --workdir")
    return {**old, **hashes}


def record_hashes(workdir: Path, hashes: dict[str, str]) -> None:
    """Add ``hashes`` to the work directory's record (refused if one differs)."""
    merged = hashes_agree(workdir, hashes)
    path = workdir / HASHES
    if not path.exists() or json.loads(path.read_text()) != merged:
        write_text(path, json.dumps(merged, indent=2, sort_keys=True))


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


def calibration(rows: dict, seq_len: int) -> np.ndarray:
    """The held-out rows' real tokens, concatenated and cut into full rows (SMART scores without padding)."""
    stream = np.concatenate([t[m] for t, m in zip(rows["tokens"], rows["token_mask"], strict=True)])
    n = len(stream) // seq_len
    if n == 0:
        raise ZebraxError(f"SMART: the held-out rows hold {len(stream)} tokens, fewer than one row of {seq_len}; "
                          f"raise the held-out fraction of Experiment.split")
    return stream[: n * seq_len].reshape(n, seq_len)

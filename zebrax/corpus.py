"""Tokenized corpora: data files tokenized once (``zebrax tokenize``) into ArrayRecord shards of rows, which training
reads by index through grain, so a host holds a few batches of the corpus, never the corpus.

``DIR/corpus.json`` describes it (``Corpus``): the rows' length and fields, whether documents were packed, the
count of rows, documents and tokens, the tokenizer, each source file's SHA-256 and the shards. A row is one record:
its fields' bytes back to back, ``tokens`` int32 ``[L]``, ``token_mask`` and ``loss_mask`` one byte each ``[L]``,
and with packing ``segment_ids`` int32 ``[L]`` (``zebrax.data``'s rows, the same ``lm_row``). Packing is
``data.pack``'s first fit, over a window of the last ``PACK_WINDOW`` open rows (the oldest written when the window is
full), so memory stays flat in the corpus size; below that many rows it is ``data.pack`` exactly.

``teacher_logits`` (``zebrax teacher-logits``) stores a teacher's top-k logits at every position beside the rows
(``teacher-topk-NNNNN.arrayrecord``, a record per row: float32 values then int32 vocabulary indices, ``[L, k]``
each), so that KD can run from them without the teacher (``data.TOPK_FIELDS``; MaxText's stored top-k
logits).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zebrax import data
from zebrax.data import DataError
from zebrax.files import atomic_directory, write_text_atomic

FORMAT, FORMAT_VERSION = "zebrax-corpus", 1
MANIFEST = "corpus.json"
PACK_WINDOW = 512  # open rows packing fills first fit; the oldest is written when another is needed
ROWS_PER_SHARD = 16384
_TYPES = {"tokens": np.int32, "token_mask": np.uint8, "loss_mask": np.uint8, "segment_ids": np.int32}
TOPK = "teacher_topk"  # the manifest's entry for stored teacher logits: {"k", "teacher", "files"}


def is_corpus(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _fields(packed: bool) -> tuple[str, ...]:
    return (*data.LM_FIELDS, "segment_ids") if packed else data.LM_FIELDS


def _encode(row: dict, fields: tuple[str, ...]) -> bytes:
    return b"".join(np.asarray(row[k]).astype(_TYPES[k]).tobytes() for k in fields)


class _Packer:
    """Documents (rows of one document) → packed rows, first fit over the last ``PACK_WINDOW`` open rows."""

    def __init__(self, seq_len: int, emit):
        self.seq_len, self.emit, self.open = seq_len, emit, []  # [(documents, free tokens)]

    def add(self, doc: dict) -> None:
        n = int(doc["token_mask"].sum())
        fit = next((b for b in self.open if b[1] >= n), None)
        if fit is None:
            if len(self.open) == PACK_WINDOW:
                self._write(self.open.pop(0))
            fit = [[], self.seq_len]
            self.open.append(fit)
        fit[0].append(doc)
        fit[1] -= n

    def _write(self, row_of_docs) -> None:
        docs = row_of_docs[0]
        packed = data.pack({k: np.stack([d[k] for d in docs]) for k in data.LM_FIELDS}, self.seq_len)
        self.emit({k: v[0] for k, v in packed.items()})

    def close(self) -> None:
        while self.open:
            self._write(self.open.pop(0))


def tokenize(files: Sequence[str | os.PathLike], out: str | os.PathLike, codec, seq_len: int, *, pack: bool = False,
             tokenizer: str = "", rows_per_shard: int = ROWS_PER_SHARD, overwrite: bool = False) -> dict:
    """Tokenize ``files`` (``data.iter_records``: jsonl, parquet, txt; ``text`` and ``messages`` records) with
    ``codec`` into rows of ``seq_len`` in ``out`` (written whole or not at all); returns the manifest, with the
    ``seconds`` it took. ``tokenizer`` names the codec in the manifest. Memory holds one record, one shard's index
    and, with ``pack``, the open rows."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if not files:
        raise DataError("tokenize: no data files given")
    seen = [Path(f).resolve() for f in files]
    twice = next((f for f, r in zip(files, seen, strict=True) if seen.count(r) > 1), None)
    if twice is not None:
        raise DataError(f"tokenize: {twice} is given twice; each file is read once")
    if seq_len < 2:
        raise DataError(f"tokenize: seq_len={seq_len}: a row of fewer than 2 tokens predicts no next token")
    start = time.perf_counter()
    fields = _fields(pack)
    counts = {"rows": 0, "documents": 0, "documents_counting_none": 0, "counted_tokens": 0, "real_tokens": 0}
    shards: list[dict] = []
    with atomic_directory(out, overwrite, replaceable=is_corpus, what="tokenized corpus",
                                     sources=files) as tmp:
        writer = None

        def emit(row: dict) -> None:
            nonlocal writer
            if writer is None or shards[-1]["rows"] == rows_per_shard:
                if writer is not None:
                    writer.close()
                shards.append({"file": f"rows-{len(shards):05d}.arrayrecord", "rows": 0})
                writer = ArrayRecordWriter(str(tmp / shards[-1]["file"]), "group_size:1")
            writer.write(_encode(row, fields))
            shards[-1]["rows"] += 1
            counts["rows"] += 1

        packer = _Packer(seq_len, emit) if pack else None
        for f in files:
            for where, record in data.iter_records(f):
                doc = data.lm_row(where, record, codec, seq_len)
                counted = int(data.counted({k: v[None] for k, v in doc.items()})[0])
                counts["documents"] += 1
                counts["documents_counting_none"] += counted == 0
                counts["counted_tokens"] += counted
                counts["real_tokens"] += int(doc["token_mask"].sum())
                if packer is None:
                    emit(doc)
                else:
                    packer.add(doc)
        if packer is not None:
            packer.close()
        if writer is not None:
            writer.close()
        if not counts["rows"]:
            raise DataError(f"tokenize: {', '.join(map(str, files))} hold no records")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": seq_len, "packed": pack,
                    "fields": list(fields), **counts, "vocab_size": codec.vocab_size, "tokenizer": tokenizer,
                    "tokenizer_sha256": codec.sha256(),
                    "sources": {str(f): data.sha256(f) for f in files}, "shards": shards}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {**manifest, "seconds": time.perf_counter() - start}


def _source(path: Path, files: list[str]):
    import grain

    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path}: shards missing: {', '.join(missing[:4])}")
    return grain.sources.ArrayRecordDataSource([str(path / f) for f in files])


class Corpus:
    """A tokenized corpus, read by row: ``len(corpus)``, ``corpus[i]`` → ``{field: [L]}`` (``bool`` masks), read from
    its shard when asked; ``take(indices)`` stacks some rows ``{field: [N, L]}``; ``subset(indices)`` a view of some
    rows (``data.split``'s parts); ``with_teacher_topk(k)`` the rows with the stored teacher logits too
    (``data.TOPK_FIELDS``, ``[L, k]``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_file = self.path / MANIFEST
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except OSError as e:
            raise DataError(f"{self.path}: not a tokenized corpus (no {MANIFEST}: {e.strerror or e})") from None
        except ValueError as e:
            raise DataError(f"{manifest_file}: not valid JSON ({e})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{manifest_file}: not a {FORMAT} version {FORMAT_VERSION} manifest "
                            f"(make it with `zebrax tokenize`)")
        self.seq_len, self.packed = int(self.manifest["seq_len"]), bool(self.manifest["packed"])
        self.fields = tuple(self.manifest["fields"])
        self._rows = _source(self.path, [s["file"] for s in self.manifest["shards"]])
        self._topk, self._k = None, 0
        self.indices = np.arange(len(self._rows))

    def _view(self, **changes) -> Corpus:
        """This corpus with some of its state replaced; the manifest and the open shards are shared."""
        view = copy.copy(self)
        view.__dict__.update(changes)
        return view

    @property
    def topk(self) -> int:
        """k of the stored teacher logits (0: none stored)."""
        return int(self.manifest.get(TOPK, {}).get("k", 0))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> dict:
        index = int(self.indices[i])
        raw = self._rows[index]
        out, at, n = {}, 0, self.seq_len
        for k in self.fields:
            v = np.frombuffer(raw, _TYPES[k], n, at)
            out[k] = v.astype(bool) if k.endswith("_mask") else v
            at += n * np.dtype(_TYPES[k]).itemsize
        if self._topk is not None:
            raw, k = self._topk[index], self.topk
            values = np.frombuffer(raw, np.float32, n * k).reshape(n, k)[:, :self._k]
            indices = np.frombuffer(raw, np.int32, n * k, n * k * 4).reshape(n, k)[:, :self._k]
            out.update(zip(data.TOPK_FIELDS, (values, indices), strict=True))
        return out

    def take(self, indices) -> dict:
        rows = [self[i] for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def subset(self, indices) -> Corpus:
        return self._view(indices=self.indices[np.asarray(indices)])

    def with_teacher_topk(self, k: int) -> Corpus:
        """The same rows, carrying the teacher's ``k`` largest stored logits (``k`` at most those stored: they are
        stored largest first, so the first ``k`` are its top ``k``)."""
        if not 1 <= k <= self.topk:
            raise DataError(f"{self.path}: holds the teacher's top {self.topk} logits, not its top {k} (make them "
                            f"with `zebrax teacher-logits --top-k {k}`)")
        return self._view(_topk=_source(self.path, self.manifest[TOPK]["files"]), _k=k)


def teacher_logits(path: str | os.PathLike, config, params, top_k: int, *, teacher: str = "", teacher_sha256: str,
                   codec_sha256: str | None = None, batch_size: int = 8) -> dict:
    """Store the teacher's (``config``, ``params``) top ``top_k`` logits at every position of every row of the corpus
    at ``path``, a shard of them beside each shard of rows, and name them in the manifest with the teacher's identity
    (``teacher_sha256``: ``checkpoint.content_sha256``), which KD checks. Returns the manifest's entry with the
    ``seconds`` it took.

    Refused before any work: a teacher of another vocabulary than the corpus's, or of another tokenizer
    (``codec_sha256``, the teacher's ``TokenizerCodec.sha256``) where the corpus records its own. The new shards are
    written under names of their own and the manifest switched to them in one atomic write, the old ones removed
    after: stopped at any point, the corpus names either the old logits whole or the new ones whole (what an
    interrupted run left unnamed, the next removes)."""
    import uuid

    import jax
    from array_record.python.array_record_module import ArrayRecordWriter

    from zebrax.models import build

    c = Corpus(path)
    if not 1 <= top_k <= config.vocab_size:
        raise DataError(f"teacher-logits: top_k={top_k} must be between 1 and the vocabulary ({config.vocab_size})")
    if config.vocab_size != c.manifest["vocab_size"]:
        raise DataError(f"teacher-logits: the teacher's vocabulary ({config.vocab_size}) is not the corpus's "
                        f"({c.manifest['vocab_size']}, {c.path}): its logits would not be of the corpus's tokens")
    theirs = c.manifest.get("tokenizer_sha256")
    if codec_sha256 is not None and theirs is not None and codec_sha256 != theirs:
        raise DataError(f"teacher-logits: {c.path} was tokenized by another tokenizer than the teacher's "
                        f"({c.manifest.get('tokenizer') or 'unnamed'}); tokenize it with the teacher's")
    start = time.perf_counter()
    module = build(config)

    @jax.jit
    def top(params, batch):
        logits = module.apply({"params": params}, batch["tokens"], token_mask=batch["token_mask"],
                              segment_ids=batch.get("segment_ids"))[0]
        return jax.lax.top_k(logits.astype(np.float32), top_k)

    _remove_unnamed(c)
    run = uuid.uuid4().hex[:8]
    files, first = [], 0
    for n, shard in enumerate(c.manifest["shards"]):
        files.append(f"teacher-topk-{run}-{n:05d}.arrayrecord")
        tmp = c.path / f".{files[-1]}.tmp-{os.getpid()}"
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for at in range(first, first + shard["rows"], batch_size):
            rows = c.take(range(at, min(at + batch_size, first + shard["rows"])))
            real = len(rows["tokens"])
            padded = {k: np.pad(v, ((0, batch_size - real), (0, 0))) for k, v in rows.items()}
            values, indices = jax.device_get(top(params, padded))
            for v, i in zip(values[:real], indices[:real], strict=True):
                writer.write(v.astype(np.float32).tobytes() + i.astype(np.int32).tobytes())
        writer.close()
        os.replace(tmp, c.path / files[-1])
        first += shard["rows"]
    entry = {"k": top_k, "teacher": teacher, "teacher_sha256": teacher_sha256, "files": files}
    write_text_atomic(c.path / MANIFEST, json.dumps({**c.manifest, TOPK: entry}, indent=2))
    _remove_unnamed(Corpus(c.path))
    return {**entry, "seconds": time.perf_counter() - start}


def _remove_unnamed(c: Corpus) -> None:
    """Remove the stored-logit shards (and temporaries) the manifest does not name: an earlier teacher's, or what an
    interrupted ``teacher_logits`` left."""
    named = set(c.manifest.get(TOPK, {}).get("files", ()))
    for f in c.path.iterdir():
        if f.name.lstrip(".").startswith("teacher-topk-") and f.name not in named:
            f.unlink()

"""Training data (METHOD §6): records from jsonl, parquet or plain text → token rows with masks → grain batches.

Records:
- ``{"text": …}``: every token counts;
- ``{"messages": [{"role", "content"}, …]}``: rendered with the model's chat template; only the last reply counts
  (the prompt's tokens are masked out of the loss);
- ``{"prompt", "chosen", "rejected"}``: a preference pair for DPO (the prompt is a string or a message list).

A row is one document, cut to ``seq_len`` and right-padded: ``tokens`` ``[L]`` int32, ``token_mask`` ``[L]`` (real
tokens: attention and the Mamba2 state ignore the rest) and ``loss_mask`` ``[L]`` (positions whose prediction of
the next token counts). ``pack`` puts several documents into one row, each with its ``segment_ids`` (1, 2, …; 0 for
padding), which the models use to keep them apart. Plain-text files hold one document per paragraph (blank-line
separated).

Batches come from grain: the documents are split once into disjoint parts by ratio (ILD 20% / KD 80% in the
paper), each part is sharded across JAX processes, shuffled from a seed and repeated; the iterator's state is a
small dict saved with every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zebrax.errors import ZebraxError
from zebrax.files import write_text_atomic

LM_FIELDS = ("tokens", "token_mask", "loss_mask")
TOPK_FIELDS = ("teacher_topk_values", "teacher_topk_indices")  # stored teacher logits (KD without the teacher)


class DataError(ZebraxError):
    """Bad training data: the message names the file (and line) and what was expected."""


# -- codecs: text → token ids ---------------------------------------------------------------------
class ByteCodec:
    """UTF-8 bytes as tokens (ids 0…255) with BOS 256 and EOS 257: the tokenizer of tiny random models, which have
    none of their own. Chat: ``<|role|>`` lines, the reply closed by EOS."""

    vocab_size = 258
    bos, eos = 256, 257

    def encode(self, text: str) -> list[int]:
        return [self.bos, *text.encode()]

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        ids = [self.bos]
        for m in messages:
            ids += [*f"<|{m['role']}|>\n{m['content']}".encode(), self.eos]
        return ids + [*b"<|assistant|>\n"] if add_generation_prompt else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def sha256(self) -> str:
        """Its identity (``TokenizerCodec.sha256``): bytes are bytes."""
        return hashlib.sha256(b"zebrax byte codec: ids 0-255, BOS 256, EOS 257").hexdigest()


class TokenizerCodec:
    """A transformers tokenizer: plain text with its special tokens, chat through its template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # added tokens included

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def sha256(self) -> str:
        """Its identity: the SHA-256 of what decides the ids of a text, the tokenizer's whole pipeline (normaliser,
        pre-tokeniser, vocabulary and merges, added tokens) and its chat template. Two tokenizers of one vocabulary
        size differ here."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        pipeline = backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(), sort_keys=True)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return hashlib.sha256(f"{pipeline}\n{template}".encode()).hexdigest()


def codec_for(model, where: str):
    """The codec of a loaded ``zebrax.Model``: its tokenizer, or bytes for a tokenizer-less model of the byte
    vocabulary (the tiny experiments' models); DataError otherwise."""
    if model.tokenizer is not None:
        return TokenizerCodec(model.tokenizer)
    if model.config.vocab_size == ByteCodec.vocab_size:
        return ByteCodec()
    raise DataError(f"{where}: has no tokenizer/ to turn text into tokens (and its vocabulary of "
                    f"{model.config.vocab_size} is not the byte codec's {ByteCodec.vocab_size})")


# -- records ----------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read a megabyte at a time: what a work directory records of the data it
    was made from."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    return digest.hexdigest()


def _lines(path: Path):
    """``(number, line)`` of a UTF-8 text file, read as it goes (a leading byte-order mark dropped); DataError
    naming the line and byte offset of the first byte that is not UTF-8."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    offset = 0
    with f:
        for number, raw in enumerate(f, 1):
            start = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                yield number, raw[start:].decode().rstrip("\r\n")
            except UnicodeDecodeError as e:
                at = offset + start + e.start
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[start + e.start]:02x} at byte offset "
                                f"{at}); save the file as UTF-8") from None
            offset += len(raw)


def iter_records(path: str | os.PathLike):
    """``(where, record)`` of a ``.jsonl``/``.json`` (one object a line), ``.parquet`` or ``.txt`` file (one document
    a paragraph), read as it goes: memory holds one record (a parquet file: one row group); ``where`` is ``file:line``
    (or ``file:row``, ``file:paragraph``) for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for number, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{number}", record
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            i = 0
            for group in pq.ParquetFile(path).iter_batches():
                for r in group.to_pylist():
                    yield f"{path}:row {i}", r
                    i += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()
            raise DataError(f"{path}: not a readable parquet file ({reason[0] if reason else type(e).__name__})"
                            ) from None
    elif suffix == ".txt":
        paragraph, i = [], 0
        for _, line in (*_lines(path), (0, "")):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield f"{path}:paragraph {i}", {"text": "\n".join(paragraph).strip()}
                paragraph, i = [], i + 1
    else:
        raise DataError(f"{path}: unknown data format {suffix!r} (expected .jsonl, .json, .parquet or .txt)")


def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Every ``(where, record)`` of a data file (``iter_records``); DataError when it holds none."""
    out = list(iter_records(path))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _messages(where: str, value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)):
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    return value


def row(ids: list[int], counted_from: int, seq_len: int) -> dict:
    """One document → a row: cut to ``seq_len``, right-padded; predictions count from position ``counted_from``."""
    ids = ids[:seq_len]
    out = {name: np.zeros(seq_len, dtype) for name, dtype in zip(LM_FIELDS, (np.int32, bool, bool), strict=True)}
    out["tokens"][:len(ids)] = ids
    out["token_mask"][:len(ids)] = True
    out["loss_mask"][max(0, counted_from):len(ids)] = True
    return out


def lm_row(where: str, record: dict, codec, seq_len: int) -> dict:
    """A ``text`` or ``messages`` record → a row (chat: predictions count from the last prompt token on, or from
    the first token with ``"loss": "all"``, a long chat every turn of which is learnt)."""
    if isinstance(record.get("text"), str):
        return row(codec.encode(record["text"]), 0, seq_len)
    if "messages" in record:
        messages = _messages(where, record["messages"])
        if record.get("loss", "reply") not in ("reply", "all"):
            raise DataError(f"{where}: 'loss' is {record['loss']!r}; expected 'reply' (the last reply counts, the "
                            f"default) or 'all' (every token)")
        if record.get("loss") == "all":
            return row(codec.chat(messages, add_generation_prompt=False), 0, seq_len)
        prompt = codec.chat(messages[:-1], add_generation_prompt=True) if len(messages) > 1 else []
        return row(codec.chat(messages, add_generation_prompt=False), len(prompt) - 1, seq_len)
    raise DataError(f"{where}: a record needs 'text' (a string) or 'messages', it has {sorted(record)}")


def preference_row(where: str, record: dict, codec, seq_len: int) -> dict:
    """A ``prompt``/``chosen``/``rejected`` record → ``chosen_*`` and ``rejected_*`` rows (the replies count)."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected' (missing "
                        f"{', '.join(repr(m) for m in missing)})")
    prompt = _messages(where, record["prompt"])
    start = len(codec.chat(prompt, add_generation_prompt=True)) - 1
    out = {}
    for side in ("chosen", "rejected"):
        if not isinstance(record[side], str):
            raise DataError(f"{where}: '{side}' must be a string (the reply)")
        ids = codec.chat([*prompt, {"role": "assistant", "content": record[side]}], add_generation_prompt=False)
        out.update({f"{side}_{k}": v for k, v in row(ids, start, seq_len).items()})
    return out


def load_rows(files: Sequence[str | os.PathLike], codec, seq_len: int, *, preference: bool = False) -> dict:
    """Every record of ``files`` → stacked rows ``{field: [N, L]}``."""
    if not files:
        raise DataError("no data files given")
    make = preference_row if preference else lm_row
    rows = [make(where, record, codec, seq_len) for f in files for where, record in read_records(f)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def counted(rows: dict, prefix: str = "") -> np.ndarray:
    """``[N]``: the tokens each row's loss counts, the positions of ``loss_mask`` whose next token is real (and, in
    packed rows, of the same document). A chat row whose prompt fills ``seq_len`` counts none. ``prefix``: the
    rows of ``chosen_`` or ``rejected_`` replies."""
    fields = {k: rows[prefix + k] for k in ("token_mask", "segment_ids") if prefix + k in rows}
    return (np.asarray(rows[prefix + "loss_mask"])[:, :-1].astype(bool) & next_in_document(fields)).sum(axis=1)


def pack(rows: dict, seq_len: int) -> dict:
    """Document rows → packed rows of ``seq_len``: whole documents placed first-fit in their order, each with its
    own ``segment_ids`` (1, 2, … within a row; 0 for padding)."""
    lengths = rows["token_mask"].sum(axis=1)
    bins: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        fit = next((b for b, f in enumerate(free) if f >= n), None)
        if fit is None:
            bins.append([])
            free.append(seq_len)
            fit = len(bins) - 1
        bins[fit].append(i)
        free[fit] -= n
    out = {k: np.zeros((len(bins), seq_len), dtype) for k, dtype in
           (("tokens", np.int32), ("token_mask", bool), ("loss_mask", bool), ("segment_ids", np.int32))}
    for b, docs in enumerate(bins):
        at = 0
        for segment, i in enumerate(docs, 1):
            n = lengths[i]
            for k in LM_FIELDS:
                out[k][b, at:at + n] = rows[k][i, :n]
            out["segment_ids"][b, at:at + n] = segment
            at += n
    return out


def next_in_document(batch: dict):
    """``[B, L-1]``: position t's next token is real and, in packed rows, in t's document (the last token of a
    packed document predicts nothing that counts)."""
    real = batch["token_mask"][:, 1:].astype(bool)
    seg = batch.get("segment_ids")
    return real if seg is None else real & (seg[:, 1:] == seg[:, :-1])


# -- split and batches ------------------------------------------------------------------------------
def _rows_in(rows) -> int:
    return len(rows) if not isinstance(rows, dict) else len(next(iter(rows.values())))


def split(rows, ratios: Sequence[float], seed: int) -> list:
    """Disjoint parts of the documents in proportion to ``ratios`` (a seeded permutation; every part non-empty).
    ``rows``: stacked rows ``{field: [N, L]}`` (parts alike) or a ``corpus.Corpus`` (parts are views of it)."""
    n = _rows_in(rows)
    if any(r <= 0 for r in ratios) or len(ratios) > n:
        raise DataError(f"split: ratios {list(ratios)} must be positive and at most one part per document ({n})")
    order = np.random.default_rng(seed).permutation(n)
    edges = np.round(np.cumsum(ratios) / sum(ratios) * n).astype(int)
    edges = np.maximum(edges, np.arange(1, len(ratios) + 1))  # no part left empty
    parts = np.split(order, edges[:-1])
    if not isinstance(rows, dict):
        return [rows.subset(idx) for idx in parts]
    return [{k: v[idx] for k, v in rows.items()} for idx in parts]


def batches(rows, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1):
    """An endless grain iterator of this process's rows of each global batch of ``batch_size`` rows: the rows
    shuffled from ``seed`` anew each epoch and cut into global batches, of which process ``i`` of ``n`` reads rows
    ``i·b/n … (i+1)·b/n`` (``{field: [b/n, L]}``). The global batches are those of one process whatever the
    number: a run on several hosts trains on the rows one host would. ``rows``: stacked rows ``{field: [N, L]}``,
    or a ``corpus.Corpus`` (each row read from its shard when a batch needs it). ``iterator.get_state()`` /
    ``set_state()`` save and restore its position."""
    import grain

    n = _rows_in(rows)
    if batch_size % process_count:
        raise DataError(f"batches: a batch of {batch_size} rows cannot be shared equally by {process_count} processes")
    share = batch_size // process_count
    ours = slice(process_index * share, (process_index + 1) * share)

    def get(batch: np.ndarray) -> dict:  # the global batch's row indices → this process's rows
        if isinstance(rows, dict):
            return {k: v[batch[ours]] for k, v in rows.items()}
        read = [rows[int(i)] for i in batch[ours]]
        return {k: np.stack([r[k] for r in read]) for k in read[0]}

    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).batch(batch_size, drop_remainder=True).map(get)
    # a few batches read ahead by a few threads: host memory stays a few batches whatever the corpus
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)))


# -- teacher-made data ------------------------------------------------------------------------------
def _prompt_messages(where: str, record: dict) -> list[dict]:
    """A prompt record: ``messages`` (a trailing assistant turn is dropped: the teacher replies) or ``prompt``."""
    if "messages" in record:
        messages = _messages(where, record["messages"])
        return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
    if isinstance(record.get("prompt"), str):
        return _messages(where, record["prompt"])
    raise DataError(f"{where}: a prompt record needs 'messages' or 'prompt' (a string), it has {sorted(record)}")


def read_prompts(path: str | os.PathLike) -> list[list[dict]]:
    """The prompts of a prompt file (``generate_data``'s input), each a message list; DataError names a bad one."""
    return [_prompt_messages(where, r) for where, r in read_records(path)]


def replies(out: str | os.PathLike) -> dict[int, str]:
    """The complete lines already in ``out`` (``generate_data``'s output) by id; a line torn by a crash, or not
    UTF-8, is dropped (its prompt is answered again)."""
    out = Path(out)
    if not out.exists():
        return {}
    done = {}
    for line in _read_bytes(out).splitlines():
        try:
            text = line.decode()
            done[int(json.loads(text)["id"])] = text
        except (ValueError, KeyError, TypeError):
            continue
    return done


def generate_data(model, prompts: str | os.PathLike, out: str | os.PathLike, *, batch_size: int = 16,
                  max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> Path:
    """The teacher's replies to every prompt of ``prompts`` → ``out``, one ``{"id", "messages"}`` record a line (the
    prompt's messages and the reply as the last, ``assistant``, turn), in prompt order.

    Batch k (prompts k·batch_size …) samples with ``seed + k``, so the file does not depend on interruptions: a
    re-run keeps the complete lines it finds, regenerates the batches that miss any, and rewrites the file in order
    (atomically) at the end. ``model``: a ``zebrax.Model`` with a chat template."""
    from tqdm import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise DataError(f"generate_data: batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    out = Path(out)
    records = read_prompts(prompts)
    done = replies(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(records), batch_size)
    with out.open("a") as f, tqdm(total=len(records), initial=sum(i in done for i in range(len(records))),
                                  desc="generate-data", unit="prompt") as bar:
        for k, start in enumerate(starts):
            ids = range(start, min(start + batch_size, len(records)))
            if all(i in done for i in ids):
                continue
            prompt_tokens = [model.chat_tokens(records[i]) for i in ids]
            outs = model.generate(prompt_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed + k)
            for i, p, o in zip(ids, prompt_tokens, outs, strict=True):
                if i not in done:
                    reply = {"role": "assistant", "content": model.decode(o[len(p):]).strip()}
                    done[i] = json.dumps({"id": i, "messages": [*records[i], reply]})
                    f.write(done[i] + "\n")
                    bar.update(1)
            f.flush()
            os.fsync(f.fileno())
    return write_text_atomic(out, "".join(done[i] + "\n" for i in range(len(records))))

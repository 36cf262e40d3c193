"""Training data (METHOD §6): records from jsonl, parquet or plain text → token rows with masks → grain batches.

Records:
- ``{"text": …}``: every token counts;
- ``{"messages": [{"role", "content"}, …]}``: rendered with the model's chat template; only the last reply counts
  (the prompt's tokens are masked out of the loss);
- ``{"prompt", "chosen", "rejected"}``: a preference pair for DPO (the prompt is a string or a message list).

A row is one document, cut to ``seq_len`` and right-padded: ``tokens`` ``[L]`` int32, ``token_mask`` ``[L]`` (real
tokens: attention and the Mamba2 state ignore the rest) and ``loss_mask`` ``[L]`` (positions whose prediction of
the next token counts). Plain-text files hold one document per paragraph (blank-line separated).

Batches come from grain: the documents are split once into disjoint parts by ratio (ILD 20% / KD 80% in the
paper), each part is sharded across JAX processes, shuffled from a seed and repeated; the iterator's state is a
small dict saved with every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zebrax.errors import ZebraxError

LM_FIELDS = ("tokens", "token_mask", "loss_mask")


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


class TokenizerCodec:
    """A transformers tokenizer: plain text with its special tokens, chat through its template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat(self, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


# -- records ----------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``[(where, record)]`` from a ``.jsonl``/``.json`` (one object a line), ``.parquet`` or ``.txt`` file; ``where``
    is ``file:line`` (or ``file:row``) for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        out = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            out.append((f"{path}:{number}", record))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        out = [(f"{path}:row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    elif suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text().split("\n\n")]
        out = [(f"{path}:paragraph {i}", {"text": p}) for i, p in enumerate(paragraphs) if p]
    else:
        raise DataError(f"{path}: unknown data format {suffix!r} (expected .jsonl, .json, .parquet or .txt)")
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


def _row(ids: list[int], counted_from: int, seq_len: int) -> dict:
    """One document → a row: cut to ``seq_len``, right-padded; predictions count from position ``counted_from``."""
    ids = ids[:seq_len]
    row = {name: np.zeros(seq_len, dtype) for name, dtype in zip(LM_FIELDS, (np.int32, bool, bool), strict=True)}
    row["tokens"][:len(ids)] = ids
    row["token_mask"][:len(ids)] = True
    row["loss_mask"][max(0, counted_from):len(ids)] = True
    return row


def lm_row(where: str, record: dict, codec, seq_len: int) -> dict:
    """A ``text`` or ``messages`` record → a row (chat: predictions count from the last prompt token on)."""
    if isinstance(record.get("text"), str):
        return _row(codec.encode(record["text"]), 0, seq_len)
    if "messages" in record:
        messages = _messages(where, record["messages"])
        prompt = codec.chat(messages[:-1], add_generation_prompt=True) if len(messages) > 1 else []
        return _row(codec.chat(messages, add_generation_prompt=False), len(prompt) - 1, seq_len)
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
        out.update({f"{side}_{k}": v for k, v in _row(ids, start, seq_len).items()})
    return out


def load_rows(files: Sequence[str | os.PathLike], codec, seq_len: int, *, preference: bool = False) -> dict:
    """Every record of ``files`` → stacked rows ``{field: [N, L]}``."""
    if not files:
        raise DataError("no data files given")
    make = preference_row if preference else lm_row
    rows = [make(where, record, codec, seq_len) for f in files for where, record in read_records(f)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# -- split and batches ------------------------------------------------------------------------------
def split(rows: dict, ratios: Sequence[float], seed: int) -> list[dict]:
    """Disjoint parts of the documents in proportion to ``ratios`` (a seeded permutation; every part non-empty)."""
    n = len(next(iter(rows.values())))
    if any(r <= 0 for r in ratios) or len(ratios) > n:
        raise DataError(f"split: ratios {list(ratios)} must be positive and at most one part per document ({n})")
    order = np.random.default_rng(seed).permutation(n)
    edges = np.round(np.cumsum(ratios) / sum(ratios) * n).astype(int)
    edges = np.maximum(edges, np.arange(1, len(ratios) + 1))  # no part left empty
    parts = np.split(order, edges[:-1])
    return [{k: v[idx] for k, v in rows.items()} for idx in parts]


def batches(rows: dict, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1):
    """An endless grain iterator of ``{field: [batch_size, L]}``: this process's share of the rows, shuffled from
    ``seed`` anew each epoch. ``iterator.get_state()`` / ``set_state()`` save and restore its position."""
    import grain

    n = len(next(iter(rows.values())))
    if n < process_count:
        raise DataError(f"batches: {n} documents cannot be shared by {process_count} processes")
    ds = grain.MapDataset.range(n)[process_index::process_count].shuffle(seed=seed).repeat(None)
    ds = ds.map(lambda i: {k: v[i] for k, v in rows.items()}).batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset())

"""How good a model is, and how close to its teacher: perplexity on the next tokens of rows, and KL(teacher ‖ model)
per counted token. Rows as ``zebrax.data`` makes them (``tokens``, ``token_mask``, ``loss_mask``): a position ``p``
with ``loss_mask`` counts in the KL, and its prediction of token ``p + 1`` (when real) counts in the perplexity.

``eval_rows`` turns text files into such rows; long documents become windows of ``seq_len`` tokens that overlap by
one token, so every token after a document's first is predicted exactly once, as in lm-eval's rolling
log-likelihood with a context of one token.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zebrax import data
from zebrax.errors import InvalidArgument
from zebrax.losses import kl_loss, token_logprobs


@functools.lru_cache(maxsize=8)
def batch_sums(model, teacher):
    """The jitted per-batch sums of one (model, teacher or None) pair of modules: compiled once per batch shape,
    whatever the parameters (they are arguments, never constants). ``zebrax.app.aot`` compiles it."""

    @jax.jit
    def sums(params, teacher_params, tokens, token_mask, loss_mask, segment_ids=None):
        counted = loss_mask & token_mask
        logits = model.apply({"params": params}, tokens, token_mask=token_mask,
                             segment_ids=segment_ids)[0].astype(jnp.float32)
        nxt = counted[:, :-1] & data.next_in_document({"token_mask": token_mask, "segment_ids": segment_ids})
        logp = token_logprobs(logits[:, :-1], tokens[:, 1:])
        out = {"nll": -jnp.sum(jnp.where(nxt, logp, 0.0)), "predicted": jnp.sum(nxt)}
        if teacher is not None:
            t_logits = teacher.apply({"params": teacher_params}, tokens, token_mask=token_mask,
                                     segment_ids=segment_ids)[0]
            out["kl"] = kl_loss(t_logits, logits, counted, normalize="sequence") * tokens.shape[0]
            out["counted"] = jnp.sum(counted)
        return out

    return sums


def _batches(rows, batch_size: int):
    """Stacked batches of ``batch_size`` rows (the last one padded with empty rows, so one shape compiles), and the
    real rows in each: from stacked arrays or, streaming, from an iterable of single rows; packed rows keep their
    ``segment_ids``."""
    if isinstance(rows, dict):
        stacked_rows = rows
        rows = ({k: v[i] for k, v in stacked_rows.items()} for i in range(len(stacked_rows["tokens"])))
    part = []

    def stacked():
        fields = [k for k in (*data.LM_FIELDS, "segment_ids") if k in part[0]]
        out = {k: np.stack([r[k] for r in part]) for k in fields}
        return {k: np.pad(v, ((0, batch_size - len(part)), (0, 0))) for k, v in out.items()}, len(part)

    for row in rows:
        part.append(row)
        if len(part) == batch_size:
            yield stacked()
            part = []
    if part:
        yield stacked()


def evaluate(model, params, rows, *, teacher=None, teacher_params=None, batch_size: int = 8,
             progress: bool = False, source: str = "the rows", mesh=None) -> dict:
    """``{"perplexity", "nll", "predicted_tokens", "rows"}`` of ``model`` (a ``DecoderLM``) on ``rows`` (stacked
    ``{field: [N, L]}`` arrays, or any iterable of single ``{field: [L]}`` rows, consumed as it streams; packed rows
    with ``segment_ids``, each document apart), and with a
    ``teacher`` also ``{"kl", "tokens"}``: KL(teacher ‖ model) per counted position. Float32 sums over every row, in
    batches of ``batch_size``, divided by their counts. ``progress``: a progress bar on stderr. Rows in which no
    token is predicted are a ``DataError`` naming ``source`` (what the rows were read from), never a perplexity
    of 1. ``mesh``: the one ``params`` (and ``teacher_params``) are sharded over; each batch's rows are split over
    its (data, fsdp) axes (``batch_size`` rounded up to a multiple of their size), so no device runs a whole
    batch or holds a whole model."""
    from tqdm import tqdm

    from zebrax.sharding import on_device, place_rows, row_shards

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgument(f"evaluate: batch_size={batch_size!r} must be an integer >= 1")
    if mesh is not None:
        batch_size = -(-batch_size // row_shards(mesh)) * row_shards(mesh)
    else:  # in memory or loaded, one compiled program
        params, teacher_params = on_device((params, teacher_params))
    sums = batch_sums(model, teacher)
    total = len(rows["tokens"]) if isinstance(rows, dict) else None
    totals: dict[str, float] = {"rows": 0}
    with tqdm(total=total, desc="evaluate", unit="row", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for part, real in _batches(rows, batch_size):
            part = {k: v.astype(np.int32 if k in ("tokens", "segment_ids") else bool) for k, v in part.items()}
            if mesh is not None:
                part = place_rows(part, mesh)
            out = sums(params, teacher_params, part["tokens"], part["token_mask"], part["loss_mask"],
                       part.get("segment_ids"))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            totals["rows"] += real
            bar.update(real)
    if not totals.get("predicted"):
        raise data.DataError(f"evaluate: no token was counted in {source} ({totals['rows']} rows): a text needs at "
                             "least 2 tokens, a chat a reply that starts within seq_len")
    nll = totals["nll"] / totals["predicted"]
    result = {"perplexity": math.exp(nll), "nll": nll, "predicted_tokens": int(totals["predicted"]),
              "rows": int(totals["rows"])}
    if teacher is not None:
        result.update(kl=totals["kl"] / totals["counted"], tokens=int(totals["counted"]))
    return result


def windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """A document's tokens → windows of at most ``seq_len`` tokens, each starting on the last token of the one
    before: every token but the first is predicted once, from up to ``seq_len - 1`` tokens of context."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise InvalidArgument(f"windows: seq_len={seq_len!r} must be an integer >= 2")
    step = seq_len - 1
    return [ids[s:s + seq_len] for s in range(0, max(len(ids) - 1, 1), step)]


def eval_rows(files: Sequence[str | os.PathLike], codec, seq_len: int):
    """Rows to evaluate from text/chat files (``zebrax.data.read_records``), one at a time: ``text`` records whole, in
    windows (``windows``); chat records as training rows (the replies count; longer ones are cut to ``seq_len``)."""
    for f in files:
        for where, record in data.read_records(f):
            if isinstance(record.get("text"), str):
                yield from (data.row(w, 0, seq_len) for w in windows(codec.encode(record["text"]), seq_len))
            else:
                yield data.lm_row(where, record, codec, seq_len)

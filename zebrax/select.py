"""SMART layer selection (METHOD §5): score every layer by how much taking it from the all-MLA student brings the
all-linear student (all-Mamba2, or all of another linear kind) back toward the teacher, then place N MLA layers.

    s_l = KL(teacher ‖ all-linear) − KL(teacher ‖ all-linear with layer l from all-MLA)

KL is the mean over calibration tokens of ``Σ_v p_teacher (log p_teacher − log p_student)``. The L + 1 student
passes share one compiled program: layer ``l``'s choice is a traced index (``nn.switch``), not a new model. The pass
that swaps layer ``l`` starts from the all-linear student's input to that layer (computed once, in one pass over all
the layers), so the layers before it are not run again: L(L + 1)/2 + 2L layers in all, not L(L + 1).

Placement: the first MLA layer at ``first``, the last at ``last`` (default L − 2), every gap between consecutive
MLA layers ⌊u⌋ or ⌈u⌉ with u = (last − first)/(N − 1); among those placements the one with the largest total score,
found exactly by dynamic programming over (layers placed, position).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zebrax.config import HybridConfig
from zebrax.errors import InvalidArgument
from zebrax.init.assemble import check_students
from zebrax.losses import kl_loss
from zebrax.models.decoder import Block, embed_tokens, layer_io, lm_head, make_slots
from zebrax.models.impls import Impls
from zebrax.sharding import place_rows


class SwapLM(nn.Module):
    """The all-linear student (``base``) whose layer ``swap`` is the all-MLA student's (``other``), run from that
    layer on; ``swap = −1`` swaps none and runs every layer. Parameters: the base student's, plus ``swap_{i}`` = the
    other student's ``layers_{i}``."""

    base: HybridConfig
    other: HybridConfig
    impls: Impls = Impls()

    @nn.compact
    def __call__(self, tokens: jax.Array, x: jax.Array, swap: jax.Array) -> jax.Array:
        """``tokens`` ``[N, L]``; ``x`` ``[N, L, D]`` the base student's input to layer max(swap, 0) → logits
        ``[N, L, V]``. Layer i runs as it is (i > swap), swapped (i = swap) or not at all (i < swap)."""
        cfg = self.base
        slots = make_slots(tokens, None, None, None)
        embedding = embed_tokens(cfg)
        for i, (ours, theirs) in enumerate(zip(cfg.plan(), self.other.plan(), strict=True)):
            kept = Block(ours, cfg, self.impls, name=f"layers_{i}")
            swapped = Block(theirs, self.other, self.impls, name=f"swap_{i}")
            x = nn.switch(jnp.sign(i - swap) + 1,  # 0 before the swap, 1 at it, 2 after it
                          [lambda _, x: x, lambda _, x, b=swapped: b(x, slots)[0],
                           lambda _, x, b=kept: b(x, slots)[0]], self, x)
        return lm_head(cfg, x, embedding)


def swap_params(mla_params: dict, linear_params: dict, num_layers: int) -> dict:
    """``SwapLM``'s parameters: the all-linear student's, plus ``swap_{i}`` = the all-MLA student's ``layers_{i}``."""
    return {**linear_params, **{f"swap_{i}": mla_params[f"layers_{i}"] for i in range(num_layers)}}


def swap_kl(mla_config: HybridConfig, linear_config: HybridConfig, impls: Impls | None = None):
    """SMART's scoring pass: ``kl(params, tokens, x, teacher_logits, swap)`` = KL(teacher ‖ the all-linear student
    with layer ``swap`` taken from the all-MLA student), the mean over ``tokens`` ``[N, L]`` (``params``:
    ``swap_params``; ``x`` ``[N, L, D]``: the all-linear student's input to layer max(swap, 0), ``layer_inputs``;
    ``teacher_logits`` ``[N, L, V]``; ``swap`` −1 for none). ``zebrax compile smart`` compiles it."""
    module = SwapLM(linear_config, mla_config, impls or Impls())

    def kl(params, tokens, x, teacher_logits, swap):
        return kl_loss(teacher_logits, module.apply({"params": params}, tokens, x, swap))  # mean over tokens

    return kl


def layer_inputs(student, tokens) -> jax.Array:
    """The input of every layer of ``student`` (a ``zebrax.Model``) on ``tokens`` ``[N, L]`` → ``[layers, N, L, D]``,
    from one forward pass."""

    def inputs(params, tokens):
        return jnp.stack(layer_io(student.module, params, tokens)["block_input"])

    return jax.jit(inputs)(student.params, tokens)


def scores(teacher, mla_student, linear_student, tokens: np.ndarray) -> dict:
    """SMART scores of every layer on ``tokens`` ``[N, L]`` (``zebrax.Model``s; the students hybrids of one teacher
    shape, all-MLA and all-linear). Returns ``kl_all_linear``, ``kl`` (per layer), ``scores``, ``seconds``,
    ``compilations`` (of the student program; 1 unless shapes change). The students must agree on every setting
    outside their mixers (``init.assemble.check_students``). Models with a ``mesh`` (one, the same) score with their
    parameters as they are sharded and the rows split over it: no device holds a whole model or all the logits."""
    check_students(mla_student.config, linear_student.config, "select")
    tokens = teacher.check_tokens(tokens, "select")
    start = time.perf_counter()
    kl = swap_kl(mla_student.config, linear_student.config, linear_student.module.impls)
    params = swap_params(mla_student.params, linear_student.params, mla_student.config.num_hidden_layers)
    traces = []

    def kl_of(*args):
        traces.append(1)
        return kl(*args)

    kl_of = jax.jit(kl_of)
    teacher_logits = teacher.forward(tokens, where="select")  # on the devices, rows split as the tokens' below
    if linear_student.mesh is not None:
        tokens = place_rows({"tokens": tokens}, linear_student.mesh)["tokens"]
    inputs = layer_inputs(linear_student, tokens)
    kls = [float(kl_of(params, tokens, inputs[max(swap, 0)], teacher_logits, np.int32(swap)))
           for swap in range(-1, linear_student.config.num_hidden_layers)]
    return {"kl_all_linear": kls[0], "kl": kls[1:], "scores": [kls[0] - k for k in kls[1:]],
            "seconds": round(time.perf_counter() - start, 2), "compilations": len(traces),
            "tokens": int(tokens.size)}


def uniform(n_layers: int, num_mla: int) -> list[int]:
    """``num_mla`` MLA layers evenly spaced from layer 0, ⌊i·L/N⌋ (no scores: the placement ablation's baseline)."""
    if not 1 <= num_mla <= n_layers:
        raise InvalidArgument(f"uniform: num_mla={num_mla} must be in 1..{n_layers}")
    return [i * n_layers // num_mla for i in range(num_mla)]


def place(scores: Sequence[float], num_mla: int, *, first: int = 0, last: int | None = None) -> list[int]:
    """The MLA layers: ``first`` and ``last`` (default L − 2) kept, gaps ⌊u⌋ or ⌈u⌉, the largest total score."""
    n_layers = len(scores)
    last = n_layers - 2 if last is None else last
    if not 0 <= first <= last < n_layers:
        raise InvalidArgument(f"place: need 0 <= first={first} <= last={last} < {n_layers} layers")
    if num_mla < 1 or num_mla > last - first + 1:
        raise InvalidArgument(f"place: num_mla={num_mla} must be in 1..{last - first + 1} (layers {first}..{last})")
    if num_mla == 1:
        return [first]
    u = (last - first) / (num_mla - 1)
    gaps = sorted({math.floor(u), math.ceil(u)} - {0})
    # best[k][p]: the largest score of k + 1 MLA layers, the first at `first`, the (k + 1)-th at p
    best = [dict.fromkeys([first], float(scores[first]))]
    back: list[dict[int, int]] = [{}]
    for _ in range(1, num_mla):
        row, arrow = {}, {}
        for p, total in best[-1].items():
            for g in gaps:
                q = p + g
                if q <= last and (q not in row or total + scores[q] > row[q]):
                    row[q], arrow[q] = total + float(scores[q]), p
        best.append(row)
        back.append(arrow)
    if last not in best[-1]:
        raise InvalidArgument(f"place: no placement of {num_mla} layers from {first} to {last} with gaps {gaps}")
    layers = [last]
    for k in range(num_mla - 1, 0, -1):
        layers.append(back[k][layers[-1]])
    return layers[::-1]


def calibration_tokens(path: str | os.PathLike, tokenizer, *, seq_len: int = 256, num_sequences: int = 8
                       ) -> np.ndarray:
    """``[num_sequences, seq_len]`` token ids from a jsonl file of ``{"text": …}``, ``{"messages": [...]}`` (through
    the chat template) or ``{"input_ids": [...]}`` records, concatenated and cut into rows."""
    path = Path(path)
    if seq_len < 1 or num_sequences < 1:
        raise InvalidArgument(f"calibration: seq_len={seq_len} and num_sequences={num_sequences} must be >= 1")
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InvalidArgument(f"{path}: cannot read calibration data ({e.strerror})") from None
    stream: list[int] = []
    need = seq_len * num_sequences
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise InvalidArgument(f"{path}:{number}: not a JSON object") from None
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            bad = [t for t in record["input_ids"] if not isinstance(t, int) or isinstance(t, bool)]
            if bad:
                raise InvalidArgument(f"{path}:{number}: input_ids holds {bad[0]!r}; token ids are integers")
            stream += record["input_ids"]
        elif isinstance(record, dict) and isinstance(record.get("text"), str) and tokenizer is not None:
            stream += tokenizer(record["text"])["input_ids"]
        elif isinstance(record, dict) and isinstance(record.get("messages"), list) and tokenizer is not None:
            text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            raise InvalidArgument(f"{path}:{number}: expected \"text\", \"messages\" or \"input_ids\""
                                  f"{'' if tokenizer is not None else ' (the teacher has no tokenizer: input_ids)'}")
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise InvalidArgument(f"{path}: {len(stream)} tokens, fewer than {num_sequences} x {seq_len} = {need}")
    return np.asarray(stream[:need], np.int32).reshape(num_sequences, seq_len)


__all__ = ["SwapLM", "calibration_tokens", "place", "scores"]

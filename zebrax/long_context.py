"""Does a model use its context: a needle in a haystack, and the loss against position.

- ``needle_map``: RULER's single needle on its noise haystack ("The grass is green. The sky is blue. …"): a prompt of
  exactly ``length`` tokens holds "One of the special magic numbers for {key} is: {value}." at a ``depth`` (0: the
  first sentence, 1: the last) and ends on the question for that key. Each cell of depth × length reports the
  retrieval accuracy as RULER scores it (the value is a substring of the greedy continuation, ``ANSWER_TOKENS``
  tokens past the value's length), the stricter ``exact`` (the continuation starts with the value's own tokens) and
  the value's log-probability. The prompt is prefilled once; the greedy continuation and the teacher-forced value
  both start from that cache.
- ``position_nll``: the mean negative log-likelihood of each token of long documents against its position, in
  geometric bins (the curve that falls as the context grows when a model uses it, and stays flat when it does not).

Both feed a prompt through the generator's chunked prefill (``Generator.prefill_chunked`` and the same per-chunk
step), so memory grows with the model's cache, never with a whole prompt's activations or logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.checks import require_counts
from zebrax.errors import InvalidArgument
from zebrax.generate import PREFILL_CHUNK
from zebrax.losses import HEAD_CHUNK, token_chunks, token_logprobs
from zebrax.models.decoder import LMHead

# RULER's noise haystack and its single-needle template (NVIDIA/RULER, ``niah`` with ``type_haystack="noise"``)
HAYSTACK = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = (" What is the special magic number for {key} mentioned in the provided text? The special magic number "
            "for {key} mentioned in the provided text is")
# keys: adjective-noun pairs, as RULER's random words are; values: 7-digit numbers
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "oval", "plain", "quiet", "rusty", "silky", "tidy")
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "ribbon", "saddle", "tunnel")


# the greedy continuation runs this many tokens past the value's own (the teacher answers ": 4821937" as often as
# " 4821937"; RULER lets a niah answer run 128 tokens)
ANSWER_TOKENS = 8


class Haystack:
    """Token ids of the needle prompts of one tokenizer: the haystack's sentences, needle and question tokenised
    alone (each begins with a space, so pieces join as they would in running text)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.encode = encode
        self.sentences = [encode(" " + s.strip() + ".") for s in HAYSTACK.split(".") if s.strip()]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [] if bos is None else [bos]

    def needle(self, key: str, value: str) -> tuple[list[int], list[int], list[int]]:
        """(needle, question, answer) token ids: the answer is the value as it follows the question."""
        return (self.encode(NEEDLE.format(key=key, value=value)), self.encode(QUESTION.format(key=key)),
                self.encode(" " + value))

    @functools.cached_property
    def minimum(self) -> int:
        """The shortest prompt any key allows: the prefix, one sentence of haystack, the longest needle and
        question."""
        longest = max(sum(map(len, self.needle(f"{a} {n}", "9999999")[:2])) for a in ADJECTIVES for n in NOUNS)
        return len(self.prefix) + len(self.sentences[0]) + longest

    def require(self, lengths: Sequence[int], what: str) -> None:
        """InvalidArgument naming the first of ``lengths`` below ``minimum``."""
        short = [n for n in lengths if n < self.minimum]
        if short:
            raise InvalidArgument(f"{what}: length={short[0]} is below the {self.minimum} tokens a needle prompt needs "
                                  "(the needle, the question and one sentence of haystack)")

    def prompt(self, length: int, depth: float, key: str, value: str) -> tuple[list[int], list[int], int]:
        """(prompt ids of exactly ``length`` tokens, answer ids, the needle's first token index): the haystack's
        sentences in a cycle, cut to fit, the needle between two sentences at ``depth`` of them, the question last."""
        needle, question, answer = self.needle(key, value)
        room = length - len(self.prefix) - len(needle) - len(question)
        if room < len(self.sentences[0]):
            raise InvalidArgument(f"needle: length={length} is below the {self.minimum} tokens a needle prompt needs "
                                  "(the needle, the question and one sentence of haystack)")
        hay, cuts = [], [0]
        i = 0
        while len(hay) < room:
            hay += self.sentences[i % len(self.sentences)]
            cuts.append(len(hay))
            i += 1
        hay = hay[:room]
        cuts = [c for c in cuts if c <= room]
        at = cuts[round(depth * (len(cuts) - 1))]
        ids = self.prefix + hay[:at] + needle + hay[at:] + question
        return ids, answer, len(self.prefix) + at


def _draw_needle(rng: np.random.Generator) -> tuple[str, str]:
    """A needle's key (an adjective-noun pair) and value (7 digits), drawn from ``rng``."""
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}", str(rng.integers(1_000_000, 10_000_000))


def _check_depths(depths: Sequence[float]) -> None:
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0]
    if not depths or bad:
        raise InvalidArgument(f"needle: depths {list(depths) if not bad else bad} must be numbers in [0, 1] (0: the "
                              "haystack's start, 1: its end)")


def needle_map(model, *, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
               samples: int = 2, seed: int = 0, batch_size: int = 4, prefill_chunk: int = PREFILL_CHUNK,
               progress=None) -> dict:
    """Retrieval accuracy and the value's log-probability for each (length, depth) of ``model`` (a
    ``zebrax.Model`` with a tokenizer): ``samples`` needles a cell (keys and values drawn from ``seed``, the same for
    every model), ``batch_size`` prompts of one length a pass. → ``{"lengths", "depths", "accuracy": [len][depth]
    (the value in the greedy continuation, RULER's match), "exact": [len][depth] (the continuation starts with the
    value's tokens), "logprob": [len][depth] (mean over samples of Σ log p(value tokens)), "value_tokens":
    [len][depth] (mean), "samples", "answers" (each needle's key, value and greedy continuation)}``.
    ``progress(done, total)`` is called after each pass."""
    if model.tokenizer is None:
        raise InvalidArgument("needle: the model has no tokenizer; a needle is text")
    if not lengths:
        raise InvalidArgument("needle: give at least one length")
    require_counts("needle", samples=samples, batch_size=batch_size, prefill_chunk=prefill_chunk,
                   lengths=list(lengths))
    _check_depths(depths)
    hay = Haystack(model.tokenizer)
    hay.require(lengths, "needle")
    rng = np.random.default_rng(seed)
    cells = [(li, di, *_draw_needle(rng)) for li in range(len(lengths)) for di in range(len(depths))
             for _ in range(samples)]
    # passes of one length each: a batch never pads a short prompt to a longer one's length
    passes = [part[s:s + batch_size] for li in range(len(lengths)) for part in [[c for c in cells if c[0] == li]]
              for s in range(0, len(part), batch_size)]
    logp = np.zeros((len(lengths), len(depths)))
    found, exact, tokens = np.zeros_like(logp), np.zeros_like(logp), np.zeros_like(logp)
    answers, done = [], 0
    for part in passes:
        built = [hay.prompt(lengths[li], depths[di], key, value) for li, di, key, value in part]
        got = zip(*_score_answers(model, [b[0] for b in built], [b[1] for b in built], prefill_chunk), strict=True)
        for (li, di, key, value), (_, answer, _), (lp, hit, text) in zip(part, built, got, strict=True):
            logp[li, di] += lp / samples
            exact[li, di] += hit / samples
            found[li, di] += (value in text) / samples
            tokens[li, di] += len(answer) / samples
            answers.append({"length": lengths[li], "depth": float(depths[di]), "key": key, "value": value,
                            "continuation": text})
        done += len(part)
        if progress is not None:
            progress(done, len(cells))
    return {"lengths": list(lengths), "depths": [float(d) for d in depths], "samples": samples, "seed": seed,
            "accuracy": found.round(6).tolist(), "exact": exact.round(6).tolist(), "logprob": logp.round(4).tolist(),
            "value_tokens": tokens.round(3).tolist(), "answers": answers}


def _score_answers(model, prompts: list[list[int]], answers: list[list[int]], prefill_chunk: int
                   ) -> tuple[list[float], list[bool], list[str]]:
    """For each row: Σ log p(answer | prompt), whether every answer token is the argmax, and the text of the greedy
    continuation (``ANSWER_TOKENS`` past the longest answer, cut at an end-of-sequence token). The prompts are
    left-padded and prefilled once (in chunks past ``prefill_chunk``); the greedy loop reads that cache, then the
    answers are fed one token a step into it."""
    gen = model.generator
    steps = max(len(a) for a in answers)
    new_tokens = steps + ANSWER_TOKENS
    logits, cache, capacity = gen.start(model.params, prompts, new_tokens, pad_id=model.pad_id,
                                        prefill_chunk=prefill_chunk)
    eos = list(model.config.eos_token_id or ()) or [-1]
    greedy, _ = gen.decode(model.params, cache, logits, jax.random.key(0), jnp.int32(new_tokens), jnp.float32(0.0),
                           jnp.float32(1.0), jnp.asarray(eos, jnp.int32), jnp.int32(model.pad_id), capacity=capacity)
    texts = []
    for row in np.asarray(greedy).tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(model.decode(row[:min(cut, new_tokens)]))
    answer = np.full((len(prompts), steps), model.pad_id, np.int32)
    counted = np.zeros(answer.shape, bool)
    for i, a in enumerate(answers):
        answer[i, :len(a)], counted[i, :len(a)] = a, True
    logp, hit = np.zeros(len(prompts)), np.ones(len(prompts), bool)
    for j in range(steps):
        lp, top = _step_scores(logits, jnp.asarray(answer[:, j]))
        logp += np.where(counted[:, j], np.asarray(lp), 0.0)
        hit &= ~counted[:, j] | np.asarray(top)
        if j + 1 < steps:
            logits, cache = gen.decode_step(model.params, cache, jnp.asarray(answer[:, j]))
    return logp.tolist(), hit.tolist(), texts


@jax.jit
def _step_scores(logits, targets):
    """logits ``[B, V]``, targets ``[B]`` → (log p(target) ``[B]``, target is the argmax ``[B]``)."""
    return token_logprobs(logits[:, None], targets[:, None])[:, 0], jnp.argmax(logits, -1) == targets


def layer_retrieval(teacher, student, *, length: int = 256, depths: Sequence[float] = (0.0, 0.5, 1.0),
                    samples: int = 2, seed: int = 0, together: Sequence[int] = ()) -> dict:
    """Which layers carry the teacher's retrieval, as a student's layers replace them. ``teacher``: a ``zebrax.Model``
    with a tokenizer; ``student``: a model of its shape whose layers are one kind (an all-Gated-DeltaNet or all-MLA
    student, ILD-trained or not). Scored: Σ log p(the needle's value), teacher-forced after a prompt of ``length``
    tokens (the needle map's keys and values of ``seed``, ``samples`` a depth; mean over samples), of the teacher;
    of the teacher with layer l the student's, for every l; and, for each k of ``together``, with the k layers whose
    swap costs least the student's at once. → ``{"kind", "length", "depths", "samples", "seed", "teacher": [depth],
    "layers": [l][depth], "cost": [l] (the teacher's Σ over depths less the swapped one's), "together": [{"k",
    "swapped", "logprob": [depth]}]}``."""
    import dataclasses

    from zebrax.api import Model
    from zebrax.config import HybridConfig, LlamaConfig

    if not isinstance(student.config, HybridConfig):
        raise InvalidArgument(f"layer retrieval: the student must be a hybrid of one student kind (an all-GDN or "
                              f"all-MLA student), it is a {type(student.config).__name__}")
    if not (isinstance(teacher.config, LlamaConfig) or (isinstance(teacher.config, HybridConfig)
                                                        and set(teacher.config.mixers) == {"attention"})):
        raise InvalidArgument(f"layer retrieval: the teacher must be a Llama (attention in every layer), it is a "
                              f"{type(teacher.config).__name__} of layers "
                              f"{teacher.config.layer_map()}")
    kinds = set(student.config.mixers)
    n = len(student.config.mixers)
    if len(kinds) != 1 or "attention" in kinds:
        raise InvalidArgument(f"layer retrieval: the student's layers must all be of one student kind, it has "
                              f"{student.config.layer_map()}")
    if teacher.tokenizer is None:
        raise InvalidArgument("layer retrieval: the teacher has no tokenizer; a needle is text")
    (kind,) = kinds
    t_layers = sorted(k for k in teacher.params if k.startswith("layers_"))
    attention = (teacher.config.attention_config() if isinstance(teacher.config, LlamaConfig)
                 else teacher.config.attention)
    if len(t_layers) != n or student.config.attention != attention:
        raise InvalidArgument(f"layer retrieval: the student ({n} layers) is not of the teacher's shape "
                              f"({len(t_layers)} layers, its attention as the student's config holds it)")
    bad = [k for k in together if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise InvalidArgument(f"layer retrieval: together={bad[0]!r} must be a count of layers in 1..{n}")
    require_counts("layer retrieval", samples=samples, length=length)
    _check_depths(depths)
    hay = Haystack(teacher.tokenizer)
    hay.require([length], "layer retrieval")
    rng = np.random.default_rng(seed)
    cells = [(d, *_draw_needle(rng)) for d in depths for _ in range(samples)]
    built = [hay.prompt(length, d, key, value) for d, key, value in cells]
    width = length + max(len(a) for _, a, _ in built)
    pad = teacher.config.pad_token_id or 0
    tokens = np.asarray([p + a + [pad] * (width - length - len(a)) for p, a, _ in built], np.int32)
    answer = np.zeros(tokens.shape, bool)
    for i, (_, a, _) in enumerate(built):
        answer[i, length:length + len(a)] = True  # right padding: no position before it sees it

    def score(swapped) -> list[float]:
        config = dataclasses.replace(student.config, mixers=tuple(kind if i in swapped else "attention"
                                                                  for i in range(n)))
        params = {**teacher.params, **{f"layers_{i}": student.params[f"layers_{i}"] for i in swapped}}
        logits = Model(config, params).logits(tokens[:, :-1])
        lp = np.asarray(token_logprobs(logits, tokens[:, 1:]), np.float64) * answer[:, 1:]
        return np.round(lp.sum(-1).reshape(len(depths), samples).mean(-1), 4).tolist()

    base = score(set())
    layers = [score({i}) for i in range(n)]
    cost = [round(sum(base) - sum(row), 4) for row in layers]
    order = sorted(range(n), key=lambda i: cost[i])
    return {"kind": kind, "length": length, "depths": [float(d) for d in depths], "samples": samples, "seed": seed,
            "teacher": base, "layers": layers, "cost": cost,
            "together": [{"k": k, "swapped": sorted(order[:k]), "logprob": score(set(order[:k]))} for k in together]}


def position_bins(length: int) -> list[int]:
    """Bin edges over token positions 1 … length - 1 (a position's token predicted from that many before it):
    1, 2, 4, 8, … doubling, then ``length``."""
    edges = [1]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges + [length]


@functools.lru_cache(maxsize=4)
def _chunk_scores(module):
    """jitted ``(params, cache, tokens [B, C], targets [B, C]) -> (log p(target) [B, C], cache)``: a chunk appended
    to the cache, the LM head ``HEAD_CHUNK`` tokens at a time; the cache is updated in place (donated)."""
    head = LMHead(module.config)

    @functools.partial(jax.jit, donate_argnums=1)
    def scores(params, cache, tokens, targets):
        hidden, cache = module.apply({"params": params}, tokens, cache=cache, hidden_only=True)
        per_token = lambda h, t: token_logprobs(head.apply({"params": params}, h), t)  # noqa: E731
        return token_chunks(per_token, (hidden, targets), math.gcd(tokens.shape[1], HEAD_CHUNK)), cache

    return scores


def position_nll(model, documents: Sequence[Sequence[int]], *, length: int, batch_size: int = 1,
                 chunk: int = PREFILL_CHUNK, progress=None) -> dict:
    """The mean NLL of each position's token over the first ``length`` tokens of every document at least that long
    (``[ids]``), predicted from all the tokens before it: documents ``batch_size`` at a time, fed ``chunk`` tokens a
    step into a cache of ``length`` slots. → ``{"length", "documents", "skipped" (shorter ones), "edges", "nll" (per
    bin [edges[i], edges[i+1])), "nll_by_position" (positions 1 … length-1, mean over documents)}``."""
    require_counts("positions", length=length, batch_size=batch_size, chunk=chunk)
    if length < 2:
        raise InvalidArgument(f"positions: length={length} must be >= 2 (a token predicted from one before it)")
    if length % chunk and chunk < length:
        raise InvalidArgument(f"positions: chunk={chunk} must divide length={length}")
    chunk = min(chunk, length)
    docs = [list(d[:length]) for d in documents if len(d) >= length]
    if not docs:
        longest = max((len(d) for d in documents), default=0)
        raise InvalidArgument(f"positions: no document has length={length} tokens (the longest has {longest}); "
                              "give longer documents or a shorter length")
    scores = _chunk_scores(model.module)
    total = np.zeros(length - 1)
    for start in range(0, len(docs), batch_size):
        part = docs[start:start + batch_size]
        ids = np.zeros((batch_size, length + 1), np.int32)
        ids[:len(part), :length] = part
        cache, got = type(model.module).init_cache(model.config, batch_size, length), []
        for s in range(0, length, chunk):
            logp, cache = scores(model.params, cache, ids[:, s:s + chunk], ids[:, s + 1:s + chunk + 1])
            got.append(np.asarray(logp))
        total -= np.concatenate(got, axis=1)[:len(part), :length - 1].sum(0)
        if progress is not None:
            progress(min(start + batch_size, len(docs)), len(docs))
    per_position = total / len(docs)
    edges = position_bins(length)
    bins = [float(per_position[a - 1:b - 1].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return {"length": length, "documents": len(docs), "skipped": len(documents) - len(docs), "edges": edges,
            "nll": [round(v, 5) for v in bins], "nll_by_position": per_position.round(5).tolist()}


def stdlib_documents(count: int) -> list[str]:
    """The texts of the ``count`` largest modules of this Python's standard library (code and docstrings): long
    documents that are on every machine with the same Python, and in no training set or needle of zebrax."""
    import pathlib
    import sysconfig

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    largest = sorted(stdlib.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))[:count]
    return [p.read_text(encoding="utf-8") for p in largest]


__all__ = ["ANSWER_TOKENS", "HAYSTACK", "NEEDLE", "QUESTION", "Haystack", "needle_map", "position_bins", "position_nll",
           "stdlib_documents"]

"""The user-facing facade: ``zebrax.convert``, ``zebrax.load`` and the ``Model`` they give."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint, files
from zebrax.config import HybridConfig, LlamaConfig
from zebrax.convert import convert
from zebrax.errors import ConfigError, InvalidArgument, warn
from zebrax.generate import PREFILL_CHUNK, Generator
from zebrax.models import build as build_module
from zebrax.models import cache_sizes
from zebrax.recipe import from_teacher


class Model:
    """A config, its parameters and (optionally) a tokenizer, with jitted inference.

    ``impl`` picks the implementation of each op the model runs: one name for all (``"auto"``, ``"reference"``,
    ``"pallas"``) or one per op (``{"attention": "reference", "ssd": "chunked"}``; see ``zebrax.ops.Impls``).
    ``mesh``: a ``jax.sharding.Mesh`` the parameters are sharded over by the rules of ``zebrax.sharding`` (global
    arrays already sharded so are used as they lie, not copied); ``forward`` and ``logits`` then split their rows
    over its (data, fsdp) axes.
    """

    def __init__(self, config, params, tokenizer=None, *, impl: str | dict = "auto", mesh=None):
        from zebrax.sharding import on_device, param_shardings, place

        self.config, self.mesh = config, mesh
        # on the devices once, not copied from the host on every call
        self.params = on_device(params) if mesh is None else place(
            params, param_shardings(config, params, mesh), copy=False)
        self.tokenizer = tokenizer
        self.module = build_module(config, impl)
        self._forward = jax.jit(lambda p, t, m: self.module.apply({"params": p}, t, token_mask=m)[0])
        self.generator = Generator(self.module)

    @functools.cached_property
    def _cache_sizes(self) -> tuple[int, int]:
        """(bytes per token, constant bytes) of one sequence's decode cache: traced once per model, not per call."""
        return cache_sizes(self.config)

    def logits(self, tokens, token_mask=None) -> np.ndarray:
        """tokens int ``[B, L]`` → float32 logits ``[B, L, vocab]`` (one full forward pass), on the host."""
        from zebrax.hosts import gather

        return np.asarray(gather(self.forward(tokens, token_mask, "logits")))

    def forward(self, tokens, token_mask=None, where: str = "forward") -> jax.Array:
        """``logits`` left on the devices: with a ``mesh``, a global array whose rows are split as ``tokens``'."""
        tokens = self.check_tokens(tokens, where)
        if token_mask is None:
            mask = np.ones(tokens.shape, bool)
        else:
            mask = np.asarray(token_mask)
            if mask.shape != tokens.shape or mask.dtype.kind not in "bi":
                raise InvalidArgument(f"{where}: token_mask must be a bool array of the tokens' shape {tokens.shape}, "
                                      f"got {mask.dtype} {mask.shape}")
            mask = mask.astype(bool)
        placed = self.placed({"tokens": tokens, "mask": mask})
        return self._forward(self.params, placed["tokens"], placed["mask"])

    def placed(self, rows: dict) -> dict:
        """``{name: [B, …] array}`` as the model's programs take them: with a ``mesh``, global arrays whose rows are
        split over (data, fsdp) where they divide (``sharding.place_rows``); without, as given."""
        from zebrax.sharding import place_rows

        return rows if self.mesh is None else place_rows(rows, self.mesh)

    def check_tokens(self, tokens, where: str) -> np.ndarray:
        """``tokens`` as int32 ``[B, L]`` after checking, on the host, that every id is an integer in the
        vocabulary; InvalidArgument names the first bad id and its position."""
        array = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
        if array.dtype.kind not in "iu":
            raise InvalidArgument(f"{where}: token ids must be integers, got an array of {array.dtype}")
        if array.ndim != 2 or 0 in array.shape:
            raise InvalidArgument(f"{where}: tokens must be a non-empty [batch, length] array, got shape {array.shape}"
                                  " (for one prompt pass [prompt])")
        vocab = self.config.vocab_size
        bad = (array < 0) | (array >= vocab)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InvalidArgument(f"{where}: token id {int(array[at])} at position {list(at)} is outside the "
                                  f"vocabulary (0 <= id < {vocab})")
        return array.astype(np.int32)

    def generate(
        self,
        tokens,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
        prefill_chunk: int | None = PREFILL_CHUNK,
    ):
        """Continue prompts; greedy when ``temperature`` is 0, else temperature + nucleus (top-p) sampling.

        tokens: int array ``[B, L]`` → ``[B, L + n]`` where n <= max_new_tokens is the number of steps
        run (generation stops once every row has emitted EOS; finished rows are padded). A list of
        prompts of different lengths → a list of ``prompt + new tokens`` (up to and including EOS).
        ``seed`` is any integer in [0, 2**64). Prompts longer than ``prefill_chunk`` tokens are prefilled that many
        tokens at a time, every layer's cache carried from chunk to chunk (None: the whole prompt at once).
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise InvalidArgument(f"generate: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"generate: temperature={temperature!r} must be a finite number >= 0")
        if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"generate: top_p={top_p!r} must be a number in (0, 1]")
        if not _is_int(seed) or not 0 <= seed < 2**64:
            raise InvalidArgument(f"generate: seed={seed!r} must be an integer in [0, 2**64)")
        if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
            raise InvalidArgument(f"generate: prefill_chunk={prefill_chunk!r} must be an integer >= 1 (or None: the "
                                  "whole prompt at once)")
        is_array = not isinstance(tokens, (list, tuple)) or bool(tokens) and np.ndim(tokens[0]) == 0
        if is_array:
            prompts = self.check_tokens(tokens, "generate").tolist()
        else:
            if not tokens or not all(isinstance(p, (list, tuple, np.ndarray)) for p in tokens):
                raise InvalidArgument("generate: expected a [batch, length] array or a non-empty list of prompts "
                                      "(lists of token ids)")
            prompts = []
            for i, p in enumerate(tokens):
                if len(p) == 0:
                    raise InvalidArgument(f"generate: prompt {i} is empty; every prompt needs at least one token")
                prompts.append(self.check_tokens([p], f"generate: prompt {i}")[0].tolist())
        self._check_length(prompts, max_new_tokens, prefill_chunk)
        eos = () if ignore_eos else self.config.eos_token_id
        new, _ = self.generator(
            self.params, prompts, max_new_tokens=max_new_tokens, temperature=float(temperature),
            top_p=float(top_p), seed=seed, eos_ids=eos, pad_id=self.pad_id, prefill_chunk=prefill_chunk,
        )
        if is_array:
            return np.concatenate([np.asarray(prompts, np.int32), new], axis=1)
        return [p + _until_eos(row, eos) for p, row in zip(prompts, new.tolist(), strict=True)]

    def _check_length(self, prompts: list[list[int]], max_new_tokens: int, prefill_chunk: int | None) -> None:
        """Warn past the trained context; refuse a decode cache that cannot fit in memory, before allocating."""
        _, cache_len = Generator.lengths([len(p) for p in prompts], max_new_tokens, prefill_chunk)
        per_token, state = self._cache_sizes
        need = len(prompts) * (cache_len * per_token + state)
        have = available_memory()
        if need > have:
            raise InvalidArgument(f"generate: the decode cache for {len(prompts)} x {cache_len} tokens needs "
                                  f"{need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available; "
                                  "lower max_new_tokens or the batch")
        longest = max(len(p) for p in prompts) + max_new_tokens
        trained = getattr(self.config, "max_position_embeddings", None)
        if trained is not None and longest > trained:
            warn(f"generate: {longest} tokens (prompt + max_new_tokens) exceed max_position_embeddings={trained}; "
                 "positions past it were never trained")

    @property
    def pad_id(self) -> int:
        if self.config.pad_token_id is not None:
            return self.config.pad_token_id
        return self.config.eos_token_id[0] if self.config.eos_token_id else 0

    def cache_bytes_per_token(self) -> int:
        """Bytes of decode cache one sequence keeps per token, summed over layers (cache dtype)."""
        return self._cache_sizes[0]

    def cache_state_bytes(self) -> int:
        """Bytes of decode state one sequence keeps whatever its length (0 for attention-only models)."""
        return self._cache_sizes[1]

    # -- text helpers (need a tokenizer) -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (with the tokenizer's special tokens, e.g. BOS)."""
        return self._require_tokenizer()(text)["input_ids"]

    def decode(self, tokens) -> str:
        """Text of token ids, special tokens dropped."""
        return self._require_tokenizer().decode(list(tokens), skip_special_tokens=True)

    def chat_tokens(self, messages: str | Sequence[dict]) -> list[int]:
        """The prompt tokens of a chat, through the tokenizer's chat template (generation prompt added)."""
        tok = self._require_tokenizer()
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise InvalidArgument("chat: expected a message string or a non-empty list of "
                                  "{\"role\": ..., \"content\": ...} dicts")
        if not getattr(tok, "chat_template", None):
            raise InvalidArgument("chat: this checkpoint's tokenizer has no chat template; generate from plain "
                                  "text instead (without --chat)")
        text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    def chat(self, messages: str | Sequence[dict], *, max_new_tokens: int = 128, **sampling) -> str:
        """Answer a chat (a user message or a list of ``{"role", "content"}``) and return the reply text."""
        prompt = self.chat_tokens(messages)
        out = self.generate([prompt], max_new_tokens=max_new_tokens, **sampling)[0]
        return self.decode(out[len(prompt):]).strip()

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InvalidArgument("this checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def __repr__(self) -> str:
        return f"Model({type(self.config).__name__}, layers {self.config.layer_map()})"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def available_memory() -> int:
    """Bytes the default device can still allocate: the accelerator's free memory, or the host's available RAM
    (within the container's cgroup limit, where one is set)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap.isdigit():
                free = min(free, int(cap) - int(Path(usage).read_text()))
        except (OSError, ValueError):
            continue
    return free


def _until_eos(row: list[int], eos: Sequence[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a checkpoint, or None. Reads local files only."""
    d = checkpoint.tokenizer_dir(path)
    if d is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def load(path: str | os.PathLike, *, dtype: str | None = None, impl: str | dict = "auto", mesh=None) -> Model:
    """Load a zebrax checkpoint. ``dtype`` overrides the compute and parameter dtype. ``mesh``: the parameters are
    restored straight into their shardings over it (each process reads the shards its devices hold; ``Model``)."""
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    config = checkpoint.load_config(path)
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    shardings = None if mesh is None else param_shardings(config, abstract_params(config), mesh)
    return Model(config, checkpoint.load_params(path, config, shardings), load_tokenizer(path), impl=impl, mesh=mesh)


def build(
    teacher: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: HybridConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **recipe,
) -> Path:
    """Build a Zebra-Llama hybrid from the Llama checkpoint ``teacher`` and write it to ``dst``.

    ``recipe``: the arguments of ``recipe.from_teacher`` (``mla_layers``, ``attention_layers``,
    ``kv_lora_rank``, ``q_lora_rank``, ``qk_rope_head_dim``, ``rope_factor``, ``linear``, ``mla={...}``,
    ``mamba2={...}``, …).
    ``config``: a ``HybridConfig`` (a preset) laid onto this teacher, with ``recipe`` over it (``_over_preset``);
    without one, ``recipe`` alone makes the hybrid. MLA layers are initialised by SVD, Mamba2 layers from the
    attention weights (fresh parts from ``jax.random.key(seed)``, ``seed`` in [0, 2**32)), the rest copied. The
    checkpoint holds the teacher's tokenizer and ``build_report.json`` (teacher, seed, truncation error per MLA
    layer). Every argument and ``dst`` are checked before the work starts.
    """
    from zebrax.init import init_hybrid

    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise InvalidArgument(f"build: seed={seed!r} must be an integer in [0, 2**32) (a jax PRNG seed)")
    teacher_config = checkpoint.load_config(teacher)
    if not isinstance(teacher_config, LlamaConfig):
        raise ConfigError(f"{teacher}: the teacher must be a Llama checkpoint, this one is "
                          f"{type(teacher_config).__name__}")
    if config is None:
        config = from_teacher(teacher_config, **_checked_recipe(recipe))
    elif isinstance(config, HybridConfig):
        config = _over_preset(config, teacher_config, recipe)
    else:
        raise InvalidArgument(f"build: config is a {type(config).__name__}; a hybrid is built from a HybridConfig")
    with files.warnings_after_success(), checkpoint.writing(dst, overwrite=overwrite,
                                                                         sources=[teacher]) as tmp:
        params, report = init_hybrid(teacher_config, checkpoint.load_params(teacher, teacher_config), config,
                                     jax.random.key(seed))
        checkpoint.save(tmp, config, params)
        report = {"teacher": str(Path(teacher).absolute()), "seed": seed, "layer_map": config.layer_map(), **report}
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2))
        tokenizer = checkpoint.tokenizer_dir(teacher)
        if tokenizer is not None:
            shutil.copytree(tokenizer, tmp / "tokenizer")
    return Path(dst)


# the MLA fields each argument of recipe.from_teacher sets
_RECIPE_MLA_FIELDS = {"kv_lora_rank": ("kv_lora_rank",), "q_lora_rank": ("q_lora_rank",),
                      "qk_rope_head_dim": ("qk_rope_head_dim", "qk_nope_head_dim"), "rope_factor": ("rope_scaling",),
                      "rope_original_max_position_embeddings": ("rope_scaling",)}


def _checked_recipe(recipe: dict) -> dict:
    """``recipe`` after InvalidArgument for a name ``recipe.from_teacher`` does not take."""
    from zebrax.recipe import arguments

    known = arguments()
    unknown = sorted(set(recipe) - set(known))
    if unknown:
        raise InvalidArgument(f"build: unknown recipe argument{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                              f"recipe.from_teacher takes {', '.join(known)}")
    return recipe


def _over_preset(preset: HybridConfig, teacher: LlamaConfig, recipe: dict) -> HybridConfig:
    """``preset`` laid onto ``teacher`` (``HybridConfig.on_teacher``) with ``recipe``, arguments of
    ``recipe.from_teacher``, over it: a layer list given replaces the preset's (layers in neither list are
    Mamba2), a rank or RoPE setting given replaces the preset's MLA value (``qk_rope_head_dim`` with its
    ``qk_nope_head_dim``), ``mla`` / ``mamba2`` fields replace theirs; the rest stays the preset's. The result is
    checked against the teacher as ``from_teacher`` checks its own."""
    config = preset.on_teacher(teacher)
    if not _checked_recipe(recipe):
        return config
    mla, rope = config.mla, config.mla.rope_scaling
    own = dict(mla_layers=list(config.layers_of("mla")), attention_layers=list(config.layers_of("attention")),
               kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank, qk_rope_head_dim=mla.qk_rope_head_dim,
               rope_factor=rope.factor, rope_original_max_position_embeddings=rope.original_max_position_embeddings,
               linear=(config.linear_kinds() or ("mamba2",))[0])
    derived = from_teacher(teacher, **{**own, **recipe})
    own_kinds = dict(config.configs)
    fields = {"mla": {f for name in recipe for f in _RECIPE_MLA_FIELDS.get(name, ())} | set(recipe.get("mla", {})),
              **{kind: set(recipe[kind]) for kind in own_kinds if kind != "mla" and kind in recipe}}
    return config.replace(mixers=derived.mixers, **{
        kind: dataclasses.replace(getattr(config, kind), **{f: getattr(getattr(derived, kind), f) for f in names})
        for kind, names in fields.items()}, **{kind: c for kind, c in derived.configs if kind not in own_kinds})


__all__ = ["Model", "build", "convert", "load", "load_tokenizer"]

"""The user-facing facade: ``zebrax.convert``, ``zebrax.load`` and the ``Model`` they give."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from zebrax import checkpoint
from zebrax.convert import convert
from zebrax.errors import InvalidArgument
from zebrax.generate import Generator
from zebrax.models import build, cache_sizes


class Model:
    """A config, its parameters and (optionally) a tokenizer, with jitted inference.

    ``impl`` picks the attention implementation (``"auto"``, ``"reference"``).
    """

    def __init__(self, config, params, tokenizer=None, *, impl: str = "auto"):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.module = build(config, impl)
        self._forward = jax.jit(lambda p, t, m: self.module.apply({"params": p}, t, token_mask=m)[0])
        self._generator = Generator(self.module)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def logits(self, tokens, token_mask=None) -> np.ndarray:
        """tokens int ``[B, L]`` → float32 logits ``[B, L, vocab]`` (one full forward pass)."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2:
            raise InvalidArgument(f"logits: tokens must be [batch, length], got shape {tokens.shape}")
        mask = np.ones(tokens.shape, bool) if token_mask is None else np.asarray(token_mask, bool)
        return np.asarray(self._forward(self.params, tokens, mask))

    def generate(
        self,
        tokens,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
    ):
        """Continue prompts; greedy when ``temperature`` is 0, else temperature + nucleus (top-p) sampling.

        tokens: int array ``[B, L]`` → ``[B, L + n]`` where n <= max_new_tokens is the number of steps
        run (generation stops once every row has emitted EOS; finished rows are padded). A list of
        prompts of different lengths → a list of ``prompt + new tokens`` (up to and including EOS).
        """
        if max_new_tokens < 1:
            raise InvalidArgument(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
        if not 0.0 < top_p <= 1.0 or temperature < 0:
            raise InvalidArgument(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        is_array = not isinstance(tokens, (list, tuple))
        prompts = [list(map(int, p)) for p in (np.asarray(tokens) if is_array else tokens)]
        eos = () if ignore_eos else self.config.eos_token_id
        new, _ = self._generator(
            self.params, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=seed, eos_ids=eos, pad_id=self.pad_id,
        )
        if is_array:
            return np.concatenate([np.asarray(tokens, np.int32), new], axis=1)
        return [p + _until_eos(row, eos) for p, row in zip(prompts, new.tolist(), strict=True)]

    @property
    def pad_id(self) -> int:
        if self.config.pad_token_id is not None:
            return self.config.pad_token_id
        return self.config.eos_token_id[0] if self.config.eos_token_id else 0

    def cache_bytes_per_token(self) -> int:
        """Bytes of decode cache one sequence keeps per token, summed over layers (cache dtype)."""
        return cache_sizes(self.config)[0]

    def cache_state_bytes(self) -> int:
        """Bytes of decode state one sequence keeps whatever its length (0 for attention-only models)."""
        return cache_sizes(self.config)[1]

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
        c = self.config
        return f"Model({type(c).__name__}, layers={c.num_hidden_layers}, params={self.num_params:,})"


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


def load(path: str | os.PathLike, *, dtype: str | None = None, impl: str = "auto") -> Model:
    """Load a zebrax checkpoint. ``dtype`` overrides the compute and parameter dtype."""
    path = Path(path)
    config = checkpoint.load_config(path)
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    return Model(config, checkpoint.load_params(path, config), load_tokenizer(path), impl=impl)


__all__ = ["Model", "convert", "load", "load_tokenizer"]

"""Autoregressive generation over any zebrax model with a decode cache.

One jitted prefill fills a preallocated cache with the (left-padded) prompts — at once, or, past ``prefill_chunk``
tokens, a chunk at a time, each chunk appended to the cache the last one left (every layer's keys, latents, conv and
SSM states), so activations never outgrow one chunk; one jitted decode loop (``lax.while_loop`` around
``decode_step``) samples a token, feeds it back, and stops when every row has produced an end-of-sequence token or
``max_new_tokens`` are done. Shapes depend only on the batch size, the bucketed prompt length and the bucketed cache
length, so a new prompt length or a new ``max_new_tokens`` rarely recompiles; temperature, top-p and the step limit
are traced values.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.errors import InvalidArgument

# prompts longer than this are prefilled this many tokens at a time (``Generator.prefill_chunked``): a 4k chunk keeps
# the chunks few and each one's activations (SmolLM2: 30 MB a row for the MLP, 0.8 GB of logits had they been kept)
# far below a long cache's
PREFILL_CHUNK = 4096


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum) up to 1024, then the next multiple of 1024."""
    if n <= 1024:
        return max(minimum, 1 << max(0, (n - 1)).bit_length())
    return -(-n // 1024) * 1024


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits ``[B, V]`` → tokens ``[B]``: argmax when temperature is 0, else nucleus sampling.

    Nucleus: keep the most likely tokens whose cumulative probability (of the tokens before them)
    is below ``top_p``; the most likely token is always kept. The sort over the vocabulary runs only when
    sampling with ``top_p < 1`` (a ``lax.cond``): greedy decoding never pays for it.
    """

    def nucleus(scaled):
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= cutoff, scaled, -jnp.inf)

    def sampled(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)
        scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda s: s, scaled)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
    return jax.lax.cond(temperature > 0, sampled, greedy, logits)


class Generator:
    """Jitted prefill, decode step and decode loop for one Flax module (``module.init_cache(config, B, S)``)."""

    def __init__(self, module):
        self.module = module
        # the steps ``zebrax compile`` compiles: ``prefill(params, tokens, token_mask, max_len=)``,
        # ``extend(params, cache, tokens, token_mask)`` (a prompt's next chunk) and ``decode_step(params, cache,
        # tokens)``; the last two update the cache they are given in place (donated)
        self.prefill = jax.jit(self._prefill, static_argnames="max_len")
        self.extend = jax.jit(self._extend, donate_argnums=1)
        self.decode_step = jax.jit(self._decode_step, donate_argnums=1)
        self.decode = jax.jit(self._decode, static_argnames="capacity")

    def _prefill(self, params, tokens, token_mask, *, max_len: int):
        """tokens, token_mask ``[B, Lp]`` (left-padded) → (logits of the last token ``[B, V]``, cache of ``max_len``
        slots)."""
        return self._extend(params, self.module.init_cache(self.module.config, tokens.shape[0], max_len), tokens,
                            token_mask)

    def _extend(self, params, cache, tokens, token_mask):
        """Append tokens, token_mask ``[B, C]`` at the cache's next slots → (logits of the last token ``[B, V]``,
        cache)."""
        logits, cache = self.module.apply({"params": params}, tokens, token_mask=token_mask, cache=cache,
                                          last_only=True)
        return logits[:, 0], cache

    def prefill_chunked(self, params, tokens, token_mask, *, max_len: int, chunk: int):
        """``prefill``'s (logits, cache), ``chunk`` tokens at a time: a prefill of the first chunk, then ``extend``
        by each next one (``[B, Lp]``, Lp a multiple of ``chunk``; a row's left padding may fill whole chunks). Two
        programs whatever Lp, and no activation longer than a chunk."""
        length = tokens.shape[1]
        if length % chunk:
            raise InvalidArgument(f"prefill: chunk={chunk} does not divide the {length} tokens of the padded prompts")
        logits, cache = self.prefill(params, tokens[:, :chunk], token_mask[:, :chunk], max_len=max_len)
        for start in range(chunk, length, chunk):
            logits, cache = self.extend(params, cache, tokens[:, start:start + chunk],
                                        token_mask[:, start:start + chunk])
        return logits, cache

    def _decode_step(self, params, cache, tokens):
        """Feed tokens ``[B]`` at the next slot → (next-token logits ``[B, V]``, cache)."""
        logits, cache = self.module.apply({"params": params}, tokens[:, None], cache=cache)
        return logits[:, 0], cache

    def _decode(self, params, cache, logits, key, max_new_tokens, temperature, top_p, eos_ids, pad_id,
                *, capacity: int):
        """Sample up to ``max_new_tokens`` (<= capacity) tokens → (tokens ``[B, capacity]``, steps run)."""
        batch = logits.shape[0]

        def cond(state):
            step, _, _, _, _, done = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, cache, logits, key, out, done = state
            key, sub = jax.random.split(key)
            tokens = jnp.where(done, pad_id, sample(logits, sub, temperature, top_p))
            out = out.at[:, step].set(tokens)
            done = done | jnp.isin(tokens, eos_ids)
            logits, cache = self._decode_step(params, cache, tokens)
            return step + 1, cache, logits, key, out, done

        out = jnp.full((batch, capacity), pad_id, jnp.int32)
        init = (jnp.zeros((), jnp.int32), cache, logits, key, out, jnp.zeros((batch,), bool))
        step, _, _, _, out, _ = jax.lax.while_loop(cond, body, init)
        return out, step

    @staticmethod
    def lengths(prompt_lengths: Sequence[int], max_new_tokens: int, prefill_chunk: int | None = None
                ) -> tuple[int, int]:
        """(bucketed prompt length, bucketed cache length) for prompts of these lengths; a prompt longer than
        ``prefill_chunk`` is padded to whole chunks."""
        prompt_len = bucket_length(max(prompt_lengths))
        if prefill_chunk is not None and prompt_len > prefill_chunk:
            prompt_len = -(-max(prompt_lengths) // prefill_chunk) * prefill_chunk
        return prompt_len, bucket_length(prompt_len + max_new_tokens)

    def start(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int = 0,
              prefill_chunk: int | None = None):
        """Prompts of any lengths, left-padded and prefilled (``prefill_chunk`` tokens at a time past it; None: at
        once) → (logits of each last token ``[B, V]``, cache, the slots left for new tokens)."""
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) == 0:
            raise InvalidArgument("generate: every prompt needs at least one token")
        prompt_len, max_len = self.lengths(lengths, max_new_tokens, prefill_chunk)
        tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
        mask = np.zeros((len(prompts), prompt_len), bool)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):] = p
            mask[i, prompt_len - len(p):] = True
        if prefill_chunk is not None and prompt_len > prefill_chunk:
            logits, cache = self.prefill_chunked(params, tokens, mask, max_len=max_len, chunk=prefill_chunk)
        else:
            logits, cache = self.prefill(params, tokens, mask, max_len=max_len)
        return logits, cache, max_len - prompt_len

    def __call__(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        prefill_chunk: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """Generate for prompts of any lengths → (new tokens ``[B, steps]`` padded with pad_id, steps). Prompts
        longer than ``prefill_chunk`` tokens are prefilled ``prefill_chunk`` tokens at a time (None: at once)."""
        logits, cache, capacity = self.start(params, prompts, max_new_tokens, pad_id=pad_id,
                                             prefill_chunk=prefill_chunk)
        key = jax.random.key(seed & 0xFFFFFFFF)  # jax keeps 32 bits of a seed unless x64 is enabled
        if seed >> 32:
            key = jax.random.fold_in(key, seed >> 32)
        out, steps = self.decode(
            params, cache, logits, key, jnp.int32(max_new_tokens), jnp.float32(temperature),
            jnp.float32(top_p), jnp.asarray(list(eos_ids) or [-1], jnp.int32), jnp.int32(pad_id),
            capacity=capacity,
        )
        steps = int(steps)
        return np.asarray(out[:, :steps]), steps


__all__ = ["PREFILL_CHUNK", "Generator", "bucket_length", "sample"]

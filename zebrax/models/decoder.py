"""One decoder stack for every model: embeddings, one block per entry of the config's ``plan()``, final norm,
LM head. Llama, dense DeepSeek-V3, the pure Mamba2 LM and every hybrid are plans of this stack.

A block is ``h = h + Mixer(RMSNorm(h)); h = h + MLP(RMSNorm(h))`` (the second half only where the plan says
``mlp``). Parameters live per layer, ``layers_{i}/…``, named as transformers names them: the mixer is its kind's
``scope`` (``zebrax.mixers``: ``self_attn`` for GQA and MLA, ``mixer`` for Mamba2 and Gated DeltaNet); the norms
``input_layernorm`` / ``post_attention_layernorm``, or ``norm`` in a block without an MLP.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zebrax.cache import Cache, Slots, segment_positions, token_positions
from zebrax.config import LayerSpec
from zebrax.errors import InvalidArgument
from zebrax.layers import Embed, Linear, RMSNorm, SwiGLU
from zebrax.mixers import kind, kinds, ops
from zebrax.models.impls import Impls
from zebrax.ops.sharded import rows

SOWN = ("block_input", "mixer_output", "block_output")  # what every block sows (``layer_io``)


def ops_of(config) -> tuple[str, ...]:
    """The ops a model runs (``attention``, ``ssd``, …), in the order of ``zebrax.mixers.ops()``."""
    used = {kind(spec.mixer).op for spec in config.plan()}
    return tuple(op for op in ops() if op in used)


def make_slots(tokens: jax.Array, positions, token_mask, cache: Cache | None, segment_ids=None) -> Slots:
    """Where new tokens sit. ``token_mask`` defaults to all real; ``positions`` to ``token_positions``: each real
    token's index among the real tokens of its row, counting those already in the cache — or, for packed rows
    (``segment_ids``, no cache), each token's index within its document."""
    b, length = tokens.shape
    token_mask = jnp.ones((b, length), bool) if token_mask is None else token_mask.astype(bool)
    if segment_ids is not None:
        if cache is not None:
            raise InvalidArgument("segment_ids (packed rows) are for full forward passes, not with a decode cache")
        if tuple(segment_ids.shape) != (b, length):
            raise InvalidArgument(f"segment_ids has shape {tuple(segment_ids.shape)}, expected {(b, length)}")
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        return Slots.without_cache(segment_positions(segment_ids) if positions is None else positions, token_mask,
                                   segment_ids)
    if positions is None:
        before = jnp.zeros((b,), jnp.int32) if cache is None else cache.num_tokens()
        positions = token_positions(token_mask, before)
    return Slots.without_cache(positions, token_mask) if cache is None else cache.slots(positions, token_mask)


class Block(nn.Module):
    """One layer of the plan. Sows ``block_input``, ``mixer_output`` and ``block_output`` into the
    ``intermediates`` collection (kept only when the caller makes it mutable), which layer-wise distillation reads.
    The residual stream is float32 when the config says ``residual_in_fp32``."""

    spec: LayerSpec
    config: Any
    impls: Impls = Impls()

    @nn.compact
    def __call__(self, x: jax.Array, slots: Slots, cache=None):
        cfg, spec = self.config, self.spec
        mixer = kind(spec.mixer)
        x = rows(x)
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.sow("intermediates", "block_input", x)
        module = mixer.module(spec.config, cfg.dtype, cfg.param_dtype, getattr(self.impls, mixer.op), name=mixer.scope)
        h, cache = module(RMSNorm(name="input_layernorm" if spec.mlp else "norm", **norm)(x), slots, cache)
        self.sow("intermediates", "mixer_output", h)
        x = _residual(x, h, cfg.residual_in_fp32)
        if spec.mlp:
            mlp = SwiGLU(cfg.intermediate_size, cfg.mlp_bias, cfg.dtype, cfg.param_dtype, cfg.hidden_act, name="mlp")
            x = _residual(x, mlp(RMSNorm(name="post_attention_layernorm", **norm)(x)), cfg.residual_in_fp32)
        x = rows(x)
        self.sow("intermediates", "block_output", x)
        return x, cache


# What a block keeps for its backward pass under ``remat`` (the rest is recomputed): by name, every ``Linear``'s output
# carrying its parameter name (``checkpoint_name``). The names are every mixer kind's own (``MixerKind.inputs``,
# ``.outputs``) and the MLP's output map.
REMAT_POLICIES = ("full", "save_qkv_proj", "save_out_proj", "save_qkv_out_proj", "save_dots")
MLP_OUTPUTS = ("down_proj",)


def remat_policies() -> dict:
    """Each policy of ``REMAT_POLICIES`` → its ``jax.checkpoint`` policy: ``full`` keeps the block's input only,
    ``save_qkv_proj`` the input projections of every kind, ``save_out_proj`` their output projections and the MLP's,
    ``save_dots`` every projection (the MLP's included)."""
    inputs = tuple(dict.fromkeys(n for k in kinds().values() for n in k.inputs))
    outputs = tuple(dict.fromkeys((*(n for k in kinds().values() for n in k.outputs), *MLP_OUTPUTS)))
    names = jax.checkpoint_policies.save_only_these_names
    return {"full": jax.checkpoint_policies.nothing_saveable, "save_qkv_proj": names(*inputs),
            "save_out_proj": names(*outputs), "save_qkv_out_proj": names(*inputs, *outputs),
            "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(remat: bool | str) -> str | None:
    """``remat`` as a policy name: False or "none" → None (nothing recomputed), True → "full"; InvalidArgument for
    a name not in ``REMAT_POLICIES``."""
    if remat is False or remat == "none":
        return None
    name = "full" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise InvalidArgument(f"remat = {remat!r}: expected True, False, 'none' or one of {', '.join(REMAT_POLICIES)}")
    return name


def remat_block(remat: bool | str):
    """``Block`` under the remat policy ``remat`` names (``remat_policy``), or ``Block`` itself."""
    name = remat_policy(remat)
    return Block if name is None else nn.remat(Block, policy=remat_policies()[name])


def _residual(x: jax.Array, h: jax.Array, in_fp32: bool) -> jax.Array:
    residual = x.astype(jnp.float32) if in_fp32 else x
    return (residual + h).astype(residual.dtype)


def embed_tokens(cfg) -> Embed:
    """The token embedding (``embed_tokens``), in the scope of the module that calls this."""
    return Embed(cfg.vocab_size, cfg.hidden_size, cfg.dtype, cfg.param_dtype, name="embed_tokens")


def lm_head(cfg, x: jax.Array, embedding: Embed) -> jax.Array:
    """Final RMSNorm (``norm``) and the LM head (``lm_head``, or the tied embedding) → float32 logits, multiplied
    in the compute dtype and accumulated in float32, in the scope of the module that calls this."""
    x = RMSNorm(cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(x)
    if cfg.tie_word_embeddings:
        return embedding.attend(x, jnp.float32)
    head = Linear((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  out_dtype="float32", name="lm_head")
    return head(x)


class LMHead(nn.Module):
    """The final norm and LM head of a model, alone: final hidden states ``[B, L, D]`` → float32 logits
    ``[B, L, vocab]``. Its parameters are the model's own (``norm``, ``lm_head`` or the tied ``embed_tokens``), so
    ``LMHead(config).apply({"params": model_params}, hidden)`` is what ``DecoderLM`` computes after its blocks —
    for losses that take the logits a few tokens at a time (``distill.losses.token_chunks``)."""

    config: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return lm_head(self.config, x, embed_tokens(self.config))


class DecoderLM(nn.Module):
    """tokens ``[B, L]`` → logits ``[B, L, vocab]`` float32 (``[B, 1, vocab]`` with ``last_only``; with
    ``hidden_only`` the last block's output ``[B, L, D]`` instead, which ``LMHead`` turns into the logits).

    ``token_mask`` ``[B, L]`` marks real tokens (left padding is False); ``positions`` ``[B, L]`` default to
    ``make_slots``'s; ``segment_ids`` ``[B, L]`` (ids >= 1, 0 for padding) packs several documents into a row, each
    computed as if alone (positions restart, attention and the Mamba2 state stay within it). With a ``cache`` the
    tokens are appended at ``cache.index`` and the updated cache is returned; without one the second output is
    None. ``impls``: the implementation of each op. ``remat``: each block's activations are recomputed in the
    backward pass instead of stored (``nn.remat``): True or "full" keeps only each block's input, a name of
    ``REMAT_POLICIES`` keeps those projections' outputs too; False or "none" recomputes nothing.
    """

    config: Any
    impls: Impls = Impls()
    remat: bool | str = False

    @nn.compact
    def __call__(self, tokens, positions=None, token_mask=None, cache: Cache | None = None, last_only=False,
                 segment_ids=None, hidden_only=False):
        cfg = self.config
        slots = make_slots(tokens, positions, token_mask, cache, segment_ids)
        embedding = embed_tokens(cfg)
        x = embedding(tokens)
        new_layers = []
        block = remat_block(self.remat)
        for i, spec in enumerate(cfg.plan()):
            x, layer_cache = block(spec, cfg, self.impls, name=f"layers_{i}")(
                x, slots, None if cache is None else cache.layers[i]
            )
            new_layers.append(layer_cache)
        x = x[:, -1:] if last_only else x
        logits = x if hidden_only else lm_head(cfg, x, embedding)
        return logits, None if cache is None else cache.advance(slots, tuple(new_layers), tokens.shape[1])

    @staticmethod
    def init_cache(cfg, batch: int, max_len: int) -> Cache:
        """Each layer's own cache (GQA keys and values, MLA latents, Mamba2 conv and SSM states) for ``batch``
        sequences of up to ``max_len`` tokens."""
        return Cache.init(batch, max_len, tuple(kind(s.mixer).module.init_cache(s.config, batch, max_len, cfg.dtype)
                                                for s in cfg.plan()))


def layer_io(module: DecoderLM, params: dict, tokens: jax.Array, token_mask: jax.Array | None = None,
             segment_ids: jax.Array | None = None) -> dict:
    """One forward pass → what every block sows, ``{"block_input": [x_0, …], "mixer_output": […], "block_output":
    […]}``, each ``[B, L, D]`` (what layer-wise distillation and SMART read)."""
    _, state = module.apply({"params": params}, tokens, token_mask=token_mask, segment_ids=segment_ids,
                            mutable=["intermediates"])
    layers = state["intermediates"]
    n = module.config.num_hidden_layers
    return {name: [layers[f"layers_{i}"][name][0] for i in range(n)] for name in SOWN}

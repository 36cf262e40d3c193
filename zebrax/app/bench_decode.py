"""Decode throughput of a teacher, its hybrids and transformers' ``generate`` against context length and batch
size (METHOD §7): JSON, and a PNG plot.

For every (model, context, batch): one random prompt of ``context`` tokens per row is prefilled once (compiled ahead,
timed without compilation), then the compiled decode loop (``Generator.decode``, one ``while_loop``) runs from that
cache for 1 and for ``new_tokens`` tokens, alternately, ``repeats`` times; the difference of the medians is the decode
of ``new_tokens - 1`` tokens. transformers' ``generate`` is timed the same way: the prompt but its last token in a
``DynamicCache`` once, then ``generate`` for 1 and ``new_tokens`` tokens from that cache (cropped back after each).

``peak_rss_bytes`` is the process's resident-memory high-water mark over one model's point (Linux ``VmHWM``, reset
before it): every loaded model's weights included, so differences between models are what their prefill and cache
add. The bytes a decode step must read are the weights plus every row's cache up to the context; the ratio of the
teacher's bytes to a hybrid's is the speed-up a memory-bound decode could reach (``bytes_limit_vs_teacher``).

The hybrids are built from the teacher's weights (decode speed does not depend on training): ``zebra`` (``num_mla``
MLA layers at SMART's spacing, or ``mla_layers``; the rest Mamba2), ``mamba2`` (every layer Mamba2) and
``mambainllama`` (MambaInLlama's recipe: every other layer keeps its attention, the rest Mamba2). Trained
checkpoints join by name (``extra``).
"""

from __future__ import annotations

import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.app.timing import compare, machine, peak_rss_bytes, reset_peak_rss
from zebrax.checks import require_counts
from zebrax.ops.auto import auto_choices
from zebrax.recipe import from_teacher

HYBRIDS = ("zebra", "mamba2", "mambainllama")
MODELS = ("teacher", "transformers", *HYBRIDS)


def hybrid_recipe(name: str, n_layers: int, *, num_mla: int, mla_layers=None) -> dict:
    """``recipe.from_teacher`` layer arguments of a named hybrid of an ``n_layers`` teacher."""
    from zebrax.select import place

    if name == "zebra":
        return {"mla_layers": list(mla_layers) if mla_layers is not None else place([0.0] * n_layers, num_mla)}
    if name == "mamba2":
        return {"mla_layers": "none"}
    if name == "mambainllama":
        return {"mla_layers": "none", "attention_layers": list(range(0, n_layers, 2))}
    raise ValueError(f"unknown hybrid {name!r}; expected one of {HYBRIDS}")


def build_hybrid(teacher, name: str, *, num_mla: int = 6, mla_layers=None, recipe: dict | None = None, seed: int = 0):
    """A ``zebrax.Model`` of the named hybrid, initialised from ``teacher`` (a ``zebrax.Model``), under the
    teacher's mesh if it has one (initialised shard by shard from its sharded parameters)."""
    from zebrax.api import Model
    from zebrax.init import init_hybrid
    from zebrax.models import abstract_params
    from zebrax.sharding import param_shardings

    layers = hybrid_recipe(name, teacher.config.num_hidden_layers, num_mla=num_mla, mla_layers=mla_layers)
    config = from_teacher(teacher.config, **layers, **(recipe or {}))
    mesh = teacher.mesh
    shardings = None if mesh is None else param_shardings(config, abstract_params(config), mesh)
    teacher_params = teacher.params if mesh is not None else jax.device_get(teacher.params)
    params = init_hybrid(teacher.config, teacher_params, config, jax.random.key(seed), shardings)[0]
    return Model(config, params, teacher.tokenizer, mesh=mesh)




def weight_bytes(model) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(model.params))


def time_zebrax(model, tokens: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """Prefill seconds (compilation excluded) and decode tokens/s of ``model.generate``'s two compiled programs."""
    gen, params = model.generator, model.params
    batch, context = tokens.shape
    prompt_len, max_len = gen.lengths([context], new_tokens)
    padded = np.zeros((batch, prompt_len), np.int32)
    padded[:, prompt_len - context:] = tokens
    mask = np.zeros(padded.shape, bool)
    mask[:, prompt_len - context:] = True
    placed = model.placed({"tokens": padded, "mask": mask})
    padded, mask = placed["tokens"], placed["mask"]
    prefill = gen.prefill.lower(params, padded, mask, max_len=max_len).compile()
    t = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(params, padded, mask))
    prefill_s = time.perf_counter() - t
    fixed = (jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0))
    decode = gen.decode.lower(params, cache, logits, fixed[0], jnp.int32(1), *fixed[1:],
                              capacity=max_len - prompt_len).compile()

    def run(n):
        return lambda: jax.block_until_ready(decode(params, cache, logits, fixed[0], jnp.int32(n), *fixed[1:]))

    return {"prefill_s": prefill_s, "decode_tokens_per_s": _rate(batch, new_tokens, run(1), run(new_tokens), repeats)}


def _rate(batch: int, new_tokens: int, one, many, repeats: int) -> float | None:
    """Decode tokens/s from the medians of ``one`` (1 token) and ``many`` (``new_tokens``), timed round-robin after a
    warm-up (``timing.compare``); None when the difference drowns in the timing noise (raise ``new_tokens``)."""
    t = compare({"one": one, "many": many}, repeats)
    delta = t["many"] - t["one"]
    return batch * (new_tokens - 1) / delta if delta > 0.05 * t["many"] else None


def time_transformers(hf, tokens: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """transformers' ``generate`` (greedy, EOS ignored) from a prefilled ``DynamicCache``."""
    import torch
    from transformers import DynamicCache

    t = torch.from_numpy(tokens.astype(np.int64))
    cache = DynamicCache(config=hf.config)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `past_key_values` is being renamed; both versions take it
        start = time.perf_counter()
        hf(t[:, :-1], past_key_values=cache, use_cache=True)
        prefill_s = time.perf_counter() - start

    def run(n):
        def go():
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                hf.generate(t, attention_mask=torch.ones_like(t), past_key_values=cache, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=0)
            cache.crop(t.shape[1] - 1 - cache.get_seq_length())  # a negative count: the tokens to drop
        return go

    return {"prefill_s": prefill_s,
            "decode_tokens_per_s": _rate(tokens.shape[0], new_tokens, run(1), run(new_tokens), repeats)}


def bench_decode(teacher, *, contexts=(1024, 4096), batches=(1, 8), models=MODELS, extra: dict | None = None,
                 num_mla: int = 6, mla_layers=None, recipe: dict | None = None, new_tokens: int = 16,
                 repeats: int = 3, transformers_max_tokens: int = 8192, seed: int = 0) -> dict:
    """Rows of ``{model, context, batch, prefill_s, decode_tokens_per_s, cache_bytes, bytes_per_step, peak_rss_bytes,
    decode_speedup_vs_teacher, bytes_limit_vs_teacher}`` for ``models`` (of ``MODELS``) and ``extra``
    (``{name: zebrax.Model}``); transformers only where ``batch × context <= transformers_max_tokens``. A teacher
    loaded with a ``mesh`` (``zebrax.load(…, mesh=)``) times every zebrax model sharded over it: parameters by the
    rules of ``zebrax.sharding``, rows over (data, fsdp) where they divide."""
    from zebrax.errors import InvalidArgument

    require_counts("bench decode", contexts=list(contexts), batches=list(batches), repeats=repeats,
                     num_mla=num_mla)
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise InvalidArgument(f"bench decode: new_tokens={new_tokens!r} must be an integer >= 2")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise InvalidArgument(f"bench decode: unknown model {unknown[0]!r}; expected some of {', '.join(MODELS)}")
    zebrax_models = {"teacher": teacher} if "teacher" in models else {}
    for name in HYBRIDS:
        if name in models:
            zebrax_models[name] = build_hybrid(teacher, name, num_mla=num_mla, mla_layers=mla_layers, recipe=recipe,
                                               seed=seed)
    zebrax_models.update(extra or {})
    hf = None
    if "transformers" in models:
        from zebrax.convert.export import to_transformers

        hf = to_transformers(teacher.config, jax.device_get(teacher.params))
    rows = []
    for context in contexts:
        for batch in batches:
            tokens = np.random.default_rng(seed).integers(0, teacher.config.vocab_size, (batch, context),
                                                          dtype=np.int32)
            timed = {}
            for name, m in zebrax_models.items():
                reset_peak_rss()
                timed[name] = {**time_zebrax(m, tokens, new_tokens, repeats), "peak_rss_bytes": peak_rss_bytes()}
            if hf is not None and batch * context <= transformers_max_tokens:
                reset_peak_rss()
                timed["transformers"] = {**time_transformers(hf, tokens, new_tokens, repeats),
                                         "peak_rss_bytes": peak_rss_bytes()}
            teacher_bytes = weight_bytes(teacher) + batch * (teacher.cache_bytes_per_token() * context)
            for name, r in timed.items():
                m = zebrax_models.get(name, teacher)
                cache = batch * (m.cache_bytes_per_token() * context + m.cache_state_bytes())
                rate = r["decode_tokens_per_s"]
                row = {"model": name, "context": context, "batch": batch, "prefill_s": round(r["prefill_s"], 3),
                       "decode_tokens_per_s": None if rate is None else round(rate, 2), "cache_bytes": cache,
                       "bytes_per_step": weight_bytes(m) + cache, "peak_rss_bytes": r["peak_rss_bytes"],
                       "layers": m.config.layer_map()}
                if "teacher" in timed:
                    base = timed["teacher"]["decode_tokens_per_s"]
                    row["decode_speedup_vs_teacher"] = None if rate is None or base is None else round(rate / base, 3)
                    row["bytes_limit_vs_teacher"] = round(teacher_bytes / row["bytes_per_step"], 3)
                rows.append(row)
                print(f"[bench decode] {name:>14} context {context:>6} batch {batch:>3}: "
                      f"{row['decode_tokens_per_s']} tok/s, prefill {row['prefill_s']:.2f}s", file=sys.stderr,
                      flush=True)
    return {"benchmark": "decode", "teacher": repr(teacher), "dtype": teacher.config.dtype, "new_tokens": new_tokens,
            "repeats": repeats, "auto": auto_choices(), "rows": rows, **machine()}





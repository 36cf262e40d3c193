"""Benchmarks that print JSON. The implementations compared are timed alternately in one process, so the
machine's drift hits them alike; each figure is a median over the repeats, after one warm-up call."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from zebrax.app.timing import compare, machine, matmul_peak
from zebrax.checks import require_counts
from zebrax.generate import PREFILL_CHUNK
from zebrax.ops.auto import auto_choices
from zebrax.recipe import from_teacher


def _torch_forward(hf, tokens: np.ndarray) -> Callable[[], object]:
    import torch

    t = torch.from_numpy(tokens.astype(np.int64))

    def run():
        with torch.inference_mode():
            return hf(t).logits.sum().item()

    return run


def _zebrax_forward(model, tokens: np.ndarray) -> Callable[[], object]:
    rows = model.placed({"tokens": tokens, "mask": np.ones(tokens.shape, bool)})
    return lambda: jax.block_until_ready(model._forward(model.params, rows["tokens"], rows["mask"]))


def gemm_rates(config, tokens: int, repeats: int = 10) -> dict[str, dict[str, float]]:
    """GFLOP/s of XLA's and PyTorch's float32 matmul on the shapes of a Llama ``config``'s projections for
    ``tokens`` rows (``[tokens, in] @ [in, out]``, the fastest of ``repeats``): what a prefill is made of."""
    import torch

    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv),
              "gate_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size),
              "lm_head": (c.hidden_size, c.vocab_size)}
    rng = np.random.default_rng(0)
    mm = jax.jit(lambda x, w: x @ w)
    out = {}
    for name, (k, n) in shapes.items():
        x, w = rng.standard_normal((tokens, k), np.float32), rng.standard_normal((k, n), np.float32)
        jx, jw, tx, tw = jnp.asarray(x), jnp.asarray(w), torch.from_numpy(x), torch.from_numpy(w)
        with torch.inference_mode():  # each side in its own loop: alternating wakes the other's threads cold
            t = {**compare({"xla": lambda: mm(jx, jw).block_until_ready()}, repeats, statistic=min),  # noqa: B023
                 **compare({"torch": lambda: tx @ tw}, repeats, statistic=min)}  # noqa: B023
        flop = 2 * tokens * k * n / 1e9  # three significant figures: a tiny GEMM runs at a fraction of a GFLOP/s
        out[f"{name} {tokens}x{k}x{n}"] = {"xla": float(f"{flop / t['xla']:.3g}"),
                                           "torch": float(f"{flop / t['torch']:.3g}"),
                                           "ratio": round(t["torch"] / t["xla"], 3)}
    return out


def bench_forward(model, *, batch: int = 4, seq_len: int = 256, repeats: int = 5, seed: int = 0) -> dict:
    """Prefill (one full forward pass with logits) tokens/s: zebrax (jit) vs transformers (PyTorch eager),
    same weights in float32, where transformers has a model of the config (a hybrid's is timed alone); and, for a
    Llama, the two libraries' matmul rates on its projection shapes (``gemm_rates``), which bound what the prefill
    ratio can be on this CPU."""
    from zebrax.convert.export import to_transformers
    from zebrax.convert.hf_config import in_transformers

    require_counts("bench forward", batch=batch, seq_len=seq_len, repeats=repeats)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq_len), dtype=np.int32)
    t = time.perf_counter()
    _zebrax_forward(model, tokens)()
    compile_s = time.perf_counter() - t
    fns = {"zebrax": _zebrax_forward(model, tokens)}
    if in_transformers(model.config):
        fns["transformers"] = _torch_forward(to_transformers(model.config, model.params), tokens)
    s = compare(fns, repeats)
    n = batch * seq_len
    theirs = {"transformers_tokens_per_s": round(n / s["transformers"], 1),
              "speedup_vs_transformers": round(s["transformers"] / s["zebrax"], 3),
              "transformers_median_s": round(s["transformers"], 4)} if "transformers" in s else {
        "transformers": f"no transformers model of a {type(model.config).__name__}"}
    return {
        "benchmark": "forward", "model": repr(model), "dtype": model.config.dtype, "batch": batch,
        "seq_len": seq_len, "repeats": repeats,
        "zebrax_tokens_per_s": round(n / s["zebrax"], 1), "zebrax_median_s": round(s["zebrax"], 4),
        "zebrax_compile_s": round(compile_s, 2), **theirs,
        **({"gemm_gflops": gemm_rates(model.config, n)} if model.config.model_type == "llama" else {}),
        **machine(),
    }


def _ssd_inputs(length: int, heads: int, head_dim: int, d_state: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return dict(x=arr(1, length, heads, head_dim), dt=jax.nn.softplus(arr(1, length, heads) - 2.0),
                A=-jnp.exp(arr(heads) * 0.5), B=arr(1, length, 1, d_state), C=arr(1, length, 1, d_state),
                D=jnp.ones(heads))


def bench_ssd(*, lengths=(512, 2048, 8192), repeats: int = 5, pallas_interpret_max_len: int = 512) -> dict:
    """The SSD op (reference scan, chunked, Pallas) and a Mamba2 LM forward, zebrax vs transformers.

    Op shape: batch 1, 8 heads x 64, d_state 64, one group. LM: 4 layers, d_model 256, expand 2, 8 heads x 64,
    d_state 64, chunk 256, vocab 1024, random weights (transformers' init), batch 1, float32.
    On a CPU the Pallas kernel runs in interpret mode (an emulation, timed only up to
    ``pallas_interpret_max_len``); on a GPU or TPU it runs compiled.
    """
    import torch
    import transformers

    from zebrax.api import Model
    from zebrax.config import Mamba2LMConfig

    require_counts("bench ssd", lengths=list(lengths), repeats=repeats)
    from zebrax.convert.architectures import MAMBA2
    from zebrax.convert.hf_config import from_hf
    from zebrax.convert.mapping import params_from_hf
    from zebrax.ops import ssd

    compiled = jax.default_backend() in ("gpu", "tpu")
    op_rows = []
    for length in lengths:
        args = _ssd_inputs(length, 8, 64, 64)
        fns = {}
        for name, impl, chunk in (("reference", "reference", 256), ("chunked_256", "chunked", 256),
                                  ("chunked_64", "chunked", 64), ("pallas", "pallas", 256)):
            if name == "pallas" and not compiled and length > pallas_interpret_max_len:
                continue
            f = jax.jit(lambda a, impl=impl, chunk=chunk: ssd(**a, chunk_size=chunk, impl=impl)[0])
            fns[name] = lambda f=f, args=args: jax.block_until_ready(f(args))
        s = compare(fns, repeats)
        op_rows.append({"seq_len": length, **{f"{k}_ms": round(v * 1e3, 2) for k, v in s.items()},
                        **{f"{k}_speedup_vs_reference": round(s["reference"] / v, 2) for k, v in s.items()
                           if k != "reference"}})

    torch.manual_seed(0)
    hf_config = transformers.Mamba2Config(vocab_size=1024, hidden_size=256, expand=2, num_heads=8, head_dim=64,
                                          n_groups=1, state_size=64, num_hidden_layers=4, chunk_size=256)
    hf = transformers.Mamba2ForCausalLM(hf_config).eval()
    config = from_hf(Mamba2LMConfig, hf_config.to_dict())
    tensors = (("memory", k, v.float().numpy()) for k, v in hf.state_dict().items())
    model = Model(*params_from_hf(MAMBA2, config, tensors))
    lm_rows = []
    for length in lengths:
        tokens = np.random.default_rng(length).integers(0, 1024, (1, length), dtype=np.int32)
        s = compare({"zebrax": _zebrax_forward(model, tokens), "transformers": _torch_forward(hf, tokens)}, repeats)
        lm_rows.append({"seq_len": length, "zebrax_ms": round(s["zebrax"] * 1e3, 1),
                        "transformers_ms": round(s["transformers"] * 1e3, 1),
                        "speedup_vs_transformers": round(s["transformers"] / s["zebrax"], 2)})
    return {"benchmark": "ssd", "repeats": repeats, "pallas_mode": "compiled" if compiled else "interpret",
            "op": op_rows, "mamba2_lm_forward": lm_rows, **machine()}


def bench_attention(*, contexts=(1024, 8192, 32768), batch: int = 1, repeats: int = 5, prefill_len: int = 1024) -> dict:
    """Decode-step throughput of one attention layer over a filled cache, and prefill attention impls.

    Layer shapes are Llama-3.2-1B's (d_model 2048, 32 heads, 8 KV heads, head_dim 64) against the MLA of
    Zebra-Llama-1B (kv_lora_rank 128, q_lora_rank 1344, rope 32, nope 32, v 64, 8 K/V groups): GQA with a
    KV cache; MLA absorbed (attention over the cached latent); MLA materialised (K and V decompressed from
    the whole cached latent every step). float32, random weights and caches.
    """
    import flax.linen as nn

    from zebrax.cache import Slots

    require_counts("bench attention", contexts=list(contexts), batch=batch, repeats=repeats, prefill_len=prefill_len)
    from zebrax.config import AttentionConfig, MLAConfig
    from zebrax.mixers.attention.layer import Attention
    from zebrax.mixers.mla.layer import MLAttention
    from zebrax.ops import attention

    gqa_cfg = AttentionConfig(n_heads=32, n_kv_heads=8, head_dim=64)
    mla_cfg = MLAConfig(d_model=2048, n_heads=32, kv_groups=8, q_lora_rank=1344, kv_lora_rank=128,
                        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
    latent_cache = lambda n: MLAttention.init_cache(mla_cfg, batch, n, "float32")  # noqa: E731
    layers = {"gqa": (Attention(gqa_cfg), lambda n: Attention.init_cache(gqa_cfg, batch, n, "float32"), None),
              "mla_absorbed": (MLAttention(mla_cfg), latent_cache, True),
              "mla_materialised": (MLAttention(mla_cfg), latent_cache, False)}
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 1, 2048)), jnp.float32)
    rows = []
    for n in contexts:
        slots = Slots(positions=jnp.full((batch, 1), n - 1, jnp.int32), token_mask=jnp.ones((batch, 1), bool),
                      kv_mask=jnp.ones((batch, n), bool), offset=jnp.asarray(n - 1, jnp.int32))
        fns, cache_bytes = {}, {}
        for name, (layer, make_cache, absorbed) in layers.items():
            cache = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), make_cache(n))
            params = nn.unbox(layer.init(jax.random.key(0), x, slots, cache))
            kw = {} if absorbed is None else {"absorbed": absorbed}
            step = jax.jit(lambda p, c, layer=layer, kw=kw, slots=slots: layer.apply(p, x, slots, c, **kw)[0])
            fns[name] = lambda step=step, params=params, cache=cache: jax.block_until_ready(step(params, cache))
            cache_bytes[name] = sum(a.nbytes for a in jax.tree.leaves(cache)) // (batch * n)
        s = compare(fns, repeats)
        rows.append({"context": n, **{f"{k}_tokens_per_s": round(batch / v, 1) for k, v in s.items()},
                     **{f"{k}_ms": round(v * 1e3, 2) for k, v in s.items()},
                     "mla_absorbed_speedup_vs_gqa": round(s["gqa"] / s["mla_absorbed"], 2),
                     "mla_absorbed_speedup_vs_materialised": round(s["mla_materialised"] / s["mla_absorbed"], 2),
                     **{f"{k}_cache_bytes_per_token": v for k, v in cache_bytes.items()}})

    compiled = jax.default_backend() in ("gpu", "tpu")
    q = jnp.asarray(rng.normal(size=(1, prefill_len, 32, 64)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, prefill_len, 8, 64)), jnp.float32)
    flash = {}
    for impl in ("reference", "blocked", "pallas"):
        f = jax.jit(lambda q, kv, impl=impl: attention(q, kv, kv, impl=impl))
        flash[impl] = lambda f=f: jax.block_until_ready(f(q, kv))
    s = compare(flash, repeats)
    return {"benchmark": "attention", "batch": batch, "repeats": repeats, "decode": rows,
            "prefill_attention": {"seq_len": prefill_len, "heads": 32, "kv_heads": 8, "head_dim": 64,
                                  "pallas_mode": "compiled" if compiled else "interpret",
                                  **{f"{k}_ms": round(v * 1e3, 2) for k, v in s.items()},
                                  "blocked_speedup_vs_reference": round(s["reference"] / s["blocked"], 2),
                                  "pallas_speedup_vs_reference": round(s["reference"] / s["pallas"], 2)},
            "auto": auto_choices(),
            **machine()}


def bench_long_prompt(ckpt: str, *, length: int = 32768, new_tokens: int = 8, prefill_chunk: int = PREFILL_CHUNK,
                      seed: int = 0) -> dict:
    """One prompt of ``length`` random tokens through ``generate`` in a fresh process, prefilled ``prefill_chunk``
    tokens at a time: the call's wall time (compilation included: a long prompt is a one-off), the process's peak
    resident memory (weights, cache and activations included) and the decode cache's own bytes."""
    import subprocess
    import sys

    require_counts("bench long-prompt", length=length, new_tokens=new_tokens, prefill_chunk=prefill_chunk)
    script = f"""
import json, resource, time
import numpy as np
import zebrax
model = zebrax.load({str(ckpt)!r})
tokens = np.random.default_rng({seed}).integers(0, model.config.vocab_size, (1, {length}), dtype=np.int32)
t = time.perf_counter()
out = model.generate(tokens, max_new_tokens={new_tokens}, ignore_eos=True, prefill_chunk={prefill_chunk})
print(json.dumps({{"generate_s_with_compile": round(time.perf_counter() - t, 1),
                  "new_tokens": out.shape[1] - {length},
                  "cache_gb": round(({length} + {new_tokens}) * model.cache_bytes_per_token() / 1e9
                                    + model.cache_state_bytes() / 1e9, 3),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench long-prompt: the child process failed:\n{done.stderr[-2000:]}")
    return {"benchmark": "long_prompt", "ckpt": str(ckpt), "prompt_tokens": length, "prefill_chunk": prefill_chunk,
            "auto": auto_choices(),
            **json.loads(done.stdout.strip().splitlines()[-1]), **machine()}


def bench_train(teacher, *, batch: int = 4, seq_len: int = 256, steps: int = 5, num_mla: int = 6,
                recipe: dict | None = None, seed: int = 0) -> dict:
    """One KD step of a hybrid of ``teacher`` (a ``zebrax.Model``; ``num_mla`` MLA layers spread as SMART's rule
    places them, the rest Mamba2): compile seconds, then tokens/s and FLOP/s over ``steps`` timed steps (XLA's own
    FLOP count of the compiled step: teacher forward, student forward and backward, optimizer), against this
    machine's float32 matmul peak measured in the same run (``matmul_peak``). A teacher loaded with a ``mesh`` runs
    the step the trainer runs over it: student initialised shard by shard, parameters, optimizer state and teacher
    sharded, rows over (data, fsdp) (``batch`` a multiple of the row shards). XLA counts one device's program there:
    ``step_flops`` is that count × devices, and the fraction of the peak is one device's against one device's. The
    step is the one ``zebrax distill`` runs for KD (``objectives.stage_objective``) at the ``Experiment``'s
    defaults."""
    from zebrax.distill.experiment import Experiment
    from zebrax.distill.objectives import stage_objective
    from zebrax.distill.trainer import TrainConfig, make_optimizer, placed_step
    from zebrax.errors import InvalidArgument
    from zebrax.init import init_hybrid
    from zebrax.models import abstract_params
    from zebrax.select import place
    from zebrax.sharding import param_shardings, row_shards

    require_counts("bench train", batch=batch, seq_len=seq_len, steps=steps, num_mla=num_mla)
    n, mesh = teacher.config.num_hidden_layers, teacher.mesh
    devices = 1 if mesh is None else mesh.size
    if mesh is not None and batch % row_shards(mesh):
        raise InvalidArgument(f"bench train: batch={batch} rows cannot be split over the mesh's {row_shards(mesh)} "
                              f"row shards (data × fsdp); make it a multiple of {row_shards(mesh)}")
    config = from_teacher(teacher.config, mla_layers=place([0.0] * n, num_mla), **(recipe or {}))
    shardings = None if mesh is None else (param_shardings(config, abstract_params(config), mesh),
                                           param_shardings(teacher.config, teacher.params, mesh))
    params = init_hybrid(teacher.config, teacher.params, config, jax.random.key(seed),
                         None if mesh is None else shardings[0])[0]
    exp = Experiment(seq_len=seq_len, kd=TrainConfig(steps=steps, batch_size=batch))
    optimizer = make_optimizer(exp.kd, params)
    params, opt_state, frozen, step, place_batch = placed_step(
        optimizer, params, teacher.params, 1, stage_objective(exp, "kd", teacher.config, {"": config}), mesh,
        shardings)
    rng = np.random.default_rng(seed)
    batch_rows = place_batch({
        "tokens": rng.integers(0, teacher.config.vocab_size, (batch, seq_len)).astype(np.int32),
        "token_mask": np.ones((batch, seq_len), bool), "loss_mask": np.ones((batch, seq_len), bool)})
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, frozen, batch_rows).compile()
    compile_s = time.perf_counter() - start
    flops = float(compiled.cost_analysis().get("flops", 0.0)) * devices
    params, opt_state, _ = compiled(params, opt_state, frozen, batch_rows)  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, frozen, batch_rows)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    peak = matmul_peak()
    return {"benchmark": "train", "machine": machine(), "auto": auto_choices(), "layers": config.layer_map(),
            "mesh": None if mesh is None else dict(mesh.shape),
            "batch": batch, "seq_len": seq_len, "compile_s": round(compile_s, 2), "step_s": round(seconds, 4),
            "tokens_per_sec": round(batch * seq_len / seconds, 1), "step_flops": flops,
            "achieved_flops_per_sec": round(flops / seconds), "matmul_peak_flops_per_sec": round(peak),
            "fraction_of_matmul_peak": round(flops / devices / seconds / peak, 3)}

"""Benchmarks that print JSON. Timings alternate between the implementations compared, in one process,
so that the machine's drift hits both alike; report medians and the ratio."""

from __future__ import annotations

import platform
import statistics
import time

import jax
import numpy as np


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_forward(model, *, batch: int = 4, seq_len: int = 256, repeats: int = 5, seed: int = 0) -> dict:
    """Prefill (one full forward pass with logits) tokens/s: zebrax (jit) vs transformers (PyTorch eager),
    same weights in float32, measured alternately."""
    import torch

    from zebrax.convert.export import to_transformers

    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq_len), dtype=np.int32)
    mask = np.ones(tokens.shape, bool)
    hf = to_transformers(model.config, model.params)
    hf_tokens = torch.from_numpy(tokens.astype(np.int64))

    def run_zebrax():
        jax.block_until_ready(model._forward(model.params, tokens, mask))

    def run_hf():
        with torch.inference_mode():
            hf(hf_tokens).logits.sum().item()

    compile_s = _time(run_zebrax, 1)[0]
    run_hf()  # warm-up
    zebrax_s, hf_s = [], []
    for _ in range(repeats):
        zebrax_s += _time(run_zebrax, 1)
        hf_s += _time(run_hf, 1)
    n = batch * seq_len
    z, h = statistics.median(zebrax_s), statistics.median(hf_s)
    return {
        "benchmark": "forward",
        "model": repr(model),
        "dtype": model.config.dtype,
        "batch": batch,
        "seq_len": seq_len,
        "repeats": repeats,
        "zebrax_tokens_per_s": round(n / z, 1),
        "transformers_tokens_per_s": round(n / h, 1),
        "speedup_vs_transformers": round(h / z, 3),
        "zebrax_median_s": round(z, 4),
        "transformers_median_s": round(h, 4),
        "zebrax_compile_s": round(compile_s, 2),
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "torch": torch.__version__,
    }

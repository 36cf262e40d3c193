"""How the benchmarks time and describe: functions timed alternately in one process (``compare``), the machine
they ran on (``machine``), its matmul peak, and the process's peak resident memory."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def compare(fns: dict[str, Callable[[], object]], repeats: int,
            statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Seconds of each no-argument function (the median of ``repeats``, or ``statistic`` of them, e.g. ``min`` for a
    peak rate), calls interleaved round-robin; first call is warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistic(ts) for name, ts in times.items()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 10) -> float:
    """This machine's float32 matmul peak in FLOP/s: the fastest of ``repeats`` jitted ``[n, n] @ [n, n]`` at any of
    ``sizes`` (a peak is the best the machine did; a median would lower it by the noise and flatter whatever is
    compared with it)."""
    mm = jax.jit(lambda x: x @ x)
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        seconds = compare({"matmul": lambda: mm(a).block_until_ready()}, repeats, statistic=min)["matmul"]  # noqa: B023
        best = max(best, 2 * n ** 3 / seconds)
    return best


def reset_peak_rss() -> None:
    """Linux: restart the process's resident-memory high-water mark (``VmHWM``) from what is resident now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """Linux: the process's resident-memory high-water mark (``VmHWM``) since the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None

"""Every plot zebrax draws (PNG, on matplotlib's file-only backend): the main job's losses and SMART scores, decode
speed against context, the ablations' KL over seeds, and the long-context needle maps and loss against position."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics: list[dict], path: Path) -> None:
    """The logged loss of every stage against its step, one panel each."""
    plt = pyplot()
    stages = list(dict.fromkeys(r["stage"] for r in metrics))
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        rows = [r for r in metrics if r["stage"] == stage]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", ms=3)
        ax.set(title=stage, xlabel="step", ylabel="loss")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_smart(smart: dict, path: Path, linear: str) -> None:
    """SMART's score per layer, the MLA layers it placed in orange; ``linear``: the all-linear student's kind."""
    plt = pyplot()
    scores, chosen = smart["scores"], set(smart["mla_layers"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(scores)), 3.2))
    ax.bar(range(len(scores)), scores, color=["C1" if i in chosen else "C0" for i in range(len(scores))])
    ax.set(xlabel="layer", ylabel=f"KL(all-{linear}) − KL(layer as MLA)", title="SMART scores (orange: MLA layers)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_decode(result: dict, path) -> None:
    """Decode tokens/s against context (one panel per batch size, log-log), and each model's speed-up over the
    teacher with the bytes-read limit dashed."""
    plt = pyplot()

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7.5), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for j, batch in enumerate(batches):
        for name in names:
            pts = sorted(((r["context"], r) for r in rows if r["model"] == name and r["batch"] == batch
                          and r["decode_tokens_per_s"] is not None), key=lambda p: p[0])
            if not pts:
                continue
            x = [c for c, _ in pts]
            axes[0, j].plot(x, [r["decode_tokens_per_s"] for _, r in pts], "o-", color=colors[name], label=name)
            pts = [(c, r) for c, r in pts if r.get("decode_speedup_vs_teacher") is not None]
            if name != "teacher" and pts:
                x = [c for c, _ in pts]
                axes[1, j].plot(x, [r["decode_speedup_vs_teacher"] for _, r in pts], "o-", color=colors[name],
                                label=name)
                axes[1, j].plot(x, [r["bytes_limit_vs_teacher"] for _, r in pts], "--", color=colors[name],
                                alpha=0.6)
        axes[0, j].set(title=f"batch {batch}", xscale="log", yscale="log", xlabel="context (tokens)",
                       ylabel="decode tokens/s")
        axes[1, j].axhline(1.0, color="gray", lw=0.8)
        axes[1, j].set(xscale="log", xlabel="context (tokens)",
                       ylabel="speed-up vs teacher (dashed: bytes-read limit)")
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"decode on {result.get('cpu') or result.get('device')}, {result['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablations(rows: list[dict], path: Path) -> None:
    """KL after each experiment, mean and standard deviation over seeds, every seed a dot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 3.6))
    for i, r in enumerate(rows):
        ax.bar(i, r["kl"]["mean"], yerr=r["kl"]["sd"] or 0.0, color="C0", alpha=0.6, capsize=4)
        ax.plot([i] * len(r["kl"]["values"]), r["kl"]["values"], "k.", ms=4)
    ax.set_xticks(range(len(rows)), [r["experiment"] for r in rows], rotation=30, ha="right")
    ax.set(ylabel="KL(teacher ‖ model), held out", title="ablations: mean ± sd over seeds (dots: seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_needles(maps: dict[str, dict], path: Path) -> None:
    """Each model's needle map side by side (``long_context.needle_map``): retrieval accuracy as colour over depth ×
    context length, the value's mean log-probability written in each cell."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(1.2 + 3.4 * len(maps), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], maps.items(), strict=True):
        accuracy, logp = np.asarray(m["accuracy"]).T, np.asarray(m["logprob"]).T  # [depth, length]
        image = ax.imshow(accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (d, n), v in np.ndenumerate(logp):
            ax.text(n, d, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(m["lengths"])), [f"{n // 1024}k" if n >= 1024 else str(n) for n in m["lengths"]])
        ax.set_yticks(range(len(m["depths"])), [f"{d:g}" for d in m["depths"]])
        ax.set(title=name, xlabel="context (tokens)", ylabel="needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="retrieval accuracy (cells: log p of the value)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_positions(curves: dict[str, dict], path: Path) -> None:
    """NLL against the number of tokens before it (``long_context.position_nll``'s bins, log scale), a line per
    model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, c in curves.items():
        edges = c["edges"]
        centres = [(a * max(b - 1, a)) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.plot(centres, c["nll"], "o-", ms=3, label=f"{name} ({c['documents']} docs)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens before the predicted one", ylabel="NLL (nats)", title="loss against position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


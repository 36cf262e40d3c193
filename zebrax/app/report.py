"""The main job's report: ``WORKDIR/report.md`` with its plots, from what the run left in its work directory
(``stages.json``, ``eval.json``, ``metrics.jsonl``, ``smart.json``, ``bench_decode.json``, ``job.json``). Every
figure in it is read from those files; nothing is typed in."""

from __future__ import annotations

import json
from pathlib import Path

from zebrax.app.plots import plot_losses, plot_smart
from zebrax.mixers import kind, legend

CONTEXTS = (1024, 4096, 32768)  # the cache table's contexts


def final_evaluation(workdir: Path, evals: dict) -> str:
    """The row of ``eval.json`` that measures the run's last model, by the stages the run followed
    (``stages.json``)."""
    from zebrax.distill.stages import final_evaluation

    return final_evaluation([s["stage"] for s in json.loads((Path(workdir) / "stages.json").read_text())], evals)




def linear_title(hybrid) -> str:
    """The title of the hybrid's linear kind, that of SMART's all-linear student (``Mamba2``, ``Gated DeltaNet``)."""
    linear = hybrid.config.linear_kinds()
    return kind(linear[0]).title if linear else "linear"




def _kl_all_linear(smart: dict) -> float:
    """SMART's KL of the all-linear student (``kl_all_mamba2`` in runs written before the student was ``linear``)."""
    return smart["kl_all_linear"] if "kl_all_linear" in smart else smart["kl_all_mamba2"]


def _or_na(value, spec: str) -> str:
    """A measured figure, or "n/a" where the benchmark could not resolve it from the timing noise."""
    return "n/a" if value is None else format(value, spec)


def _reply(text: str) -> str:
    return text or "*(no text: the first token was end-of-sequence)*"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _long_context(w: Path) -> list[str]:
    """The report's long-context section, from ``long_context.json`` (none when the run measured none)."""
    path = w / "long_context.json"
    if not path.exists():
        return []
    measured = json.loads(path.read_text())
    needle, positions = measured.get("needle"), measured.get("positions")
    lines = ["", "## Long context", ""]
    if needle:
        first = next(iter(needle.values()))
        lines += [f"RULER's single needle on its noise haystack (`zebrax long-eval needle`): the value found in the "
                  f"greedy continuation, {first['samples']} needle{'s' * (first['samples'] > 1)} a cell at depths "
                  f"{first['depths']}; in brackets "
                  "the value's mean log-probability.", "", "![needle maps](needle.png)", "",
                  "| context | " + " | ".join(needle) + " |", "|---|" + "---|" * len(needle)]
        for i, n in enumerate(first["lengths"]):
            cells = [f"{100 * sum(m['accuracy'][i]) / len(m['accuracy'][i]):.0f}% "
                     f"({sum(m['logprob'][i]) / len(m['logprob'][i]):.2f})" for m in needle.values()]
            lines += [f"| {n:,} | " + " | ".join(cells) + " |"]
    if positions:
        first = next(iter(positions.values()))
        edges = first["edges"]
        lines += ["", f"Loss against position (`zebrax long-eval positions`): mean NLL of each token of "
                  f"{first['documents']} long documents (Python's standard library) over their first "
                  f"{first['length']:,} tokens, by how many tokens precede it.", "", "![loss against position]"
                  "(positions.png)", "", "| tokens before | " + " | ".join(positions) + " |",
                  "|---|" + "---|" * len(positions)]
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            span = f"{a:,}" if b - 1 == a else f"{a:,}–{b - 1:,}"
            lines += [f"| {span} | " + " | ".join(f"{c['nll'][i]:.3f}" for c in positions.values()) + " |"]
    return lines


def write(workdir: str | Path, *, teacher, hybrid, answers: dict, machine: dict) -> Path:
    """``report.md`` (and ``loss.png``, ``smart.png``; ``decode.png`` comes with the benchmark) of a finished run.
    ``teacher``/``hybrid``: the ``zebrax.Model``s; ``answers``: ``{"prompt", "teacher", "hybrid"}``."""
    from zebrax.files import write_text_atomic

    w = Path(workdir)
    evals = json.loads((w / "eval.json").read_text())
    metrics = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines() if line.strip()]
    smart = json.loads((w / "smart.json").read_text())
    bench = json.loads((w / "bench_decode.json").read_text()) if (w / "bench_decode.json").exists() else None
    job = json.loads((w / "job.json").read_text()) if (w / "job.json").exists() else {}
    plot_losses(metrics, w / "loss.png")
    linear = linear_title(hybrid)
    if "scores" in smart:
        plot_smart(smart, w / "smart.png", linear)

    final = final_evaluation(w, evals)
    first, last, t_ppl = evals["initialised"], evals[final], evals["teacher"]["perplexity"]
    source = job.get("teacher", "tiny")
    lines = [f"# {w.name}: a Zebra-Llama hybrid of {'a tiny random Llama' if source == 'tiny' else source}", ""]
    layers = hybrid.config.layer_map()
    lines += [f"Hybrid layers `{layers}` ({legend(layers)}), MLA at {smart['mla_layers']}.", ""]
    lines += ["| | teacher | hybrid | |", "|---|---|---|---|",
              f"| KL(teacher ‖ model) per token, held out | 0 | {first['kl']:.3f} initialised → **{last['kl']:.3f}"
              f"** {final.replace('_', ' ')} | {100 * last['kl'] / first['kl']:.1f}% of the initialised |",
              f"| perplexity, held out | {t_ppl:.2f} | {first['perplexity']:,.1f} → **{last['perplexity']:.2f}** | |"]
    t_tok, h_tok, h_state = teacher.cache_bytes_per_token(), hybrid.cache_bytes_per_token(), hybrid.cache_state_bytes()
    lines += [f"| decode cache per token | {t_tok:,} B | {h_tok:,} B + {_mb(h_state)} of state | "
              f"{100 * h_tok / t_tok:.2f}% |"]
    if bench:
        top = max(r["context"] * r["batch"] for r in bench["rows"])
        for r in bench["rows"]:
            if r["context"] * r["batch"] == top and r["model"] != "teacher" and r.get("decode_speedup_vs_teacher"):
                lines += [f"| decode at context {r['context']:,}, batch {r['batch']} | | "
                          f"{r['decode_tokens_per_s']:.1f} tokens/s | **{r['decode_speedup_vs_teacher']:.2f}×** the "
                          f"teacher (bytes-read limit {r['bytes_limit_vs_teacher']:.2f}×) |"]
    lines += ["", "## Quality on the held-out rows", "", "| model | KL(teacher ‖ model) | perplexity | tokens |",
              "|---|---|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {e['kl']:.4f} | {e['perplexity']:,.2f} | {e['tokens']:,} |"
              for name, e in evals.items()]
    lines += ["", "## Training", "", "![loss per stage](loss.png)", "", "| stage | steps | first loss | last loss | "
              "tokens/s (median) |", "|---|---|---|---|---|"]
    for stage in dict.fromkeys(r["stage"] for r in metrics):
        rows = [r for r in metrics if r["stage"] == stage]
        speeds = sorted(r["tokens_per_sec"] for r in rows)
        lines += [f"| {stage} | {rows[-1]['step']} | {rows[0]['loss']:.4g} | {rows[-1]['loss']:.4g} | "
                  f"{speeds[len(speeds) // 2]:.0f} |"]
    if "scores" in smart:
        lines += ["", "## SMART", "", f"KL of the all-{linear} student {_kl_all_linear(smart):.3f}; "
                  "each layer's score "
                  "is how far swapping it alone to MLA brings that KL down. Placed "
                  f"({smart.get('placement', 'smart')}): {smart['mla_layers']}.", "", "![SMART scores](smart.png)", ""]
    else:
        lines += ["", "## Placement", "", f"{smart['placement']}: MLA at {smart['mla_layers']} (no scores).", ""]
    lines += ["## Decode cache", "", "| context | teacher | hybrid | hybrid / teacher |", "|---|---|---|---|"]
    for c in CONTEXTS:
        t, h = t_tok * c, h_tok * c + h_state
        lines += [f"| {c:,} | {_mb(t)} | {_mb(h)} | {100 * h / t:.2f}% |"]
    if bench:
        lines += ["", "## Decode speed", "", "![decode tokens/s against context](decode.png)", "",
                  "| model | context | batch | prefill s | decode tokens/s | vs teacher | bytes-read limit |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['context']:,} | {r['batch']} | {r['prefill_s']:.2f} | "
                  f"{_or_na(r['decode_tokens_per_s'], '.1f')} | {_or_na(r.get('decode_speedup_vs_teacher'), '.2f')}"
                  f" | {_or_na(r.get('bytes_limit_vs_teacher'), '.2f')} |" for r in bench["rows"]]
    lines += _long_context(w)
    lines += ["", "## The same chat prompt", "", f"**user:** {answers['prompt']}", "",
              f"**teacher:** {_reply(answers['teacher'])}", "", f"**hybrid:** {_reply(answers['hybrid'])}", ""]
    if job.get("steps"):
        lines += ["## Time", "", "| step | seconds (when it ran) |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in job["steps"].items()]
        lines += [""]
    lines += ["## Machine", "", f"{machine.get('cpu')} ({machine.get('cores')} cores), jax {machine.get('jax')}, "
              f"backend {machine.get('backend')}.", ""]
    return write_text_atomic(w / "report.md", "\n".join(lines))

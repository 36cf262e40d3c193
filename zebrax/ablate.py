"""``zebrax ablate``: experiments × seeds, one table.

Each gin file is one experiment (its name: the file's stem); each runs once per seed (``distill.seed`` = 0 … N−1,
seed by seed: the table is rewritten after each seed, every experiment in it) in ``ROOT/NAME/seed_S`` (a ``zebrax
distill`` work directory: resumable, a finished run is read back). The runs share what they agree on
(``stages.Run.reuse``, in ``ROOT/shared``): the teacher of a seed is trained once for every experiment that keeps
its settings, ILD once for the ablations after it, and so on.

The table (``ROOT/ablations.md``, its numbers in ``ablations.json``, ``ablations.png``) gives per experiment the
mean ± standard deviation over seeds of KL(teacher ‖ model) and perplexity on the held-out rows, after its last
stage and as initialised, its KL less the first experiment's seed by seed (``paired``: each seed is its own teacher,
so the differences are what the comparison rests on), beside the tokens it trained on (``trained_tokens``: the
budget the comparison holds equal). The runs compile the same programs, so they share JAX's persistent compilation cache
(``ROOT/jax-cache`` unless one is set).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from zebrax.errors import ConfigError


def _say(text: str) -> None:
    print(f"[zebrax ablate] {text}", file=sys.stderr, flush=True)


def trained_tokens(exp) -> int:
    """Tokens the student trains on: each of its training stages' steps × batch × row length (``seq_len``, or
    ``kd_long_seq_len`` for the second KD; ILD trains both students on the same rows, counted once)."""
    return sum(getattr(exp, s).steps * getattr(exp, s).batch_size * (exp.kd_long_seq_len if s == "kd_long"
                                                                     else exp.seq_len)
               for s in ("ild", "kd", "kd_long", "dpo") if s in exp.plan())


def _spread(values: list[float]) -> dict:
    """The mean and the sample standard deviation of ``values`` (``sd`` None for one value: one seed has no spread)."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def _pm(spread: dict, spec: str) -> str:
    """``mean ± sd``, or the mean alone for one seed."""
    sd = "" if spread["sd"] is None else f" ± {format(spread['sd'], spec.lstrip('+'))}"
    return f"{format(spread['mean'], spec)}{sd}"


def summarise(name: str, exp, evals: list[dict]) -> dict:
    """One experiment's row: its final and initial KL and perplexity over the seeds' ``eval.json``s."""
    from zebrax.distill.stages import final_evaluation

    final = [final_evaluation(exp.plan(), e) for e in evals]
    return {"experiment": name, "seeds": len(evals), "stages": list(exp.plan()), "final": final[0],
            "trained_tokens": trained_tokens(exp),
            "kl": _spread([e[f]["kl"] for e, f in zip(evals, final, strict=True)]),
            "perplexity": _spread([e[f]["perplexity"] for e, f in zip(evals, final, strict=True)]),
            "kl_initialised": _spread([e["initialised"]["kl"] for e in evals]),
            "teacher_perplexity": _spread([e["teacher"]["perplexity"] for e in evals])}


def paired(rows: list[dict]) -> list[dict]:
    """Each row after the first compared with the first, seed by seed (a seed is one teacher and one data order,
    shared by every experiment): ``vs_first`` = the spread of its final KL less the first's, and in how many seeds
    it is lower."""
    base = rows[0]["kl"]["values"]
    for r in rows[1:]:
        diff = [a - b for a, b in zip(r["kl"]["values"], base, strict=False)]
        r["vs_first"] = {"experiment": rows[0]["experiment"], **_spread(diff),
                         "lower": sum(d < 0 for d in diff), "of": len(diff)}
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of ``summarise`` rows (``paired``: the column against the first experiment)."""
    first = rows[0]["experiment"]
    lines = [f"| experiment | seeds | KL after (mean ± sd) | Δ KL vs {first}, paired by seed (lower in) | "
             "perplexity after | KL initialised | teacher perplexity | trained tokens | stages |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_first")
        versus = f"{_pm(vs, '+.4f')} ({vs['lower']}/{vs['of']})" if vs else "—"
        lines += [f"| {r['experiment']} | {r['seeds']} | **{_pm(r['kl'], '.4f')}** | {versus} | "
                  f"{_pm(r['perplexity'], '.2f')} | {_pm(r['kl_initialised'], '.4f')} | "
                  f"{_pm(r['teacher_perplexity'], '.2f')} | {r['trained_tokens']:,} | {' → '.join(r['stages'])} |"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """KL after each experiment, mean and standard deviation over seeds, every seed a dot."""
    from zebrax.bench_decode import pyplot

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


def ablate(gin_files: list[str], seeds: int, root: str | Path, bindings: list[str] = ()) -> list[dict]:
    """Run every experiment of ``gin_files`` (with ``bindings`` after each) with seeds 0 … ``seeds``−1 under
    ``root``; writes and returns the table's rows. Every experiment is parsed and checked before any runs."""
    import dataclasses

    from zebrax.checkpoint import write_text_atomic
    from zebrax.distill import pipeline
    from zebrax.presets import call_configurable, parse_gin

    if not gin_files:
        raise ConfigError("zebrax ablate: no gin files given")
    names = [Path(f).stem for f in gin_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"zebrax ablate: two experiments share a name ({', '.join(names)}); each gin file's stem "
                          f"names its directory")
    experiments = {}
    for name, f in zip(names, gin_files, strict=True):
        gin = parse_gin([f], list(bindings))
        experiments[name] = (call_configurable(gin, "zebrax.distill"), gin.config_str())
    root = Path(root)
    import jax

    if not jax.config.jax_compilation_cache_dir:  # the runs compile the same programs: each compiled once
        jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    evals = {name: [] for name in experiments}
    for seed in range(seeds):  # seed by seed: the table after each holds every experiment
        for name, (exp, text) in experiments.items():
            _say(f"{name}, seed {seed}")
            evals[name].append(pipeline.run(dataclasses.replace(exp, seed=seed), root / name / f"seed_{seed}",
                                            config_text=text + f"\n# zebrax ablate: distill.seed = {seed}\n",
                                            shared=root / "shared"))
        rows = paired([summarise(name, exp, evals[name]) for name, (exp, _) in experiments.items()])
        write_text_atomic(root / "ablations.json", json.dumps(rows, indent=2))
        write_text_atomic(root / "ablations.md", table(rows))
        plot(rows, root / "ablations.png")
    return rows

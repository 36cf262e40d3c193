"""``zebrax ablate``: experiments × seeds, one table.

Each gin file is one experiment (its name: the file's stem); each runs once per seed (``distill.seed`` = 0 … N−1,
seed by seed: the table is rewritten after each seed, every experiment in it) in ``ROOT/NAME/seed_S`` (a ``zebrax
distill`` work directory: resumable, a finished run is read back). The runs share what they agree on
(``stages.Run.reuse``, in ``ROOT/shared``): the teacher of a seed is trained once for every experiment that keeps
its settings, ILD once for the ablations after it, and so on.

The table (``ROOT/ablations.md``, its numbers in ``ablations.json``, ``ablations.png``) gives per experiment the
mean ± standard deviation over seeds of KL(teacher ‖ model) and perplexity on the held-out rows, after its last
stage and as initialised, its KL less the baseline experiment's (``--baseline``; ``method`` by default) seed by seed
(``paired``: each seed is its own teacher, so the differences are what the comparison rests on), beside the tokens
it trained on (``trained_tokens``: the budget the comparison holds equal). A later call into the same root keeps the
rows of the experiments it does not run. The runs compile the same programs, so they share JAX's persistent
compilation cache (``ROOT/jax-cache`` unless one is set).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from zebrax.errors import ConfigError

ROWS = "ablations.json"
RESERVED = {"shared": "stages the runs share", "jax-cache": "compilation cache"}  # ROOT's own entries


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


def paired(rows: list[dict], baseline: str) -> list[dict]:
    """Each row compared with the ``baseline`` experiment's, seed by seed (a seed is one teacher and one data order,
    shared by every experiment): ``vs_baseline`` = the spread of its final KL less the baseline's, and in how many
    seeds it is lower."""
    base = next(r for r in rows if r["experiment"] == baseline)["kl"]["values"]
    for r in rows:
        r.pop("vs_baseline", None)
        if r["experiment"] != baseline:
            diff = [a - b for a, b in zip(r["kl"]["values"], base, strict=False)]
            r["vs_baseline"] = {"experiment": baseline, **_spread(diff), "lower": sum(d < 0 for d in diff),
                                "of": len(diff)}
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of ``summarise`` rows (``paired``: the column against the baseline experiment)."""
    baseline = next((r["vs_baseline"]["experiment"] for r in rows if "vs_baseline" in r), rows[0]["experiment"])
    lines = [f"| experiment | seeds | KL after (mean ± sd) | Δ KL vs {baseline}, paired by seed (lower in) | "
             "perplexity after | KL initialised | teacher perplexity | trained tokens | stages |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_baseline")
        versus = f"{_pm(vs, '+.4f')} ({vs['lower']}/{vs['of']})" if vs else "—"
        lines += [f"| {r['experiment']} | {r['seeds']} | **{_pm(r['kl'], '.4f')}** | {versus} | "
                  f"{_pm(r['perplexity'], '.2f')} | {_pm(r['kl_initialised'], '.4f')} | "
                  f"{_pm(r['teacher_perplexity'], '.2f')} | {r['trained_tokens']:,} | {' → '.join(r['stages'])} |"]
    return "\n".join(lines) + "\n"


def ablate(gin_files: list[str], seeds: int, root: str | Path, bindings: list[str] = (), *,
           baseline: str | None = None) -> list[dict]:
    """Run every experiment of ``gin_files`` (with ``bindings`` after each) with seeds 0 … ``seeds``−1 under
    ``root`` (a local directory); writes and returns the table's rows: this call's experiments, and those an earlier
    call wrote into ``root`` that this one does not run again. ``baseline``: the experiment the others are compared
    with (default ``method`` where there is one, else the first). Every experiment is parsed and checked before any
    runs."""
    import dataclasses

    import jax

    from zebrax.app.plots import plot_ablations
    from zebrax.app.presets import call_configurable, parse_gin
    from zebrax.distill import pipeline
    from zebrax.files import local_path, write_text_atomic

    if not gin_files:
        raise ConfigError("zebrax ablate: no gin files given")
    root = local_path(root, "root of ablations (their table, shared stages and compilation cache)")
    names = [Path(f).stem for f in gin_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"zebrax ablate: two experiments share a name ({', '.join(names)}); each gin file's stem "
                          f"names its directory")
    taken = sorted(set(names) & set(RESERVED))
    if taken:
        raise ConfigError(f"zebrax ablate: an experiment may not be named {taken[0]!r}: ROOT/{taken[0]} holds the "
                          f"{RESERVED[taken[0]]}; rename its gin file")
    earlier = json.loads((root / ROWS).read_text()) if (root / ROWS).exists() else []
    kept = [r for r in earlier if r["experiment"] not in names]
    every = [r["experiment"] for r in kept] + names
    baseline = baseline or ("method" if "method" in every else every[0])
    if baseline not in every:
        raise ConfigError(f"zebrax ablate: --baseline {baseline!r} is none of the experiments ({', '.join(every)})")
    experiments = {}
    for name, f in zip(names, gin_files, strict=True):
        gin = parse_gin([f], list(bindings))
        experiments[name] = (call_configurable(gin, "zebrax.distill"), gin.config_str())
    root.mkdir(parents=True, exist_ok=True)
    if not jax.config.jax_compilation_cache_dir:  # the runs compile the same programs: each compiled once
        jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    evals = {name: [] for name in experiments}
    rows = []
    for seed in range(seeds):  # seed by seed: the table after each holds every experiment
        for name, (exp, text) in experiments.items():
            _say(f"{name}, seed {seed}")
            evals[name].append(pipeline.run(dataclasses.replace(exp, seed=seed), root / name / f"seed_{seed}",
                                            config_text=text + f"\n# zebrax ablate: distill.seed = {seed}\n",
                                            shared=root / "shared"))
        rows = paired(kept + [summarise(name, exp, evals[name]) for name, (exp, _) in experiments.items()], baseline)
        write_text_atomic(root / ROWS, json.dumps(rows, indent=2))
        write_text_atomic(root / "ablations.md", table(rows))
        plot_ablations(rows, root / "ablations.png")
    return rows

"""The main job (``make run``, ``zebrax run``): convert the teacher → ILD → SMART → the hybrid → KD (``zebrax.distill``
on the experiment the gin files bind) → KL and perplexity before and after → the decode benchmark → a sample answer
from teacher and hybrid → ``runs/NAME/report.md``.

Re-running reuses every finished step: the converted teacher, each finished stage (an unfinished one resumes from
its checkpoint), the benchmark when its settings are the ones recorded in ``bench_decode.json`` (otherwise it is
measured anew: it holds no training). ``runs/NAME/job.json`` keeps the seconds each step took when it ran.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from zebrax import checkpoint, files


def _say(text: str) -> None:
    print(f"[zebrax run] {text}", file=sys.stderr, flush=True)


def answer(model, prompt: str, max_new_tokens: int) -> str:
    """``model``'s greedy reply to one user turn, through its chat template (bytes for tokenizer-less models)."""
    from zebrax.data import codec_for

    codec = codec_for(model, "run")
    tokens = codec.chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    out = model.generate([tokens], max_new_tokens=max_new_tokens)[0]
    return codec.decode(out[len(tokens):]).strip()


def measured(path: Path, step: str, name: str, what: str, settings: dict, starting: str, measure, done) -> None:
    """``measure()``'s dict written to ``path`` with ``settings`` (the job's step ``name``, timed by ``done``),
    unless ``path`` holds one measured with these settings already; other settings there are named and measured
    again (``what`` holds no training)."""
    recorded = json.loads(path.read_text()).get("settings") if path.exists() else None
    if recorded == settings:
        _say(f"{step}: {path} is there")
        return
    if path.exists():
        changed = [f"{k} {(recorded or {}).get(k)} there, {v} now" for k, v in settings.items()
                   if (recorded or {}).get(k) != v]
        _say(f"{step}: {path} was measured with other settings ({'; '.join(changed)}); measuring again ({what} "
             f"holds no training)")
    else:
        _say(f"{step}: {starting}")
    t = time.perf_counter()
    files.write_text_atomic(path, json.dumps({**measure(), "settings": settings}, indent=2))
    done(name, t)


def long_context(teacher, hybrid, workdir: Path, *, needle_lengths, needle_depths, needle_samples: int,
                 positions_length: int, positions_documents: int) -> dict:
    """The job's long-context measurements of teacher and hybrid (``zebrax.long_context``), with their plots
    ``needle.png`` and ``positions.png`` in ``workdir``: ``{"needle": {name: map} | None, "positions": {name: curve}
    | None}``."""
    from zebrax import long_context as lc
    from zebrax.app.plots import plot_needles, plot_positions
    from zebrax.data import codec_for

    models = {"teacher": teacher, "hybrid": hybrid}
    out = {"needle": None, "positions": None}
    if needle_lengths and all(m.tokenizer is not None for m in models.values()):
        out["needle"] = {name: lc.needle_map(m, lengths=needle_lengths, depths=needle_depths, samples=needle_samples)
                         for name, m in models.items()}
        plot_needles(out["needle"], workdir / "needle.png")
    if positions_length:
        codec = codec_for(teacher, "the teacher")
        documents = [codec.encode(text) for text in lc.stdlib_documents(positions_documents)]
        out["positions"] = {name: lc.position_nll(m, documents, length=positions_length)
                            for name, m in models.items()}
        for curve in out["positions"].values():
            del curve["nll_by_position"]  # the bins are what the report reads
        plot_positions(out["positions"], workdir / "positions.png")
    return out


def run(exp, name: str = "smollm2", root: str = "runs", convert_from: str | None = None, *,
        prompt: str = "What is the capital of France?", max_new_tokens: int = 48,
        bench_contexts: tuple[int, ...] = (256, 1024, 4096), bench_batches: tuple[int, ...] = (1,),
        bench_new_tokens: int = 16, bench_repeats: int = 2, needle_lengths: tuple[int, ...] = (512, 1024, 2048),
        needle_depths: tuple[float, ...] = (0.0, 0.5, 1.0), needle_samples: int = 1, positions_length: int = 2048,
        positions_documents: int = 4, config_text: str | None = None) -> Path:
    """Run (or resume) the main job in ``ROOT/NAME`` on the experiment ``exp`` (a ``zebrax.distill.Experiment``);
    returns the report's path. ``convert_from``: the checkpoint the teacher is converted from when ``exp.teacher`` is
    not a zebrax checkpoint yet (``None``: the embedded SmolLM2 GGUF). The long-context step: the needle map at
    ``needle_lengths`` × ``needle_depths`` (``needle_samples`` a cell; none: no map, as for a model without a
    tokenizer) and the loss against position over the first ``positions_length`` tokens (0: none) of the
    ``positions_documents`` largest modules of Python's standard library, teacher and hybrid."""
    from zebrax.api import convert, load
    from zebrax.app import bench_decode, report
    from zebrax.app.embedded import embedded_teacher
    from zebrax.app.plots import plot_decode
    from zebrax.app.timing import machine
    from zebrax.distill import pipeline, stages
    from zebrax.distill.workdir import locked

    start = time.perf_counter()
    workdir = Path(root) / name
    job_path = workdir / "job.json"
    steps: dict[str, float] = {}

    def done(step: str, t: float) -> None:
        """Record a step's seconds; written once the work directory is the run's (the distill step claims it)."""
        steps[step] = round(time.perf_counter() - t, 1)
        if workdir.is_dir():
            saved = json.loads(job_path.read_text()) if job_path.exists() else {}
            saved.setdefault("steps", {}).update(steps)
            files.write_text_atomic(job_path, json.dumps({**saved, "teacher": exp.teacher}, indent=2))

    if exp.teacher != "tiny" and not checkpoint.is_checkpoint(exp.teacher):
        src = Path(convert_from) if convert_from else embedded_teacher()
        _say(f"1/6 convert {src} → {exp.teacher}")
        t = time.perf_counter()
        convert(src, exp.teacher)
        done("convert", t)
    else:
        _say(f"1/6 convert: {exp.teacher} is there")

    _say(f"2/6 distill → {workdir} ({' → '.join(exp.plan())}; finished stages are kept)")
    t = time.perf_counter()
    evals = pipeline.run(exp, workdir, config_text=config_text)
    if not (job_path.exists() and "distill" in json.loads(job_path.read_text()).get("steps", {})):
        done("distill", t)

    teacher = load(workdir / "teacher" if exp.teacher == "tiny" else exp.teacher)
    hybrid = load(workdir / stages.final_model(exp.plan()))
    with locked(workdir):  # one run at a time writes the benchmark and the report
        def benchmark() -> dict:
            result = bench_decode.bench_decode(teacher, contexts=bench_contexts, batches=bench_batches,
                                               models=("teacher",), extra={"hybrid": hybrid},
                                               new_tokens=bench_new_tokens, repeats=bench_repeats)
            plot_decode(result, workdir / "decode.png")
            return result

        measured(workdir / "bench_decode.json", "3/6 decode benchmark", "bench", "the benchmark",
                 {"contexts": list(bench_contexts), "batches": list(bench_batches), "new_tokens": bench_new_tokens,
                  "repeats": bench_repeats},
                 f"contexts {list(bench_contexts)}, batches {list(bench_batches)}", benchmark, done)
        long_settings = {"needle_lengths": list(needle_lengths), "needle_depths": list(needle_depths),
                         "needle_samples": needle_samples, "positions_length": positions_length,
                         "positions_documents": positions_documents}
        measured(workdir / "long_context.json", "4/6 long context", "long_context", "the long-context step",
                 long_settings, f"needles at {list(needle_lengths)} tokens, loss against position over "
                 f"{positions_length}", lambda: long_context(teacher, hybrid, workdir, **long_settings), done)

        _say("5/6 the same chat prompt to teacher and hybrid")
        t = time.perf_counter()
        answers = {"prompt": prompt, "teacher": answer(teacher, prompt, max_new_tokens),
                   "hybrid": answer(hybrid, prompt, max_new_tokens)}
        done("answers", t)
        _say("6/6 report")
        path = report.write(workdir, teacher=teacher, hybrid=hybrid, answers=answers, machine=machine())
    wall = time.perf_counter() - start
    final = stages.final_evaluation(exp.plan(), evals)
    print(f"{name}: hybrid {hybrid.config.layer_map()} of {exp.teacher}\n"
          f"  KL(teacher ‖ hybrid) {evals['initialised']['kl']:.3f} initialised → {evals[final]['kl']:.3f} "
          f"{final.replace('_', ' ')}; perplexity {evals[final]['perplexity']:.2f} (teacher "
          f"{evals['teacher']['perplexity']:.2f})\n"
          f"  decode cache per token {hybrid.cache_bytes_per_token():,} B vs {teacher.cache_bytes_per_token():,} B "
          f"({100 * hybrid.cache_bytes_per_token() / teacher.cache_bytes_per_token():.2f}%)\n"
          f"  user: {prompt}\n  teacher: {answers['teacher']}\n  hybrid: {answers['hybrid']}\n"
          f"  report: {path} ({wall:.0f} s this time)")
    return path

"""`zebrax distill` end to end on the tiny experiment: every stage learns, KL to the teacher falls, a run killed with
SIGKILL resumes to the numbers of an uninterrupted one, and bad configs and work directories are one-line errors that
leave the work directory as it was. The uninterrupted run is the main job (`zebrax run`, configs/experiments/
tiny_run.gin) on the same experiment: its report, plots and reuse of finished steps are checked too. fp32, CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zebrax import checkpoint
from zebrax.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "tiny_cpu.gin")
TINY_RUN = str(ROOT / "configs" / "experiments" / "tiny_run.gin")
# shorter than tiny_cpu.gin; KD long enough to be killed in its middle
SHORT = ["teacher/TrainConfig.steps = 40", "ild/TrainConfig.steps = 8", "ild/TrainConfig.checkpoint_every = 4",
         "kd/TrainConfig.steps = 40", "kd/TrainConfig.checkpoint_every = 4", "kd/TrainConfig.log_every = 2",
         "dpo/TrainConfig.steps = 4"]


def distill(workdir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "zebrax", "distill", "--gin_file", TINY, "--workdir", str(workdir)]
    for binding in [*SHORT, *extra]:
        args += ["--gin_param", binding]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main_job(root: Path) -> subprocess.CompletedProcess:
    """The main job on the tiny experiment with the same bindings: its work directory is ROOT/tiny."""
    args = [sys.executable, "-m", "zebrax", "run", TINY_RUN, "--gin", f"run.root = '{root}'", "--gin",
            "run.bench_contexts = (32,)"]
    for binding in SHORT:
        args += ["--gin", binding]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(workdir: Path) -> list[tuple]:
    """Every logged number but the timing ones."""
    return [tuple(sorted((k, v) for k, v in row.items() if k != "tokens_per_sec")) for row in metrics(workdir)]


def test_tiny_experiment_learns_and_resumes_after_kill_9_and_the_main_job_reports_it(tmp_path):
    killed = tmp_path / "killed"
    proc = distill(killed)
    while not any(r["stage"] == "kd" and r["step"] >= 10 for r in metrics(killed)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "kd").exists(), "the run finished KD before it could be killed"
    for entry in killed.iterdir():  # stage outputs are whole or absent
        if entry.name in ("teacher", "hybrid", "kd", "dpo"):
            assert checkpoint.is_checkpoint(entry), entry
    job = main_job(tmp_path)  # uninterrupted
    assert job.returncode == 0, job.stderr[-2000:]
    straight = tmp_path / "tiny"
    resumed = distill(killed)
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err[-2000:]
    assert losses(killed) == losses(straight)  # the resumed log reads as the uninterrupted one, number for number

    rows = metrics(straight)
    for stage in ("teacher", "ild", "kd", "dpo"):
        logged = [r["loss"] for r in rows if r["stage"] == stage]
        assert logged[-1] < logged[0], (stage, logged)
    evals = json.loads(out)
    assert evals == json.loads((straight / "eval.json").read_text())
    assert evals["after_kd"]["kl"] < 0.5 * evals["initialised"]["kl"], evals
    smart = json.loads((straight / "smart.json").read_text())
    assert len(smart["mla_layers"]) == 2 and len(smart["scores"]) == 4
    assert checkpoint.load_config(straight / "dpo").layer_map().count("L") == 2
    assert not (straight / "checkpoints" / "kd").exists()  # finished stages drop their resumption checkpoints
    assert "distill.teacher = 'tiny'" in (straight / "config.gin").read_text()

    # the main job's report: its plots, and the numbers of the run's own files
    report = (straight / "report.md").read_text()
    for png in ("loss.png", "smart.png", "decode.png"):
        assert (straight / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    assert f"**{evals['after_dpo']['kl']:.3f}** after dpo" in report
    assert f"| after kd | {evals['after_kd']['kl']:.4f} | {evals['after_kd']['perplexity']:,.2f} |" in report
    bench = json.loads((straight / "bench_decode.json").read_text())
    assert {(r["model"], r["context"], r["batch"]) for r in bench["rows"]} == {
        (m, 32, b) for m in ("teacher", "hybrid") for b in (1, 4)}
    resolved = [r for r in bench["rows"] if r["decode_tokens_per_s"] is not None]  # None: lost in timing noise
    assert len(resolved) >= 2 and all(r["decode_tokens_per_s"] > 0 for r in resolved)
    row = resolved[-1]
    assert (f"| {row['model']} | {row['context']} | {row['batch']} | {row['prefill_s']:.2f} | "
            f"{row['decode_tokens_per_s']:.1f} |") in report
    assert str(smart["mla_layers"]) in report and "**teacher:**" in report and "**hybrid:**" in report
    assert "KL(teacher ‖ hybrid)" in job.stdout and f"report: {straight / 'report.md'}" in job.stdout
    steps = json.loads((straight / "job.json").read_text())["steps"]
    assert set(steps) == {"distill", "bench", "answers"}

    bench_mtime = (straight / "bench_decode.json").stat().st_mtime
    again = main_job(tmp_path)  # everything reused: no training, no benchmark
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3/5 decode benchmark: " in again.stderr and "is there" in again.stderr
    assert "ILD:" not in again.stderr and "KD:" not in again.stderr
    assert (straight / "bench_decode.json").stat().st_mtime == bench_mtime
    assert json.loads((straight / "job.json").read_text())["steps"]["distill"] == steps["distill"]


def test_a_workdir_of_another_experiment_is_refused_and_left_alone(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "experiment.json").write_text(json.dumps({"seq_len": 32}))
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    assert main(["distill", "--gin_file", TINY, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by a different experiment" in err, err
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["distill", "--gin_file", TINY, "--workdir", str(other)]) == 1
    assert "is not a zebrax distill work directory" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("binding, message", [
    ("distill.sed = 1", r"Configurable 'distill' doesn't have a parameter named 'sed'.*its parameters: teacher, "
                        r"tiny_teacher, data"),
    ("distil.seed = 1", r"No configurable matching 'distil'.*configurables: .*distill"),
    ("kd/TrainConfig.step = 1", r"its parameters: steps, batch_size"),
])
def test_a_misspelt_binding_lists_the_valid_names(tmp_path, capsys, binding, message):
    assert main(["distill", "--gin_file", TINY, "--gin_param", binding, "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "w").exists()


def test_missing_data_is_one_line_before_any_training(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert main(["distill", "--gin_file", TINY, "--gin_param", "distill.data = ('nope.jsonl',)",
                 "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.jsonl: no such data file" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["config.gin", "experiment.json"]

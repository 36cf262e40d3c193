"""`zebrax distill` end to end on the tiny experiment: every stage learns, KL to the teacher falls, a run killed with
SIGKILL resumes to the numbers of an uninterrupted one, and bad configs and work directories are one-line errors that
leave the work directory as it was. The uninterrupted run is the main job (`zebrax run`, configs/experiments/
tiny_run.gin) on the same experiment: its report, plots and reuse of finished steps are checked too. fp32, CPU."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import assert_one_line_error
from zebrax import checkpoint
from zebrax.app.cli import main
from zebrax.distill.experiment import Experiment
from zebrax.distill.trainer import TrainConfig
from zebrax.errors import ConfigError
from zebrax.recipe import from_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "tiny_cpu.gin")
TINY_RUN = str(ROOT / "configs" / "experiments" / "tiny_run.gin")
# shorter than tiny_cpu.gin; KD long enough to be killed in its middle
SHORT = ["teacher/TrainConfig.steps = 40", "ild/TrainConfig.steps = 8", "ild/TrainConfig.checkpoint_every = 4",
         "kd/TrainConfig.steps = 40", "kd/TrainConfig.checkpoint_every = 4", "kd/TrainConfig.log_every = 2",
         "dpo/TrainConfig.steps = 4"]


def distill(child_process, workdir: Path, *extra: str) -> subprocess.Popen:
    args = ["distill", "--gin_file", TINY, "--workdir", workdir]
    for binding in [*SHORT, *extra]:
        args += ["--gin_param", binding]
    return child_process.zebrax(*args, wait=False)


def main_job(child_process, root: Path) -> subprocess.CompletedProcess:
    """The main job on the tiny experiment with the same bindings: its work directory is ROOT/tiny."""
    args = ["run", "--gin_file", TINY_RUN, "--gin_param", f"run.root = '{root}'", "--gin_param",
            "run.bench_contexts = (32,)"]
    for binding in SHORT:
        args += ["--gin_param", binding]
    return child_process.zebrax(*args)


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(workdir: Path) -> list[tuple]:
    """Every logged number but the timing ones."""
    return [tuple(sorted((k, v) for k, v in row.items() if k != "tokens_per_sec")) for row in metrics(workdir)]


def test_tiny_experiment_learns_and_resumes_after_kill_9_and_the_main_job_reports_it(child_process, tmp_path):
    killed = tmp_path / "killed"
    proc = distill(child_process, killed)
    while not any(r["stage"] == "kd" and r["step"] >= 10 for r in metrics(killed)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "kd").exists(), "the run finished KD before it could be killed"
    for entry in killed.iterdir():  # stage outputs are whole or absent
        if entry.name in ("teacher", "hybrid", "kd", "dpo"):
            assert checkpoint.is_checkpoint(entry), entry
    job = main_job(child_process, tmp_path)  # uninterrupted
    assert job.returncode == 0, job.stderr[-2000:]
    straight = tmp_path / "tiny"
    resumed = distill(child_process, killed)
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
    for png in ("loss.png", "smart.png", "decode.png", "positions.png"):
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
    assert set(steps) == {"distill", "bench", "long_context", "answers"}
    measured = json.loads((straight / "long_context.json").read_text())
    assert measured["needle"] is None and set(measured["positions"]) == {"teacher", "hybrid"}  # bytes: no needle
    curve = measured["positions"]["hybrid"]
    assert curve["length"] == 512 and curve["documents"] == 2 and "## Long context" in report
    assert f"| 256–511 | {measured['positions']['teacher']['nll'][-1]:.3f} | {curve['nll'][-1]:.3f} |" in report

    bench_mtime = (straight / "bench_decode.json").stat().st_mtime
    again = main_job(child_process, tmp_path)  # everything reused: no training, no benchmark
    assert again.returncode == 0, again.stderr[-2000:]
    assert "3/6 decode benchmark: " in again.stderr and "is there" in again.stderr
    assert "4/6 long context: " in again.stderr
    assert "ILD:" not in again.stderr and "KD:" not in again.stderr
    assert (straight / "bench_decode.json").stat().st_mtime == bench_mtime
    assert json.loads((straight / "job.json").read_text())["steps"]["distill"] == steps["distill"]


def test_a_workdir_of_another_experiment_is_refused_and_left_alone(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "experiment.json").write_text(json.dumps({"seq_len": 32}))
    (workdir / "smart.json").write_text("{}")  # a stage of that experiment is begun
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    assert main(["distill", "--gin_file", TINY, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "written by a different experiment (stage 'smart' is begun there" in err
    assert "and data ([] there, ['configs/data/prompts.jsonl'] now) differs); use another --workdir" in err, err
    assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["distill", "--gin_file", TINY, "--workdir", str(other)]) == 1
    assert "is not a zebrax distill work directory" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_work_directory_takes_over_stages_added_after_those_begun(tmp_path):
    """``stages.disagreement``: a begun stage (its artefact or its checkpoints there) must keep its settings, those of
    the stages before it and the fields no stage claims; stages not begun, or added after, may change."""
    from zebrax.distill.experiment import Experiment
    from zebrax.distill.stages import disagreement

    def fields(stages=("teacher", "students", "ild", "smart", "hybrid", "kd"), **changes):
        return {**json.loads(Experiment(stages=stages).to_json()), **changes}

    old = fields()
    (tmp_path / "ild" / "mla").mkdir(parents=True)
    (tmp_path / "smart.json").write_text("{}")
    (tmp_path / "checkpoints" / "hybrid").mkdir(parents=True)
    longer = json.loads(Experiment(stages=(*old["stages"], "kd_long"), kd_long_seq_len=512).to_json())
    assert disagreement(tmp_path, old, longer) is None  # a stage added after
    assert disagreement(tmp_path, old, fields(kd={**old["kd"], "steps": 7})) is None  # kd is not begun
    assert disagreement(tmp_path, old, fields(num_mla=1)) == (
        "stage 'smart' is begun there, and num_mla (2 there, 1 now) differs")
    assert disagreement(tmp_path, old, fields(ild={**old["ild"], "steps": 7})).startswith(
        "stage 'ild' is begun there, and ild (")
    assert disagreement(tmp_path, old, fields(mesh={"data": 2})).startswith(
        "stage 'ild' is begun there, and mesh (")  # no stage claims it: it decides every stage
    assert disagreement(tmp_path, old, fields(stages=("teacher", "students", "smart", "hybrid", "kd"))) == (
        "stage 'ild' is begun there, and not in distill.stages now")
    (tmp_path / "kd").mkdir()
    assert disagreement(tmp_path, old, fields(kd={**old["kd"], "steps": 7})).startswith(
        "stage 'kd' is begun there, and kd (")
    fresh = tmp_path / "fresh"  # a row of eval.json counts: the teacher's is written before any artefact
    fresh.mkdir()
    (fresh / "eval.json").write_text(json.dumps({"teacher": {"kl": 0.0}}))
    assert disagreement(fresh, old, fields(seq_len=64)) == (
        "stage 'teacher' is begun there, and seq_len (128 there, 64 now) differs")
    no_ild = fields(stages=("teacher", "students", "smart", "hybrid", "kd"))
    (fresh / "smart.json").write_text("{}")
    assert disagreement(fresh, no_ild, old) == (
        "stage 'smart' is begun there, and the stages up to it (['teacher', 'students', 'smart'] there, "
        "['teacher', 'students', 'ild', 'smart'] now) differs")


@pytest.mark.parametrize("binding, message", [
    ("distill.sed = 1", r"Configurable 'distill' doesn't have a parameter named 'sed'.*its parameters: teacher, "
                        r"tiny_teacher, tiny_layers, stages, data"),
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
    assert not workdir.exists()  # checked before the work directory is touched


# -- everything checked before any work -------------------------------------------------------------
FEW = ["teacher/TrainConfig.steps = 2", "ild/TrainConfig.steps = 1", "kd/TrainConfig.steps = 1",
       "dpo/TrainConfig.steps = 1"]


def distill_cli(capsys, workdir: Path, *bindings: str) -> tuple[int, str]:
    """``zebrax distill`` on the tiny experiment in this process, a few steps a stage: (exit code, stderr)."""
    capsys.readouterr()
    args = ["distill", "--gin_file", TINY, "--workdir", str(workdir)]
    for binding in [*FEW, *bindings]:
        args += ["--gin_param", binding]
    code = main(args)
    return code, capsys.readouterr().err


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def long_prompt_chat(i: int) -> dict:
    """A chat record whose prompt alone is longer than 48 byte tokens: its reply starts after them."""
    return {"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue at noon? " * 2},
                         {"role": "assistant", "content": "Rayleigh scattering."}]}


@pytest.mark.parametrize("binding, message", [
    ("distill.seq_len = 'abc'", "distill.seq_len = 'abc': expected an integer >= 2"),
    ("distill.seq_len = 1", "distill.seq_len = 1: expected an integer >= 2"),
    ("kd/TrainConfig.steps = '10'", "kd/TrainConfig.steps = '10': expected an integer >= 1"),
    ("ild/TrainConfig.warmup_ratio = 1.5", "ild/TrainConfig.warmup_ratio = 1.5: expected a number in [0, 1]"),
    ("distill.split = (0.1, 0.9)", "distill.split = (0.1, 0.9): expected 3 fractions (held-out, ILD, KD)"),
    ("distill.split = (0.1, -0.2, 0.7)", "distill.split[1] = -0.2: expected a number in (0, 1]"),
    ("distill.remat = 'save_qkv'", "distill.remat = 'save_qkv': expected True, False, 'none' or one of full, "
                                   "save_qkv_proj"),
    ("distill.kd_direction = 'sideways'", "distill.kd_direction = 'sideways': expected one of 'forward', 'reverse'"),
    ("distill.data = 'configs/data/prompts.jsonl'", "distill.data = 'configs/data/prompts.jsonl': expected a tuple"),
    ("distill.num_mla = 4", "distill.num_mla = 4: place: num_mla=4 must be in 1..3"),
    ("distill.student = {'kv_lora_rank': 0}", "distill.student = {'kv_lora_rank': 0}: HybridConfig: kv_lora_rank=0"),
    ("distill.teacher = 'no/such/teacher'", "no/such/teacher: not a zebrax checkpoint"),
    ("distill.stages = ('teacher', 'students', 'kd')",
     "distill.stages ['teacher', 'students', 'kd']: 'kd' reads 'hybrid', which no stage before it writes"),
    ("distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'sft')",
     "'sft' is not a stage (expected some of teacher, students, ild, smart, hybrid, kd, kd_long, dpo)"),
    ("distill.stages = ('teacher', 'students', 'ild', 'ild', 'smart', 'hybrid')", "a stage is listed twice"),
    ("distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd', 'kd_long')",
     "distill.kd_long_seq_len = 0: the second KD (stage 'kd_long') needs a context longer than distill.seq_len = 128"),
    ("distill.placement = 'random'", "distill.placement = 'random': expected one of 'smart', 'uniform', 'reverse'"),
    ("distill.long_data = ('configs/data/prompts.jsonl',)",
     "distill.long_data = ('configs/data/prompts.jsonl',): only the stage 'kd_long' reads it"),
    (["distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd', 'kd_long')", "distill.kd_long_seq_len = 256",
      "distill.long_data = ('no/such.jsonl',)"], "distill.long_data: no/such.jsonl: no such data file"),
    (["distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd', 'kd_long')", "distill.kd_long_seq_len = 256",
      "distill.long_data = ('configs/data/prompts.jsonl',)"],
     "distill.long_data (configs/data/prompts.jsonl): document 0 has 49 tokens, under half of "
     "distill.kd_long_seq_len = 256 (320 of 320 are)"),
    ("distill.random_init = ('gdn',)", "distill.random_init = ('gdn',): expected some of the students' mixer kinds "
                                       "(mamba2, mla)"),
])
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, binding, message):
    code, err = distill_cli(capsys, tmp_path / "w", *([binding] if isinstance(binding, str) else binding))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "w").exists()


def test_an_ablation_leaves_out_ild_places_uniformly_and_starts_mla_at_random(child_process, tmp_path):
    """The stage list and the ablation settings (``zebrax.distill.stages``): without ILD the hybrid is assembled from
    the initialised students (no ild/, no after_ild row), a uniform placement scores nothing, MLA starts at random;
    stages.json records the list, each stage with its settings. The finished run then takes ``kd_long`` added
    after its stages, from its KD model (``stages.disagreement``)."""
    workdir = tmp_path / "w"
    args = ["distill", "--gin_file", TINY, "--workdir", workdir]
    for binding in (*FEW, "distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd')",
                    "distill.placement = 'uniform'", "distill.random_init = ('mla',)"):
        args += ["--gin_param", binding]
    run = child_process.zebrax(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    kd = (workdir / "kd" / "config.json").stat().st_mtime
    for binding in ("distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd', 'kd_long')",
                    "distill.kd_long = @kd_long/TrainConfig()", "kd_long/TrainConfig.steps = 1",
                    "kd_long/TrainConfig.batch_size = 2", "distill.kd_long_seq_len = 256"):
        args += ["--gin_param", binding]
    run = child_process.zebrax(*args)
    code, err = run.returncode, run.stderr
    assert code == 0, err[-2000:]
    assert "KD:" not in err and (workdir / "kd" / "config.json").stat().st_mtime == kd
    assert not (workdir / "ild").exists() and not (workdir / "dpo").exists() and "ILD:" not in err
    assert json.loads((workdir / "smart.json").read_text()) == {"placement": "uniform", "mla_layers": [0, 2]}
    evals = json.loads((workdir / "eval.json").read_text())
    assert list(evals) == ["teacher", "initialised", "after_kd", "after_kd_long"]
    assert "KD LONG: 1 steps of 2 × 256 tokens" in err
    assert [r["stage"] for r in metrics(workdir)][-1] == "kd_long" and checkpoint.is_checkpoint(workdir / "kd_long")
    stages = json.loads((workdir / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["teacher", "students", "smart", "hybrid", "kd", "kd_long"]
    assert stages[1]["settings"]["random_init"] == ["mla"] and stages[2]["settings"]["placement"] == "uniform"
    hybrid = checkpoint.load_config(workdir / "hybrid")
    assert hybrid.layer_map() == "LSLS"


@pytest.mark.training
def test_a_context_extension_learns_from_long_documents_one_a_row(tmp_path, capsys):
    """``kd_long`` on ``distill.long_data`` (chats of 1,900–2,048 byte tokens made by ``ledger_chats``), past the
    tiny teacher's 1,024 positions: the run records the file among its inputs and in the stage's settings, trains
    rows of 2,048 tokens with the RoPE of the teacher and of the MLA layers stretched by YaRN of factor 2, and writes
    ``kd_long`` with that YaRN and a context of 2,048."""
    from zebrax.config import RopeScaling
    from zebrax.data import ByteCodec
    from zebrax.long_documents import ledger_chats

    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
             for i in range(100)]
    long = tmp_path / "long.jsonl"
    docs = ledger_chats(chats, ByteCodec(), length=2048, count=4, notes=2)
    assert all(1900 <= d["tokens"] <= 2048 for d in docs)
    long.write_text("".join(json.dumps(d) + "\n" for d in docs))
    workdir = tmp_path / "w"
    student = "{'kv_lora_rank': 16, 'q_lora_rank': 32, 'qk_rope_head_dim': 8, 'rope_factor': 1.0, " \
              "'rope_original_max_position_embeddings': 1024}"
    code, err = distill_cli(capsys, workdir, "distill.stages = ('teacher', 'students', 'smart', 'hybrid', 'kd', "
                                             "'kd_long')", "distill.kd_long = @kd_long/TrainConfig()",
                            "kd_long/TrainConfig.steps = 1", "kd_long/TrainConfig.batch_size = 2",
                            "distill.kd_long_seq_len = 2048", f"distill.long_data = ('{long}',)",
                            f"distill.student = {student}")
    assert code == 0, err[-2000:]
    assert "KD LONG: 1 steps of 2 × 2048 tokens" in err and "past the teacher's 1024: YaRN of factor 2" in err
    assert str(long) in json.loads((workdir / "data_sha256.json").read_text())
    stages = {s["stage"]: s for s in json.loads((workdir / "stages.json").read_text())}
    assert stages["kd_long"]["settings"]["long_data"] == [str(long)]
    before, after = checkpoint.load_config(workdir / "kd"), checkpoint.load_config(workdir / "kd_long")
    assert before.mla.rope_scaling.factor == 1.0 and before.max_position_embeddings == 1024
    assert after.mla.rope_scaling == RopeScaling("yarn", factor=2.0, original_max_position_embeddings=1024)
    assert after.max_position_embeddings == 2048


def test_zebrax_ablate_runs_each_experiment_by_seed_shares_what_they_agree_on_and_tabulates(child_process, tmp_path):
    """Two ablations × 2 seeds, a few steps: every run's final KL in the table, each seed's teacher and ILD trained
    once (the second experiment reuses them), and a second call reads everything back."""
    files = [str(ROOT / "configs" / "ablations" / f"{name}.gin") for name in ("method", "uniform_placement")]
    args = ["ablate", *files, "--seeds", "2", "--root", tmp_path]
    for binding in (*FEW, "distill.tiny_layers = 4", "distill.num_mla = 2"):
        args += ["--gin_param", binding]
    run = child_process.zebrax(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "ablations.json").read_text())
    assert [(r["experiment"], r["seeds"]) for r in rows] == [("method", 2), ("uniform_placement", 2)]
    for r in rows:
        kls = [json.loads((tmp_path / r["experiment"] / f"seed_{s}" / "eval.json").read_text())["after_kd"]["kl"]
               for s in (0, 1)]
        assert r["kl"]["values"] == kls and r["final"] == "after_kd" and r["trained_tokens"] == 2 * 4 * 128
    differences = [b - a for a, b in zip(rows[0]["kl"]["values"], rows[1]["kl"]["values"], strict=True)]
    assert rows[1]["vs_baseline"]["values"] == differences and rows[1]["vs_baseline"]["of"] == 2
    assert rows[1]["vs_baseline"]["experiment"] == "method" and "vs_baseline" not in rows[0]
    assert run.stderr.count("teacher: reused from") == 2 and run.stderr.count("ild: reused from") == 2, run.stderr
    inodes = lambda path: {p.stat().st_ino for p in path.rglob("*") if p.is_file()}  # noqa: E731
    # the reused ILD is the shared one's files, linked, not copied
    assert inodes(tmp_path / "uniform_placement" / "seed_0" / "ild") <= inodes(tmp_path / "shared")
    assert run.stdout == (tmp_path / "ablations.md").read_text() and "| uniform_placement | 2 |" in run.stdout
    assert (tmp_path / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = child_process.zebrax(*args)
    assert again.returncode == 0 and "ILD:" not in again.stderr and "KD:" not in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "ablations.json").read_text()) == rows


def test_the_ablation_table_gives_one_seed_no_spread():
    """Mean ± sample sd over seeds; one seed has no spread, so its cells are the value alone (not "± 0.0000")."""
    from zebrax.app.ablate import _spread, paired, table

    def row(name, kls):
        spread = _spread(kls)
        return {"experiment": name, "seeds": len(kls), "stages": ["kd"], "trained_tokens": 512, "kl": spread,
                "perplexity": spread, "kl_initialised": spread, "teacher_perplexity": spread}

    one = table(paired([row("a", [2.0]), row("b", [1.5])], "a")).splitlines()
    assert "| a | 1 | **2.0000** | — | 2.00 |" in one[2] and "| b | 1 | **1.5000** | -0.5000 (1/1) |" in one[3]
    two = table(paired([row("a", [1.0, 3.0]), row("b", [1.0, 2.0])], "a")).splitlines()
    assert "| a | 2 | **2.0000 ± 1.4142** |" in two[2] and "| -0.5000 ± 0.7071 (1/2) |" in two[3]


def test_ablate_keeps_other_rows_compares_with_its_baseline_and_refuses_what_it_cannot_hold(tmp_path, monkeypatch):
    """A second call into a root keeps the rows of the experiments it does not run; the comparison is with
    ``method`` (or ``--baseline``); an experiment may not be named after the root's own entries, nor the root be an
    object store's. The runs are stubbed: their KL is the seed plus a number of the experiment's."""
    from zebrax.app import ablate
    from zebrax.distill import pipeline

    kl = {"method": 1.0, "b": 0.5, "c": 2.0, "shared": 0.0}
    monkeypatch.setattr(pipeline, "run", lambda exp, workdir, **_: {
        "teacher": {"kl": 0.0, "perplexity": 2.0}, "initialised": {"kl": 5.0, "perplexity": 9.0},
        "after_kd": {"kl": kl[Path(workdir).parent.name] + exp.seed, "perplexity": 3.0}})
    gin = {}
    for name in kl:
        gin[name] = tmp_path / f"{name}.gin"
        gin[name].write_text(f"include '{TINY}'\n")
    bindings = ["distill.stages = ('teacher', 'students', 'ild', 'smart', 'hybrid', 'kd')"]
    rows = ablate.ablate([str(gin["b"]), str(gin["method"])], 2, tmp_path / "r", bindings)
    assert [r["experiment"] for r in rows] == ["b", "method"]
    assert rows[0]["vs_baseline"]["experiment"] == "method" and rows[0]["vs_baseline"]["values"] == [-0.5, -0.5]
    rows = ablate.ablate([str(gin["c"])], 2, tmp_path / "r", bindings)  # a second call: b and method kept
    assert [r["experiment"] for r in rows] == ["b", "method", "c"] and rows[2]["vs_baseline"]["mean"] == 1.0
    table = (tmp_path / "r" / "ablations.md").read_text()
    assert "Δ KL vs method" in table and "| b | 2 |" in table and "| c | 2 |" in table
    rows = ablate.ablate([str(gin["c"])], 2, tmp_path / "r", bindings, baseline="b")
    assert rows[1]["vs_baseline"] == {**rows[1]["vs_baseline"], "experiment": "b", "values": [0.5, 0.5]}
    with pytest.raises(ConfigError, match="--baseline 'd' is none of the experiments"):
        ablate.ablate([str(gin["c"])], 1, tmp_path / "r", bindings, baseline="d")
    with pytest.raises(ConfigError, match="an experiment may not be named 'shared': ROOT/shared holds the stages"):
        ablate.ablate([str(gin["shared"])], 1, tmp_path / "r", bindings)
    with pytest.raises(ConfigError, match="gs://b/r: a root of ablations .* lives on a local disk"):
        ablate.ablate([str(gin["c"])], 1, "gs://b/r", bindings)


def test_micro_batches_a_mesh_cannot_split_are_refused_naming_the_stage():
    """Rows are split over the mesh's (data, fsdp) devices: a stage whose micro-batches they do not divide is a
    ConfigError naming its batch size, accumulation and the mesh (it was an IndivisibleError from inside JAX at the
    stage's first step)."""
    from zebrax.distill.inputs import check_rows_divide

    exp = Experiment(mesh={"fsdp": 4}, kd=TrainConfig(batch_size=12, accumulate=2))
    check_rows_divide(exp, 2)
    with pytest.raises(ConfigError, match=r"kd/TrainConfig.batch_size = 12 \(accumulate 2\): micro-batches of 6 "
                                          r"rows, which distill.mesh = \{'fsdp': 4\} cannot split over its 4 row"):
        check_rows_divide(exp, 4)


def test_rows_that_count_no_token_are_refused_before_any_work(tmp_path, capsys):
    """Chat records whose prompts fill seq_len train on nothing (loss 0) and measure nothing (KL 0, perplexity 1):
    refused, naming the files and seq_len, whether all the data, the DPO pairs or one part of the split."""
    long = write_jsonl(tmp_path / "long.jsonl", [long_prompt_chat(i) for i in range(12)])
    code, err = distill_cli(capsys, tmp_path / "a", f"distill.data = ('{long}',)", "distill.preferences = ()",
                            "distill.seq_len = 48")
    assert_one_line_error(code, err, f"distill.data ({long}): none of its 12 documents counts a loss token once cut "
                                     "to distill.seq_len = 48")
    # the shipped single-turn prompts count at any length; the pairs' prompts fill 40 tokens
    code, err = distill_cli(capsys, tmp_path / "b", "distill.seq_len = 40")
    assert_one_line_error(code, err, "distill.preferences (configs/data/tiny_preferences.jsonl): none of its 40 pairs "
                                     "counts a loss token once cut to distill.seq_len = 40")
    # one document of 10 counts: the held-out or the KD part has none (and the warning about the rest is not said)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [long_prompt_chat(i) for i in range(9)] + [{"text": "x" * 60}])
    code, err = distill_cli(capsys, tmp_path / "c", f"distill.data = ('{mixed}',)", "distill.preferences = ()",
                            "distill.seq_len = 48")
    assert_one_line_error(code, err, "part (distill.split[", f"of distill.data ({mixed}): none of its")
    assert not any((tmp_path / w).exists() for w in "abc")


def test_bad_data_files_are_refused_before_any_work(tmp_path, capsys):
    """Every data file is read before the teacher trains: a DPO file missing a field, a record without text, a
    file that is not UTF-8."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "B."},
                                                   {"prompt": "Q?", "chosen": "A."}])
    code, err = distill_cli(capsys, tmp_path / "w", f"distill.preferences = ('{prefs}',)")
    assert_one_line_error(code, err, f"{prefs}:2: a preference record needs 'prompt', 'chosen' and 'rejected' "
                                     "(missing 'rejected')")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine"}, {"txt": "typo"}])
    code, err = distill_cli(capsys, tmp_path / "w", f"distill.data = ('{bad}',)")
    assert_one_line_error(code, err, f"{bad}:3: a record needs 'text' (a string) or 'messages'")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, err = distill_cli(capsys, tmp_path / "w", f"distill.data = ('{latin1}',)")
    assert_one_line_error(code, err, f"{latin1}:2: not UTF-8 text (byte 0xe9 at byte offset 30)")
    assert not (tmp_path / "w").exists()


# -- the work directory: one run at a time, from the same data --------------------------------------
def test_a_second_run_is_refused_while_one_holds_the_workdir_and_kill_9_frees_it(child_process, tmp_path, capsys):
    workdir = tmp_path / "w"
    holder = child_process.python("-c", "import sys, time\nfrom zebrax.distill.workdir import locked\n"
                                  "with locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n",
                                  workdir, wait=False)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = distill_cli(capsys, workdir)
        assert_one_line_error(code, err, f"{workdir}: in use by another run (pid {holder.pid} on "
                                         f"{socket.gethostname()})")
        assert [p.name for p in workdir.iterdir()] == [".lock"]  # nothing written
    finally:
        holder.kill()  # SIGKILL: the lock ends with the process
        holder.wait()
    from zebrax.distill.workdir import locked

    with locked(workdir):
        assert (workdir / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        code, err = distill_cli(capsys, workdir)  # this process holds it now: a second run of its own is refused
        assert_one_line_error(code, err, f"in use by another run (pid {os.getpid()} on")


def test_a_data_file_changed_since_is_refused_on_resume(tmp_path, capsys, monkeypatch):
    """The work directory records each data file's SHA-256; the same path with other content is another
    experiment (its stages and eval.json would be stale). The stages are stubbed: this is about the record."""
    from zebrax.distill import stages

    monkeypatch.setattr(stages, "run_stages", lambda run: {})
    data = tmp_path / "prompts.jsonl"
    data.write_bytes((ROOT / "configs/data/prompts.jsonl").read_bytes())
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_bytes((ROOT / "configs/data/tiny_preferences.jsonl").read_bytes())
    bindings = (f"distill.data = ('{data}',)", f"distill.preferences = ('{prefs}',)")
    workdir = tmp_path / "w"
    assert distill_cli(capsys, workdir, *bindings)[0] == 0
    recorded = json.loads((workdir / "data_sha256.json").read_text())
    assert set(recorded) == {str(data), str(prefs)}
    assert distill_cli(capsys, workdir, *bindings)[0] == 0  # the same data: resumed
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    for changed in (data, prefs):
        original = changed.read_bytes()
        changed.write_bytes(original.replace(b"the", b"a", 1))
        code, err = distill_cli(capsys, workdir, *bindings)
        assert_one_line_error(code, err, f"{workdir}: written from other data ({changed}: sha256 "
                                         f"{recorded[str(changed)][:12]} there,", "use another --workdir")
        assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
        changed.write_bytes(original)


def test_a_teacher_replaced_at_its_path_is_another_teacher(tmp_path, capsys, monkeypatch, smollm2_tokenizer):
    """The work directory records the teacher by its content (``checkpoint.content_sha256``): the same path holding
    other weights is refused on resume, as a changed data file is; so is its key for shared stages. The stages are
    stubbed: this is about the record."""
    import shutil

    from tests.helpers import TEACHER, model_params
    from zebrax.distill import stages

    monkeypatch.setattr(stages, "run_stages", lambda run: {})

    def teacher(seed):
        with checkpoint.writing(tmp_path / "t", overwrite=True) as tmp:
            checkpoint.save(tmp, TEACHER, model_params(TEACHER, seed))
            shutil.copytree(smollm2_tokenizer, tmp / "tokenizer")
        return checkpoint.content_sha256(tmp_path / "t")

    first = teacher(0)
    workdir, binding = tmp_path / "w", f"distill.teacher = '{tmp_path / 't'}'"
    assert distill_cli(capsys, workdir, binding)[0] == 0
    assert json.loads((workdir / "data_sha256.json").read_text())[str(tmp_path / "t")] == first
    assert teacher(0) == first  # written again, the same weights: the same teacher
    assert distill_cli(capsys, workdir, binding)[0] == 0
    second = teacher(1)
    code, err = distill_cli(capsys, workdir, binding)
    assert_one_line_error(code, err, f"written from other data ({tmp_path / 't'}: sha256 {first[:12]} there, "
                                     f"{second[:12]} now: its content has changed)")


def test_smarts_shared_placement_is_keyed_by_the_held_out_split():
    """Without ILD, SMART's scores are of the held-out part the split makes: two experiments that differ in
    distill.split share the teacher and the students, never smart.json."""
    from types import SimpleNamespace

    from zebrax.distill import stages

    names = ("teacher", "students", "smart", "hybrid", "kd")
    keys = []
    for split in ((0.1, 0.2, 0.7), (0.2, 0.2, 0.6)):
        exp = Experiment(stages=names, split=split)
        run = stages.Run(exp, Path("w"), SimpleNamespace(hashes={}), stages.plan(names))
        keys.append({s.name: run.key(s) for s in run.stages})
    assert keys[0]["students"] == keys[1]["students"] and keys[0]["smart"] != keys[1]["smart"]


def test_the_main_job_measures_the_benchmark_again_when_its_settings_change(tmp_path, monkeypatch, capsys):
    """``zebrax run`` with other ``run.bench_*`` settings than the benchmark in the work directory measures again
    (the benchmark holds no training) and the report shows the new contexts; the same settings reuse it. The
    distillation is stubbed by a finished work directory of tiny random models, and the answers too: this is about
    the benchmark step."""
    from tests.helpers import random_model
    from zebrax.app import job
    from zebrax.config import LlamaConfig

    workdir = tmp_path / "tiny"
    teacher = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    hybrid = from_teacher(teacher, mla_layers=[0], kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=8,
                                       rope_factor=1.0, mamba2={"chunk_size": 8})
    for name, config in (("teacher", teacher), ("kd", hybrid)):
        (workdir / name).mkdir(parents=True)
        checkpoint.save(workdir / name, config, random_model(config).params)
    evals = {k: {"kl": 0.5, "perplexity": 2.0, "tokens": 10} for k in ("teacher", "initialised", "after_kd")}
    (workdir / "eval.json").write_text(json.dumps(evals))
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "kd", "loss": 1.0,
                                                       "tokens_per_sec": 1.0}) + "\n")
    (workdir / "smart.json").write_text(json.dumps({"scores": [0.0, 0.0], "mla_layers": [0], "kl_all_mamba2": 1.0}))
    (workdir / "stages.json").write_text(json.dumps([{"stage": "hybrid", "evaluates": ["initialised", "after_ild"]},
                                                     {"stage": "kd", "evaluates": ["after_kd"]}]))
    row = {"model": "teacher", "context": 8, "batch": 1, "prefill_s": 0.1, "decode_tokens_per_s": 1.0}
    (workdir / "bench_decode.json").write_text(json.dumps({"rows": [row], "settings": {
        "contexts": [8], "batches": [1], "new_tokens": 2, "repeats": 1}}))  # an earlier run's
    from zebrax.distill import pipeline

    monkeypatch.setattr(pipeline, "run", lambda exp, workdir, config_text=None: evals)
    monkeypatch.setattr(job, "answer", lambda model, prompt, max_new_tokens: "")

    def main_job() -> str:
        capsys.readouterr()
        job.run(pipeline.Experiment(), "tiny", str(tmp_path), bench_contexts=(16,), bench_batches=(2,),
                bench_new_tokens=2, bench_repeats=1, needle_lengths=(), positions_length=0)
        return capsys.readouterr().err

    err = main_job()
    assert (f"{workdir / 'bench_decode.json'} was measured with other settings (contexts [8] there, [16] now; batches "
            "[1] there, [2] now); measuring again (the benchmark holds no training)") in err, err
    rows = json.loads((workdir / "bench_decode.json").read_text())["rows"]
    assert {(r["model"], r["context"], r["batch"]) for r in rows} == {("teacher", 16, 2), ("hybrid", 16, 2)}
    report = (workdir / "report.md").read_text()
    assert "| teacher | 16 | 2 |" in report and "| teacher | 8 | 1 |" not in report
    written = (workdir / "bench_decode.json").stat().st_mtime_ns
    err = main_job()  # the same settings: reused
    assert f"3/6 decode benchmark: {workdir / 'bench_decode.json'} is there" in err, err
    assert (workdir / "bench_decode.json").stat().st_mtime_ns == written


def test_the_reports_long_context_section_reads_its_measurements(tmp_path):
    """``long_context.json`` → the needle table (mean accuracy over the depths, the mean log-probability beside it)
    and the loss table by bin; a run that measured none has no section."""
    from zebrax.app.report import _long_context

    assert _long_context(tmp_path) == []
    maps = {name: {"lengths": [512, 1024], "depths": [0.0, 1.0], "samples": 1, "accuracy": acc,
                   "logprob": [[-0.5, -1.5], [-2.0, -4.0]]}
            for name, acc in (("teacher", [[1.0, 1.0], [1.0, 0.0]]), ("hybrid", [[0.0, 1.0], [0.0, 0.0]]))}
    curves = {name: {"length": 8, "documents": 2, "edges": [1, 2, 4, 8], "nll": nll}
              for name, nll in (("teacher", [5.0, 4.0, 3.0]), ("hybrid", [5.5, 4.5, 4.25]))}
    (tmp_path / "long_context.json").write_text(json.dumps({"needle": maps, "positions": curves}))
    text = "\n".join(_long_context(tmp_path))
    assert "| 512 | 100% (-1.00) | 50% (-1.00) |" in text and "| 1,024 | 50% (-3.00) | 0% (-3.00) |" in text
    assert "| 4–7 | 3.000 | 4.250 |" in text and "| 1 | 5.000 | 5.500 |" in text and "1 needle a cell" in text
    assert "![needle maps](needle.png)" in text

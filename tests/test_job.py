"""The main job (`zebrax run`) end to end on the tiny experiment: convert-free tiny teacher → ILD → SMART → KD → DPO →
evaluation → decode benchmark → sample answers → report.md with its plots; a second run reuses every finished step.
fp32, CPU."""

from __future__ import annotations

import json
from pathlib import Path

from zebrax.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = str(ROOT / "configs" / "experiments" / "tiny_run.gin")
SHORT = ["teacher/TrainConfig.steps = 40", "ild/TrainConfig.steps = 8", "kd/TrainConfig.steps = 16",
         "dpo/TrainConfig.steps = 4", "run.bench_contexts = (32, 128)"]


def test_main_job_on_the_tiny_experiment_writes_its_report_and_reuses_finished_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the experiment's data paths are relative to the repository
    args = ["run", TINY_RUN, "--gin", f"run.root = '{tmp_path}'"]
    for binding in SHORT:
        args += ["--gin", binding]
    assert main(args) == 0
    out = capsys.readouterr().out
    w = tmp_path / "tiny"
    evals = json.loads((w / "eval.json").read_text())
    assert evals["after_dpo"]["kl"] < evals["initialised"]["kl"]
    report = (w / "report.md").read_text()
    for png in ("loss.png", "smart.png", "decode.png"):  # the plots exist, are PNGs, and the report shows them
        assert (w / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    # measured numbers, read from the run's files
    assert f"**{evals['after_dpo']['kl']:.3f}** after dpo" in report
    assert f"| after kd | {evals['after_kd']['kl']:.4f} | {evals['after_kd']['perplexity']:,.2f} |" in report
    bench = json.loads((w / "bench_decode.json").read_text())
    assert {(r["model"], r["context"], r["batch"]) for r in bench["rows"]} == {
        (m, c, b) for m in ("teacher", "hybrid") for c in (32, 128) for b in (1, 4)}
    resolved = [r for r in bench["rows"] if r["decode_tokens_per_s"] is not None]  # None: lost in timing noise
    assert len(resolved) >= 4 and all(r["decode_tokens_per_s"] > 0 for r in resolved)
    row = resolved[-1]
    assert (f"| {row['model']} | {row['context']} | {row['batch']} | {row['prefill_s']:.2f} | "
            f"{row['decode_tokens_per_s']:.1f} |") in report
    smart = json.loads((w / "smart.json").read_text())
    assert str(smart["mla_layers"]) in report and "**teacher:**" in report and "**hybrid:**" in report
    assert "KL(teacher ‖ hybrid)" in out and f"report: {w / 'report.md'}" in out
    steps = json.loads((w / "job.json").read_text())["steps"]
    assert set(steps) == {"distill", "bench", "answers"}

    bench_mtime = (w / "bench_decode.json").stat().st_mtime
    assert main(args) == 0  # everything reused: no training, no benchmark
    err = capsys.readouterr().err
    assert "3/5 decode benchmark: " in err and "is there" in err and "ILD:" not in err and "KD:" not in err
    assert (w / "bench_decode.json").stat().st_mtime == bench_mtime
    assert json.loads((w / "job.json").read_text())["steps"]["distill"] == steps["distill"]

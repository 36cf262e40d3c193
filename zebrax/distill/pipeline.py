"""The Zebra-Llama pipeline in one resumable run (METHOD §6): teacher → all-MLA and all-linear students → ILD (both
students in one step) → SMART on held-out rows → the assembled hybrid → KD → DPO (when preference data is given).
Each is a stage of ``zebrax.distill.stages``; an ``Experiment`` lists the ones it runs (``Experiment.stages``).

Everything that can be checked from the settings and the files is checked before any work: the ``Experiment``'s
fields (``experiment.py``), the teacher's config and tokenizer, the students' configs, SMART's placement, the mesh,
and every data file (records, and the tokens their loss counts once cut to ``seq_len``: ``inputs.py``). Everything
then lands in one work directory, which one run at a time holds (``workdir.py``):

    experiment.json          the run's ``Experiment`` (config.gin: its gin form); another is refused if it changes a
                             stage begun (``stages.disagreement``), and takes over if it adds later stages
    data_sha256.json         the SHA-256 of every data file read; a file changed since is refused
    .lock                    held (``flock``) by the run in progress; it names the process
    teacher/                 the teacher made for ``teacher="tiny"`` (a random tiny Llama)
    checkpoints/STAGE/       orbax checkpoints of the stage in progress (params, optimizer, data position),
                             removed once the stage's output is written
    ild/{mla,linear}/        the ILD-trained students        (zebrax checkpoints, each written atomically)
    stages.json              the stages the run follows, in order, each with its settings (``stages``)
    smart.json               SMART's scores and the MLA layers
    hybrid/  kd/  dpo/       the assembled hybrid, and after KD and DPO
    eval.json                KL(teacher ‖ model) and perplexity on the held-out rows, per model
    metrics.jsonl            one line per logged step; tensorboard/STAGE/ event files

``WORKDIR`` may be an object store's URI (``gs://bucket/run``, with ``pip install zebrax[gcs]``): there a stage's
output is written in place and finished once its ``commit_success.txt`` is (``files.committed``), metrics.jsonl
is rewritten whole at each log, and nothing locks the directory.

A finished stage is one whose output exists; re-running the same command skips it and resumes the stage in
progress from its latest complete checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from zebrax import files
from zebrax.distill import stages as stage_list
from zebrax.distill.experiment import Experiment
from zebrax.distill.inputs import prepare
from zebrax.distill.workdir import claimed, write_text


def run(exp: Experiment, workdir: str | os.PathLike, *, config_text: str | None = None,
        shared: str | os.PathLike | None = None) -> dict:
    """Run (or resume) every stage; returns ``eval.json``'s content. ``config_text``: the resolved gin config, written
    to ``WORKDIR/config.gin``; ``shared``: a directory of stages finished by runs that agree on them
    (``stages.Run.reuse``). Everything is checked (``inputs.prepare``) before the work directory is touched."""
    workdir = files.as_path(workdir)
    with files.warnings_after_success():  # a refused experiment says one thing, why
        inputs = prepare(exp)
    with claimed(workdir, exp, inputs.hashes, stage_list.disagreement):
        if config_text is not None:
            write_text(workdir / "config.gin", config_text)
        return stage_list.run_stages(stage_list.Run(exp, workdir, inputs, stage_list.plan(exp.plan()),
                                                    shared=None if shared is None else Path(shared)))

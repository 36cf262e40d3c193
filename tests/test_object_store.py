"""Work directories and checkpoints on an object store (``gs://``), against a local GCS server (tests/gcs_emulator.py:
not a POSIX directory; objects, generations and preconditions, no rename): a stage output is committed by its last
object and a half-written one is replaced, checkpoints round-trip, and `zebrax distill` killed with SIGKILL in its KD
resumes there to the numbers of an uninterrupted local run. fp32, CPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.gcs_emulator import environment
from zebrax import checkpoint, files
from zebrax.config import LlamaConfig
from zebrax.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "zebrax-test"
TINY = str(ROOT / "configs" / "experiments" / "tiny_cpu.gin")
# tests/test_distill.py's run: KD long enough to be killed in its middle
SHORT = ["teacher/TrainConfig.steps = 40", "ild/TrainConfig.steps = 8", "ild/TrainConfig.checkpoint_every = 4",
         "kd/TrainConfig.steps = 40", "kd/TrainConfig.checkpoint_every = 4", "kd/TrainConfig.log_every = 2",
         "dpo/TrainConfig.steps = 4"]


@pytest.fixture(scope="session")
def gcs():
    """``new() -> 'gs://zebrax-test/<fresh prefix>'`` on a GCS server of this session (its environment set for this
    process and the children it starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.devnull, "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
                              stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, "the GCS server did not start"
            time.sleep(0.05)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in environment(url).items():
            mp.setenv(k, v)
        yield lambda: f"gs://{BUCKET}/{uuid.uuid4().hex[:8]}"
    server.kill()
    server.wait()
    log.close()


CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)


def _params():
    import flax.linen as nn

    from zebrax.models import build

    return nn.unbox(build(CONFIG).init(jax.random.key(0), np.zeros((1, 4), np.int32)))["params"]


def _flat(tree):
    from flax.traverse_util import flatten_dict

    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}


def test_an_object_store_that_cannot_be_reached_is_one_line_at_once(capsys, monkeypatch):
    """No server where the store should be: `zebrax distill --workdir gs://…` says so in one line within seconds
    (gcsfs alone retried for about a minute, logging every retry's traceback)."""
    from tests.helpers import assert_one_line_error
    from zebrax.app.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    code = main(["distill", "--gin_file", TINY, "--workdir", f"gs://{BUCKET}/w"])
    assert_one_line_error(code, capsys.readouterr().err, f"gs://{BUCKET}/w: cannot reach the object store at "
                                                         f"http://127.0.0.1:{port} (Connection refused)")
    assert time.monotonic() - start < 15


def test_a_stage_output_on_an_object_store_is_committed_last_and_round_trips(gcs, tmp_path):
    root = gcs()
    dst = f"{root}/kd"
    params = _params()
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"x": 1}')
    with files.atomic_directory_of_all(dst, what="stage output") as d:
        assert str(d) == dst
        checkpoint.save(d, CONFIG, params)
        files.copy_tree(tmp_path / "tok", d / "tokenizer")
        assert not files.committed(dst)  # written in place, not yet whole
    assert files.committed(dst)
    assert checkpoint.load_config(dst) == CONFIG
    restored = checkpoint.load_params(dst, CONFIG)
    a, b = _flat(params), _flat(restored)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (checkpoint.tokenizer_dir(dst) / "tokenizer.json").read_text() == '{"x": 1}'  # downloaded
    with pytest.raises(CheckpointError, match="already exists"):
        with files.atomic_directory_of_all(dst, what="stage output"):
            pass


def test_what_a_killed_writer_left_on_an_object_store_is_not_committed_and_is_replaced(gcs):
    dst = f"{gcs()}/ild"
    with pytest.raises(RuntimeError):
        with files.atomic_directory_of_all(dst, what="stage output") as d:
            (d / "stale.txt").write_text("half of a stage output")
            raise RuntimeError("killed")
    assert not files.committed(dst) and (files.as_path(dst) / "stale.txt").exists()
    with files.atomic_directory_of_all(dst, what="stage output") as d:
        (d / "whole.txt").write_text("all of it")
    assert sorted(p.name for p in files.as_path(dst).iterdir()) == [files.COMMITTED, "whole.txt"]


def test_records_on_an_object_store_are_written_whole_and_removed(gcs):
    root = gcs()
    files.write_text_atomic(f"{root}/smart.json", '{"mla_layers": [0]}')
    assert files.as_path(f"{root}/smart.json").read_text() == '{"mla_layers": [0]}'
    files.remove_tree(root)
    files.remove_tree(root)  # absent: nothing to do
    assert not files.as_path(root).exists()


def _logged(workdir) -> list[dict]:
    """metrics.jsonl's rows; a last line cut off by a read racing the writer's next upload is left out."""
    path = files.as_path(workdir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def _losses(workdir) -> list[tuple]:
    return [tuple(sorted((k, v) for k, v in row.items() if k != "tokens_per_sec")) for row in _logged(workdir)]


def _distill(child_process, workdir, wait=True):
    args = ["distill", "--gin_file", TINY, "--workdir", workdir]
    for binding in SHORT:
        args += ["--gin_param", binding]
    return child_process.zebrax(*args, wait=wait)


def test_a_run_on_an_object_store_killed_with_sigkill_resumes_to_the_numbers_of_a_local_run(gcs, child_process,
                                                                                             tmp_path):
    remote = gcs()
    proc = _distill(child_process, remote, wait=False)
    while not any(r["stage"] == "kd" and r["step"] >= 10 for r in _logged(remote)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not files.committed(f"{remote}/kd"), "the run finished KD before it could be killed"
    assert files.committed(f"{remote}/hybrid")
    local = _distill(child_process, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    resumed = _distill(child_process, remote)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(remote) == _losses(tmp_path / "local")  # number for number
    assert json.loads(resumed.stdout) == json.loads((tmp_path / "local" / "eval.json").read_text())
    smart = [json.loads(p.read_text()) for p in (files.as_path(f"{remote}/smart.json"),
                                                 tmp_path / "local" / "smart.json")]
    bucket, disk = ({k: v for k, v in s.items() if k != "seconds"} for s in smart)
    assert bucket == disk and bucket["mla_layers"]
    names = {p.name for p in files.as_path(remote).iterdir()}
    assert {"teacher", "ild", "hybrid", "kd", "dpo", "tensorboard", "experiment.json"} <= names
    assert not (files.as_path(remote) / "checkpoints" / "kd").exists()  # dropped once KD's output is whole
    # the hybrid loads and exports from the bucket as from a local directory: the same weights
    import zebrax

    tokens = np.arange(1, 17, dtype=np.int32)[None]
    np.testing.assert_array_equal(zebrax.load(f"{remote}/dpo").logits(tokens),
                                  zebrax.load(tmp_path / "local" / "dpo").logits(tokens))
    for src, dst in ((f"{remote}/dpo", tmp_path / "from_bucket"), (tmp_path / "local" / "dpo", tmp_path / "from_disk")):
        exported = child_process.zebrax("export", src, dst)
        assert exported.returncode == 0, exported.stderr[-2000:]
    from safetensors.numpy import load_file

    bucket, disk = (load_file(tmp_path / d / "model.safetensors") for d in ("from_bucket", "from_disk"))
    assert bucket.keys() == disk.keys() and all(np.array_equal(bucket[k], disk[k]) for k in disk)
    for name in {p.name for p in (tmp_path / "from_disk").iterdir()} - {"model.safetensors"}:
        assert (tmp_path / "from_bucket" / name).read_text() == (tmp_path / "from_disk" / name).read_text(), name

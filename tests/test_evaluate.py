"""`zebrax eval` and `zebrax.evaluate`: rolling windows predict every token once, streamed rows give the numbers of
stacked ones whatever the batch size, KL of a model to itself is 0, and bad input is one line. fp32, CPU."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from zebrax import checkpoint
from zebrax.cli import main
from zebrax.data import ByteCodec
from zebrax.distill.pipeline import TINY_TEACHER
from zebrax.evaluate import eval_rows, evaluate, windows
from zebrax.models import build

TEXT = "The river wound slowly through the valley.\n\nPast orchards heavy with apples and fields of grazing cattle."


@pytest.mark.parametrize("n, seq_len", [(1, 4), (2, 4), (4, 4), (5, 4), (11, 4), (100, 16), (16, 16)])
def test_windows_predict_every_token_but_the_first_once(n, seq_len):
    ids = list(range(n))
    predicted = [w[i + 1] for w in windows(ids, seq_len) for i in range(len(w) - 1)]
    assert predicted == ids[1:] and all(len(w) <= seq_len for w in windows(ids, seq_len))


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    module = build(TINY_TEACHER)
    params = jax.device_get(module.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"])
    import flax.linen as nn

    ckpt = tmp_path_factory.mktemp("eval") / "ckpt"
    with checkpoint.atomic_directory(ckpt) as tmp:
        checkpoint.save(tmp, TINY_TEACHER, nn.unbox(params))
    return ckpt, module, nn.unbox(params)


def test_streamed_rows_give_the_stacked_numbers_at_any_batch_size(byte_model, tmp_path):
    _, module, params = byte_model
    (tmp_path / "t.txt").write_text(TEXT)
    rows = list(eval_rows([tmp_path / "t.txt"], ByteCodec(), 24))
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    want = evaluate(module, params, stacked, batch_size=8)
    for batch_size in (1, 3):
        got = evaluate(module, params, iter(rows), batch_size=batch_size)
        assert got["rows"] == want["rows"] == len(rows) > 4 and got["predicted_tokens"] == want["predicted_tokens"]
        np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-6)
    assert want["predicted_tokens"] == sum(len(p.encode()) for p in TEXT.split("\n\n"))  # BOS + bytes, less one


def test_eval_command(byte_model, tmp_path, capsys):
    ckpt = str(byte_model[0])
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "o.json"
    assert main(["eval", ckpt, "--data", str(tmp_path / "t.txt"), "--teacher", ckpt, "--seq-len", "32",
                 "--batch-size", "2", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["kl"] == pytest.approx(0.0, abs=1e-6) and result["perplexity"] > 1 and result["rows"] == 4
    assert main(["eval", ckpt, "--data", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: no such data file" in capsys.readouterr().err

"""`zebrax eval` and `zebrax.evaluate`: rolling windows predict every token once, streamed rows give the numbers of
stacked ones whatever the batch size, KL of a model to itself is 0, and bad input is one line. fp32, CPU."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tests.helpers import assert_one_line_error
from zebrax import checkpoint
from zebrax.app.cli import main
from zebrax.data import LM_FIELDS, ByteCodec, DataError
from zebrax.distill.inputs import TINY_TEACHER
from zebrax.errors import InvalidArgument
from zebrax.evaluate import batch_sums, eval_rows, evaluate, windows
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


def test_parameters_in_memory_or_loaded_share_one_compiled_program(byte_model, tmp_path, caplog):
    """The pipeline evaluates a hybrid as assembled in memory, then as loaded (committed to the device): one
    program for both, the same numbers."""
    _, module, params = byte_model
    (tmp_path / "t.txt").write_text(TEXT)
    rows = list(eval_rows([tmp_path / "t.txt"], ByteCodec(), 24))
    rows = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    loaded = jax.device_put(params, jax.devices()[0])
    batch_sums.cache_clear()  # a new jitted function: compiled here, whatever ran before
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        first, second = (evaluate(module, p, rows, teacher=module, teacher_params=p) for p in (params, loaded))
    assert sum("Compiling jit(sums)" in r.getMessage() for r in caplog.records) == 1
    assert first == second


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


def test_nothing_counted_is_an_error_naming_the_data(byte_model, tmp_path, capsys):
    """Empty texts, or chat replies that start past --seq-len, leave no token to predict: one line naming the data
    (`evaluate` refuses it for every caller), never a perplexity of 1."""
    ckpt = str(byte_model[0])
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    chat = {"messages": [{"role": "user", "content": "a question longer than the window"},
                         {"role": "assistant", "content": "an answer"}]}
    (tmp_path / "late.jsonl").write_text(json.dumps(chat) + "\n")
    for data, seq_len in (("empty.jsonl", "32"), ("late.jsonl", "16")):
        capsys.readouterr()
        code = main(["eval", ckpt, "--data", str(tmp_path / data), "--seq-len", seq_len])
        assert_one_line_error(code, capsys.readouterr().err, str(tmp_path / data), "no token was counted")
    _, module, params = byte_model
    rows = {k: np.stack([r[k] for r in eval_rows([tmp_path / "empty.jsonl"], ByteCodec(), 8)]) for k in LM_FIELDS}
    with pytest.raises(DataError, match="no token was counted in the rows"):
        evaluate(module, params, rows)


def test_eval_refuses_bad_flags_before_any_work(byte_model, tmp_path, capsys):
    """Each bad value is one line naming the flag and the value, found before the model is read; nothing is
    written."""
    ckpt = str(byte_model[0])
    (tmp_path / "t.txt").write_text(TEXT)
    for flag, value in (("--max-rows", "-1"), ("--batch-size", "0"), ("--seq-len", "0"), ("--seq-len", "1"),
                        ("--out", str(tmp_path / "missing" / "o.json")), ("--out", str(tmp_path))):
        capsys.readouterr()
        code = main(["eval", ckpt, "--data", str(tmp_path / "t.txt"), flag, value])
        assert_one_line_error(code, capsys.readouterr().err, flag, value)
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    _, module, params = byte_model
    rows = list(eval_rows([tmp_path / "t.txt"], ByteCodec(), 24))
    with pytest.raises(InvalidArgument, match="batch_size=0"):
        evaluate(module, params, iter(rows), batch_size=0)
    with pytest.raises(InvalidArgument, match="seq_len=1"):
        list(eval_rows([tmp_path / "t.txt"], ByteCodec(), 1))

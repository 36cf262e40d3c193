"""SMART: placement against brute force, the released lists, scores against one model per candidate (fp32), one
compilation for all L + 1 passes, calibration data, assembly, and the commands."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import jax
import numpy as np
import pytest

import zebrax
from tests.helpers import TEACHER, hybrid, random_model
from zebrax import select
from zebrax.errors import ConfigError, InvalidArgument
from zebrax.init import assemble, init_hybrid


def brute_force(scores, n, first, last):
    """Every placement that keeps the rules, and the best total."""
    u = (last - first) / (n - 1)
    gaps = {math.floor(u), math.ceil(u)}
    valid = [c for c in itertools.combinations(range(first, last + 1), n)
             if c[0] == first and c[-1] == last and all(b - a in gaps for a, b in itertools.pairwise(c))]
    return valid, max(sum(scores[i] for i in c) for c in valid)


@pytest.mark.parametrize("n_layers, n", [(12, 4), (16, 4), (13, 5), (10, 2), (16, 8), (9, 9 - 1)])
def test_placement_keeps_the_rules_and_finds_the_best_total(rng, n_layers, n):
    for _ in range(20):
        scores = rng.normal(size=n_layers).tolist()
        got = select.place(scores, n)
        valid, best = brute_force(scores, n, 0, n_layers - 2)
        assert tuple(got) in valid and math.isclose(sum(scores[i] for i in got), best, rel_tol=1e-12)


@pytest.mark.parametrize("n_layers, released", [
    (16, [0, 5, 10, 14]), (28, [0, 5, 10, 16, 21, 26]), (32, [0, 4, 8, 12, 16, 20, 25, 30]),
    (16, list(range(0, 16, 2))), (28, list(range(0, 28, 2))), (32, list(range(0, 32, 2))),
])
def test_the_released_smart_lists_keep_the_rules_and_are_reachable(n_layers, released):
    n, last = len(released), n_layers - 2
    u = last / (n - 1)
    assert released[0] == 0 and released[-1] == last
    assert {b - a for a, b in itertools.pairwise(released)} <= {math.floor(u), math.ceil(u)}
    assert select.place([1.0 if i in released else 0.0 for i in range(n_layers)], n) == released


def test_placement_refuses_impossible_requests():
    with pytest.raises(InvalidArgument, match="num_mla=20 must be in 1..15"):
        select.place([0.0] * 16, 20)
    with pytest.raises(InvalidArgument, match="first=5 <= last=3"):
        select.place([0.0] * 16, 2, first=5, last=3)
    assert select.place([0.0] * 16, 1, first=3) == [3]


@pytest.fixture(scope="module")
def students():
    """A tiny teacher and its two students, initialised from it (all-MLA by SVD, all-Mamba2 from attention)."""
    teacher = random_model(TEACHER, seed=4)
    out = {}
    for kind, config in (("mla", hybrid("all")), ("mamba2", hybrid("none"))):
        params, _ = init_hybrid(TEACHER, teacher.params, config, jax.random.key(1))
        out[kind] = zebrax.Model(config, params)
    return teacher, out["mla"], out["mamba2"]


def test_scores_equal_one_assembled_model_per_candidate_with_one_compilation(students, rng):
    teacher, mla, mamba = students
    tokens = rng.integers(0, 97, (3, 24)).astype(np.int32)
    result = select.scores(teacher, mla, mamba, tokens)
    assert result["compilations"] == 1 and len(result["scores"]) == 5 and result["tokens"] == 72
    want_logp = jax.nn.log_softmax(teacher.logits(tokens))

    def kl(model):
        logp = jax.nn.log_softmax(model.logits(tokens))
        return float(np.mean(np.sum(np.exp(want_logp) * (want_logp - logp), axis=-1)))

    assert math.isclose(result["kl_all_linear"], kl(mamba), rel_tol=1e-4)
    for layer in range(5):  # each pass from its layer's input, the layers before it not run again
        config, params = assemble((mla.config, mla.params), (mamba.config, mamba.params), [layer])
        assert math.isclose(result["kl"][layer], kl(zebrax.Model(config, params)), rel_tol=1e-4)
        assert math.isclose(result["scores"][layer], result["kl_all_linear"] - result["kl"][layer], rel_tol=1e-12)


def test_assemble_takes_each_layer_from_its_student(students):
    _, mla, mamba = students
    config, params = assemble((mla.config, mla.params), (mamba.config, mamba.params), [0, 3],
                              embeddings_from="mla")
    assert config.layer_map() == "LSSLS"
    assert params["layers_0"] is mla.params["layers_0"] and params["layers_1"] is mamba.params["layers_1"]
    assert params["embed_tokens"] is mla.params["embed_tokens"]
    with pytest.raises(ConfigError, match="mla_student must be a hybrid of one attention kind in every layer"):
        assemble((mamba.config, mamba.params), (mamba.config, mamba.params), [0])
    with pytest.raises(ConfigError, match=r"mla_layers \[7\] are outside"):
        assemble((mla.config, mla.params), (mamba.config, mamba.params), [7])


def test_calibration_data_from_text_chat_or_ids(tmp_path, smollm2_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (
        {"text": "The quick brown fox jumps over the lazy dog. " * 4},
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]},
        {"input_ids": list(range(100, 140))},
    )))
    tokens = select.calibration_tokens(data, tokenizer, seq_len=16, num_sequences=5)
    assert tokens.shape == (5, 16) and tokens.dtype == np.int32
    with pytest.raises(InvalidArgument, match="fewer than 50 x 16"):
        select.calibration_tokens(data, tokenizer, seq_len=16, num_sequences=50)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(InvalidArgument, match=r"bad.jsonl:1: expected \"text\""):
        select.calibration_tokens(tmp_path / "bad.jsonl", tokenizer)


def test_select_and_assemble_commands(students, tmp_path, capsys):
    from zebrax import checkpoint
    from zebrax.app.cli import main

    teacher, mla, mamba = students
    for name, model in (("teacher", teacher), ("mla", mla), ("mamba", mamba)):
        with checkpoint.atomic_directory(tmp_path / name) as tmp:
            checkpoint.save(tmp, model.config, model.params)
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps({"input_ids": list(range(5 + i, 45 + i))})
                                                    for i in range(4)))
    assert main(["select", "--teacher", str(tmp_path / "teacher"), "--mla-student", str(tmp_path / "mla"),
                 "--linear-student", str(tmp_path / "mamba"), "--num-mla", "2", "--data", str(tmp_path / "calib.jsonl"),
                 "--seq-len", "16", "--num-sequences", "4", "--out", str(tmp_path / "scores.json")]) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert result["mla_layers"] == [0, 3] and result["compilations"] == 1 and len(result["kl"]) == 5
    assert main(["assemble", "--mla-student", str(tmp_path / "mla"), "--linear-student", str(tmp_path / "mamba"),
                 "--mla-layers", "0,3", str(tmp_path / "hybrid")]) == 0
    assert "layers LSSLS" in capsys.readouterr().out
    assert zebrax.load(tmp_path / "hybrid").config.layer_map() == "LSSLS"
    capsys.readouterr()
    assert main(["assemble", "--mla-student", str(tmp_path / "mamba"), "--linear-student", str(tmp_path / "mamba"),
                 "--mla-layers", "0", str(tmp_path / "bad")]) == 1
    assert "must be a hybrid of one attention kind" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("field, value", [("hidden_act", "gelu_pytorch_tanh"), ("rms_norm_eps", 1e-6)])
def test_students_that_differ_outside_their_mixers_are_refused(students, rng, field, value):
    """A hybrid runs every layer under one hidden_act, rms_norm_eps, …: students that differ in one are refused by
    assemble and by the scores, naming the field and both values (a GELU student's layers would run with SiLU)."""
    teacher, mla, mamba = students
    ours = getattr(mla.config, field)
    other = dataclasses.replace(mla.config, **{field: value})
    needle = re.escape(f"{field}: {value!r} (mla_student) vs {ours!r} (linear_student)")
    with pytest.raises(ConfigError, match=needle):
        assemble((other, mla.params), (mamba.config, mamba.params), [0])
    with pytest.raises(ConfigError, match=needle):
        select.scores(teacher, zebrax.Model(other, mla.params), mamba, rng.integers(0, 97, (1, 8)).astype(np.int32))
    with pytest.raises(ConfigError, match=re.escape(f"{field}: {ours!r} (mla_student) vs {value!r} (linear_student)")):
        assemble((mla.config, mla.params), (dataclasses.replace(mamba.config, **{field: value}), mamba.params), [0],
                 embeddings_from="mla")


@pytest.mark.parametrize("ids, shown", [([5, 1.9, 7], "1.9"), ([5, "6"], "'6'"), ([True, 4], "True")])
def test_calibration_ids_must_be_integers(tmp_path, ids, shown):
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"input_ids": list(range(10))}) + "\n" + json.dumps({"input_ids": ids}) + "\n")
    with pytest.raises(InvalidArgument, match=re.escape(f"calib.jsonl:2: input_ids holds {shown}; token ids are")):
        select.calibration_tokens(data, None, seq_len=4, num_sequences=3)


def test_assemble_and_select_commands_refuse_unlike_students_and_float_ids(students, tmp_path, capsys):
    from tests.helpers import assert_nothing_left, assert_one_line_error
    from zebrax import checkpoint
    from zebrax.app.cli import main

    teacher, mla, mamba = students
    gelu = dataclasses.replace(mla.config, hidden_act="gelu")
    for name, config, params in (("teacher", teacher.config, teacher.params), ("mla", gelu, mla.params),
                                 ("mamba", mamba.config, mamba.params)):
        with checkpoint.atomic_directory(tmp_path / name) as tmp:
            checkpoint.save(tmp, config, params)
    capsys.readouterr()
    code = main(["assemble", "--mla-student", str(tmp_path / "mla"), "--linear-student", str(tmp_path / "mamba"),
                 "--mla-layers", "0,3", str(tmp_path / "hybrid")])
    assert_one_line_error(code, capsys.readouterr().err, "hidden_act: 'gelu' (mla_student) vs 'silu' (linear_student)")
    assert_nothing_left(tmp_path / "hybrid")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"input_ids": [float(i) + 0.9 for i in range(64)]}) + "\n")
    code = main(["select", "--teacher", str(tmp_path / "teacher"), "--mla-student", str(tmp_path / "mla"),
                 "--linear-student", str(tmp_path / "mamba"), "--num-mla", "2", "--data", str(tmp_path / "calib.jsonl"),
                 "--seq-len", "16", "--num-sequences", "4", "--out", str(tmp_path / "scores.json")])
    assert_one_line_error(code, capsys.readouterr().err, "calib.jsonl:1: input_ids holds 0.9")
    assert not (tmp_path / "scores.json").exists()

"""Gated DeltaNet as a hybrid's linear kind: its initialisation from the teacher's attention, a hybrid built from a
Llama checkpoint that decodes as it prefills, and its export in zebrax's own layout, converted back to the same
logits. fp32."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from tests.helpers import TEACHER, hybrid, model_params
from zebrax.app import report
from zebrax.convert.export import export
from zebrax.errors import ConfigError
from zebrax.generate import Generator
from zebrax.mixers import kinds
from zebrax.mixers.gdn.init import gated_delta_from_attention


def test_gdn_is_one_registered_kind_of_its_own_folder():
    gdn = kinds()["gdn"]
    assert (gdn.letter, gdn.scope, gdn.op, gdn.hf_module, gdn.family) == ("D", "mixer", "gated_delta", "linear_attn",
                                                                         "linear")
    assert {gdn.module.__module__, gdn.config.__module__, gdn.from_attention.__module__, gdn.recipe.__module__} == {
        "zebrax.mixers.gdn.layer", "zebrax.mixers.gdn.config", "zebrax.mixers.gdn.init"}
    assert hybrid([0, 3], linear="gdn").layer_map() == "LDDLD"


def test_q_k_v_and_out_proj_are_the_teachers_and_the_rest_is_fresh():
    attn = model_params(TEACHER, 0)["layers_0"]["self_attn"]
    config = hybrid("none", linear="gdn")
    m = config.gdn
    params, report = gated_delta_from_attention(attn, config.attention, m, jax.random.key(3))
    assert report == {}
    for name in "qkv":
        np.testing.assert_array_equal(params[f"{name}_proj"]["kernel"], attn[f"{name}_proj"]["kernel"].reshape(48, -1))
    np.testing.assert_array_equal(params["out_proj"]["kernel"], attn["o_proj"]["kernel"])
    for name in ("g_proj", "a_proj", "b_proj"):  # PyTorch's Linear default
        assert 0 < np.abs(params[name]["kernel"]).max() <= 1 / math.sqrt(48)
    assert np.abs(params["conv_kernel"]).max() <= 1 / math.sqrt(m.conv_kernel)
    assert np.all((params["A_log"] >= 0) & (params["A_log"] <= math.log(16)))
    dt = np.log1p(np.exp(params["dt_bias"]))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))) and np.all(params["norm"]["scale"] == 1)
    again, _ = gated_delta_from_attention(attn, config.attention, m, jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, params, again)  # an explicit key decides everything
    with pytest.raises(ConfigError, match="k_heads=4 \\(needs 2\\)"):
        gated_delta_from_attention(attn, config.attention, dataclasses.replace(m, k_heads=4), jax.random.key(0))


def test_a_gdn_hybrid_builds_decodes_as_it_prefills_and_exports(tiny_llama, tmp_path, rng):
    teacher = tiny_llama("gqa_llama3_untied")[2]
    zebrax.build(teacher, tmp_path / "h", mla_layers=[0], linear="gdn", kv_lora_rank=8, gdn={"chunk_size": 8})
    model = zebrax.load(tmp_path / "h")
    assert set(model.config.mixers) == {"mla", "gdn"} and model.config.layer_map()[0] == "L"
    tokens = rng.integers(0, 200, (2, 19)).astype(np.int32)
    full = np.asarray(model.logits(tokens))
    gen = Generator(model.module)
    logits, cache = gen.prefill(model.params, tokens[:, :11], np.ones((2, 11), bool), max_len=19)
    tol = 1e-5 * np.abs(full).max()
    np.testing.assert_allclose(logits, full[:, 10], rtol=0, atol=tol)
    for i in range(11, 19):
        logits, cache = gen.decode_step(model.params, cache, jnp.asarray(tokens[:, i]))
        np.testing.assert_allclose(logits, full[:, i], rtol=0, atol=tol)

    export(tmp_path / "h", tmp_path / "exported")
    files = {p.name for p in (tmp_path / "exported").iterdir()}
    assert {"config.json", "zebra_hybrid.json", "model.safetensors"} <= files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
    assert "model.layers.1.linear_attn.q_proj.weight" in names and "model.layers.0.mla.kv_b_proj.weight" in names
    assert json.loads((tmp_path / "exported" / "zebra_hybrid.json").read_text())["mixers"][:2] == ["mla", "gdn"]
    zebrax.convert(tmp_path / "exported", tmp_path / "back")
    back = zebrax.load(tmp_path / "back")
    np.testing.assert_array_equal(np.asarray(back.logits(tokens)), full)



def test_a_gdn_hybrid_in_a_layout_that_cannot_hold_it_is_one_line(tmp_path, capsys):
    """AMD's and MambaInLlama's layouts hold no Gated DeltaNet, and transformers no hybrid: `zebrax export
    --format amd|mambainllama|hf` of a GDN hybrid says so in one line, and writes nothing."""
    from tests.helpers import WITH_GDN, assert_nothing_left, assert_one_line_error
    from zebrax import checkpoint
    from zebrax.app.cli import main

    with checkpoint.writing(tmp_path / "h") as tmp:
        checkpoint.save(tmp, WITH_GDN, model_params(WITH_GDN))
    for layout, message in (("amd", "the amd layout holds mamba2 and mla layers; this hybrid's LDALD has attention, "
                                    "gdn layers"),
                            ("mambainllama", "the mambainllama layout holds attention and mamba2 layers; this "
                                             "hybrid's LDALD has gdn, mla layers"),
                            ("hf", "format 'hf' is not one of ['amd', 'mambainllama', 'zebrax']")):
        code = main(["export", str(tmp_path / "h"), str(tmp_path / layout), "--format", layout])
        assert_one_line_error(code, capsys.readouterr().err, message)
        assert_nothing_left(tmp_path / layout)


def test_the_tiny_experiment_distils_a_gdn_hybrid(child_process, tmp_path):
    """`zebrax distill` on configs/experiments/tiny_gdn.gin (the tiny experiment, Gated DeltaNet for Mamba2), fewer
    steps: ILD and KD losses fall, SMART places MLA among GDN layers, the distilled hybrid is evaluated."""
    from tests.test_distill import TINY, metrics

    gin = TINY.replace("tiny_cpu.gin", "tiny_gdn.gin")
    args = ["distill", "--gin_file", gin, "--workdir", tmp_path / "w"]
    for binding in ("teacher/TrainConfig.steps = 40", "ild/TrainConfig.steps = 8", "kd/TrainConfig.steps = 20",
                    "dpo/TrainConfig.steps = 2"):
        args += ["--gin_param", binding]
    run = child_process.zebrax(*args)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = metrics(tmp_path / "w")
    for stage in ("ild", "kd"):
        logged = [r["loss"] for r in rows if r["stage"] == stage]
        assert len(logged) > 1 and logged[-1] < logged[0], (stage, logged)
    layers = zebrax.load(tmp_path / "w" / "hybrid").config.layer_map()
    assert sorted(set(layers)) == ["D", "L"] and layers.count("L") == 2, layers
    evals = json.loads(run.stdout)
    assert evals == json.loads((tmp_path / "w" / "eval.json").read_text())
    # the report names SMART's linear student by its kind
    text = report.write(tmp_path / "w", teacher=zebrax.load(tmp_path / "w" / "teacher"),
                        hybrid=zebrax.load(tmp_path / "w" / "hybrid"),
                        answers={"prompt": "Hi", "teacher": "Hello", "hybrid": "Hello"}, machine={}).read_text()
    assert "KL of the all-Gated DeltaNet student" in text and "all-Mamba2" not in text

"""A new mixer kind is its own folder plus one line: two throwaway kinds (``tests/kinds/``: ``ema``, linear; ``nope``,
attention-like), each registered by one ``zebrax.mixers.register`` call, build, run, decode, export and compile in a
hybrid, with nothing else of zebrax told about them. Logits float32; decoding is compared token for token."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import zebrax
from tests.kinds.ema.kind import KIND as EMA
from tests.kinds.nope.kind import KIND as NOPE
from zebrax import mixers
from zebrax.convert.export import export
from zebrax.errors import ConfigError

RECIPES = {"ema": dict(mla_layers=[0], linear="ema"),  # MLA at layer 0, the rest EMA
           "nope": dict(mla_layers=[0], layers={"nope": [1]})}  # MLA, NoPE, Mamba2


@pytest.fixture
def registered(monkeypatch):
    """Both kinds in the registry for the test, gone after it."""
    monkeypatch.setattr(mixers, "_KINDS", dict(mixers._KINDS))
    for kind in (EMA, NOPE):
        mixers.register(kind)


def greedy(model, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy continuation by whole forward passes, one a token: what a decode cache must reproduce."""
    tokens = prompt
    for _ in range(steps):
        tokens = np.concatenate([tokens, model.logits(tokens)[:, -1].argmax(-1)[:, None].astype(np.int32)], axis=1)
    return tokens


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_kind_of_its_own_folder_builds_runs_decodes_and_exports(registered, name, tiny_llama, tmp_path, rng):
    teacher = tiny_llama("gqa_llama3_untied")[2]
    zebrax.build(teacher, tmp_path / "h", kv_lora_rank=8, **RECIPES[name])
    model = zebrax.load(tmp_path / "h")
    assert name in model.config.mixers and mixers.kind(name).letter in model.config.layer_map()
    report = json.loads((tmp_path / "h" / "build_report.json").read_text())
    assert [r["mixer"] for r in report["layers"]] == list(model.config.mixers)

    prompt = rng.integers(0, 200, (2, 7)).astype(np.int32)
    logits = model.logits(prompt)
    assert logits.shape == (2, 7, 211) and np.isfinite(logits).all()
    out = model.generate(prompt, max_new_tokens=6, ignore_eos=True)  # prefill, then the decode cache
    np.testing.assert_array_equal(out, greedy(model, prompt, 6))
    # MLA caches its latent (8 + 6 values a token), NoPE its keys and values (2 × 2 heads × 12); EMA a state
    mla, nope = model.config.layers_of("mla"), model.config.layers_of("nope")
    assert model.cache_bytes_per_token() == 4 * (len(mla) * 14 + len(nope) * 48)
    if name == "ema":
        assert model.cache_state_bytes() == 4 * len(model.config.layers_of("ema")) * 6 * 12

    export(tmp_path / "h", tmp_path / "exported")  # zebrax's own layout: every kind under its hf_module
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exported" / "model.safetensors"), framework="numpy") as f:
        assert any(f".{mixers.kind(name).hf_module}." in key for key in f.keys())
    zebrax.convert(tmp_path / "exported", tmp_path / "back")
    back = zebrax.load(tmp_path / "back")
    assert back.config == model.config
    jax.tree.map(np.testing.assert_array_equal, back.params, model.params)


def test_the_kinds_are_known_only_while_registered(registered):
    assert {"ema", "nope"} <= set(mixers.kinds()) and mixers.ops()["ema"] == ("reference", "auto")
    with pytest.raises(ConfigError, match="its name 'ema' is taken by 'ema'"):
        mixers.register(EMA)


def test_an_unregistered_kind_is_refused():
    with pytest.raises(ConfigError, match="mixer 'ema' is not one of"):
        mixers.kind("ema")


@pytest.mark.parametrize("program", ["ild", "smart", "decode"])
def test_a_kind_of_its_own_folder_compiles_for_a_tpu(registered, tpu_compiler, program):
    """The linear kind's students for ILD and SMART, and the attention-like kind's decode step, on v5e-8."""
    from tests.helpers import TEACHER
    from zebrax.recipe import from_teacher

    small = dict(kv_lora_rank=12, q_lora_rank=24, qk_rope_head_dim=8)
    if program == "decode":
        report = tpu_compiler.compile("decode", topology="v5e-8", batch=8, context=256,
                                      model=from_teacher(TEACHER, **RECIPES["nope"], **small))
    else:
        report = tpu_compiler.compile(program, topology="v5e-8", teacher=TEACHER, batch=8, seq_len=64,
                                      student=from_teacher(TEACHER, **RECIPES["ema"], **small))
    assert report.fits and report.flops > 0

"""zebrax MLA models vs transformers' DeepseekV3ForCausalLM (dense) on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest

import zebrax
from tests.helpers import (
    TINY_DEEPSEEKS,
    assert_export_round_trip,
    assert_greedy_matches,
    assert_logits_match,
)
from zebrax.models import param_count

LOGIT_ATOL = 1e-4  # fp32, max |Δlogit|


@pytest.mark.parametrize("name", sorted(TINY_DEEPSEEKS))
def test_logits_match_transformers(tiny_deepseek, name, rng):
    hf, _, ckpt = tiny_deepseek(name)
    model = zebrax.load(ckpt)
    tokens = rng.integers(0, model.config.vocab_size, (2, 29))
    assert_logits_match(model, hf, tokens, LOGIT_ATOL)


@pytest.mark.parametrize("name", sorted(TINY_DEEPSEEKS))
def test_greedy_generation_with_the_absorbed_latent_cache_matches_transformers(tiny_deepseek, name, rng):
    hf, _, ckpt = tiny_deepseek(name)
    model = zebrax.load(ckpt)
    prompt = rng.integers(4, model.config.vocab_size, (2, 9))
    assert_greedy_matches(model, hf, prompt, 16)


def test_config_translation(tiny_deepseek):
    hf, _, ckpt = tiny_deepseek("q_lora_yarn")
    a = zebrax.load(ckpt).config.attention
    assert (a.q_lora_rank, a.kv_lora_rank, a.kv_groups, a.q_latent_norm, a.kv_latent_norm) == (20, 24, 4, True, True)
    assert a.rope_interleave and a.rope_scaling.rope_type == "yarn" and a.rope_scaling.mscale_all_dim == 1.0
    assert param_count(zebrax.load(ckpt).config) == sum(p.numel() for p in hf.parameters())


def test_export_round_trip(tiny_deepseek, tmp_path, rng):
    hf, _, ckpt = tiny_deepseek("full_q_bias_tied_bin")
    assert_export_round_trip(ckpt, hf, tmp_path / "hf", rng.integers(0, 90, (2, 11)))


def test_moe_checkpoints_are_refused(tiny_deepseek, tmp_path, capsys):
    import json
    import shutil

    from zebrax.app.cli import main

    src = shutil.copytree(tiny_deepseek("q_lora_yarn")[1], tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["first_k_dense_replace"] = 1
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "first_k_dense_replace=1" in err and "MoE" in err and not (tmp_path / "out").exists()

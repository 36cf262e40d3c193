"""The command line, end to end: info, generate, run, and `python -m zebrax` (the benchmarks: test_bench.py)."""

from __future__ import annotations

import json

import pytest

import zebrax
from tests.helpers import assert_one_line_error
from zebrax import checkpoint
from zebrax.app.cli import main
from zebrax.app.presets import CONFIGS, parse_gin, preset_config

TINY_CPU = str(CONFIGS / "experiments" / "tiny_cpu.gin")


def test_info_json_on_a_preset(capsys):
    assert main(["info", "llama3_1_8b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["num_hidden_layers"], info["params"]) == ("preset", 32, 8_030_261_248)
    assert info["cache_bytes_per_token"] == 131072 and info["cache_state_bytes"] == 0


def test_info_on_a_checkpoint(capsys, tiny_llama):
    _, _, ckpt = tiny_llama("gqa_llama3_untied")
    assert main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "cache_bytes_per_token: 576" in out  # 3 layers x (k, v) x 2 heads x 12 x 4 B


def test_info_on_mla_and_mamba2_checkpoints(capsys, tiny_deepseek, tiny_mamba2):
    assert main(["info", str(tiny_deepseek("q_lora_yarn")[2]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "deepseek_v3" and info["cache_bytes_per_token"] == 2 * (24 + 6) * 4
    assert main(["info", str(tiny_mamba2("groups2_bias")[2]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache_bytes_per_token"] == 0 and info["cache_state_bytes"] > 0


def test_info_on_something_unknown_lists_the_presets(capsys):
    assert main(["info", "llama9"]) == 1
    err = capsys.readouterr().err
    assert "llama9" in err and "llama3_1_8b" in err and len(err.strip().splitlines()) == 1


def test_generate_without_a_tokenizer_says_so(capsys, tiny_llama):
    assert main(["generate", str(tiny_llama("gqa_llama3_untied")[2]), "--prompt", "hi"]) == 1
    assert "no tokenizer" in capsys.readouterr().err


def test_misspelt_gin_binding_is_an_error_naming_it(capsys):
    assert main(["run", "--gin_param", "run.promt = 'x'"]) == 1
    assert "promt" in capsys.readouterr().err


def test_generate_prints_what_the_api_generates(tiny_chat, capsys):
    """A chat reply and a continuation, greedy and sampled (the embedded teacher's answers are checked through the
    API in tests/parity/test_smollm2_gguf.py)."""
    model = zebrax.load(tiny_chat)
    question = "What is the capital of Germany?"
    capsys.readouterr()
    assert main(["generate", str(tiny_chat), "--chat", "--prompt", question, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == model.chat(question, max_new_tokens=8) + "\n"
    prompt = model.encode("The capital of France is")
    for flags, kw in (([], {}), (["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"],
                                  dict(temperature=0.8, top_p=0.9, seed=3))):
        assert main(["generate", str(tiny_chat), "--prompt", "The capital of France is", "--max-new-tokens", "6",
                     *flags]) == 0
        out = model.generate([prompt], max_new_tokens=6, **kw)[0]
        assert capsys.readouterr().out == "The capital of France is" + model.decode(out[len(prompt):]) + "\n"


# a preset of the tiny teacher gqa_llama3_untied (3 layers, GQA 6/2, head_dim 12): MLA at 0, the rest Mamba2
TINY_PRESET = """
model.config = @zebra_hybrid()
zebra_hybrid.teacher = @LlamaConfig()
LlamaConfig.vocab_size = 211
LlamaConfig.hidden_size = 72
LlamaConfig.intermediate_size = 100
LlamaConfig.num_hidden_layers = 3
LlamaConfig.num_attention_heads = 6
LlamaConfig.num_key_value_heads = 2
LlamaConfig.head_dim = 12
zebra_hybrid.mla_layers = [0]
zebra_hybrid.kv_lora_rank = 16
zebra_hybrid.q_lora_rank = 32
zebra_hybrid.qk_rope_head_dim = 6
zebra_hybrid.rope_factor = 1.0
zebra_hybrid.mamba2 = {'chunk_size': 8}
"""


def test_build_lays_the_recipe_over_a_preset(tiny_llama, tmp_path, capsys):
    """`build --preset P --kv-lora-rank …` and `zebrax.build(config=preset, **recipe)`: what is given replaces the
    preset's, the rest stays the preset's; an override the teacher cannot take is one line."""
    teacher = tiny_llama("gqa_llama3_untied")[2]
    (tmp_path / "tiny.gin").write_text(TINY_PRESET)
    preset = str(tmp_path / "tiny.gin")
    assert main(["build", str(teacher), str(tmp_path / "a"), "--preset", preset, "--kv-lora-rank", "8",
                 "--mla-layers", "1,2", "--rope-factor", "2"]) == 0
    a = checkpoint.load_config(tmp_path / "a")
    assert a.layer_map() == "SLL" and (a.mla.kv_lora_rank, a.mla.rope_scaling.factor) == (8, 2.0)
    assert (a.mla.q_lora_rank, a.mla.qk_rope_head_dim, a.mamba2.chunk_size) == (32, 6, 8)  # the preset's

    zebrax.build(teacher, tmp_path / "b", config=preset_config(preset), qk_rope_head_dim=4, attention_layers=[2])
    b = checkpoint.load_config(tmp_path / "b")
    assert b.layer_map() == "LSA" and (b.mla.qk_rope_head_dim, b.mla.qk_nope_head_dim) == (4, 8)
    assert (b.mla.kv_lora_rank, b.mla.rope_scaling.factor, b.mamba2.chunk_size) == (16, 1.0, 8)

    capsys.readouterr()
    code = main(["build", str(teacher), str(tmp_path / "c"), "--preset", preset, "--kv-lora-rank", "999"])
    assert_one_line_error(code, capsys.readouterr().err, "kv_lora_rank=999")
    assert not (tmp_path / "c").exists()


@pytest.fixture
def no_pipeline(monkeypatch):
    """`zebrax distill` up to the pipeline: a test that reaches it fails at once instead of distilling."""
    from zebrax.distill import pipeline

    def run(*_, **__):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(pipeline, "run", run)


def test_a_binding_in_a_scope_nothing_uses_is_refused(capsys, tmp_path, no_pipeline):
    """`kdd/TrainConfig.steps = 10` (a --gin_param or a line of a gin file) would apply nowhere: one line naming the
    scope and the scopes the experiment uses, before anything runs."""
    (tmp_path / "mine.gin").write_text("include 'experiments/tiny_cpu.gin'\nteachr/TrainConfig.steps = 3\n")
    for gin in (["--gin_file", TINY_CPU, "--gin_param", "kdd/TrainConfig.steps = 10"],
                ["--gin_file", str(tmp_path / "mine.gin")]):
        capsys.readouterr()
        code = main(["distill", *gin, "--workdir", str(tmp_path / "w")])
        scope = "kdd" if "--gin_param" in gin else "teachr"
        assert_one_line_error(code, capsys.readouterr().err, f"{scope}/TrainConfig.steps", f"'{scope}'",
                              "dpo, ild, kd, teacher")
    assert not (tmp_path / "w").exists()


def test_every_shipped_gin_file_parses():
    """Experiments, stages and presets, each alone: their scopes are all used, their bindings all known."""
    from zebrax.config import HybridConfig

    files = sorted(CONFIGS.rglob("*.gin"))
    assert len(files) >= 20
    for f in files:
        parse_gin([f], [])
    assert parse_gin([TINY_CPU], ["kd/TrainConfig.steps = 10"]).config._CONFIG[("kd", "zebrax.TrainConfig")][
        "steps"] == 10
    hybrids = [preset_config(f.stem) for f in (CONFIGS / "models").glob("zebra-*.gin")]
    assert len(hybrids) == 8 and all(isinstance(c, HybridConfig) for c in hybrids)

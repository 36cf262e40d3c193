"""The benchmark commands (``zebrax bench forward|ssd|attention|train|decode|long-prompt``): each reports what it
says in JSON, on tiny models, one repeat. They time whole models several times over, so they are a tier of their own
(``benchmarks``), outside ``make test``; what the figures are on real models is docs/benchmarks.md's."""

from __future__ import annotations

import json

import zebrax
from zebrax.app.cli import main
from zebrax.recipe import from_teacher


def test_bench_forward_reports_both_implementations(tiny_llama):
    import zebrax
    from zebrax.app.bench import bench_forward

    result = bench_forward(zebrax.load(tiny_llama("tied_bias_bin")[2]), batch=1, seq_len=8, repeats=1)
    assert result["zebrax_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    gemms = result["gemm_gflops"]
    assert len(gemms) == 5 and all(g["xla"] > 0 and g["torch"] > 0 for g in gemms.values())
    json.dumps(result)


def test_bench_forward_of_a_hybrid_times_zebrax_alone(tmp_path, capsys):
    """transformers has no model of a hybrid: `zebrax bench forward` times zebrax's and says why it is alone."""
    from tests.helpers import MIXED, model_params
    from zebrax import checkpoint

    with checkpoint.writing(tmp_path / "h") as tmp:
        checkpoint.save(tmp, MIXED, model_params(MIXED))
    assert main(["bench", "forward", str(tmp_path / "h"), "--batch", "1", "--seq-len", "8", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["zebrax_tokens_per_s"] > 0 and result["transformers"] == "no transformers model of a HybridConfig"


def test_bench_train_reports_flops_against_the_matmul_peak(tiny_llama, capsys):
    ckpt = tiny_llama("gqa_llama3_untied")[2]
    assert main(["bench", "train", str(ckpt), "--batch", "2", "--seq-len", "16", "--steps", "2", "--num-mla", "1",
                 "--kv-lora-rank", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step_flops"] > 0 and result["compile_s"] > 0 and result["tokens_per_sec"] > 0
    assert 0 < result["fraction_of_matmul_peak"] < 2 and result["layers"].count("L") == 1


def test_bench_ssd_reports_every_impl_and_the_lm_ratio():
    from zebrax.app.bench import bench_ssd

    result = bench_ssd(lengths=(64,), repeats=1)
    assert set(result["op"][0]) >= {"reference_ms", "chunked_64_ms", "chunked_256_ms", "pallas_ms"}
    assert result["mamba2_lm_forward"][0]["speedup_vs_transformers"] > 0
    json.dumps(result)


def test_bench_attention_reports_the_three_decode_paths():
    from zebrax.app.bench import bench_attention

    result = bench_attention(contexts=(64,), repeats=1, prefill_len=32)
    row = result["decode"][0]
    assert {"gqa_tokens_per_s", "mla_absorbed_tokens_per_s", "mla_materialised_tokens_per_s"} <= set(row)
    assert row["gqa_cache_bytes_per_token"] == 2 * 8 * 64 * 4 and row["mla_absorbed_cache_bytes_per_token"] == 160 * 4
    assert result["prefill_attention"]["pallas_ms"] > 0
    json.dumps(result)


def test_bench_decode_times_every_model_and_plots(tiny_llama, tmp_path, capsys):
    """Teacher, its three hybrids and transformers' generate, one row each per (context, batch); caches add up;
    the plot is written; an unknown model or a bad NAME=CKPT is one line."""
    from zebrax.models import cache_sizes

    ckpt = str(tiny_llama("gqa_llama3_untied")[2])  # 3 layers, GQA 6/2
    assert main(["bench", "decode", ckpt, "--contexts", "24", "--batches", "2", "--num-mla", "1",
                 "--kv-lora-rank", "16", "--q-lora-rank", "32", "--qk-rope-head-dim", "4",
                 "--new-tokens", "24", "--repeats", "1", "--model", f"again={ckpt}", "--plot",
                 str(tmp_path / "d.png")]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "transformers", "zebra", "mamba2", "mambainllama", "again"}
    assert {r["batch"] for r in result["rows"]} == {2}
    assert [rows[m]["layers"] for m in ("teacher", "zebra", "mamba2", "mambainllama")] == ["AAA", "LSS", "SSS", "ASA"]
    t = rows["teacher"]
    assert t["cache_bytes"] == 2 * 24 * 3 * 2 * 2 * 12 * 4  # batch · context · layers · (K, V) · kv heads · dim · 4
    assert t["cache_bytes"] == rows["again"]["cache_bytes"]
    state = cache_sizes(from_teacher(zebrax.load(ckpt).config, mla_layers="none"))[1]
    assert rows["mamba2"]["cache_bytes"] == 2 * state > 0  # the state, per row, whatever the context
    assert t["decode_speedup_vs_teacher"] in (1.0, None) and t["bytes_limit_vs_teacher"] == 1.0
    assert all(r["peak_rss_bytes"] > 2**20 for r in result["rows"])  # Linux VmHWM, reset per model
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG" and result["plot"] == str(tmp_path / "d.png")
    assert main(["bench", "decode", ckpt, "--models", "teacher", "llama"]) == 1
    assert "unknown model 'llama'" in capsys.readouterr().err
    assert main(["bench", "decode", ckpt, "--model", "nameless"]) == 1
    assert "NAME=CKPT" in capsys.readouterr().err


def test_bench_long_prompt_prefills_in_chunks_in_a_fresh_process(tmp_path, capsys):
    """`bench long-prompt` on a tiny hybrid, a 40-token prompt prefilled 16 tokens at a time: the new tokens, the
    time, the peak memory and the decode cache's bytes of that length."""
    from tests.helpers import MIXED, model_params
    from zebrax import checkpoint

    with checkpoint.writing(tmp_path / "h") as tmp:
        checkpoint.save(tmp, MIXED, model_params(MIXED))
    assert main(["bench", "long-prompt", str(tmp_path / "h"), "--length", "40", "--new-tokens", "3",
                 "--prefill-chunk", "16"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = zebrax.load(tmp_path / "h")
    assert result["prompt_tokens"] == 40 and result["prefill_chunk"] == 16 and result["new_tokens"] == 3
    assert result["cache_gb"] == round((43 * model.cache_bytes_per_token() + model.cache_state_bytes()) / 1e9, 3)
    assert result["generate_s_with_compile"] > 0 and result["peak_rss_gb"] > 0.1

"""RULER through lm-eval on the embedded teacher: `zebrax lm-eval` and lm-eval's own ``hf`` model (transformers
loading the same GGUF), each with its defaults, build the same 4,096-token prompts and generate the same answers."""

from __future__ import annotations

import json

import pytest

import zebrax

TASK, LENGTH, LIMIT = "niah_single_1", 4096, 2


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _answers(samples: list[dict]) -> list[tuple[str, str]]:
    """(prompt, answer) of each sample, from lm-eval's samples in memory (arguments: ``[(prompt, kwargs)]``) or as
    it writes them (``{"gen_args_0": {"arg_0": prompt, …}}``)."""
    prompt = lambda a: a["gen_args_0"]["arg_0"] if isinstance(a, dict) else a[0][0]  # noqa: E731
    return [(prompt(s["arguments"]), s["filtered_resps"][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_ruler_at_4k_with_zebrax_defaults_is_hf_with_its_defaults(smollm2_checkpoint, smollm2_gguf, tmp_path,
                                                                  offline):
    """Neither model is given a ``max_length``: both take the checkpoint's 8,192, so no prompt is cut, and each of
    the two prompts and its generated answer are the same (the value found in both)."""
    import lm_eval

    from zebrax.app.cli import main

    tokenizer = str(smollm2_checkpoint / "tokenizer")  # RULER sizes its prompts with the model's tokenizer
    metadata = {"max_seq_lengths": [LENGTH]}
    want = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(smollm2_gguf.parent), "gguf_file": smollm2_gguf.name,
                                "tokenizer": tokenizer, "dtype": "float32", "device": "cpu"},
        tasks=[TASK], metadata=metadata, limit=LIMIT, batch_size=1, log_samples=True)
    assert want["config"]["model_args"] and "max_length" not in want["config"]["model_args"]
    assert main(["lm-eval", "--model", "zebrax", "--model_args", f"pretrained={smollm2_checkpoint},batch_size=2",
                 "--tasks", TASK, "--metadata", json.dumps(metadata), "--limit", str(LIMIT),
                 "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0
    got = [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")).read_text()
           .splitlines()]
    answers = _answers(got)
    assert answers == _answers(want["samples"][TASK]) and len(answers) == LIMIT
    # RULER's own prompts of its 4,096 (a haystack grown in steps to leave its 128 answer tokens), none cut
    assert all(s["doc"]["max_length"] == LENGTH for s in got)
    encode = zebrax.load(smollm2_checkpoint).encode
    lengths = [len(encode(prompt)) for prompt, _ in answers]
    assert all(LENGTH - 512 < n <= LENGTH - 128 for n in lengths), lengths
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][TASK]
    assert results[f"{LENGTH},none"] == want["results"][TASK][f"{LENGTH},none"] == 1.0

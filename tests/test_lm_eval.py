"""lm-eval through zebrax against lm-eval's own ``hf`` model on the same random tiny Llama (float32): the shipped
local tasks (configs/lm_eval: multiple choice, rolling log-likelihood, greedy generation), every request's answer.
The tiny Llama carries SmolLM2's tokenizer, so both read the same text as the same tokens."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import zebrax
from tests.helpers import assert_one_line_error
from zebrax.app.lm_eval import bucket

TASKS = Path(__file__).resolve().parent.parent / "configs" / "lm_eval"
NAMES = ("zebrax_mc", "zebrax_text", "zebrax_qa")
MAX_LENGTH = 32  # short enough that the texts roll over several windows and long prompts are cut


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer, tmp_path_factory):
    """(HF directory, zebrax checkpoint) of a random 2-layer Llama with SmolLM2's tokenizer and vocabulary."""
    import transformers

    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits spread enough that choices and greedy tokens differ
        hf.lm_head.weight.mul_(40.0)
    hf.save_pretrained(root / "hf")
    transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer).save_pretrained(root / "hf")
    return root / "hf", zebrax.convert(root / "hf", root / "zebrax")


@pytest.fixture(scope="module")
def include_path(tmp_path_factory):
    """The shipped task files, their data paths made absolute (the shipped ones are relative to the repo root)."""
    d = tmp_path_factory.mktemp("tasks")
    for name in NAMES:
        text = (TASKS / f"{name}.yaml").read_text().replace("configs/lm_eval/", f"{TASKS}/")
        (d / f"{name}.yaml").write_text(text)
    return d


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval indexes only the tasks of ``--include_path`` (its scan of its own thousands takes 20 s a call and is not
    what is tested)."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(TaskManager, "__init__", functools.partialmethod(TaskManager.__init__, include_defaults=False))


def _samples(results: dict) -> dict:
    return {task: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def test_bucket_lengths():
    assert [bucket(n, 2048) for n in (1, 32, 33, 64, 65, 1500, 3000)] == [32, 32, 64, 64, 128, 2048, 2048]
    assert bucket(40, 48) == 48


def test_zebrax_lm_eval_equals_hf(tiny, include_path, tmp_path, monkeypatch, local_tasks_only):
    """`zebrax lm-eval --model zebrax` (the command line) and lm-eval's `hf` (its Python API) on the same tasks:
    log-likelihoods within 1e-3, the same greedy flags and accuracies, the same rolling sums (1e-3 relative) and
    the same generated text."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from zebrax.app.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    hf_dir, ckpt = tiny
    want = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "max_length": MAX_LENGTH,
                                "device": "cpu"},
        tasks=list(NAMES), task_manager=TaskManager(include_path=str(include_path)), batch_size=4, log_samples=True)
    assert main(["lm-eval", "--model", "zebrax", "--model_args",
                 f"pretrained={ckpt},batch_size=3,max_length={MAX_LENGTH}", "--tasks", ",".join(NAMES),
                 "--include_path", str(include_path), "--output_path", str(tmp_path / "out"), "--log_samples"]) == 0
    got = {"results": json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"],
           "samples": {t: [json.loads(line) for line in next((tmp_path / "out").rglob(f"samples_{t}_*.jsonl"))
                           .read_text().splitlines()] for t in NAMES}}
    g, w = _samples(got), _samples(want)

    choices = [[float(ll) for ll, _ in doc] for doc in g["zebrax_mc"]]
    np.testing.assert_allclose(choices, [[ll for ll, _ in doc] for doc in w["zebrax_mc"]], rtol=0, atol=1e-3)
    greedy = [[x == "True" for _, x in doc] for doc in g["zebrax_mc"]]  # the saved samples hold text
    assert greedy == [[x for _, x in doc] for doc in w["zebrax_mc"]]
    assert np.std(choices) > 1.0, "random choices too alike for the comparison to mean anything"
    for metric in ("acc,none", "acc_norm,none"):
        assert got["results"]["zebrax_mc"][metric] == want["results"]["zebrax_mc"][metric]

    rolling = [float(doc[0]) for doc in g["zebrax_text"]]
    np.testing.assert_allclose(rolling, [doc[0] for doc in w["zebrax_text"]], rtol=1e-3)
    assert max(len(zebrax.load(ckpt).encode(json.loads(line)["text"]))
               for line in (TASKS / "zebrax_text.jsonl").read_text().splitlines()) > MAX_LENGTH  # several windows

    assert g["zebrax_qa"] == w["zebrax_qa"]
    assert any(doc[0].strip() for doc in g["zebrax_qa"]), "nothing generated: the comparison would be empty"


def test_registered_on_import(tiny):
    """`import zebrax.app.lm_eval` registers the model for lm_eval.simple_evaluate; model_args win over lm-eval's
    flags."""
    import lm_eval.api.registry

    import zebrax.app.lm_eval  # noqa: F401

    cls = lm_eval.api.registry.get_model("zebrax")
    lm = cls.create_from_arg_string(f"pretrained={tiny[1]},batch_size=5", {"batch_size": 1, "device": "cpu"})
    assert lm.batch_size == 5 and lm.max_length == 256


def test_bad_model_arguments_are_one_line_before_loading(tiny_llama, capsys, monkeypatch, local_tasks_only):
    """`zebrax lm-eval` with batch_size=0, without pretrained or with a misspelt argument: one line naming it (the
    accepted ones listed), before any checkpoint is read; lm-eval's own arguments are accepted."""
    from zebrax.app.cli import main
    from zebrax.app.lm_eval import ZebraxLM
    from zebrax.errors import ConfigError

    monkeypatch.setenv("LMEVAL_LOG_LEVEL", "ERROR")
    ckpt = tiny_llama("gqa_llama3_untied")[2]  # no tokenizer: loading it would fail with "has no tokenizer"
    for model_args, needles in ((f"pretrained={ckpt},batch_size=0", ["batch_size=0"]),
                                (f"pretrained={ckpt},max_gen_toks=-5", ["max_gen_toks=-5"]),
                                ("batch_size=4", ["pretrained=CKPT"]),
                                (f"pretrained={ckpt},batchsize=4", ["unknown model argument batchsize",
                                                                    "pretrained, batch_size, max_length"])):
        capsys.readouterr()
        code = main(["lm-eval", "--model", "zebrax", "--model_args", model_args, "--tasks", "zebrax_mc",
                     "--include_path", str(TASKS)])
        assert_one_line_error(code, capsys.readouterr().err, *needles)
    with pytest.raises(ConfigError, match="has no tokenizer"):  # lm-eval's device, max_batch_size, … go through
        ZebraxLM.create_from_arg_string(f"pretrained={ckpt}", {"batch_size": 1, "max_batch_size": None,
                                                                "device": "cpu", "trust_remote_code": True})

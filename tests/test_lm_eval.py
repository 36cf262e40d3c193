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
    assert [bucket(n) for n in (1, 32, 33, 64, 65, 500, 512, 513, 3000)] == [32, 32, 64, 64, 128, 512, 512, 1024,
                                                                              3072]


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


def test_rows_past_one_head_chunk_score_as_the_whole_logits_do(tiny, rng):
    """Rows of 1,024 tokens (two of the LM head's chunks of 512), every other target the greedy token: the
    log-probabilities and greedy flags of the model's whole logits (fp32, 1e-5)."""
    from zebrax.app.lm_eval import _scorer
    from zebrax.losses import token_logprobs

    model = zebrax.load(tiny[1])
    tokens = rng.integers(0, model.config.vocab_size, (2, 1024)).astype(np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[1, 700:] = False
    logits = model.module.apply({"params": model.params}, tokens, token_mask=mask)[0]
    targets = np.where(np.arange(1024) % 2, np.roll(tokens, -1, axis=1), np.argmax(logits, -1)).astype(np.int32)
    logp, greedy = map(np.asarray, _scorer(model.module)(model.params, tokens, mask, targets))
    np.testing.assert_allclose(logp, token_logprobs(logits, targets), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1) == targets)
    assert greedy.any() and logp.std() > 1.0


def test_defaults_are_hfs_and_every_cut_is_counted(tiny):
    """Left at its default, ``max_length`` is the checkpoint's ``max_position_embeddings``, as for lm-eval's ``hf``
    model (not a cap of 2,048); past it only with ``extrapolate=True``. A context cut to fit is counted and warned
    of, by request type, in one warning a call; a context that fits is not."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from zebrax.app.lm_eval import ZebraxLM
    from zebrax.errors import InvalidArgument, ZebraxWarning

    hf_dir, ckpt = tiny
    lm = ZebraxLM(pretrained=str(ckpt), batch_size=2)
    assert lm.max_length == HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32").max_length == 256
    with pytest.raises(InvalidArgument, match="max_length=512 is past .*max_position_embeddings=256.*extrapolate=True"):
        ZebraxLM(pretrained=str(ckpt), max_length=512)
    assert ZebraxLM(pretrained=str(ckpt), max_length=512, extrapolate=True).max_length == 512

    lm = ZebraxLM(pretrained=str(ckpt), batch_size=2, max_length=32, max_gen_toks=4)
    short, long = list(range(100, 110)), list(range(100, 140))
    with pytest.warns(ZebraxWarning, match=r"1 of 2 loglikelihood requests did not fit max_length=32"):
        lm._loglikelihood_tokens([(None, short, [7, 8]), (None, long, [7, 8])])
    text = lambda n: " ".join(["the quick brown fox"] * n)  # noqa: E731
    requests = [Instance(request_type="generate_until", doc={}, arguments=(text(k), {"until": ["\n\n"],
                                                                                    "max_gen_toks": 4}), idx=0)
                for k in (2, 20, 30)]
    with pytest.warns(ZebraxWarning, match=r"2 of 3 generate_until requests did not fit max_length=32"):
        lm.generate_until(requests, disable_tqdm=True)
    assert lm.truncated == {"loglikelihood": 1, "generate_until": 2}


def test_tasks_that_read_a_tokenizer_get_the_checkpoints(tiny, tmp_path):
    """`zebrax lm-eval` adds ``tokenizer=CKPT/tokenizer`` to a local zebrax checkpoint's model arguments (RULER's
    tasks size their prompts with ``AutoTokenizer.from_pretrained`` of it), never over one given, never for another
    model; a tokenizer that tokenizes otherwise is refused by name."""
    import transformers

    from zebrax.app.lm_eval import ZebraxLM, with_tokenizer
    from zebrax.errors import InvalidArgument

    ckpt = tiny[1]
    argv = ["--model", "zebrax", "--model_args", f"pretrained={ckpt},batch_size=2", "--tasks", "niah_single_1"]
    assert with_tokenizer(argv)[3] == f"pretrained={ckpt},batch_size=2,tokenizer={ckpt / 'tokenizer'}"
    assert with_tokenizer(["--model=zebrax", f"--model_args=pretrained={ckpt}"])[1] == (
        f"--model_args=pretrained={ckpt},tokenizer={ckpt / 'tokenizer'}")
    for unchanged in (["--model", "zebrax", "--model_args", f"pretrained={ckpt},tokenizer=T"],
                      ["--model", "hf", "--model_args", f"pretrained={ckpt}"],
                      ["--model", "zebrax", "--model_args", f"pretrained={tmp_path}"]):
        assert with_tokenizer(unchanged) == unchanged
    assert ZebraxLM(pretrained=str(ckpt), tokenizer=str(ckpt / "tokenizer")).max_length == 256
    other = transformers.AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    other.add_tokens(["<needle>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(InvalidArgument, match=f"tokenizer={tmp_path / 'other'} does not tokenize as"):
        ZebraxLM(pretrained=str(ckpt), tokenizer=str(tmp_path / "other"))


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
                                (f"pretrained={ckpt},prefill_chunk=0", ["prefill_chunk=0"]),
                                (f"pretrained={ckpt},extrapolate=yes", ["extrapolate='yes'", "True or False"]),
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


def test_a_task_that_is_not_there_or_needs_the_hub_is_one_line(tiny, tmp_path, capsys, monkeypatch,
                                                                local_tasks_only):
    """An unknown task name, and a task whose data is on the Hub (RULER's essay haystack, here offline): one line
    each, naming the task or the dataset, and what runs here."""
    from zebrax.app.cli import main

    monkeypatch.setenv("LMEVAL_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    (tmp_path / "tasks").mkdir()
    qa = (TASKS / "zebrax_qa.yaml").read_text()  # the shipped task, its data on the Hub instead
    head, tail = qa.split("dataset_path: json")
    (tmp_path / "tasks" / "essays.yaml").write_text(head.replace("task: zebrax_qa", "task: essays") +
                                                    "dataset_path: baber/paul_graham_essays\n" +
                                                    "test_split:" + tail.split("test_split:")[1])
    ckpt = tiny[1]
    for task, needles in (("no_such_task", ["Tasks not found: no_such_task", "lm-eval ls tasks"]),
                          ("essays", ["baber/paul_graham_essays", "cannot reach", "niah_single_1"])):
        capsys.readouterr()
        code = main(["lm-eval", "--model", "zebrax", "--model_args", f"pretrained={ckpt}", "--tasks", task,
                     "--include_path", str(tmp_path / "tasks"), "--limit", "1"])
        assert_one_line_error(code, capsys.readouterr().err, *needles)

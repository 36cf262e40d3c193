"""Bad input to load, logits, generate, chat, export and bench: the API raises a ``ZebraxError`` subclass naming
the value; the CLI exits non-zero with one line on stderr and no traceback; nothing is left behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zebrax
from tests.helpers import assert_one_line_error
from zebrax.api import load_tokenizer
from zebrax.cli import main
from zebrax.errors import CheckpointError, InvalidArgument, ZebraxError, ZebraxWarning


@pytest.fixture(scope="module")
def model(tiny_llama):
    return zebrax.load(tiny_llama("gqa_llama3_untied")[2])  # vocab 211, max_position_embeddings 256


# -- 3. token ids are checked ---------------------------------------------------------------------
@pytest.mark.parametrize("tokens, needles", [
    ([[1, 2, 211]], ["token id 211", "position [0, 2]", "0 <= id < 211"]),
    ([[5, -1, 3], [1, 2, 3]], ["token id -1", "position [0, 1]"]),
    (np.array([[3, 2**40]], np.int64), [f"token id {2**40}", "position [0, 1]"]),
    (np.array([[1.0, 2.0]]), ["must be integers", "float64"]),
    (np.array([[True, False]]), ["must be integers", "bool"]),
    ([1, 2, 3], ["[batch, length]", "(3,)"]),
    (np.zeros((1, 0), np.int32), ["non-empty", "(1, 0)"]),
], ids=["past_vocab", "negative", "int64_wrap", "float", "bool", "one_dim", "empty"])
def test_logits_and_generate_refuse_bad_token_ids(model, tokens, needles):
    for call in (lambda: model.logits(tokens), lambda: model.generate(tokens, max_new_tokens=2)):
        with pytest.raises(InvalidArgument) as e:
            call()
        for needle in needles:
            assert needle in str(e.value)


def test_ragged_prompts_are_checked_one_by_one(model):
    with pytest.raises(InvalidArgument, match=r"prompt 1: token id 500 at position \[0, 1\]"):
        model.generate([[1, 2], [3, 500]], max_new_tokens=2)


# -- 9. the other arguments -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(tokens=[]), "non-empty list of prompts"),
    (dict(tokens=np.array([1, 2, 3])), "[batch, length]"),
    (dict(tokens=[[1, 2], []]), "prompt 1 is empty"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=True), "max_new_tokens=True"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=float("nan")), "top_p=nan"),
    (dict(seed=2**64), f"seed={2**64}"),
    (dict(seed=-1), "seed=-1"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(max_new_tokens=10**10), "GiB, more than the"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_generate_refuses_bad_arguments_before_any_work(model, kwargs, needle):
    kwargs = {"tokens": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(InvalidArgument) as e:
        model.generate(kwargs.pop("tokens"), **kwargs)
    assert needle in str(e.value)


def test_seeds_past_32_bits_give_other_samples(model):
    """jax keeps 32 bits of a seed: zebrax folds in the rest, so 2**32 is not seed 0 again."""
    draws = {seed: model.generate([[1, 2, 3]], max_new_tokens=12, temperature=5.0, seed=seed, ignore_eos=True)[0]
             for seed in (0, 2**32, 2**64 - 1)}
    assert draws[0] != draws[2**32] and draws[0] != draws[2**64 - 1]


def test_a_wrong_token_mask_is_refused(model):
    with pytest.raises(InvalidArgument, match="token_mask must be a bool array of the tokens' shape"):
        model.logits([[1, 2, 3]], token_mask=[[True, False]])


def test_running_past_the_trained_context_warns(model):
    with pytest.warns(ZebraxWarning, match="exceed max_position_embeddings=256"):
        out = model.generate([[1, 2, 3]], max_new_tokens=260, ignore_eos=True)
    assert len(out[0]) == 263


def test_an_unknown_impl_is_refused_at_load(tiny_llama, tiny_mamba2):
    expected = r"impl='cuda' is not one of \('reference', 'blocked', 'pallas', 'auto'\)"
    with pytest.raises(InvalidArgument, match=expected):
        zebrax.load(tiny_llama("gqa_llama3_untied")[2], impl="cuda")
    with pytest.raises(InvalidArgument, match="impl='chunked'"):  # an SSD impl is no attention impl
        zebrax.load(tiny_llama("gqa_llama3_untied")[2], impl="chunked")
    assert zebrax.load(tiny_mamba2("groups2_bias")[2], impl="chunked").config.model_type == "mamba2"


@pytest.fixture(scope="module")
def templateless(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The real teacher with its tokenizer's chat template removed."""
    ckpt = Path(shutil.copytree(smollm2_checkpoint, tmp_path_factory.mktemp("nochat") / "ckpt"))
    (ckpt / "tokenizer" / "chat_template.jinja").unlink()
    return ckpt


def test_chat_refuses_bad_messages_and_a_missing_template(model, templateless):
    chatty = zebrax.Model(model.config, model.params, load_tokenizer(templateless.parent / "ckpt"))
    for messages, needle in (([], "non-empty list"), ([{"text": "hi"}], "non-empty list"), ("hi", "no chat template")):
        with pytest.raises(InvalidArgument, match=needle):
            chatty.chat(messages)


# -- the command line: one line, the right exit code, no traceback --------------------------------
def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_generate_on_the_command_line(capsys, smollm2_checkpoint, templateless):
    ck = smollm2_checkpoint
    for args, needle in (
        (("--seed", str(2**70)), "seed="),
        (("--seed", "-3"), "seed=-3"),
        (("--max-new-tokens", "100000000"), "GiB, more than the"),
        (("--max-new-tokens", "0"), "max_new_tokens=0"),
        (("--temperature", "nan"), "temperature=nan"),
        (("--top-p", "1.5"), "top_p=1.5"),
    ):
        assert_one_line_error(*cli(capsys, "generate", ck, "--prompt", "Hello", *args), needle)
    assert_one_line_error(*cli(capsys, "generate", templateless, "--chat", "--prompt", "Hi"), "no chat template")
    assert_one_line_error(*cli(capsys, "generate", ck.parent / "nowhere", "--prompt", "Hi"), "not a zebrax checkpoint")


def test_bench_sizes_on_the_command_line(capsys, tiny_llama):
    ck = tiny_llama("tied_bias_bin")[2]
    for args, needle in ((("forward", ck, "--seq-len", "0"), "seq_len=0"), (("forward", ck, "--batch", "0"), "batch=0"),
                         (("forward", ck, "--repeats", "0"), "repeats=0"), (("ssd", "--lengths", "64", "0"), "lengths"),
                         (("attention", "--contexts", "0"), "contexts"), (("attention", "--batch", "-1"), "batch=-1")):
        assert_one_line_error(*cli(capsys, "bench", *args), needle)


def test_export_on_the_command_line(capsys, tiny_llama, tmp_path):
    ck = tiny_llama("tied_bias_bin")[2]
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")
    for dst, needle in ((tmp_path / "taken", "already exists"), (ck, "is (or contains) the source"),
                        (tmp_path / "file" / "hf", "cannot write here")):
        assert_one_line_error(*cli(capsys, "export", ck, dst), str(dst), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]


def test_damaged_parameters_through_the_real_entry_point(tiny_llama, tmp_path):
    """What a user sees running `zebrax` on a damaged checkpoint: one line, however loud orbax's threads are."""
    ck = Path(shutil.copytree(tiny_llama("tied_bias_bin")[2], tmp_path / "ckpt"))
    for f in (ck / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged"):
        zebrax.load(ck)
    for args in (["export", str(ck), str(tmp_path / "hf")], ["bench", "forward", str(ck)],
                 ["generate", str(ck), "--prompt", "x", "--seed", str(2**70)]):
        proc = subprocess.run([sys.executable, "-m", "zebrax", *args], capture_output=True, text=True, timeout=300)
        assert_one_line_error(proc.returncode, proc.stderr, str(ck / "params"), "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_every_error_above_is_a_zebrax_error():
    assert issubclass(InvalidArgument, ZebraxError) and issubclass(CheckpointError, ZebraxError)

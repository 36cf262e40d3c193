"""Bad input to load, logits, generate, chat, export and bench: the API raises a ``ZebraxError`` subclass naming
the value; the CLI exits non-zero with one line on stderr and no traceback; nothing is left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import zebrax
from tests.helpers import assert_one_line_error
from zebrax.api import load_tokenizer
from zebrax.app.cli import main
from zebrax.errors import CheckpointError, InvalidArgument, ZebraxWarning


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
def templateless(tiny_chat, tmp_path_factory) -> Path:
    """A checkpoint with SmolLM2's tokenizer, its chat template removed."""
    ckpt = Path(shutil.copytree(tiny_chat, tmp_path_factory.mktemp("nochat") / "ckpt"))
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


def test_generate_on_the_command_line(capsys, tiny_chat, templateless):
    ck = tiny_chat
    for args, needles in (
        (("--seed", str(2**70)), ("--seed", str(2**70))),
        (("--seed", "-3"), ("--seed", "-3")),
        (("--max-new-tokens", "100000000"), ("GiB, more than the",)),
        (("--max-new-tokens", "0"), ("--max-new-tokens", "0")),
        (("--temperature", "nan"), ("--temperature", "nan")),
        (("--top-p", "1.5"), ("--top-p", "1.5")),
    ):
        assert_one_line_error(*cli(capsys, "generate", ck, "--prompt", "Hello", *args), *needles)
    assert_one_line_error(*cli(capsys, "generate", templateless, "--chat", "--prompt", "Hi"), "no chat template")
    assert_one_line_error(*cli(capsys, "generate", ck.parent / "nowhere", "--prompt", "Hi"), "not a zebrax checkpoint")


def test_bench_sizes_on_the_command_line(capsys, tiny_llama, model):
    from zebrax.app import bench

    ck = tiny_llama("tied_bias_bin")[2]
    for args, flag, value in ((("forward", ck), "--seq-len", "0"), (("forward", ck), "--batch", "0"),
                              (("forward", ck), "--repeats", "0"), (("ssd", "--lengths", "64"), "--lengths", "0"),
                              (("attention",), "--contexts", "0"), (("attention",), "--batch", "-1")):
        assert_one_line_error(*cli(capsys, "bench", *args, flag, value), flag, value)
    for call, needle in ((lambda: bench.bench_forward(model, seq_len=0), "seq_len=0"),
                         (lambda: bench.bench_ssd(lengths=(64, 0)), "lengths"),
                         (lambda: bench.bench_attention(batch=-1), "batch=-1")):
        with pytest.raises(InvalidArgument, match=needle):
            call()


def test_numbers_on_the_command_line_are_checked_before_any_work(capsys, tiny_llama, tmp_path):
    """Counts >= 1, indices >= 0, seeds and probabilities in range: one line naming the flag and the value, before
    any checkpoint or data is read (the paths here need not exist)."""
    ck, data, out = tiny_llama("gqa_llama3_untied")[2], tmp_path / "d.jsonl", tmp_path / "o.json"
    select = ["select", "--teacher", ck, "--mla-student", ck, "--linear-student", ck, "--data", data, "--out", out]
    for args, flag, value in (
        (["build", ck, tmp_path / "h"], "--seed", str(2**80)),
        (["build", ck, tmp_path / "h"], "--seed", "-1"),
        (["build", ck, tmp_path / "h"], "--kv-lora-rank", "0"),
        (["build", ck, tmp_path / "h"], "--rope-factor", "nan"),
        ([*select, "--num-mla", "2"], "--seq-len", "0"),
        ([*select, "--num-mla", "2"], "--num-sequences", "-4"),
        ([*select, "--num-mla", "2"], "--first", "-1"),
        ([*select], "--num-mla", "0"),
        (["generate", ck, "--prompt", "x"], "--max-new-tokens", "0"),
        (["generate", ck, "--prompt", "x"], "--top-p", "2"),
        (["generate", ck, "--prompt", "x"], "--temperature", "-1"),
        (["generate-data", ck, "--prompts", data, "--out", out], "--batch-size", "0"),
        (["generate-data", ck, "--prompts", data, "--out", out], "--top-p", "0"),
        (["bench", "decode", ck], "--new-tokens", "1"),
        (["bench", "decode", ck], "--transformers-max-tokens", "-1"),
        (["bench", "decode", ck], "--kv-lora-rank", "0"),
        (["bench", "train", ck], "--steps", "0"),
        (["bench", "long-prompt", ck], "--length", "0"),
        (["bench", "long-prompt", ck], "--prefill-chunk", "0"),
        (["generate", ck, "--prompt", "x"], "--prefill-chunk", "0"),
        (["distill", "--gin_file", tmp_path / "x.gin", "--workdir", tmp_path / "w"], "--num-processes", "0"),
        (["distill", "--gin_file", tmp_path / "x.gin", "--workdir", tmp_path / "w"], "--process-id", "-1"),
    ):
        code, err = cli(capsys, *args, flag, value)
        assert code == 2, err
        assert_one_line_error(code, err, flag, repr(value))
    assert list(tmp_path.iterdir()) == []


def test_output_locations_are_checked_before_any_work(capsys, tiny_llama, tmp_path, monkeypatch):
    """A file to write in a missing folder (or onto a folder), or a checkpoint directory that exists: one line
    before the work (here the work fails the test at once)."""
    from zebrax import init

    def work(*_, **__):
        raise AssertionError("the work started")

    monkeypatch.setattr(init, "init_hybrid", work)
    monkeypatch.setattr(init, "assemble", work)
    ck = tiny_llama("gqa_llama3_untied")[2]
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "taken").mkdir()
    missing = tmp_path / "missing"
    for args, needles in (
        (["select", "--teacher", ck, "--mla-student", ck, "--linear-student", ck, "--data", tmp_path / "data.jsonl",
          "--num-mla", "1", "--out", missing / "s.json"], ("--out", str(missing / "s.json"), "does not exist")),
        (["generate-data", ck, "--prompts", tmp_path / "data.jsonl", "--out", missing / "g.jsonl"],
         ("--out", "does not exist")),
        (["generate-data", ck, "--prompts", tmp_path / "data.jsonl", "--out", tmp_path / "taken"],
         ("--out", "is a folder")),
        (["bench", "decode", ck, "--plot", missing / "p.png"], ("--plot", "does not exist")),
        (["build", ck, tmp_path / "taken", "--mla-layers", "0", "--kv-lora-rank", "8"],
         (str(tmp_path / "taken"), "already exists")),
        (["assemble", "--mla-student", ck, "--linear-student", ck, "--mla-layers", "0", tmp_path / "taken"],
         (str(tmp_path / "taken"), "already exists")),
    ):
        assert_one_line_error(*cli(capsys, *args), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_layer_lists_are_checked(capsys, tiny_llama, tmp_path):
    """`--mla-layers ""` (an unset shell variable) is no all-Mamba2 hybrid: an empty list, a part that is no index,
    an index given twice or past the teacher's layers is one line."""
    ck = tiny_llama("gqa_llama3_untied")[2]  # 3 layers
    for value, needles in (("", ("--mla-layers", "got ''")), ("0,,2", ("--mla-layers", "got '0,,2'")),
                           ("1,x", ("--mla-layers", "got '1,x'")), ("-1", ("--mla-layers", "got '-1'")),
                           ("2,0,2", ("--mla-layers", "layer 2 is given twice")), ("0,3", ("mla_layers holds 3",))):
        assert_one_line_error(*cli(capsys, "build", ck, tmp_path / "h", "--kv-lora-rank", "8", "--mla-layers", value),
                              *needles)
    assert_one_line_error(*cli(capsys, "assemble", "--mla-student", ck, "--linear-student", ck, "--mla-layers", "",
                               tmp_path / "h"), "--mla-layers", "got ''")
    assert list(tmp_path.iterdir()) == []


def test_build_seeds_are_jax_seeds(tiny_llama, tmp_path):
    """jax keeps 32 bits of a seed: a larger one would alias a smaller one, so build refuses it."""
    ck = tiny_llama("gqa_llama3_untied")[2]
    for seed in (2**32, -1, 2**80, 1.5):
        with pytest.raises(InvalidArgument, match=rf"seed={seed!r} must be an integer in \[0, 2\*\*32\)"):
            zebrax.build(ck, tmp_path / "h", seed=seed, kv_lora_rank=8)
    assert list(tmp_path.iterdir()) == []


def test_export_on_the_command_line(capsys, tiny_llama, tmp_path):
    ck = tiny_llama("tied_bias_bin")[2]
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("x")
    for dst, needle in ((tmp_path / "taken", "already exists"), (ck, "is (or contains) the source"),
                        (tmp_path / "file" / "hf", "cannot write here")):
        assert_one_line_error(*cli(capsys, "export", ck, dst), str(dst), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]


def test_damaged_parameters_through_the_real_entry_point(child_process, tiny_llama, tmp_path):
    """What a user sees running `zebrax` on a damaged checkpoint: one line, however loud orbax's threads are."""
    ck = Path(shutil.copytree(tiny_llama("tied_bias_bin")[2], tmp_path / "ckpt"))
    for f in (ck / "params" / "d").iterdir():
        f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged"):
        zebrax.load(ck)
    for args in (["export", str(ck), str(tmp_path / "hf")], ["bench", "forward", str(ck)],
                 ["generate", str(ck), "--prompt", "x"]):
        proc = child_process.zebrax(*args)
        assert_one_line_error(proc.returncode, proc.stderr, str(ck / "params"), "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

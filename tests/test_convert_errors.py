"""Bad input to `zebrax convert`: a non-zero exit, one line on stderr naming the file and the problem,
no traceback, no output left behind, an existing destination untouched, nothing executed from a pickle."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

import zebrax
from tests.helpers import assert_nothing_left, assert_one_line_error, convert_cli
from zebrax.app.cli import main


@pytest.fixture
def hf_copy(tiny_llama, tmp_path) -> Path:
    src = tiny_llama("gqa_llama3_untied")[1]
    return Path(shutil.copytree(src, tmp_path / "hf"))


def test_missing_path(capsys, tmp_path):
    code, err = convert_cli(capsys, tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(code, err, str(tmp_path / "nope"), "no such file")
    assert_nothing_left(tmp_path / "out")


def test_truncated_safetensors(capsys, hf_copy, tmp_path):
    f = hf_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = convert_cli(capsys, hf_copy, tmp_path / "out")
    assert_one_line_error(code, err, str(f), "safetensors")
    assert_nothing_left(tmp_path / "out")


def test_config_sizes_disagree_with_tensors(capsys, hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config["num_key_value_heads"] = 3  # the tensors were made with 2
    (hf_copy / "config.json").write_text(json.dumps(config))
    code, err = convert_cli(capsys, hf_copy, tmp_path / "out")
    assert_one_line_error(code, err, "model.safetensors", "k_proj.weight", "(24, 72)", "expected (36, 72)",
                          "num_key_value_heads=3")
    assert_nothing_left(tmp_path / "out")


def test_unsupported_architecture(capsys, hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (hf_copy / "config.json").write_text(json.dumps(config))
    code, err = convert_cli(capsys, hf_copy, tmp_path / "out")
    assert_one_line_error(code, err, str(hf_copy / "config.json"), "unsupported architecture", "GPT2LMHeadModel")
    assert_nothing_left(tmp_path / "out")


def test_random_bytes_named_gguf(capsys, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(os.urandom(4096))
    code, err = convert_cli(capsys, f, tmp_path / "out")
    assert_one_line_error(code, err, str(f), "not a valid GGUF file")
    assert_nothing_left(tmp_path / "out")


class Payload:
    """Unpickling this would create the marker file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_executed(capsys, hf_copy, tmp_path, writer):
    import torch

    (hf_copy / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    bin_file = hf_copy / "pytorch_model.bin"
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, bin_file)
    else:
        with open(bin_file, "wb") as f:
            pickle.dump(state, f)
    code, err = convert_cli(capsys, hf_copy, tmp_path / "out")
    assert_one_line_error(code, err, str(bin_file), "weights_only")
    assert not marker.exists(), "the pickle's payload ran"
    assert_nothing_left(tmp_path / "out")


def test_existing_destination_is_never_damaged(capsys, tiny_llama, hf_copy, tmp_path):
    ckpt = tiny_llama("gqa_llama3_untied")[2]
    dst = Path(shutil.copytree(ckpt, tmp_path / "existing"))
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    # without --overwrite: refused
    code, err = convert_cli(capsys, hf_copy, dst)
    assert_one_line_error(code, err, str(dst), "already exists")
    # with --overwrite but a source that fails half-way through the tensors: the old checkpoint survives
    f = hf_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, err = convert_cli(capsys, hf_copy, dst, "--overwrite")
    assert code != 0 and sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".existing")) == []
    # with --overwrite and a good source: replaced atomically, and it loads
    old_inode = dst.stat().st_ino
    assert main(["convert", str(tiny_llama("tied_bias_bin")[1]), str(dst), "--overwrite"]) == 0
    assert dst.stat().st_ino != old_inode and zebrax.load(dst).config.tie_word_embeddings
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_real_entry_point_prints_one_line(child_process, tmp_path):
    """Through `python -m zebrax`, as a user runs it: whatever the libraries print, stderr is one line."""
    proc = child_process.zebrax("convert", tmp_path / "missing", tmp_path / "out")
    assert_one_line_error(proc.returncode, proc.stderr, "missing", "no such file")

"""What zebrax does to the filesystem: a write that says it succeeded can be read back; ``--overwrite``
replaces only what zebrax wrote; "already exists" holds at the end too; interrupted work is cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import zebrax
from tests.helpers import assert_nothing_left, assert_one_line_error
from zebrax import checkpoint, files
from zebrax.app.cli import main
from zebrax.errors import CheckpointError


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def hidden_siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# -- 5. a write that says it succeeded can be read back -------------------------------------------
@pytest.mark.parametrize("name", ["a[1]", "b]", "c\\d"])
def test_paths_orbax_would_write_incompletely_are_refused_before_writing(capsys, tiny_llama, tmp_path, name):
    src, ckpt = tiny_llama("tied_bias_bin")[1], tiny_llama("tied_bias_bin")[2]
    for args in (("convert", src, tmp_path / name / "out"), ("export", ckpt, tmp_path / name)):
        code, err = cli(capsys, *args)
        assert_one_line_error(code, err, "glob pattern")
        assert os.listdir(tmp_path) == []  # not even the parent folder


def test_a_checkpoint_that_cannot_be_read_back_is_never_renamed_into_place(capsys, tiny_llama, tmp_path,
                                                                           monkeypatch):
    """With the path check off, orbax writes `a[1]` without its data: the read-back catches it."""
    monkeypatch.setattr(files, "UNSAFE_PATH_CHARS", "")
    code, err = cli(capsys, "convert", tiny_llama("tied_bias_bin")[1], tmp_path / "a[1]")
    assert_one_line_error(code, err, "not readable back")
    assert_nothing_left(tmp_path / "a[1]")


def test_loading_from_such_a_path_says_why(tiny_llama, tmp_path):
    ckpt = shutil.copytree(tiny_llama("tied_bias_bin")[2], tmp_path / "x[1]")
    with pytest.raises(CheckpointError, match="glob pattern"):
        zebrax.load(ckpt)


# -- 6. --overwrite replaces a zebrax checkpoint, nothing else ------------------------------------
def test_overwrite_never_touches_the_source(capsys, tiny_llama, tmp_path):
    hf = Path(shutil.copytree(tiny_llama("tied_bias_bin")[1], tmp_path / "models" / "hf"))
    before = tree(hf)
    for dst in (hf, hf.parent, hf / ".."):  # the source itself, and a folder holding it
        code, err = cli(capsys, "convert", hf, dst, "--overwrite")
        assert_one_line_error(code, err, "is (or contains) the source")
        assert tree(hf) == before
    ckpt = tiny_llama("tied_bias_bin")[2]
    code, err = cli(capsys, "export", ckpt, ckpt, "--overwrite")
    assert_one_line_error(code, err, "is (or contains) the source")
    assert zebrax.load(ckpt).params  # still there, and it loads


def test_overwrite_refuses_what_is_not_a_zebrax_checkpoint(capsys, tiny_llama, tmp_path):
    src = tiny_llama("tied_bias_bin")[1]
    ordinary = tmp_path / "results"
    ordinary.mkdir()
    (ordinary / "notes.txt").write_text("three weeks of notes")
    a_file = tmp_path / "model.txt"
    a_file.write_text("not a directory")
    # a zebrax config.json beside files of the user's: not a checkpoint zebrax may delete
    mixed = Path(shutil.copytree(tiny_llama("tied_bias_bin")[2], tmp_path / "mixed"))
    (mixed / "eval.csv").write_text("keep me")
    for dst, needle in ((ordinary, "is not a zebrax checkpoint"), (a_file, "is not a directory"),
                        (mixed, "is not a zebrax checkpoint")):
        before = tree(dst) if dst.is_dir() else dst.read_bytes()
        code, err = cli(capsys, "convert", src, dst, "--overwrite")
        assert_one_line_error(code, err, str(dst), needle)
        assert (tree(dst) if dst.is_dir() else dst.read_bytes()) == before
    assert hidden_siblings(tmp_path) == []


def test_export_overwrite_replaces_an_export_and_nothing_else(capsys, tiny_llama, tmp_path):
    ckpt = tiny_llama("tied_bias_bin")[2]
    assert cli(capsys, "export", ckpt, tmp_path / "hf")[0] == 0
    first = (tmp_path / "hf").stat().st_ino
    assert cli(capsys, "export", ckpt, tmp_path / "hf", "--overwrite")[0] == 0
    assert (tmp_path / "hf").stat().st_ino != first
    hand_made = Path(shutil.copytree(tiny_llama("tied_bias_bin")[1], tmp_path / "hand_made"))
    before = tree(hand_made)
    code, err = cli(capsys, "export", ckpt, hand_made, "--overwrite")
    assert_one_line_error(code, err, "is not a zebrax export")
    assert tree(hand_made) == before


def test_a_copy_is_whole_or_absent(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("a")
    (src / "sub" / "b.bin").write_bytes(b"b")
    files.copy_tree(src, tmp_path / "out" / "dir")
    files.copy_tree(src / "a.json", tmp_path / "out" / "file.json")
    assert tree(tmp_path / "out" / "dir") == tree(src) and (tmp_path / "out" / "file.json").read_text() == "a"

    def fails_after_writing(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fails_after_writing)  # every file copied, then the rename fails
    with pytest.raises(OSError, match="No space"):
        files.copy_tree(src, tmp_path / "out" / "again")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dir", "file.json"]  # no half copy, no temporary


def test_a_linked_copy_shares_the_files_and_copies_where_links_fail(tmp_path, monkeypatch):
    """``copy_tree(link=True)`` (a stage's artefact shared between runs, ``ROOT/shared``): the same files on disk,
    taking no space; a plain copy where the file system refuses hard links."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "b.bin").write_bytes(b"b")
    files.copy_tree(src, tmp_path / "linked", link=True)
    assert tree(tmp_path / "linked") == tree(src)
    assert (tmp_path / "linked" / "sub" / "b.bin").stat().st_ino == (src / "sub" / "b.bin").stat().st_ino

    def refused(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refused)
    files.copy_tree(src, tmp_path / "copied", link=True)
    assert tree(tmp_path / "copied") == tree(src)
    assert (tmp_path / "copied" / "sub" / "b.bin").stat().st_ino != (src / "sub" / "b.bin").stat().st_ino


# -- 7. "already exists" holds at the end too -----------------------------------------------------
def test_a_destination_that_appears_while_writing_is_never_replaced(tmp_path):
    dst = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match="appeared while"):
        with checkpoint.writing(dst) as tmp:
            (tmp / "config.json").write_text("ours")
            dst.mkdir()  # another writer finished first (an empty directory is the case a plain rename replaces)
    assert list(dst.iterdir()) == [] and hidden_siblings(tmp_path) == []


def test_with_overwrite_a_destination_that_stopped_being_a_checkpoint_is_left(tiny_llama, tmp_path):
    dst = Path(shutil.copytree(tiny_llama("tied_bias_bin")[2], tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="changed while writing"):
        with checkpoint.writing(dst, overwrite=True) as tmp:
            (tmp / "config.json").write_text("ours")
            (dst / "results.csv").write_text("someone else's")
    assert (dst / "results.csv").read_text() == "someone else's" and hidden_siblings(tmp_path) == []


def test_two_concurrent_converts_into_one_destination_one_wins(child_process, tiny_llama, tmp_path):
    src = tiny_llama("tied_bias_bin")[1]
    procs = [child_process.zebrax("convert", src, tmp_path / "ckpt", wait=False) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    loser = next(err for code, _, err in results if code)
    assert_one_line_error(1, loser, str(tmp_path / "ckpt"))
    assert "already exists" in loser or "appeared while" in loser
    assert zebrax.load(tmp_path / "ckpt").params and hidden_siblings(tmp_path) == []


# -- 8. interrupted work is cleaned up ------------------------------------------------------------
def _start_convert(child_process, src: Path, dst: Path) -> subprocess.Popen:
    proc = child_process.zebrax("convert", src, dst, wait=False)
    deadline = time.time() + 120
    while not [p for p in dst.parent.iterdir() if ".tmp-" in p.name]:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("sig, delay", [(signal.SIGTERM, 0.5), (signal.SIGINT, 2.5)])
def test_sigterm_and_sigint_end_in_one_line_and_remove_the_temporary(child_process, smollm2_gguf, tmp_path, sig,
                                                                   delay):
    """The real teacher's conversion (~8 s), interrupted while reading tensors or writing parameters."""
    proc = _start_convert(child_process, smollm2_gguf, tmp_path / "ckpt")
    time.sleep(delay)
    proc.send_signal(sig)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 128 + sig, err
    assert_one_line_error(code, err, f"interrupted by {sig.name}")
    assert os.listdir(tmp_path) == []


def test_a_killed_writers_temporary_is_swept_by_the_next_writer(child_process, tiny_llama, smollm2_gguf, tmp_path):
    proc = _start_convert(child_process, smollm2_gguf, tmp_path / "killed")
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=60)
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0]
    # temporaries that must survive: a live process's, another host's, and a name that is not ours
    alive = tmp_path / f".x.tmp-{socket.gethostname()}-{os.getppid()}-0123abcd"
    other_host = tmp_path / f".x.tmp-elsewhere-{proc.pid}-0123abcd"
    not_ours = tmp_path / ".x.tmp-notes"
    for d in (alive, other_host, not_ours):
        d.mkdir()
    zebrax.convert(tiny_llama("tied_bias_bin")[1], tmp_path / "next")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["next", alive.name, other_host.name, not_ours.name])


def test_destinations_that_cannot_be_written_fail_in_one_line(capsys, tiny_llama, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    src = tiny_llama("tied_bias_bin")[1]
    for dst in (a_file / "ckpt", Path("/proc/zebrax/ckpt")):
        code, err = cli(capsys, "convert", src, dst)
        assert_one_line_error(code, err, str(dst), "cannot write here")
    assert os.listdir(tmp_path) == ["file"]


def test_an_os_error_while_writing_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt: No space left on device \(.*model.safetensors\)"):
        with checkpoint.writing(tmp_path / "ckpt") as tmp:
            raise OSError(28, "No space left on device", str(tmp / "model.safetensors"))
    assert os.listdir(tmp_path) == []

"""Tokenized corpora (``zebrax tokenize``, ``zebrax.corpus``): the rows the files make, read by row through grain;
the same batches, parts and run as from the files; host memory flat in the corpus size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zebrax import corpus, data
from zebrax.app.cli import main
from zebrax.data import ByteCodec, DataError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = str(ROOT / "configs" / "data" / "prompts.jsonl")
TINY = str(ROOT / "configs" / "experiments" / "tiny_cpu.gin")


@pytest.mark.parametrize("pack", [False, True], ids=["documents", "packed"])
def test_a_corpus_holds_the_rows_its_files_make(tmp_path, pack):
    """Row for row the in-memory path's rows (``load_rows``, then ``pack``: fewer rows than the packing window)."""
    manifest = corpus.tokenize([PROMPTS], tmp_path / "c", ByteCodec(), 128, pack=pack, rows_per_shard=50)
    rows = data.load_rows([PROMPTS], ByteCodec(), 128)
    want = data.pack(rows, 128) if pack else rows
    c = corpus.Corpus(tmp_path / "c")
    got = c.take(range(len(c)))
    assert set(got) == set(want) and len(c) == manifest["rows"] == len(want["tokens"])
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert len(manifest["shards"]) == -(-len(c) // 50)
    assert manifest["documents"] == len(rows["tokens"]) and manifest["real_tokens"] == rows["token_mask"].sum()
    assert manifest["counted_tokens"] == data.counted(rows).sum()


def test_batches_and_parts_of_a_corpus_are_those_of_its_rows(tmp_path):
    """``data.split`` and ``data.batches`` over a corpus: the same parts, batches, process shares and resumed
    positions as over the rows in memory."""
    corpus.tokenize([PROMPTS], tmp_path / "c", ByteCodec(), 64)
    rows, c = data.load_rows([PROMPTS], ByteCodec(), 64), corpus.Corpus(tmp_path / "c")
    for part_rows, part_c in zip(data.split(rows, (0.1, 0.3, 0.6), 3), data.split(c, (0.1, 0.3, 0.6), 3), strict=True):
        a, b = data.batches(part_rows, 4, 7, process_index=1, process_count=2), data.batches(part_c, 4, 7,
                                                                                               process_index=1,
                                                                                               process_count=2)
        for _ in range(3):
            next(b)
            next(a)
        state = b.get_state()
        want = [next(a) for _ in range(2)]
        resumed = data.batches(part_c, 4, 7, process_index=1, process_count=2)
        resumed.set_state(state)
        for w, g in zip(want, [next(resumed) for _ in range(2)], strict=True):
            assert all(np.array_equal(w[k], g[k]) for k in w)


# peak RSS of this process alone: /proc's VmHWM starts anew at exec (getrusage's ru_maxrss keeps the parent's peak
# from before the exec, the test runner's)
RSS = '''
import sys
from zebrax import corpus, data
path, out, mode = sys.argv[1:4]
if mode == "corpus":
    corpus.tokenize([path], out, data.ByteCodec(), 512)
    rows = corpus.Corpus(out)
else:
    rows = data.load_rows([path], data.ByteCodec(), 512)
it = data.batches(rows, 8, 0)
for _ in range(20):
    next(it)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
'''


@pytest.mark.end_to_end
def test_host_memory_of_the_data_path_is_flat_in_the_corpus_size(child_process, tmp_path):
    """Tokenizing a corpus and reading batches from it peaks at the same host memory (RSS, within 10%) for 2,000 and
    20,000 documents of ~500 bytes; reading the files into memory does not (the test would see it)."""
    rng = np.random.default_rng(0)
    words = ["zebra", "mamba", "latent", "attention", "state", "space", "token", "cache", "layer", "teacher"]
    for n in (2000, 20000):
        with open(tmp_path / f"{n}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(rng.choice(words, 70))}) + "\n")

    def peak(n, mode):
        out = child_process.python("-c", RSS, tmp_path / f"{n}.jsonl", tmp_path / f"{n}-{mode}", mode)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    small, large = peak(2000, "corpus"), peak(20000, "corpus")
    assert abs(large - small) <= 0.10 * small, (small, large)
    in_memory = peak(2000, "memory"), peak(20000, "memory")
    assert in_memory[1] - in_memory[0] > 0.10 * in_memory[0], in_memory


def _run(tmp_path, name, data_binding, capsys, *extra):
    steps = ["teacher/TrainConfig.steps = 20", "ild/TrainConfig.steps = 4", "kd/TrainConfig.steps = 4",
             "dpo/TrainConfig.steps = 2", "distill.pack = False", *extra]
    args = ["distill", "--gin_file", TINY, "--workdir", str(tmp_path / name), "--gin_param", data_binding]
    for binding in steps:
        args += ["--gin_param", binding]
    assert main(args) == 0
    said = capsys.readouterr().err
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    logged = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"} for line in lines]
    smart = {k: v for k, v in json.loads((tmp_path / name / "smart.json").read_text()).items() if k != "seconds"}
    return logged, smart, json.loads((tmp_path / name / "eval.json").read_text()), said


@pytest.mark.end_to_end
def test_a_run_from_a_corpus_is_the_run_from_its_files(tmp_path, capsys):
    """The tiny experiment (short) from ``zebrax tokenize``'s corpus of its data file logs the same losses, places the
    same MLA layers and measures the same figures as from the file."""
    assert main(["tokenize", PROMPTS, "--out", str(tmp_path / "corpus"), "--teacher", "tiny", "--seq-len", "128"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 320
    from_files = _run(tmp_path, "files", f"distill.data = ('{PROMPTS}',)", capsys)[:3]
    from_corpus = _run(tmp_path, "corpus_run", f"distill.data = ('{tmp_path / 'corpus'}',)", capsys)[:3]
    assert from_corpus == from_files


def test_a_corpus_that_does_not_fit_the_run_is_refused_before_any_work(tmp_path, capsys):
    corpus.tokenize([PROMPTS], tmp_path / "c", ByteCodec(), 64)
    args = ["distill", "--gin_file", TINY, "--workdir", str(tmp_path / "w"), "--gin_param",
            f"distill.data = ('{tmp_path / 'c'}',)"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "was tokenized with seq_len 64, the run's is 128" in err and not (tmp_path / "w").exists(), err
    assert main([*args, "--gin_param", "distill.seq_len = 64"]) == 1
    assert "was tokenized with pack False, the run's is True" in capsys.readouterr().err
    assert main([*args[:-1], f"distill.data = ('{tmp_path / 'c'}', '{PROMPTS}')"]) == 1
    assert "a tokenized corpus is the whole of the data" in capsys.readouterr().err
    (tmp_path / "c" / "rows-00000.arrayrecord").unlink()
    with pytest.raises(DataError, match=r"c: shards missing: rows-00000\.arrayrecord"):
        corpus.Corpus(tmp_path / "c")
    assert main(["tokenize", PROMPTS, "--out", str(tmp_path / "d"), "--teacher", str(tmp_path), "--seq-len", "8"]) == 1
    assert "no tokenizer/" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_stored_teacher_logits_are_the_teachers_top_k(tmp_path):
    """``teacher_logits`` stores, for every row, the top-k of the logits the teacher gives the row (fp32, 1e-5 of
    the largest magnitude; the same vocabulary indices), read back with the rows."""
    import jax

    from tests.helpers import TEACHER, close, random_model

    corpus.tokenize([PROMPTS], tmp_path / "c", ByteCodec(), 32, pack=True, rows_per_shard=40)
    teacher = random_model(TEACHER.replace(vocab_size=258, eos_token_id=(257,), bos_token_id=256,
                                           pad_token_id=None), seed=1)
    entry = corpus.teacher_logits(tmp_path / "c", teacher.config, teacher.params, 6, teacher_sha256="t",
                                  batch_size=16)
    assert entry["k"] == 6 and len(entry["files"]) == len(corpus.Corpus(tmp_path / "c").manifest["shards"])
    c = corpus.Corpus(tmp_path / "c").with_teacher_topk(6)
    assert c.topk == 6 and c.manifest[corpus.TOPK]["teacher_sha256"] == "t"
    rows = c.take([0, 41, len(c) - 1])
    logits = teacher.module.apply({"params": teacher.params}, rows["tokens"], token_mask=rows["token_mask"],
                                  segment_ids=rows["segment_ids"])[0]
    values, indices = jax.lax.top_k(logits, 6)
    close(rows["teacher_topk_values"], values, 1e-5)
    np.testing.assert_array_equal(rows["teacher_topk_indices"], indices)
    # fewer than stored: the first ones, the teacher's top 4; more than stored: refused
    fewer = corpus.Corpus(tmp_path / "c").with_teacher_topk(4).take([41])
    np.testing.assert_array_equal(fewer["teacher_topk_indices"], rows["teacher_topk_indices"][1:2, :, :4])
    with pytest.raises(DataError, match="holds the teacher's top 6 logits, not its top 7"):
        corpus.Corpus(tmp_path / "c").with_teacher_topk(7)
    corpus.tokenize([PROMPTS], tmp_path / "d", ByteCodec(), 32)
    with pytest.raises(DataError, match="holds the teacher's top 0 logits"):
        corpus.Corpus(tmp_path / "d").with_teacher_topk(1)


def _teacher(vocab_size: int = 258):
    from tests.helpers import TEACHER, random_model

    return random_model(TEACHER.replace(vocab_size=vocab_size, eos_token_id=(257,), bos_token_id=256,
                                        pad_token_id=None), seed=1)


def _tiny_corpus_and_teacher(tmp_path, vocab_size: int = 258):
    corpus.tokenize([PROMPTS], tmp_path / "c", ByteCodec(), 32, pack=True, rows_per_shard=40)
    return _teacher(vocab_size)


def test_stored_logits_replaced_by_another_teachers_are_whole_or_not_at_all(tmp_path, monkeypatch):
    """A second teacher's logits written over the first's: stopped in the middle (its second shard), the corpus still
    names the first teacher's files, which read back as they were; the next run removes what the stopped one left,
    and a finished one replaces the first teacher's whole."""
    import jax
    from array_record.python import array_record_module

    from zebrax.errors import Interrupted

    teacher = _tiny_corpus_and_teacher(tmp_path)
    corpus.teacher_logits(tmp_path / "c", teacher.config, teacher.params, 4, teacher_sha256="first")
    before = corpus.Corpus(tmp_path / "c").with_teacher_topk(4).take(range(60))
    other = jax.tree.map(lambda w: w * 1.5, teacher.params)
    real = array_record_module.ArrayRecordWriter
    opened = []

    def stopping(path, options):  # a SIGINT as the second shard starts
        opened.append(path)
        if len(opened) == 2:
            raise Interrupted(2)
        return real(path, options)

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", stopping)
    with pytest.raises(Interrupted):
        corpus.teacher_logits(tmp_path / "c", teacher.config, other, 4, teacher_sha256="second")
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", real)
    c = corpus.Corpus(tmp_path / "c")
    assert c.manifest[corpus.TOPK]["teacher_sha256"] == "first"
    after = c.with_teacher_topk(4).take(range(60))
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    named = set(c.manifest[corpus.TOPK]["files"])
    assert {f.name for f in (tmp_path / "c").iterdir() if "topk" in f.name} > named  # the stopped run's leftovers
    corpus.teacher_logits(tmp_path / "c", teacher.config, other, 4, teacher_sha256="second")
    c = corpus.Corpus(tmp_path / "c")
    assert c.manifest[corpus.TOPK]["teacher_sha256"] == "second"
    assert {f.name for f in (tmp_path / "c").iterdir() if "topk" in f.name} == set(c.manifest[corpus.TOPK]["files"])
    assert not np.array_equal(c.with_teacher_topk(4).take(range(60))["teacher_topk_values"],
                              before["teacher_topk_values"])


def test_a_teacher_of_another_vocabulary_or_tokenizer_stores_no_logits(tmp_path):
    teacher = _tiny_corpus_and_teacher(tmp_path, vocab_size=300)
    with pytest.raises(DataError, match=r"the teacher's vocabulary \(300\) is not the corpus's \(258"):
        corpus.teacher_logits(tmp_path / "c", teacher.config, teacher.params, 4, teacher_sha256="t")
    teacher = _teacher()
    with pytest.raises(DataError, match="was tokenized by another tokenizer than the teacher's"):
        corpus.teacher_logits(tmp_path / "c", teacher.config, teacher.params, 4, teacher_sha256="t",
                              codec_sha256="not the byte codec's")
    assert corpus.TOPK not in corpus.Corpus(tmp_path / "c").manifest


def test_a_corpus_of_another_tokenizer_of_the_same_size_is_refused(tmp_path, smollm2_tokenizer):
    """The run's codec and the corpus's tokenizer are compared by identity (``TokenizerCodec.sha256``), not size."""
    from transformers import AutoTokenizer

    from zebrax.distill.experiment import Experiment
    from zebrax.distill.inputs import documents
    from zebrax.errors import ConfigError

    ours = data.TokenizerCodec(AutoTokenizer.from_pretrained(str(smollm2_tokenizer)))
    other = AutoTokenizer.from_pretrained(str(smollm2_tokenizer))
    other.chat_template = "{{ messages[0]['content'] }}"  # the same vocabulary, other rows of a chat
    theirs = data.TokenizerCodec(other)
    assert ours.vocab_size == theirs.vocab_size and ours.sha256() != theirs.sha256()
    corpus.tokenize([PROMPTS], tmp_path / "c", theirs, 64)
    exp = Experiment(data=(str(tmp_path / "c"),), seq_len=64, pack=False)
    with pytest.raises(ConfigError, match="was tokenized by another tokenizer than the teacher's"):
        documents(exp, ours, exp.data)
    assert len(documents(exp, theirs, exp.data)) == 320


def test_tokenize_refuses_rows_that_predict_nothing_a_file_twice_and_an_object_store(tmp_path, capsys):
    base = ["tokenize", "--teacher", "tiny", "--out"]
    assert main([*base, str(tmp_path / "a"), PROMPTS, "--seq-len", "1"]) == 2
    assert "--seq-len: expected an integer >= 2" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "a"), PROMPTS, PROMPTS, "--seq-len", "8"]) == 1
    assert "prompts.jsonl is given twice" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*base, "gs://bucket/corpus", PROMPTS, "--seq-len", "8"]) == 1
    err = capsys.readouterr().err
    assert "gs://bucket/corpus: a tokenized corpus lives on a local disk" in err and not Path("gs:").exists(), err


@pytest.mark.end_to_end
def test_kd_from_stored_teacher_logits_is_kd_with_the_teacher(tmp_path, capsys):
    """The tiny experiment (short, top-8 KD) from a corpus: with the teacher's top-8 logits stored in the corpus
    (``zebrax teacher-logits``) KD runs without the teacher and logs the losses it logs with it (1e-5)."""
    assert main(["tokenize", PROMPTS, "--out", str(tmp_path / "corpus"), "--teacher", "tiny", "--seq-len", "128"]) == 0
    data_binding = f"distill.data = ('{tmp_path / 'corpus'}',)"
    with_teacher, _, evals, said = _run(tmp_path, "online", data_binding, capsys, "distill.kd_top_k = 8")
    assert "stored top-8" not in said
    assert main(["teacher-logits", str(tmp_path / "corpus"), "--teacher", str(tmp_path / "online" / "teacher"),
                 "--top-k", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 8
    stored, _, stored_evals, said = _run(tmp_path, "stored", data_binding, capsys, "distill.kd_top_k = 8")
    assert "KD: 4 steps of 4 × 128 tokens, from the teacher's stored top-8 logits" in said, said
    kd = lambda logged: [r for r in logged if r["stage"] == "kd"]  # noqa: E731
    assert len(kd(stored)) == len(kd(with_teacher)) > 0
    for got, want in zip(kd(stored), kd(with_teacher), strict=True):
        assert got.keys() == want.keys()
        for k in ("loss", "kl", "ce", "grad_norm"):
            assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert stored_evals["after_kd"]["kl"] == pytest.approx(evals["after_kd"]["kl"], rel=1e-5)

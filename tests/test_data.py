"""Training data: records from every format, masks of chat prompts and preference pairs, the seeded split, grain
batches and their saved position, and one-line errors for bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zebrax import data
from zebrax.data import ByteCodec, DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_text_chat_and_plain_text_rows(tmp_path):
    codec = ByteCodec()
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}, {"messages": chat}])
    rows = data.load_rows([f], codec, 64)
    assert rows["tokens"].shape == (2, 64) and rows["tokens"].dtype == np.int32
    np.testing.assert_array_equal(rows["tokens"][0, :4], [codec.bos, *b"abc"])
    assert rows["token_mask"][0].sum() == 4 and rows["loss_mask"][0].sum() == 4
    # chat: the loss counts the reply only; the position before the reply predicts its first token
    full = codec.chat(chat, add_generation_prompt=False)
    prompt = codec.chat(chat[:1], add_generation_prompt=True)
    assert full[:len(prompt)] == prompt
    assert rows["token_mask"][1].sum() == len(full)
    np.testing.assert_array_equal(np.flatnonzero(rows["loss_mask"][1]), np.arange(len(prompt) - 1, len(full)))
    # plain text: one document per paragraph; long documents are cut to seq_len
    t = tmp_path / "b.txt"
    t.write_text("first paragraph\n\nsecond one, longer than eight bytes\n\n\n")
    rows = data.load_rows([t], codec, 8)
    assert rows["tokens"].shape == (2, 8) and rows["token_mask"].all()


def test_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "d.parquet")
    rows = data.load_rows([tmp_path / "d.parquet"], ByteCodec(), 16)
    assert rows["token_mask"].sum(axis=1).tolist() == [4, 4]


def test_preference_rows_count_the_replies_only(tmp_path):
    codec = ByteCodec()
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no!"}])
    rows = data.load_rows([f], codec, 64, preference=True)
    start = len(codec.chat([{"role": "user", "content": "Q?"}], add_generation_prompt=True)) - 1
    for side, reply in (("chosen", "yes"), ("rejected", "no!")):
        counted = np.flatnonzero(rows[f"{side}_loss_mask"][0])
        assert counted[0] == start and rows[f"{side}_token_mask"][0].sum() == counted[-1] + 1
        assert len(counted) == len(reply) + 2  # the prompt's last token, the reply, and EOS


def test_split_is_disjoint_seeded_and_covers_every_document():
    rows = {"tokens": np.arange(100)[:, None], "token_mask": np.ones((100, 1), bool)}
    parts = data.split(rows, (0.05, 0.2, 0.75), seed=42)
    assert [len(p["tokens"]) for p in parts] == [5, 20, 75]
    ids = np.concatenate([p["tokens"][:, 0] for p in parts])
    assert sorted(ids.tolist()) == list(range(100))
    again = data.split(rows, (0.05, 0.2, 0.75), seed=42)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(data.split(rows, (0.05, 0.2, 0.75), seed=1)[2]["tokens"], parts[2]["tokens"])


def test_batches_are_seeded_sharded_and_resume_from_their_state():
    rows = {"tokens": np.arange(12)[:, None]}
    it = data.batches(rows, 3, seed=7)
    first = [next(it)["tokens"][:, 0].tolist() for _ in range(2)]
    state = it.get_state()
    json.dumps(state)  # saved with the checkpoint as JSON
    rest = [next(it)["tokens"][:, 0].tolist() for _ in range(6)]
    resumed = data.batches(rows, 3, seed=7)
    resumed.set_state(state)
    assert [next(resumed)["tokens"][:, 0].tolist() for _ in range(6)] == rest
    assert sorted(sum(first + rest[:2], [])) == list(range(12))  # one epoch is every row once
    assert sum(first + rest[:2], []) != sum(rest[2:6], [])  # the next epoch is shuffled anew
    # process i of 3 reads the i-th third of each global batch of one process: a run on 3 hosts trains on its rows
    whole = data.batches(rows, 6, seed=0)
    shares = [data.batches(rows, 6, seed=0, process_index=i, process_count=3) for i in range(3)]
    for _ in range(3):
        got = np.concatenate([next(share)["tokens"][:, 0] for share in shares])
        assert got.tolist() == next(whole)["tokens"][:, 0].tolist()
    with pytest.raises(data.DataError, match="a batch of 4 rows cannot be shared equally by 3 processes"):
        data.batches(rows, 4, seed=0, process_count=3)


@pytest.mark.parametrize("records, preference, message", [
    ([], False, r"no records"),
    ([{"txt": "typo"}], False, r"a\.jsonl:1: a record needs 'text' \(a string\) or 'messages', it has \['txt'\]"),
    ([{"text": "ok"}, {"messages": [{"role": "user"}]}], False, r"a\.jsonl:2: 'messages' must be a non-empty list"),
    ([{"prompt": "Q", "chosen": "A"}], True, r"a\.jsonl:1: a preference record needs .* \(missing 'rejected'\)"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, records, preference, message):
    f = write_jsonl(tmp_path / "a.jsonl", records)
    with pytest.raises(DataError, match=message):
        data.load_rows([f], ByteCodec(), 16, preference=preference)


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such data file"):
        data.load_rows([tmp_path / "missing.jsonl"], ByteCodec(), 16)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object"):
        data.load_rows([tmp_path / "bad.jsonl"], ByteCodec(), 16)
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format '\.csv'"):
        data.load_rows([tmp_path / "d.csv"], ByteCodec(), 16)


def test_files_that_are_not_utf8_or_not_parquet_are_one_line_errors_naming_where(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "na\xefve"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not UTF-8 text \(byte 0xef at byte offset 27\); save the "
                                        r"file as UTF-8"):
        data.load_rows([tmp_path / "a.jsonl"], ByteCodec(), 16)
    (tmp_path / "b.txt").write_bytes(b"first\n\nsecond\nthird \x80\n")
    with pytest.raises(DataError, match=r"b\.txt:4: not UTF-8 text \(byte 0x80 at byte offset 20\)"):
        data.read_records(tmp_path / "b.txt")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable parquet file \("):
        data.read_records(tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')  # UTF-8 with a byte-order mark
    assert data.read_records(tmp_path / "d.jsonl") == [(f"{tmp_path / 'd.jsonl'}:1", {"text": "café"})]
    # generate_data's own output: a line that is not UTF-8 is dropped like a torn one (its prompt answered again)
    (tmp_path / "out.jsonl").write_bytes(b'{"id": 0, "messages": []}\n{"id": 1, "messages": "\xff"}\n')
    assert list(data.replies(tmp_path / "out.jsonl")) == [0]


def test_eval_of_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    from tests.helpers import assert_one_line_error, random_model
    from zebrax import checkpoint
    from zebrax.app.cli import main
    from zebrax.distill.inputs import TINY_TEACHER

    model = random_model(TINY_TEACHER)
    (tmp_path / "m").mkdir()
    checkpoint.save(tmp_path / "m", model.config, model.params)
    (tmp_path / "latin1.txt").write_bytes("a paragraph\n\ncaf\xe9 au lait\n".encode("latin-1"))
    capsys.readouterr()
    code = main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "latin1.txt")])
    assert_one_line_error(code, capsys.readouterr().err,
                          f"{tmp_path / 'latin1.txt'}:3: not UTF-8 text (byte 0xe9 at byte offset 16)")


def test_counted_tokens_are_the_predictions_that_count():
    codec = ByteCodec()
    chat = {"messages": [{"role": "user", "content": "a long question?"}, {"role": "assistant", "content": "Yes."}]}
    prompt = len(codec.chat(chat["messages"][:1], add_generation_prompt=True))
    whole = len(codec.chat(chat["messages"], add_generation_prompt=False))
    def counted(seq_len: int) -> int:
        return int(data.counted({k: v[None] for k, v in data.lm_row("x", chat, codec, seq_len).items()})[0])

    # the reply and EOS; a row cut where the reply starts counts none (its last position predicts nothing there)
    assert [counted(n) for n in (64, prompt + 1, prompt, prompt - 5)] == [whole - prompt, 1, 0, 0]
    two = data.pack({k: np.stack([v, v]) for k, v in data.lm_row("x", chat, codec, 64).items()}, 128)
    assert data.counted(two).tolist() == [2 * (whole - prompt)]  # a document's EOS does not predict the next one


def test_generate_data_is_seeded_batched_and_resumes_to_the_same_file(tiny_chat, tmp_path):
    """A chat model answers 5 prompts in batches of 2 (sampled); a run cut after one batch, with a torn line,
    completes to the same file an uninterrupted run writes."""
    import zebrax

    model = zebrax.load(tiny_chat)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Name a color, {i}."} for i in range(4)]
                          + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]}])
    settings = dict(batch_size=2, max_new_tokens=6, temperature=0.8, seed=3)
    whole = data.generate_data(model, prompts, tmp_path / "whole.jsonl", **settings).read_text()
    lines = [json.loads(line) for line in whole.splitlines()]
    assert [r["id"] for r in lines] == list(range(5))
    assert lines[4]["messages"][:-1] == [{"role": "user", "content": "Hi"}]  # the teacher replaces the last reply
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in lines)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(whole.splitlines(keepends=True)[:3]) + '{"id": 3, "mess')  # killed while writing
    assert data.generate_data(model, prompts, cut, **settings).read_text() == whole
    rows = data.load_rows([tmp_path / "whole.jsonl"], data.TokenizerCodec(model.tokenizer), 64)
    assert rows["loss_mask"].sum() < rows["token_mask"].sum()  # the prompts are masked out of the loss

"""Long training documents (``zebrax.long_documents``, ``zebrax long-docs``, ``distill.long_data``): chats of a
teacher's conversations with notes handed over and a question on one last, or ending on earlier answers asked for
and repeated word for word; as long as asked, the same for a seed, and apart from every long-context evaluation's
text, keys and values."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tests.helpers import assert_one_line_error
from zebrax import data
from zebrax.errors import InvalidArgument
from zebrax.long_context import ADJECTIVES, HAYSTACK, NOUNS
from zebrax.long_documents import ASK, NOTE, RECALL, ledger_chats, recall_chats

REPLIES = "configs/data/smollm2_replies.jsonl"


@pytest.fixture(scope="module")
def codec(smollm2_tokenizer):
    import transformers

    return data.TokenizerCodec(transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer))


@pytest.fixture(scope="module")
def conversations():
    return [r["messages"] for _, r in data.read_records(REPLIES)]


@pytest.fixture(scope="module")
def docs(codec, conversations):
    return ledger_chats(conversations, codec, length=2048, count=4, seed=3)


def test_a_document_is_as_long_as_asked_and_ends_on_a_note_handed_over_far_back(docs, codec, conversations):
    """Each chat holds 95–100% of 2,048 tokens of the template (counted as the rows count them); its last
    question asks for a note handed over once, in the first half of the chat, whose code the answer repeats; the
    rest is the teacher's conversations, each at most once."""
    known = {json.dumps(c[0]) for c in conversations}
    for doc in docs:
        messages = doc["messages"]
        ids = codec.chat(messages, add_generation_prompt=False)
        assert doc["tokens"] == len(ids) and 0.95 * 2048 <= len(ids) <= 2048 and doc["loss"] == "all"
        question, answer = messages[-2]["content"], messages[-1]["content"]
        assert answer.endswith(f"is {doc['answer']}.") and question.startswith("Earlier I gave you the")
        notes = [i for i, m in enumerate(messages) if m["role"] == "user" and doc["answer"] in m["content"]]
        assert len(notes) == 1 and messages[notes[0]]["content"].startswith(NOTE.split("{")[0])
        assert notes[0] < len(messages) / 2
        users = [json.dumps(m) for m in messages if m["role"] == "user" and "keep this for later" not in
                 m["content"]][:-1]
        assert set(users) <= known and len(users) == len(set(users))


def test_documents_are_the_same_for_a_seed_and_differ_between_seeds(codec, conversations, docs):
    assert ledger_chats(conversations, codec, length=2048, count=4, seed=3) == docs
    assert ledger_chats(conversations, codec, length=2048, count=4, seed=4) != docs


def test_documents_share_nothing_with_the_long_context_evaluations(docs):
    """No needle phrasing, none of RULER's noise-haystack sentences, no key of the needle map (its adjective-noun
    pairs), and no value of its form (7 digits): the codes are a letter, a dash and four digits."""
    text = " ".join(m["content"] for d in docs for m in d["messages"]).lower()
    assert "special magic number" not in text and "what is the special" not in text
    assert not [s for s in HAYSTACK.lower().split(".") if s.strip() and s.strip() in text]
    assert not [f"{a} {n}" for a, n in itertools.product(ADJECTIVES, NOUNS) if f"{a} {n}" in text]
    assert not re.search(r"\b\d{7}\b", text)
    assert all(re.fullmatch(r"[A-Z]-\d{4}", d["answer"]) for d in docs)
    assert ASK.split("{")[0] in " ".join(m["content"] for d in docs for m in d["messages"])


def test_a_row_of_a_long_chat_counts_every_token(codec, docs):
    """``"loss": "all"``: the row's loss mask covers every real token, where a chat record's counts its last reply
    only; any other value is refused by name."""
    whole = data.lm_row("doc", docs[0], codec, 2048)
    reply = data.lm_row("doc", {"messages": docs[0]["messages"]}, codec, 2048)
    assert whole["loss_mask"].sum() == whole["token_mask"].sum() == docs[0]["tokens"]
    assert reply["loss_mask"].sum() < 40
    with pytest.raises(data.DataError, match="'loss' is 'most'; expected 'reply'"):
        data.lm_row("f.jsonl:1", {**docs[0], "loss": "most"}, codec, 2048)


def test_long_docs_writes_them_and_refuses_a_length_too_short_in_one_line(smollm2_tokenizer, tiny_chat, tmp_path,
                                                                          capsys):
    from zebrax.app.cli import main

    out = tmp_path / "long.jsonl"
    assert main(["long-docs", REPLIES, "--teacher", str(tiny_chat), "--length", "1024", "--count", "2", "--seed",
                 "1", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["documents"] == len(records) == 2 and summary["conversations"] == 320
    assert all(900 <= r["tokens"] <= 1024 for r in records)
    code = main(["long-docs", REPLIES, "--teacher", str(tiny_chat), "--length", "100", "--count", "1", "--out",
                 str(tmp_path / "short.jsonl")])
    assert_one_line_error(code, capsys.readouterr().err, "length=100 holds no conversation beside 8 notes")
    assert not (tmp_path / "short.jsonl").exists()
    with pytest.raises(InvalidArgument, match="no conversations"):
        ledger_chats([], None, length=100, count=1)
    assert main(["long-docs", REPLIES, "--teacher", str(tiny_chat), "--kind", "recall", "--length", "512", "--count",
                 "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["documents"] == 2 and all(r["asked"] and r["loss"] == "all" for r in records)


def test_a_recall_chat_repeats_answers_of_its_first_half_word_for_word(codec, conversations):
    """``recall_chats``: at most ``length`` tokens and at least half of it (what ``kd_long`` asks of a document);
    the teacher's conversations once each, then for each asked one of the first half its question quoted and its
    answer verbatim; the same for a seed; nothing of the needle map's; bad counts and a length too short in one
    line."""
    docs = recall_chats(conversations, codec, length=512, count=6, seed=5, recalls=2)
    known = {json.dumps(c[:2]) for c in conversations}
    for doc in docs:
        messages, asked = doc["messages"], doc["asked"]
        assert doc["tokens"] == len(codec.chat(messages, add_generation_prompt=False)) and doc["loss"] == "all"
        assert 256 <= doc["tokens"] <= 512 and 1 <= len(asked) <= 2
        body, tail = messages[:-2 * len(asked)], messages[-2 * len(asked):]
        pairs = [body[i:i + 2] for i in range(0, len(body), 2)]
        assert {json.dumps(p) for p in pairs} <= known and len(pairs) == len({json.dumps(p) for p in pairs})
        for a, (question, answer) in zip(asked, zip(tail[::2], tail[1::2], strict=True), strict=True):
            assert a < len(pairs) / 2
            assert question["content"] == RECALL.format(question=pairs[a][0]["content"])
            assert answer == {"role": "assistant", "content": pairs[a][1]["content"]}
    assert recall_chats(conversations, codec, length=512, count=6, seed=5) == docs
    assert recall_chats(conversations, codec, length=512, count=6, seed=6) != docs
    text = " ".join(m["content"] for d in docs for m in d["messages"]).lower()
    assert "special magic number" not in text and not re.search(r"\b\d{7}\b", text)
    with pytest.raises(InvalidArgument, match="length=40 holds no two conversations"):
        recall_chats(conversations, codec, length=40, count=1)
    with pytest.raises(InvalidArgument, match="tokens, under half of length=4000 once its repetitions fit"):
        recall_chats(conversations[:3], codec, length=4000, count=1)  # kd_long would refuse such a document
    with pytest.raises(InvalidArgument, match="recalls=0 must be >= 1"):
        recall_chats(conversations, codec, length=512, count=1, recalls=0)

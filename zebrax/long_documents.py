"""Long training documents, made offline and kept apart from every long-context evaluation.

A context-extension stage (``distill.long_data``, stage ``kd_long``) needs documents as long as its rows, in which
the far past matters. ``ledger_chats`` makes them from a teacher's own short conversations: one long multi-turn chat
of those conversations in a shuffled order, into which a user hands over notes ("Please keep this for later: the
locker code of Marta in Lisbon is K-4821.") and which ends on a question about one of them, answered from the note.
Every token counts in the loss (a chat record with ``"loss": "all"``), so KD teaches the student to track the whole
chat, and the last answer can be copied only from far back. ``recall_chats`` makes a denser copying signal of the
same conversations: the chat ends by asking for earlier answers word for word, and repeats them.

Kept apart from the evaluations by construction (``tests/test_long_documents.py``): no needle phrasing ("special
magic number"), none of RULER's noise-haystack sentences, no key of the needle map (its adjective-noun pairs), and
values of another form (a letter, a dash and four digits, where the needles hold 7-digit numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zebrax.errors import InvalidArgument

NOTE = "Please keep this for later: the {item} of {person} in {city} is {code}."
NOTED = "Noted: the {item} of {person} in {city} is {code}."
ASK = "Earlier I gave you the {item} of {person} in {city}. What is it?"
ANSWER = "The {item} of {person} in {city} is {code}."
RECALL = 'Repeat, word for word, your answer to "{question}"'
PEOPLE = ("Marta", "Tomasz", "Aiko", "Dmitri", "Leila", "Oscar", "Priya", "Henrik", "Chiara", "Kofi", "Ingrid",
          "Rafael", "Yusuf", "Elena", "Bram", "Noor", "Felix", "Sanna", "Mateo", "Grace")
CITIES = ("Lisbon", "Krakow", "Osaka", "Tbilisi", "Accra", "Bergen", "Porto", "Quito", "Tallinn", "Lyon", "Hanoi",
          "Cusco", "Dublin", "Izmir", "Graz", "Perth")
ITEMS = ("locker code", "flight number", "booking reference", "table number", "badge number", "parcel code",
         "room code", "ticket number")


def _code(rng: np.random.Generator) -> str:
    return f"{chr(ord('A') + int(rng.integers(26)))}-{int(rng.integers(1000, 10000))}"


def ledger_chats(conversations: Sequence[Sequence[dict]], codec, *, length: int, count: int, seed: int = 0,
                 notes: int = 8) -> list[dict]:
    """``count`` chat records (``{"messages", "loss": "all", "tokens", "answer"}``) of at most ``length`` tokens of
    ``codec``'s chat template: ``conversations`` (lists of user/assistant messages, e.g. a teacher's replies) in a
    shuffled order, up to ``notes`` notes handed over at random turns of the first half, and the question about one
    of them with its answer last. ``"loss": "all"``: every token of the chat counts (``data.lm_row``)."""
    if count < 1 or length < 1 or notes < 1:
        raise InvalidArgument(f"long documents: count={count}, length={length} and notes={notes} must be >= 1")
    turns = [list(c) for c in conversations if c]
    if not turns:
        raise InvalidArgument("long documents: no conversations to make them of")
    rng = np.random.default_rng(seed)
    size = lambda messages: len(codec.chat(messages, add_generation_prompt=False))  # noqa: E731
    qa = lambda fact: [{"role": "user", "content": ASK.format(**fact)},  # noqa: E731
                       {"role": "assistant", "content": ANSWER.format(**fact)}]
    out = []
    for _ in range(count):
        facts = [dict(item=str(rng.choice(ITEMS)), person=str(p), city=str(rng.choice(CITIES)), code=_code(rng))
                 for p in rng.choice(PEOPLE, size=notes, replace=False)]
        longest = max((qa(f) for f in facts), key=size)  # room kept for whichever question comes last
        pairs = [[{"role": "user", "content": NOTE.format(**f)}, {"role": "assistant", "content": NOTED.format(**f)}]
                 for f in facts]
        room = length - max(size(longest + p) - size(longest) for p in pairs) * notes
        picked: list[list[dict]] = []
        order = rng.permutation(len(turns)).tolist()
        for j in order:
            if size(sum(picked, []) + turns[j] + longest) > room:
                break
            picked.append(turns[j])
        # the notes go in at turns of the first half, so an answer is far from its note
        half = max(1, len(picked) // 2)
        at = sorted(rng.choice(half, size=min(notes, half), replace=False).tolist())
        chat, given = [], []
        for i, conversation in enumerate(picked):
            if i in at:
                fact = facts[len(given)]
                chat += pairs[len(given)]
                given.append(fact)
            chat += conversation
        for j in order[len(picked):]:  # the room of notes not handed over, filled with more conversations
            if size(chat + turns[j] + longest) > length:
                break
            chat += turns[j]
        if not picked or size(chat + longest) > length:
            raise InvalidArgument(f"long documents: length={length} holds no conversation beside {notes} notes and "
                                  f"a question; give a longer length, fewer notes or shorter conversations")
        asked = given[int(rng.integers(len(given)))]
        chat += qa(asked)
        tokens = size(chat)
        if tokens > length:
            raise InvalidArgument(f"long documents: a chat came to {tokens} tokens, past length={length} (a chat "
                                  f"template whose turns do not add up)")
        out.append({"messages": chat, "loss": "all", "tokens": tokens, "answer": asked["code"]})
    return out


def recall_chats(conversations: Sequence[Sequence[dict]], codec, *, length: int, count: int, seed: int = 0,
                 recalls: int = 2) -> list[dict]:
    """``count`` chat records (``{"messages", "loss": "all", "tokens", "asked"}``) of at most ``length`` tokens of
    ``codec``'s chat template: the first question and answer of ``conversations`` in a shuffled order, then up to
    ``recalls`` turns asking for an answer of the chat's first half word for word (``RECALL``), each answered by that
    answer verbatim. Every token of a repeated answer can be copied from far back, so KD on them asks the student
    for the teacher's copying on whole replies, where a ledger chat asks it once, for one code. ``asked``: the
    indices, among the chat's conversations, of those repeated."""
    if count < 1 or length < 1 or recalls < 1:
        raise InvalidArgument(f"long documents: count={count}, length={length} and recalls={recalls} must be >= 1")
    pairs = [list(c[:2]) for c in conversations
             if len(c) >= 2 and c[0].get("role") == "user" and c[1].get("role") == "assistant"]
    if not pairs:
        raise InvalidArgument("long documents: no conversations (a user turn, then the assistant's) to make them of")
    rng = np.random.default_rng(seed)
    size = lambda messages: len(codec.chat(messages, add_generation_prompt=False))  # noqa: E731
    out = []
    for _ in range(count):
        body: list[dict] = []
        for j in rng.permutation(len(pairs)).tolist():
            if size(body + pairs[j]) <= length:
                body += pairs[j]
        draws = rng.random(recalls)
        while True:  # the last conversations give way to the repetitions
            if len(body) < 4:
                raise InvalidArgument(f"long documents: length={length} holds no two conversations beside the "
                                      f"repetition of one; give a longer length or shorter conversations")
            half = len(body) // 4  # conversations in the chat's first half
            asked = sorted({int(u * half) for u in draws})
            tail = [m for a in asked for m in (
                {"role": "user", "content": RECALL.format(question=body[2 * a]["content"])},
                {"role": "assistant", "content": body[2 * a + 1]["content"]})]
            if size(body + tail) <= length:
                break
            body = body[:-2]
        chat = body + tail
        tokens = size(chat)
        if 2 * tokens < length:  # what a context-extension stage asks of a document (inputs.long_rows)
            raise InvalidArgument(f"long documents: a chat came to {tokens} tokens, under half of length={length} "
                                  f"once its repetitions fit; give a longer length or shorter conversations")
        out.append({"messages": chat, "loss": "all", "tokens": tokens, "asked": asked})
    return out

__all__ = ["ASK", "CITIES", "ITEMS", "NOTE", "PEOPLE", "RECALL", "ledger_chats", "recall_chats"]

"""Long-context measures (``zebrax.long_context``, ``zebrax long-eval``): the needle prompts are what they say, the
needle scores and the loss against position equal those of whole forward passes and greedy generation (fp32), on a
tiny Llama with SmolLM2's tokenizer and on a hybrid of it (MLA + Gated DeltaNet); bad input is one line."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import zebrax
from tests.helpers import assert_one_line_error
from zebrax.errors import InvalidArgument
from zebrax.long_context import ANSWER_TOKENS, Haystack, _score_answers, needle_map, position_bins, position_nll
from zebrax.losses import token_logprobs


@pytest.fixture(scope="module")
def models(tiny_chat, tmp_path_factory):
    """{"teacher": the tiny chat Llama, "hybrid": MLA at layer 0, Gated DeltaNet at layer 1, both with its tokenizer;
    "paths": their checkpoints}."""
    dst = tmp_path_factory.mktemp("long") / "hybrid"
    zebrax.build(tiny_chat, dst, mla_layers=[0], kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, linear="gdn",
                 gdn={"chunk_size": 8})
    return {"teacher": zebrax.load(tiny_chat), "hybrid": zebrax.load(dst), "paths": {"teacher": tiny_chat,
                                                                                     "hybrid": dst}}


def test_a_needle_prompt_has_its_length_and_the_needle_at_its_depth(models):
    model = models["teacher"]
    hay = Haystack(model.tokenizer)
    needle, question, answer = hay.needle("calm harbor", "4821937")
    starts = []
    for depth in (0.0, 0.5, 1.0):
        ids, got_answer, at = hay.prompt(300, depth, "calm harbor", "4821937")
        assert len(ids) == 300 and got_answer == answer
        assert ids[at:at + len(needle)] == needle and ids[-len(question):] == question
        starts.append(at)
    assert starts[0] == len(hay.prefix) and starts[0] < starts[1] < starts[2]
    assert 0.35 < (starts[1] - starts[0]) / (starts[2] - starts[0]) < 0.65
    text = model.decode(hay.prompt(300, 0.5, "calm harbor", "4821937")[0])
    assert "The grass is green." in text and "special magic numbers for calm harbor is: 4821937." in text
    assert model.decode(answer).strip() == "4821937"


@pytest.mark.parametrize("name", ["teacher", "hybrid"])
def test_needle_scores_are_those_of_whole_passes_and_greedy_decoding(models, name):
    """Each prompt prefilled in chunks of 64, then the value fed a token a step: Σ log p(value) equals the whole
    forward pass's (1e-4), and "every step's argmax is the value" holds exactly for the model's own greedy
    continuation and fails once a token of it is changed."""
    model = models[name]
    hay = Haystack(model.tokenizer)
    built = [hay.prompt(n, d, k, v) for n, d, k, v in ((150, 0.0, "calm harbor", "4821937"),
                                                        (300, 1.0, "icy lantern", "1000003"))]
    prompts, answers = [b[0] for b in built], [b[1] for b in built]
    logp, _, texts = _score_answers(model, prompts, answers, prefill_chunk=64)
    # the greedy continuation read from the same cache is generate's, cut at end-of-sequence
    steps = max(map(len, answers)) + ANSWER_TOKENS
    generated = model.generate(prompts, max_new_tokens=steps, prefill_chunk=None)
    assert texts == [model.decode(out[len(p):]) for p, out in zip(prompts, generated, strict=True)]
    for p, a, got in zip(prompts, answers, logp, strict=True):
        whole = model.logits(np.asarray([p + a], np.int32))
        want = token_logprobs(whole[:, len(p) - 1:-1], np.asarray([a], np.int32)).sum()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    greedy = [out[len(p):] for p, out in zip(prompts, model.generate(prompts, max_new_tokens=3, ignore_eos=True,
                                                                      prefill_chunk=None), strict=True)]
    assert _score_answers(model, prompts, greedy, prefill_chunk=64)[1] == [True, True]
    assert all(text.startswith(model.decode(g)) for text, g in zip(texts, greedy, strict=True))
    changed = [[g[0], (g[1] + 1) % model.config.vocab_size, g[2]] for g in greedy]
    assert _score_answers(model, prompts, changed, prefill_chunk=64)[1] == [False, False]


def test_a_needle_map_has_a_cell_for_each_length_and_depth(models):
    result = needle_map(models["hybrid"], lengths=[150, 200], depths=[0, 0.5, 1], samples=2, batch_size=4,
                        prefill_chunk=64)
    assert result["lengths"] == [150, 200] and result["depths"] == [0.0, 0.5, 1.0]
    for field in ("accuracy", "exact", "logprob", "value_tokens"):
        assert np.asarray(result[field]).shape == (2, 3)
    assert np.all(np.asarray(result["logprob"]) < 0) and np.all(np.asarray(result["value_tokens"]) >= 7)
    # accuracy is RULER's substring match over the answers it reports; exact implies found
    assert len(result["answers"]) == 12
    for li, n in enumerate(result["lengths"]):
        for di, d in enumerate(result["depths"]):
            cell = [a for a in result["answers"] if a["length"] == n and a["depth"] == d]
            assert result["accuracy"][li][di] == pytest.approx(np.mean([a["value"] in a["continuation"]
                                                                         for a in cell]))
            assert result["exact"][li][di] <= result["accuracy"][li][di]


def test_needle_accuracy_finds_the_value_anywhere_in_the_continuation(models, monkeypatch):
    """RULER's match: a continuation ": 4821937." counts, one that misses a digit does not; exact counts only a
    continuation that starts with the value's tokens."""
    import zebrax.long_context as lc

    said = iter([": {v}.", " {v}", " 482193"])

    def answer(model, prompts, answers, prefill_chunk):
        text = next(said)
        values = [model.decode(a).strip() for a in answers]
        return [-1.0] * len(prompts), [text == " {v}"] * len(prompts), [text.format(v=v) for v in values]

    monkeypatch.setattr(lc, "_score_answers", answer)
    got = [needle_map(models["teacher"], lengths=[150], depths=[0.5], samples=1) for _ in range(3)]
    assert [g["accuracy"][0][0] for g in got] == [1.0, 1.0, 0.0]
    assert [g["exact"][0][0] for g in got] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["teacher", "hybrid"])
def test_loss_against_position_is_the_whole_passes(models, name, rng):
    """Documents of 70, 40 and 64 tokens, length 64 in chunks of 16, two a batch: the 40-token one is skipped, and
    each position's NLL is the mean over the others of their whole forward pass's (1e-4)."""
    model = models[name]
    docs = [rng.integers(4, 4000, n).tolist() for n in (70, 40, 64)]
    result = position_nll(model, docs, length=64, batch_size=2, chunk=16)
    assert result["documents"] == 2 and result["skipped"] == 1 and result["edges"] == position_bins(64)
    kept = np.asarray([docs[0][:64], docs[2]], np.int32)
    want = -token_logprobs(model.logits(kept)[:, :-1], kept[:, 1:]).mean(0)
    np.testing.assert_allclose(result["nll_by_position"], want, rtol=0, atol=1e-4)
    assert position_bins(64) == [1, 2, 4, 8, 16, 32, 64]
    np.testing.assert_allclose(result["nll"][-1], want[31:63].mean(), rtol=0, atol=1e-4)


def test_long_eval_writes_json_and_one_figure_of_both_models(models, tmp_path, capsys):
    from zebrax.app.cli import main

    named = [f"{name}={path}" for name, path in models["paths"].items()]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(["word"] * 90)}) + "\n" for _ in range(2)))
    for args, plot in ((["needle", *named, "--lengths", "150", "--depths", "0", "1", "--samples", "1",
                         "--prefill-chunk", "64"], "needle.png"),
                       (["positions", *named, "--data", str(docs), "--length", "64", "--chunk", "32"],
                        "positions.png")):
        assert main(["long-eval", *args, "--out", str(tmp_path / "out.json"), "--plot", str(tmp_path / plot)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert list(out["results"]) == ["teacher", "hybrid"] and out["measure"] == args[0]
        assert json.loads((tmp_path / "out.json").read_text()) == out
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_bad_long_context_input_is_one_line(models, tiny_chat, tmp_path, capsys):
    model = models["teacher"]
    minimum = Haystack(model.tokenizer).minimum
    for kwargs, needle in ((dict(lengths=[minimum - 1]), f"length={minimum - 1} is below the {minimum} tokens"),
                           (dict(lengths=[200], depths=[1.5]), "depths [1.5] must be numbers in [0, 1]"),
                           (dict(lengths=[200], prefill_chunk=0), "prefill_chunk=0 must be an integer >= 1"),
                           (dict(lengths=[]), "at least one length")):
        with pytest.raises(InvalidArgument, match=needle.replace("[", r"\[").replace("]", r"\]")):
            needle_map(model, **kwargs)
    with pytest.raises(InvalidArgument, match="no document has length=64 tokens .the longest has 10."):
        position_nll(model, [[5] * 10], length=64)
    with pytest.raises(InvalidArgument, match="chunk=24 must divide length=64"):
        position_nll(model, [[5] * 64], length=64, chunk=24)
    from zebrax.app.cli import main

    for args, needles in ((["needle", str(tiny_chat), "--depths", "2"], ["--depths", "'2'", "[0, 1]"]),
                          (["needle", str(tiny_chat), "--lengths", "0"], ["--lengths", "'0'"]),
                          (["positions", str(tiny_chat), "--data", "x.txt", "--length", "1"], ["--length", "'1'"]),
                          (["needle", str(tiny_chat), "--lengths", "20"], ["length=20 is below"])):
        capsys.readouterr()
        assert_one_line_error(main(["long-eval", *args]), capsys.readouterr().err, *needles)


def test_layer_retrieval_scores_the_teacher_with_each_layer_a_students(models, tiny_chat, tmp_path, capsys):
    """``layer_retrieval`` on the tiny Llama and its all-GDN student: the teacher's row, each single swap and the
    whole student (``together`` = every layer) equal the needle map's log-probabilities of those very models (its
    cached prefill and stepwise scoring, 1e-4 in fp32, the same needles); the cost is the teacher's sum less the
    swap's; the CLI writes the same JSON; bad input is one line."""
    from zebrax.app.cli import main
    from zebrax.long_context import layer_retrieval

    zebrax.build(tiny_chat, tmp_path / "gdn", mla_layers=[], linear="gdn", gdn={"chunk_size": 8})
    zebrax.build(tiny_chat, tmp_path / "gdn1", mla_layers=[], attention_layers=[0], linear="gdn",
                 gdn={"chunk_size": 8})
    teacher, student, swapped = (zebrax.load(p) for p in (tiny_chat, tmp_path / "gdn", tmp_path / "gdn1"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(student.params["layers_1"]),
                                                     jax.tree.leaves(swapped.params["layers_1"]), strict=True))
    got = layer_retrieval(teacher, student, length=150, depths=[0, 1], samples=2, seed=3, together=[2])

    def needles(model):
        return needle_map(model, lengths=[150], depths=[0, 1], samples=2, seed=3)["logprob"][0]

    np.testing.assert_allclose(got["teacher"], needles(teacher), atol=1e-4)
    np.testing.assert_allclose(got["layers"][1], needles(swapped), atol=1e-4)
    np.testing.assert_allclose(got["together"][0]["logprob"], needles(student), atol=1e-4)
    assert got["together"][0]["swapped"] == [0, 1] and got["kind"] == "gdn" and len(got["layers"]) == 2
    for row, cost in zip(got["layers"], got["cost"], strict=True):
        assert cost == pytest.approx(sum(got["teacher"]) - sum(row), abs=1e-3)
    assert got["layers"][0] != got["teacher"]  # a swap changes the scores

    out = tmp_path / "layers.json"
    capsys.readouterr()
    assert main(["long-eval", "layers", str(tiny_chat), str(tmp_path / "gdn"), "--length", "150", "--depths", "0",
                 "1", "--seed", "3", "--together", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"] == got == json.loads(capsys.readouterr().out)["results"]
    with pytest.raises(InvalidArgument, match="the student must be a hybrid of one student kind .* LlamaConfig"):
        layer_retrieval(student, teacher)  # swapped
    with pytest.raises(InvalidArgument, match="the teacher must be a Llama .* it is a HybridConfig of layers LD"):
        layer_retrieval(models["hybrid"], student)
    for kwargs, needle in ((dict(student=models["hybrid"]), "must all be of one student kind, it has LD"),
                           (dict(together=[3]), "together=3 must be a count of layers in 1..2"),
                           (dict(length=20), "length=20 is below the")):
        with pytest.raises(InvalidArgument, match=needle):
            layer_retrieval(teacher, **{"student": student, **kwargs})

"""The real embedded teacher: zebrax from the GGUF vs transformers loading the same GGUF (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zebrax
from tests.helpers import assert_greedy_matches
from zebrax.models import param_count

MESSAGES = [
    {"role": "user", "content": "Explain in two sentences why the sky is blue, and then name three colours that "
                                "appear in a sunset over the sea. Keep it simple enough for a curious ten-year-old."},
]


@pytest.fixture(scope="module")
def teacher(smollm2_gguf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def model(smollm2_checkpoint):
    return zebrax.load(smollm2_checkpoint)


def test_config_read_from_metadata(model):
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (1536, 49152, 100000.0, True)
    assert param_count(model.config) == 134_515_008
    assert model.cache_bytes_per_token() == 30 * 2 * 3 * 64 * 4


def test_chat_prompt_logits_match_transformers(model, teacher):
    tokens = np.asarray([model.chat_tokens(MESSAGES)])
    assert tokens.shape[1] >= 60
    with torch.no_grad():
        want = teacher(torch.from_numpy(tokens)).logits.numpy()
    got = model.logits(tokens)
    err = np.abs(got - want).max()
    assert err <= 1e-3, f"max |Δlogit| = {err:.2e}"
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_32_greedy_tokens_match_transformers(model, teacher):
    assert_greedy_matches(model, teacher, np.asarray([model.chat_tokens(MESSAGES)]), 32, pad_token_id=2)


def test_answers_the_capital_question(model):
    assert "Paris" in model.chat("What is the capital of France?", max_new_tokens=24)


TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def test_eval_perplexity_matches_transformers(smollm2_checkpoint, teacher, tmp_path, capsys):
    """`zebrax eval` on a fixed text: the perplexity transformers' logits give on the same tokens (1e-4 relative)."""
    import json

    from zebrax.app.cli import main

    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["eval", str(smollm2_checkpoint), "--data", str(tmp_path / "text.txt"), "--seq-len", "256"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = zebrax.load(smollm2_checkpoint).encode(TEXT)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0, :-1].double(), -1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    assert got["rows"] == 1 and got["predicted_tokens"] == len(ids) - 1 > 30
    np.testing.assert_allclose(got["perplexity"], np.exp(nll), rtol=1e-4)

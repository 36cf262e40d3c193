"""Comparisons every parity test makes between a zebrax model and its transformers twin."""

from __future__ import annotations

import numpy as np
import torch


def transformers_greedy(hf, prompt: np.ndarray, max_new_tokens: int, pad_token_id: int = 0) -> np.ndarray:
    """transformers' greedy continuation, EOS ignored. The mask is explicit: transformers would otherwise
    mask every prompt token equal to the pad id."""
    tokens = torch.from_numpy(np.asarray(prompt))
    return hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=pad_token_id).numpy()


def assert_logits_match(model, hf, tokens: np.ndarray, atol: float, min_std: float = 0.3) -> float:
    """max |Δlogit| <= atol over a full forward pass; returns the measured error."""
    with torch.no_grad():
        want = hf(torch.from_numpy(np.asarray(tokens))).logits.numpy()
    got = model.logits(tokens)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert want.std() > min_std, "random logits too small for the tolerance to mean anything"
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    return float(np.abs(got - want).max())


def assert_greedy_matches(model, hf, prompt: np.ndarray, max_new_tokens: int, pad_token_id: int = 0) -> None:
    got = model.generate(np.asarray(prompt), max_new_tokens=max_new_tokens, ignore_eos=True)
    np.testing.assert_array_equal(got, transformers_greedy(hf, prompt, max_new_tokens, pad_token_id))


def assert_export_round_trip(ckpt, hf, directory, tokens: np.ndarray) -> None:
    """zebrax → HF directory → transformers gives the original transformers model's logits (fp32, 1e-6)."""
    import transformers

    from zebrax.convert.export import export

    export(ckpt, directory)
    back = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.from_numpy(np.asarray(tokens))
        np.testing.assert_allclose(back(t).logits.numpy(), hf(t).logits.numpy(), rtol=0, atol=1e-6)

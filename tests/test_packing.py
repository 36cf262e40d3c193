"""Documents packed into one row stay apart: the SSD scan resets at each document start, attention stays within a
document, the Mamba2 conv reads nothing across a start, and whole models give each packed document the logits it
gets alone — for every implementation. fp32: ops 1e-5 (Pallas, interpreted, 1e-4) and models 1e-5, relative to
each array's largest magnitude."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zebrax
from kernels_pallas.flash_attention import BlockSizes, attention_reference, flash_attention
from kernels_pallas.ssd import ssd_pallas
from tests.helpers import MIXED, close, compiled, random_model
from zebrax import data
from zebrax.ops import ssd
from zebrax.ops.attention_blocked import Blocks, attention_blocked

# row 0: documents of 10, 20, 10 tokens and 5 of padding; row 1: 20 and 25
SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 10 + [0] * 5, [1] * 20 + [2] * 25], np.int32)


def grads(fn, args, ct, **kw):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * ct), argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("impl", ["blocked", "flash_loop", "flash_grid"])
def test_attention_keeps_documents_apart(impl, rng):
    b, length, h, g = *SEGMENTS.shape, 4, 2
    args = [jnp.asarray(rng.normal(size=(b, length, n, d)), jnp.float32) for n, d in ((h, 16), (g, 16), (g, 12))]
    ct = jnp.asarray(rng.normal(size=(b, length, h, 12)), jnp.float32)
    rows = dict(kv_mask=jnp.asarray(SEGMENTS > 0), segment_ids=jnp.asarray(SEGMENTS))
    grid = dict(backend="tpu", interpret=True, block_sizes=BlockSizes(8, 128))
    fn, kw = {"blocked": (attention_blocked, dict(blocks=Blocks(16, 16))), "flash_loop": (flash_attention, {}),
              "flash_grid": (flash_attention, grid)}[impl]
    (got, got_grads), (want, want_grads) = grads(fn, args, ct, **rows, **kw), grads(attention_reference, args, ct,
                                                                                    **rows)
    close(got, want, 1e-5)
    for name, gt, w in zip("qkv", got_grads, want_grads, strict=True):
        close(gt, w, 1e-4 if impl.startswith("flash") else 1e-5, f"d/d{name}")
    alone = compiled(attention_reference, *(a[:1, 10:30] for a in args))  # the reference itself: document 2 of row 0
    close(compiled(attention_reference, *args, **rows)[:1, 10:30], alone, 1e-5)


@pytest.mark.parametrize("impl", ["chunked", "pallas", "pallas_grid"])
def test_ssd_resets_at_document_starts(impl, rng):
    b, length, h, g, p, n = *SEGMENTS.shape, 4, 2, 8, 6
    arr = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)  # noqa: E731
    args = dict(x=arr(b, length, h, p), dt=jax.nn.softplus(arr(b, length, h) - 1.0), A=-jnp.exp(arr(h, scale=0.5)),
                B=arr(b, length, g, n, scale=0.5), C=arr(b, length, g, n, scale=0.5), D=arr(h))
    s0 = arr(b, h, p, n)
    reset = jnp.asarray(np.concatenate([np.ones((b, 1), bool), SEGMENTS[:, 1:] != SEGMENTS[:, :-1]], axis=1))

    def run(which, x, B, C, s0, dt, A):
        rest = dict(args, x=x, B=B, C=C, dt=dt, A=A, initial_state=s0, reset=reset, chunk_size=16)
        if which == "pallas_grid":
            return ssd_pallas(**rest, backend="tpu", interpret=True)
        return ssd(**rest, impl=which)

    ct = arr(b, length, h, p)

    def loss(which, *values):
        y, s = run(which, *values)
        return jnp.sum(y * ct) + jnp.sum(s), (y, s)

    values = [args["x"], args["B"], args["C"], s0, args["dt"], args["A"]]
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=range(1, 7), has_aux=True), static_argnums=0)
    (_, want), want_grads = value_and_grad("reference", *values)
    (_, got), got_grads = value_and_grad(impl, *values)
    tol = 1e-5 if impl == "chunked" else 1e-4
    for name, gt, w in zip(["y", "final state"], got, want, strict=True):
        close(gt, w, tol, name)
    for name, gt, w in zip(["x", "B", "C", "initial_state", "dt", "A"], got_grads, want_grads, strict=True):
        close(gt, w, tol, f"d/d{name}")
    # the reference itself: document 2 of row 0 from a zero state, and the initial state never reaches it
    alone, _ = compiled(ssd, **{k: (v[:1, 10:30] if k in ("x", "dt", "B", "C") else v) for k, v in args.items()},
                            chunk_size=16, impl="reference")
    close(want[0][:1, 10:30], alone, 1e-5, "document alone")


@pytest.mark.parametrize("impls", [{"attention": "reference", "ssd": "reference"},
                                   {"attention": "blocked", "ssd": "chunked"},
                                   {"attention": "pallas", "ssd": "pallas"}], ids=["reference", "xla", "pallas"])
def test_models_give_packed_documents_the_logits_they_get_alone(impls, rng):
    """MLA, Mamba2 and attention layers (L S A L S); documents of 7, 2 (shorter than the conv), 12 and 5 tokens."""
    model = random_model(MIXED, seed=1)
    model = zebrax.Model(MIXED, model.params, impl=impls)
    docs = [rng.integers(0, 97, n) for n in (7, 2, 12, 5)]
    alone = {"tokens": np.stack([np.pad(d, (0, 12 - len(d))) for d in docs]),
             "token_mask": np.stack([np.arange(12) < len(d) for d in docs])}
    rows = data.pack(alone | {"loss_mask": alone["token_mask"]}, 16)
    assert rows["tokens"].shape == (2, 16) and rows["segment_ids"].max() == 3  # [7, 2, 5] and [12]
    forward = jax.jit(lambda t, m, s: model.module.apply({"params": model.params}, t, token_mask=m, segment_ids=s)[0])
    packed = forward(rows["tokens"], rows["token_mask"], rows["segment_ids"])
    each = model.logits(alone["tokens"], alone["token_mask"])  # right padding: the real positions are the document's
    for i, doc in enumerate(docs):
        row, start = next((r, int(np.flatnonzero(rows["segment_ids"][r] == s)[0]))
                          for r in range(2) for s in range(1, 4)
                          if np.array_equal(rows["tokens"][r][rows["segment_ids"][r] == s], doc))
        close(packed[row, start:start + len(doc)], each[i, :len(doc)], 1e-5, f"document {i}")


def test_pack_places_whole_documents_first_fit():
    lengths = [5, 3, 6, 2, 8]
    rows = {"tokens": np.stack([np.pad(np.full(n, i + 1), (0, 8 - n)) for i, n in enumerate(lengths)]),
            "token_mask": np.stack([np.arange(8) < n for n in lengths])}
    rows["loss_mask"] = rows["token_mask"].copy()
    rows["loss_mask"][2, :3] = False  # a prompt
    packed = data.pack(rows, 8)
    np.testing.assert_array_equal(packed["tokens"], [[1] * 5 + [2] * 3, [3] * 6 + [4] * 2, [5] * 8])
    np.testing.assert_array_equal(packed["segment_ids"], [[1] * 5 + [2] * 3, [1] * 6 + [2] * 2, [1] * 8])
    assert packed["token_mask"].all() and packed["loss_mask"].sum() == sum(lengths) - 3
    assert not packed["loss_mask"][1, :3].any()
    batch = {"token_mask": packed["token_mask"], "segment_ids": packed["segment_ids"]}
    # the last token of a document predicts nothing that counts
    assert data.next_in_document(batch)[0].tolist() == [True] * 4 + [False] + [True] * 2

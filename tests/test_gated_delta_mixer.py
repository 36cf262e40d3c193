"""The Gated DeltaNet mixer (zebrax/mixers/gdn/): parity with transformers' PyTorch Qwen3-Next layer
(``Qwen3NextGatedDeltaNet``, its weights converted), a prefill then decode steps against the full forward, padding
and packed rows, the attention-shaped head layout, configs. fp32; tolerances 1e-5 absolute against transformers
(outputs of std ≥ 0.1), 1e-5 of the largest output between the chunked and step forms (their sums run in other
orders: measured 1.4e-5 on outputs up to 4.1)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zebrax.cache import Slots, token_positions
from zebrax.errors import ConfigError
from zebrax.mixers.gdn.config import GatedDeltaConfig
from zebrax.mixers.gdn.layer import GatedDeltaMixer

D, H, HK, DK, DV = 32, 4, 2, 8, 6
QWEN_LAYOUT = GatedDeltaConfig(d_model=D, n_heads=H, head_k_dim=DK, head_v_dim=DV, q_heads=HK, k_heads=HK,
                               chunk_size=8)
# initialised from GQA attention: q on the 4 query heads, k and v on the 2 KV heads, head_k_dim = head_v_dim
ATTENTION_SHAPED = GatedDeltaConfig(d_model=D, n_heads=H, head_k_dim=8, head_v_dim=8, k_heads=2, v_heads=2,
                                    chunk_size=8)


def slots(mask, segment_ids=None):
    mask = jnp.asarray(mask, bool)
    return Slots.without_cache(token_positions(mask, jnp.zeros(mask.shape[0], jnp.int32)), mask, segment_ids)


def random_params(cfg, seed=0):
    """Kernels ~ N(0, 0.3²) so that every path matters; A_log, dt_bias and the norm scale random too."""
    x = jnp.zeros((1, 3, cfg.d_model))
    params = nn.unbox(GatedDeltaMixer(cfg).init(jax.random.PRNGKey(seed), x, slots(np.ones((1, 3))))["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, p.shape) + (p if p.ndim == 1 else 0)
                                     for k, p in zip(keys, leaves, strict=True)])


def run(cfg, params, x, mask=None, segment_ids=None, cache=None, impl="auto"):
    mask = np.ones(x.shape[:2], bool) if mask is None else mask
    return _apply(cfg, impl, params, jnp.asarray(x), slots(mask, segment_ids), cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(cfg, impl, params, x, at, cache):
    return GatedDeltaMixer(cfg, impl=impl).apply({"params": params}, x, at, cache)


def to_qwen3_next(cfg: GatedDeltaConfig, params) -> dict:
    """zebrax's parameters → Qwen3NextGatedDeltaNet's state dict (q, k, v, z fused per key head; b, a likewise)."""
    import torch

    r = cfg.n_heads // cfg.k_heads
    w = lambda name: np.asarray(params[name]["kernel"]).reshape(cfg.d_model, -1).T  # noqa: E731  [out, in]
    per_group = lambda t, n: t.reshape(cfg.k_heads, n, cfg.d_model)  # noqa: E731
    qkvz = np.concatenate([per_group(w("q_proj"), DK), per_group(w("k_proj"), DK), per_group(w("v_proj"), r * DV),
                           per_group(w("g_proj"), r * DV)], axis=1).reshape(-1, cfg.d_model)
    ba = np.concatenate([per_group(w("b_proj"), r), per_group(w("a_proj"), r)], axis=1).reshape(-1, cfg.d_model)
    state = {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba,
             "conv1d.weight": np.asarray(params["conv_kernel"]).T[:, None, :],
             "dt_bias": np.asarray(params["dt_bias"]), "A_log": np.asarray(params["A_log"]),
             "norm.weight": np.asarray(params["norm"]["scale"]),
             "out_proj.weight": np.asarray(params["out_proj"]["kernel"]).reshape(-1, cfg.d_model).T}
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}


@pytest.mark.parametrize("length", [5, 29])
def test_transformers_qwen3_next_layer_agrees(length, rng):
    """An independent implementation: transformers' ``Qwen3NextGatedDeltaNet`` (PyTorch, its chunked rule, chunk
    64) with the same weights."""
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = QWEN_LAYOUT
    hf = transformers.Qwen3NextConfig(hidden_size=D, linear_num_value_heads=H, linear_num_key_heads=HK,
                                      linear_key_head_dim=DK, linear_value_head_dim=DV, linear_conv_kernel_dim=4,
                                      hidden_act="silu", rms_norm_eps=cfg.norm_eps, num_hidden_layers=1,
                                      layer_types=["linear_attention"])
    layer = Qwen3NextGatedDeltaNet(hf, 0).to(torch.float32).eval()
    params = random_params(cfg)
    layer.load_state_dict(to_qwen3_next(cfg, params), strict=True)
    x = rng.standard_normal((2, length, D)).astype(np.float32)
    with torch.no_grad():
        want = layer(torch.from_numpy(x)).numpy()
    got, _ = run(cfg, params, x)
    assert want.std() > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg", [QWEN_LAYOUT, ATTENTION_SHAPED], ids=["qwen_layout", "attention_shaped"])
@pytest.mark.parametrize("pad", [0, 3])
def test_a_prefill_then_decode_steps_is_the_full_forward(cfg, pad, rng):
    params = random_params(cfg)
    x = rng.standard_normal((2, 21, D)).astype(np.float32)
    full, _ = run(cfg, params, x)
    assert full.std() > 0.1
    tol = 1e-5 * np.abs(full).max()
    prompt = np.concatenate([rng.standard_normal((2, pad, D)).astype(np.float32), x[:, :11]], axis=1)
    mask = np.concatenate([np.zeros((2, pad), bool), np.ones((2, 11), bool)], axis=1)
    out, cache = run(cfg, params, prompt, mask, cache=GatedDeltaMixer.init_cache(cfg, 2, 32, jnp.float32))
    np.testing.assert_allclose(out[:, pad:], full[:, :11], rtol=0, atol=tol)
    for t in range(11, 21):
        out, cache = run(cfg, params, x[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(out[:, 0], full[:, t], rtol=0, atol=tol)


def test_packed_rows_are_each_document_alone(rng):
    cfg = ATTENTION_SHAPED
    params = random_params(cfg)
    x = rng.standard_normal((1, 23, D)).astype(np.float32)
    segment_ids = np.asarray([[1] * 9 + [2] * 14], np.int32)
    packed, _ = run(cfg, params, x, segment_ids=jnp.asarray(segment_ids))
    for lo, hi in ((0, 9), (9, 23)):
        alone, _ = run(cfg, params, x[:, lo:hi])
        np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=0, atol=1e-5)


def test_the_reference_impl_is_the_chunked_one(rng):
    params = random_params(QWEN_LAYOUT)
    x = rng.standard_normal((2, 19, D)).astype(np.float32)
    chunked, _ = run(QWEN_LAYOUT, params, x, impl="chunked")
    reference, _ = run(QWEN_LAYOUT, params, x, impl="reference")
    np.testing.assert_allclose(chunked, reference, rtol=0, atol=1e-5)


def test_head_counts_must_divide_the_state_heads():
    with pytest.raises(ConfigError, match="k_heads=3 must divide n_heads=4"):
        GatedDeltaConfig(d_model=D, n_heads=4, k_heads=3)
    assert GatedDeltaConfig(n_heads=4, q_heads=2).k_heads == 2  # k as q unless said

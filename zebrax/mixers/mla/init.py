"""MLA on a Llama teacher: its config by the Zebra recipe (``recipe``: ranks, RoPE dims, YaRN), and its parameters
from a teacher layer's GQA attention by SVD (``mla_from_attention``, METHOD §4), in float32.

Per head, the teacher's ``head_dim`` rows (transformers' half-split RoPE layout: pair ``j`` is rows ``j`` and
``j + head_dim/2``, rotating at ``θ^(-2j/head_dim)``) split into the MLA head's two parts:

- ``q_pe`` / ``k_pe`` (``d_rope`` rows): the teacher pairs ``j = k·head_dim/d_rope``, ``k < d_rope/2``, placed as
  MLA's interleaved pair ``k`` (rows ``2k``, ``2k + 1``). Pair ``k`` of MLA rotates at ``θ^(-2k/d_rope)`` — the very
  frequency of teacher pair ``k·head_dim/d_rope`` — so these dims keep their rotation exactly (YaRN then only
  rescales MLA's low frequencies). That needs ``d_rope`` to divide ``head_dim`` (``rope_head_dims``); other
  values are refused;
- ``q_nope`` / ``k_nope`` (``head_dim − d_rope`` rows): every other teacher row, in order.

Query: ``W_q`` (rows permuted as above) ``= U Σ Vᵀ``; ``W_qa = Σ_r Vᵀ_r``, ``W_qb = U_r`` (``r = q_lora_rank``).
Keys and values: per KV group ``[W_k nope rows ; W_v]`` stacked (the layout of ``kv_b_proj``) ``= U Σ Vᵀ``;
the latent rows of ``W_kva`` are ``Σ_r Vᵀ_r`` and ``W_kvb = U_r``; the shared rope key (``k_pe``) rows of ``W_kva``
are the mean over KV heads of the teacher's rope rows of ``W_k``. ``o_proj`` is the teacher's.
"""

from __future__ import annotations

import numpy as np

from zebrax.checks import RopeScaling
from zebrax.errors import ConfigError
from zebrax.mixers.attention.config import AttentionConfig
from zebrax.mixers.mla.config import MLAConfig


def recipe(teacher, *, kv_lora_rank: int = 128, q_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
           rope_factor: float = 32.0, rope_original_max_position_embeddings: int = 8192,
           check: bool = True) -> MLAConfig:
    """Zebra's MLA on a Llama teacher (METHOD §1–3): ``kv_groups`` = the teacher's KV heads, ``qk_rope_head_dim``
    (default head_dim / 2; one of ``rope_head_dims``, so that each MLA RoPE pair keeps the frequency of the teacher
    pair it is taken from) + ``qk_nope_head_dim`` = head_dim, ``v_head_dim`` = head_dim, ``q_lora_rank`` (default
    2/3 of the query width, rounded to 8), DeepSeek's YaRN on the rope part (base = the teacher's ``rope_theta``,
    ``rope_factor``, original length ``rope_original_max_position_embeddings``, beta 32/1), interleaved pairs, no
    latent norms. ``check``: ConfigError unless the SVD can make it from the teacher's attention (the RoPE pairs, and
    each rank within the matrix it truncates); a hybrid without MLA layers holds its config unchecked."""
    heads, kv_heads, head_dim, d = (teacher.num_attention_heads, teacher.num_key_value_heads, teacher.head_dim,
                                    teacher.hidden_size)
    rope = qk_rope_head_dim if qk_rope_head_dim is not None else head_dim // 2
    if q_lora_rank is None:
        q_lora_rank = max(8, round(heads * head_dim * 2 / 3 / 8) * 8)
    if check and rope not in rope_head_dims(head_dim):
        raise ConfigError(f"HybridConfig: qk_rope_head_dim={rope!r}: MLA's RoPE pairs would rotate at other "
                          f"frequencies than the teacher pairs they are taken from; for head_dim={head_dim} it "
                          f"must be one of {rope_head_dims(head_dim)} (an even divisor of head_dim below it)")
    kv_rows = kv_heads * (2 * head_dim - rope)  # per KV group: the nope part of K and all of V
    limits = {"kv_lora_rank": (kv_lora_rank, min(d, kv_rows), "min(hidden, KV heads·(2·head_dim − rope))"),
              "q_lora_rank": (q_lora_rank, min(d, heads * head_dim), "min(hidden, heads·head_dim)")}
    for name, (value, limit, what) in limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= (limit if check else value):
            raise ConfigError(f"HybridConfig: {name}={value} must be in 1..{limit} ({what} of the teacher)")
    return MLAConfig(
        d_model=d, n_heads=heads, kv_groups=kv_heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=head_dim - rope, qk_rope_head_dim=rope, v_head_dim=head_dim, norm_eps=1e-6,
        rope_theta=teacher.rope_theta, rope_interleave=True,
        rope_scaling=RopeScaling("yarn", factor=rope_factor,
                                 original_max_position_embeddings=rope_original_max_position_embeddings))


def rope_head_dims(head_dim: int) -> list[int]:
    """The ``qk_rope_head_dim`` values for an MLA initialised from a teacher of ``head_dim``: MLA pair ``k`` rotates
    at ``θ^(-2k/d_rope)`` and is taken from teacher pair ``k·head_dim/d_rope``, rotating at ``θ^(-2j/head_dim)``; the
    two agree for every ``k`` only when ``d_rope`` divides ``head_dim``."""
    return [r for r in range(2, head_dim, 2) if head_dim % r == 0]


def rope_rows(head_dim: int, rope_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(nope rows, rope rows in MLA's interleaved order) of a half-split teacher head."""
    half = head_dim // 2
    pairs = [k * half // (rope_dim // 2) for k in range(rope_dim // 2)]
    rope = np.array([row for j in pairs for row in (j, j + half)])
    nope = np.array(sorted(set(range(head_dim)) - set(rope.tolist())))
    return nope, rope


def check_shapes(teacher: AttentionConfig, mla: MLAConfig) -> None:
    """MLA must have the teacher's heads, KV groups, and head width split into nope + rope."""
    want = dict(n_heads=teacher.n_heads, kv_groups=teacher.n_kv_heads, v_head_dim=teacher.head_dim,
                qk_nope_head_dim=teacher.head_dim - mla.qk_rope_head_dim)
    wrong = {k: (getattr(mla, k), v) for k, v in want.items() if getattr(mla, k) != v}
    if mla.qk_rope_head_dim not in rope_head_dims(teacher.head_dim):
        wrong["qk_rope_head_dim"] = (mla.qk_rope_head_dim, f"one of {rope_head_dims(teacher.head_dim)}, so each RoPE "
                                     "pair keeps its teacher pair's frequency")
    if wrong or mla.q_lora_rank is None or teacher.attention_bias or mla.q_latent_norm or mla.kv_latent_norm:
        details = ", ".join(f"{k}={got} (needs {need})" for k, (got, need) in wrong.items()) or (
            "q_lora_rank is None, latent norms or attention biases")
        raise ConfigError(f"MLA init from attention: {details}; the SVD init needs the teacher's heads and groups, "
                          "qk_nope + qk_rope = v = head_dim, a low-rank query, no latent norms and no biases")


def mla_from_attention(attention: dict, teacher: AttentionConfig, mla: MLAConfig, key=None) -> tuple[dict, dict]:
    """Teacher attention params (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` kernels) → (MLA params, report).
    The report holds the relative Frobenius error of each truncation, ``‖W − W_r‖ / ‖W‖``. Nothing is drawn at
    random (``key`` is not used)."""
    check_shapes(teacher, mla)
    h, g, hd = teacher.n_heads, teacher.n_kv_heads, teacher.head_dim
    nope, rope = rope_rows(hd, mla.qk_rope_head_dim)
    order = np.concatenate([nope, rope])
    wq = np.asarray(attention["q_proj"]["kernel"], np.float32)  # [d, H, hd]
    wk = np.asarray(attention["k_proj"]["kernel"], np.float32)  # [d, G, hd]
    wv = np.asarray(attention["v_proj"]["kernel"], np.float32)  # [d, G, hd]
    d = wq.shape[0]

    q_a, q_b, q_err = _truncated(wq[:, :, order].reshape(d, -1), mla.q_lora_rank)
    kv_a, kv_b, kv_err = _truncated(np.concatenate([wk[:, :, nope], wv], axis=2).reshape(d, -1), mla.kv_lora_rank)
    k_pe = wk[:, :, rope].mean(axis=1)  # [d, d_rope]: one RoPE key shared by every head
    params = {
        "q_a_proj": {"kernel": q_a},
        "q_b_proj": {"kernel": q_b.reshape(mla.q_lora_rank, h, mla.qk_head_dim)},
        "kv_a_proj_with_mqa": {"kernel": np.concatenate([kv_a, k_pe], axis=1)},
        "kv_b_proj": kv_b.reshape(mla.kv_lora_rank, g, mla.qk_nope_head_dim + mla.v_head_dim),
        "o_proj": {"kernel": np.asarray(attention["o_proj"]["kernel"], np.float32)},
    }
    return params, {"q_relative_error": q_err, "kv_relative_error": kv_err}


def _truncated(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``w`` ``[in, out]`` ≈ ``a @ b`` with ``a = V_r Σ_r`` ``[in, rank]``, ``b = U_rᵀ`` ``[rank, out]`` (the SVD of the
    torch-layout ``wᵀ = U Σ Vᵀ``), and the relative Frobenius error of the truncation."""
    if rank > min(w.shape):
        raise ConfigError(f"MLA init from attention: rank {rank} is larger than the {w.shape[1]}x{w.shape[0]} "
                          f"matrix allows ({min(w.shape)})")
    u, s, vt = np.linalg.svd(w.T.astype(np.float64), full_matrices=False)
    a = (vt[:rank].T * s[:rank]).astype(np.float32)
    b = u[:, :rank].T.astype(np.float32)
    err = float(np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))) if s.size else 0.0
    return a, b, err

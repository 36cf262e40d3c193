"""The one table between transformers' Llama tensor names and zebrax parameter paths.

Both directions use it: import (HF ``[out, in]`` tensors → zebrax kernels ``[*in, *out]``) and
export. Expected shapes come from the zebrax model itself (``jax.eval_shape`` of its init), so a
config whose sizes disagree with the tensors is caught on the first tensor that differs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from zebrax.config import LlamaConfig
from zebrax.errors import ConversionError
from zebrax.models import abstract_params

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor maps onto a zebrax parameter of shape ``shape``.

    ``n_in`` set: a torch Linear weight ``[out, in]`` becomes a kernel ``[*in_dims, *out_dims]``
    whose first ``n_in`` axes are the input. ``n_in`` None: the values are only reshaped
    (``flat``: HF stores them 1-D).
    """

    n_in: int | None = None
    flat: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.n_in is not None:
            return (int(np.prod(shape[self.n_in:])), int(np.prod(shape[: self.n_in])))
        return (int(np.prod(shape)),) if self.flat else tuple(shape)

    def to_zebrax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (w.T if self.n_in is not None else w).reshape(shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        if self.n_in is not None:
            return p.reshape(int(np.prod(p.shape[: self.n_in])), -1).T
        return p.reshape(self.hf_shape(p.shape))


LINEAR_1, LINEAR_2, SAME, FLAT = Layout(n_in=1), Layout(n_in=2), Layout(), Layout(flat=True)

TOP_LEVEL = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), SAME),
    "model.norm.weight": (("norm", "scale"), SAME),
    "lm_head.weight": (("lm_head", "kernel"), LINEAR_1),
}
PER_LAYER = {
    "input_layernorm.weight": (("input_layernorm", "scale"), SAME),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), SAME),
    **{
        f"self_attn.{p}_proj.weight": (("self_attn", f"{p}_proj", "kernel"), LINEAR_1) for p in "qkv"
    },
    **{f"self_attn.{p}_proj.bias": (("self_attn", f"{p}_proj", "bias"), FLAT) for p in "qkv"},
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), LINEAR_2),
    "self_attn.o_proj.bias": (("self_attn", "o_proj", "bias"), FLAT),
    **{f"mlp.{p}_proj.weight": (("mlp", f"{p}_proj", "kernel"), LINEAR_1) for p in ("gate", "up", "down")},
    **{f"mlp.{p}_proj.bias": (("mlp", f"{p}_proj", "bias"), FLAT) for p in ("gate", "up", "down")},
}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


def locate(name: str) -> tuple[tuple[str, ...], Layout] | None:
    """The zebrax path and layout of an HF tensor name, or None if the name is not Llama's."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = LAYER_NAME.fullmatch(name)
    if m and m.group(2) in PER_LAYER:
        path, layout = PER_LAYER[m.group(2)]
        return (f"layers_{int(m.group(1))}", *path), layout
    return None


def hf_name(path: tuple[str, ...]) -> str:
    """Inverse of ``locate`` for the names zebrax writes."""
    for name, (p, _) in TOP_LEVEL.items():
        if p == path:
            return name
    layer = int(path[0].removeprefix("layers_"))
    for suffix, (p, _) in PER_LAYER.items():
        if p == path[1:]:
            return f"model.layers.{layer}.{suffix}"
    raise KeyError(path)


def describe(config: LlamaConfig) -> str:
    return (
        f"LlamaConfig(hidden_size={config.hidden_size}, num_attention_heads={config.num_attention_heads}, "
        f"num_key_value_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
        f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size}, "
        f"num_hidden_layers={config.num_hidden_layers})"
    )


def params_from_hf(
    config: LlamaConfig, tensors: Iterable[tuple[str, str, np.ndarray]], dtype: str = "float32"
) -> dict:
    """Build the zebrax parameter tree from ``(file, hf_name, array)`` triples, one tensor at a time."""
    shapes = {path: leaf.shape for path, leaf in flatten_dict(abstract_params(config)).items()}
    out: dict[tuple[str, ...], np.ndarray] = {}
    for file, name, w in tensors:
        if IGNORED.fullmatch(name):
            continue
        found = locate(name)
        if found is None or found[0] not in shapes:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some tied checkpoints store the head as well; it equals the embedding
            raise ConversionError(f"{file}: unexpected tensor {name} {tuple(w.shape)} for {describe(config)}")
        path, layout = found
        want = layout.hf_shape(shapes[path])
        if tuple(w.shape) != want:
            raise ConversionError(
                f"{file}: {name} has shape {tuple(w.shape)}, expected {want} for {describe(config)}"
            )
        if path in out:
            raise ConversionError(f"{file}: tensor {name} appears twice")
        out[path] = np.ascontiguousarray(layout.to_zebrax(np.asarray(w), shapes[path]), NP_DTYPES[dtype])
    missing = [hf_name(p) for p in shapes if p not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    return unflatten_dict(out)


def hf_tensors(params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The HF state dict of a zebrax Llama parameter tree, float32, one tensor at a time."""
    for path, p in flatten_dict(params).items():
        _, layout = locate(hf_name(path))
        yield hf_name(path), np.ascontiguousarray(layout.to_hf(np.asarray(p, np.float32)))

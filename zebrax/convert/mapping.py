"""Tables between transformers tensor names and zebrax parameter paths, one per architecture.

Both directions use them: import (HF tensors → zebrax parameters) and export. Expected shapes come
from the zebrax model itself (``jax.eval_shape`` of its init), so a config whose sizes disagree with the
tensors is caught on the first tensor that differs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from zebrax.errors import ConversionError
from zebrax.models import abstract_params

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one HF tensor maps onto a zebrax parameter of shape ``shape``.

    ``linear``: a torch Linear weight ``[out, in]`` becomes a kernel ``[*in_dims, *out_dims]`` whose first
    ``n_in`` axes are the input. ``same``: identical shape. ``flat``: HF stores it 1-D. ``conv``: a
    depthwise Conv1d weight ``[channels, 1, kernel]`` becomes ``[kernel, channels]``.
    """

    kind: str = "same"
    n_in: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "linear":
            return (int(np.prod(shape[self.n_in:])), int(np.prod(shape[: self.n_in])))
        if self.kind == "flat":
            return (int(np.prod(shape)),)
        if self.kind == "conv":
            return (shape[1], 1, shape[0])
        return tuple(shape)

    def to_zebrax(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "linear":
            return w.T.reshape(shape)
        if self.kind == "conv":
            return w[:, 0, :].T
        return w.reshape(shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return p.reshape(int(np.prod(p.shape[: self.n_in])), -1).T
        if self.kind == "conv":
            return p.T[:, None, :]
        return p.reshape(self.hf_shape(p.shape))


LINEAR, LINEAR_2, SAME, FLAT, CONV = Layout("linear"), Layout("linear", 2), Layout(), Layout("flat"), Layout("conv")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """HF name ↔ (zebrax path, layout) for one architecture. Layer ``i``'s tensors are named
    ``{layer_prefix}.{i}.{suffix}`` and live under ``layers_{i}``; ``aliases`` are other names of a tensor."""

    top_level: dict[str, tuple[Path, Layout]]
    per_layer: dict[str, tuple[Path, Layout]]
    layer_prefix: str
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    ignored: str = r"(.*\.)?rotary_emb\.inv_freq"

    def locate(self, name: str) -> tuple[Path, Layout] | None:
        name = self.aliases.get(name, name)
        if name in self.top_level:
            return self.top_level[name]
        m = re.fullmatch(re.escape(self.layer_prefix) + r"\.(\d+)\.(.+)", name)
        if m and m.group(2) in self.per_layer:
            path, layout = self.per_layer[m.group(2)]
            return (f"layers_{int(m.group(1))}", *path), layout
        return None

    def hf_name(self, path: Path) -> str:
        for name, (p, _) in self.top_level.items():
            if p == path:
                return name
        for suffix, (p, _) in self.per_layer.items():
            if p == path[1:]:
                return f"{self.layer_prefix}.{int(path[0].removeprefix('layers_'))}.{suffix}"
        raise KeyError(path)


def describe(config) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in config.summary().items())
    return f"{type(config).__name__}({fields})"


def params_from_hf(
    tensor_map: TensorMap, config, tensors: Iterable[tuple[str, str, np.ndarray]], dtype: str = "float32"
) -> dict:
    """Build the zebrax parameter tree from ``(file, hf_name, array)`` triples, one tensor at a time."""
    shapes = {path: leaf.shape for path, leaf in flatten_dict(abstract_params(config)).items()}
    out: dict[Path, np.ndarray] = {}
    for file, name, w in tensors:
        if re.fullmatch(tensor_map.ignored, name):
            continue
        found = tensor_map.locate(name)
        if found is None or found[0] not in shapes:
            if found is not None and found[0] == ("lm_head", "kernel") and config.tie_word_embeddings:
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
    missing = [tensor_map.hf_name(p) for p in shapes if p not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    return unflatten_dict(out)


def hf_tensors(tensor_map: TensorMap, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The HF state dict of a zebrax parameter tree, float32, one tensor at a time."""
    for path, p in flatten_dict(params).items():
        name = tensor_map.hf_name(path)
        _, layout = tensor_map.locate(name)
        yield name, np.ascontiguousarray(layout.to_hf(np.asarray(p, np.float32)))

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

from zebrax.errors import ConversionError, warn
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

    def hf_name(self, path: Path, module: str | None = None) -> str:
        """The HF name of a parameter path; ``module`` picks among the layer's names (``mla``, ``self_attn``) when
        several modules store the same path (an MLA layer's ``o_proj`` is AMD's ``mla.out_proj``)."""
        for name, (p, _) in self.top_level.items():
            if p == path:
                return name
        suffixes = [suffix for suffix, (p, _) in self.per_layer.items() if p == path[1:]]
        if not suffixes:
            raise KeyError(path)
        chosen = next((x for x in suffixes if module and x.startswith(f"{module}.")), suffixes[0])
        return f"{self.layer_prefix}.{int(path[0].removeprefix('layers_'))}.{chosen}"


def params_from_hf(
    tensor_map: TensorMap, config, tensors: Iterable[tuple[str, str, np.ndarray]], dtype: str = "float32",
    *, quiet_untie: bool = False,
) -> tuple[object, dict]:
    """Build the zebrax parameter tree from ``(file, hf_name, array)`` triples, one tensor at a time.

    Returns ``(config, params)``: the checkpoint is what its tensors say. A head stored beside
    ``tie_word_embeddings=True`` is compared with the embedding and, if it differs, kept (the config is untied,
    as transformers 5 uses the stored head; ``quiet_untie`` for formats whose loaders never tie); stored RoPE
    frequencies must equal the config's.
    """
    shapes = {path: leaf.shape for path, leaf in flatten_dict(abstract_params(config)).items()}
    out: dict[Path, np.ndarray] = {}
    stored_head = None
    for file, name, w in tensors:
        if re.fullmatch(tensor_map.ignored, name):
            check_stored_frequencies(config, file, name, w)
            continue
        found = tensor_map.locate(name)
        if found is not None and found[0] == ("lm_head", "kernel") and config.tie_word_embeddings:
            stored_head = (file, name, np.asarray(w).astype(NP_DTYPES[dtype]))
            continue
        if found is None or found[0] not in shapes:
            raise ConversionError(f"{file}: unexpected tensor {name} {tuple(w.shape)} for {config.describe()}")
        path, layout = found
        want = layout.hf_shape(shapes[path])
        if tuple(w.shape) != want:
            raise ConversionError(
                f"{file}: {name} has shape {tuple(w.shape)}, expected {want} for {config.describe()}"
            )
        if path in out:
            raise ConversionError(f"{file}: tensor {name} appears twice")
        out[path] = np.ascontiguousarray(layout.to_zebrax(np.asarray(w), shapes[path]), NP_DTYPES[dtype])
    missing = [tensor_map.hf_name(p) for p in shapes if p not in out]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    if stored_head is not None:
        config = _untie_if_different(config, out, *stored_head, quiet=quiet_untie)
    return config, unflatten_dict(out)


def _untie_if_different(config, out: dict[Path, np.ndarray], file: str, name: str, head: np.ndarray,
                        quiet: bool = False):
    """A tied config with a stored head: drop the head if it equals the embedding, else keep it and untie."""
    embedding = out[("embed_tokens", "embedding")]
    if head.shape != embedding.shape:
        raise ConversionError(f"{file}: {name} has shape {head.shape}, expected {embedding.shape} (the embedding's, "
                              "tie_word_embeddings=true)")
    if np.array_equal(head, embedding):
        return config
    delta = float(np.max(np.abs(head.astype(np.float32) - embedding.astype(np.float32))))
    if not quiet:
            warn(f"{file}: {name} differs from the embedding (max |Δ| {delta:.3g}) although tie_word_embeddings=true; "
             "converted untied with the stored head, which is what transformers computes")
    out[("lm_head", "kernel")] = np.ascontiguousarray(LINEAR.to_zebrax(head, embedding.shape[::-1]))
    return config.replace(tie_word_embeddings=False)


def check_stored_frequencies(config, file: str, name: str, w: np.ndarray) -> None:
    """Old checkpoints store RoPE's ``inv_freq``; refuse one that disagrees with the config's frequencies."""
    from zebrax.layers.rope import inv_frequencies

    a = getattr(config, "attention", config)  # MLAConfig of a DeepSeek-V3 model, else the Llama config
    if not hasattr(a, "rope_theta"):
        raise ConversionError(f"{file}: unexpected tensor {name} {tuple(w.shape)} for {config.describe()}")
    dim = getattr(a, "qk_rope_head_dim", None) or a.head_dim
    want = inv_frequencies(dim, a.rope_theta, a.rope_scaling)
    if w.shape != want.shape or not np.allclose(w, want, rtol=1e-5, atol=0):
        raise ConversionError(f"{file}: {name} holds other RoPE frequencies than config.json's rope_theta="
                              f"{a.rope_theta}, {a.rope_scaling.rope_type} scaling ({tuple(w.shape)}, "
                              f"expected {want.shape}); fix the config's rope parameters")


def hf_tensors(tensor_map: TensorMap, params: dict, modules: dict[str, str] | None = None
               ) -> Iterator[tuple[str, np.ndarray]]:
    """The HF state dict of a zebrax parameter tree, float32, one tensor at a time. ``modules``: layer name →
    the HF module its mixer is stored under, where the map has several (``{"layers_0": "mla"}``)."""
    for path, p in flatten_dict(params).items():
        name = tensor_map.hf_name(path, (modules or {}).get(path[0]))
        _, layout = tensor_map.locate(name)
        yield name, np.ascontiguousarray(layout.to_hf(np.asarray(p, np.float32)))

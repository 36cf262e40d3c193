"""Read llama.cpp GGUF files: dequantise each tensor, undo the rotary row permutation of Q and K,
and rename to transformers' Llama names so the Llama tensor map in ``convert/architectures.py`` applies.

llama.cpp stores ``attn_q``/``attn_k`` rows interleaved per head (pairs ``(i, i + D/2)`` adjacent);
HF checkpoints keep them half-split. Config, special tokens and chat template come from the file's
metadata; the tokenizer is rebuilt from it by transformers' GGUF loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from zebrax.config import LlamaConfig, RopeScaling
from zebrax.convert.hf import first_line
from zebrax.errors import ConfigError, ConversionError

SUPPORTED_ARCHITECTURES = ("llama",)
TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
PER_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: per head, interleaved pairs back to half-split rows."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # gguf raises ValueError, struct errors, IndexError … on bad bytes
            raise ConversionError(f"{path}: not a valid GGUF file ({first_line(e)})") from None
        self.arch = self._field("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"{path}: unsupported architecture {self.arch!r}; zebrax converts {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise ConversionError(
                f"{path}: rope_freqs.weight (llama3 RoPE scaling stored as per-frequency factors) is not "
                "supported; convert the model from its HF checkpoint instead"
            )
        self.config = self._read_config()

    def _field(self, key: str, default=None, required: bool = True):
        field = self.reader.fields.get(key)
        if field is None:
            if required and default is None:
                raise ConversionError(f"{self.path}: metadata key {key} is missing")
            return default
        return field.contents()

    def _read_config(self) -> LlamaConfig:
        a = self.arch
        heads = self._field(f"{a}.attention.head_count")
        hidden = self._field(f"{a}.embedding_length")
        tensors = {t.name: t for t in self.reader.tensors}
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab_default = len(tokens.data)
        elif "token_embd.weight" in tensors:
            vocab_default = int(tensors["token_embd.weight"].shape[-1])  # gguf lists dims fastest first
        else:
            vocab_default = None
        vocab = self._field(f"{a}.vocab_size", vocab_default)
        scaling = self._field(f"{a}.rope.scaling.type", "none", required=False)
        if scaling not in ("none", "linear"):
            raise ConversionError(f"{self.path}: rope scaling type {scaling!r} is not supported")
        experts = self._field(f"{a}.expert_count", 0, required=False)
        if experts:
            raise ConversionError(f"{self.path}: {a}.expert_count={experts}: mixture-of-experts models are not "
                                  "supported")
        head_dim = int(self._field(f"{a}.attention.key_length", hidden // heads))
        rope_dims = self._field(f"{a}.rope.dimension_count", head_dim, required=False)
        if int(rope_dims) != head_dim:
            raise ConversionError(f"{self.path}: {a}.rope.dimension_count={rope_dims} rotates part of each "
                                  f"{head_dim}-wide head; zebrax rotates whole heads")
        rope = (
            RopeScaling("linear", factor=float(self._field(f"{a}.rope.scaling.factor")))
            if scaling == "linear" else RopeScaling()
        )
        eos = self._field("tokenizer.ggml.eos_token_id", required=False)
        names = set(tensors)
        try:
            return LlamaConfig(
                vocab_size=int(vocab),
                hidden_size=int(hidden),
                intermediate_size=int(self._field(f"{a}.feed_forward_length")),
                num_hidden_layers=int(self._field(f"{a}.block_count")),
                num_attention_heads=int(heads),
                num_key_value_heads=int(self._field(f"{a}.attention.head_count_kv", heads)),
                head_dim=head_dim,
                rms_norm_eps=float(self._field(f"{a}.attention.layer_norm_rms_epsilon")),
                rope_theta=float(self._field(f"{a}.rope.freq_base", 10000.0)),
                rope_scaling=rope,
                max_position_embeddings=int(self._field(f"{a}.context_length", 4096)),
                # what the tensors say: llama.cpp keeps no flags for these
                tie_word_embeddings="output.weight" not in names,
                attention_bias=any(n.endswith(".attn_q.bias") for n in names),
                mlp_bias=any(n.endswith(".ffn_up.bias") for n in names),
                bos_token_id=self._field("tokenizer.ggml.bos_token_id", required=False),
                eos_token_id=() if eos is None else (int(eos),),
                pad_token_id=self._field("tokenizer.ggml.padding_token_id", required=False),
            )
        except ConfigError as e:
            raise ConversionError(f"{self.path}: metadata gives an invalid config: {e}") from None

    def tensors(self) -> Iterator[tuple[str, str, np.ndarray]]:
        import gguf

        cfg = self.config
        for t in self.reader.tensors:
            name = self._hf_name(t.name)
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            except Exception as e:
                raise ConversionError(f"{self.path}: cannot dequantise {t.name} ({first_line(e)})") from None
            w = np.asarray(w, np.float32).reshape([int(n) for n in reversed(t.shape)])
            if name.startswith("model.layers.") and ".self_attn.q_proj." in name:
                w = unpermute_rotary(w, cfg.num_attention_heads)
            elif name.startswith("model.layers.") and ".self_attn.k_proj." in name:
                w = unpermute_rotary(w, cfg.num_key_value_heads)
            yield str(self.path), name, w

    def _hf_name(self, name: str) -> str:
        if name in TOP_LEVEL:
            return TOP_LEVEL[name]
        m = BLOCK_NAME.fullmatch(name)
        if m and m.group(2) in PER_BLOCK:
            return f"model.layers.{m.group(1)}.{PER_BLOCK[m.group(2)]}.{m.group(3)}"
        return name  # unknown names are reported by the mapping with the file and shape

    def save_tokenizer(self, dst: Path) -> bool:
        """Rebuild the tokenizer from the metadata; False when the file has none (``tokenizer.ggml.*``)."""
        from transformers import AutoTokenizer

        if "tokenizer.ggml.tokens" not in self.reader.fields:
            return False
        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:
            raise ConversionError(
                f"{self.path}: cannot rebuild the tokenizer from metadata ({first_line(e)})"
            ) from None
        tok.save_pretrained(str(dst))
        return True

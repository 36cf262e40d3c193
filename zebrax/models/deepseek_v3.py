"""Dense DeepSeek-V3-family models: the Llama stack with MLA attention and a latent decode cache."""

from __future__ import annotations

from zebrax.config import DeepseekV3Config
from zebrax.layers.mla import MLAttention
from zebrax.models.llama import LlamaForCausalLM


class DeepseekV3ForCausalLM(LlamaForCausalLM):
    """tokens ``[B, L]`` → logits ``[B, L, vocab]`` float32; each layer caches ``[c_kv ; k_pe]`` per token."""

    config: DeepseekV3Config

    @staticmethod
    def layer_cache(cfg: DeepseekV3Config, batch: int, max_len: int):
        return MLAttention.init_cache(cfg.attention, batch, max_len, cfg.dtype)

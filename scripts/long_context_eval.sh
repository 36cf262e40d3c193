#!/usr/bin/env bash
# The figures of docs/long_context.md: the needle map and the loss against position, the teacher and its hybrids side
# by side. The documents of the loss curve are the largest modules of this Python's standard library (code and
# docstrings: long, the same on every machine with the same Python, and in no training set or needle of zebrax).
#   scripts/long_context_eval.sh OUT_DIR NAME=CKPT [NAME=CKPT …]
# LENGTHS (default "1024 2048 4096 8192"), LONG (16384: one needle a cell), DEPTHS ("0 0.5 1"), SAMPLES (2),
# POSITIONS_LENGTH (4096), DOCS (4). On 2 cores of an AMD EPYC (AVX2) the needles at 1k-8k took 27 min for the teacher
# and one hybrid, the loss against position 6 min for three models.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
PY=${PY:-.venv/bin/python}
"$PY" - "$out/stdlib.jsonl" "${DOCS:-4}" <<'PY'
import json, sys
from zebrax.long_context import stdlib_documents
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps({"text": text}) + "\n" for text in stdlib_documents(int(sys.argv[2])))
PY
depths=${DEPTHS:-0 0.5 1}
"$PY" -m zebrax long-eval needle "$@" --lengths ${LENGTHS:-1024 2048 4096 8192} --depths $depths \
  --samples "${SAMPLES:-2}" --out "$out/needle.json" --plot "$out/needle.png" > /dev/null
"$PY" -m zebrax long-eval needle "$@" --lengths ${LONG:-16384} --depths $depths --samples 1 \
  --out "$out/needle_long.json" --plot "$out/needle_long.png" > /dev/null
"$PY" -m zebrax long-eval positions "$@" --data "$out/stdlib.jsonl" --length "${POSITIONS_LENGTH:-4096}" \
  --out "$out/positions.json" --plot "$out/positions.png" > /dev/null

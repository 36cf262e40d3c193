#!/usr/bin/env bash
# The 8B hybrid and its teacher at long context on a TPU slice, compiled with libtpu's deviceless compiler (nothing
# runs): the chunked prefill's step (the last chunk appended to a full cache, costed for the whole prompt) and the
# decode step, one sequence, at each context. One JSON object a line, `zebrax compile --json`'s keys plus "model".
# The long-context table of docs/scaling.md. About 15 minutes on 2 cores.
#   scripts/long_context_pod.sh [CONTEXT…]   default: 131072 524288 1048576 2097152 4194304
# TOPOLOGY=v5p-8 and CHUNK=4096 by default.
set -uo pipefail
cd "$(dirname "$0")/.."
TOPOLOGY=${TOPOLOGY:-v5p-8}
CHUNK=${CHUNK:-4096}

for context in "${@:-131072 524288 1048576 2097152 4194304}"; do
  for c in $context; do
    for model in zebra-llama-8b-8mla-24m2 llama3_1_8b; do
      for program in prefill decode; do
        chunk=(); [ "$program" = prefill ] && chunk=(--chunk "$CHUNK")
        .venv/bin/zebrax compile "$program" --model "$model" --topology "$TOPOLOGY" --batch 1 --context "$c" \
          "${chunk[@]}" --compute-dtype bfloat16 --json 2>/dev/null \
          | .venv/bin/python -c 'import json, sys; print(json.dumps({"model": sys.argv[1], **json.load(sys.stdin)}))' \
            "$model"
      done
    done
  done
done

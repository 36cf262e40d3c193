#!/usr/bin/env bash
# Every training stage of the three recipe sizes at the paper's global batches, compiled for a TPU slice with
# libtpu's deviceless compiler (nothing runs): one JSON object a line, `zebrax compile --json`'s keys plus
# "recipe". The figures of docs/scaling.md. About 45 minutes on 2 cores; the 8B programs need 17 GB of RAM.
#   scripts/pod_recipes.sh [SIZE…]        SIZE: 1b 3b 8b (default: all); TOPOLOGY=v5p-16 by default
# Extra settings for every program go in ZEBRAX_COMPILE_ARGS (e.g. "--accumulate 2").
set -uo pipefail
cd "$(dirname "$0")/.."
TOPOLOGY=${TOPOLOGY:-v5p-16}

one() {  # recipe program teacher student batch seq_len [settings of this program…]
  .venv/bin/zebrax compile "$2" --teacher "$3" --student "$4" --batch "$5" --seq-len "$6" --topology "$TOPOLOGY" \
    --remat --compute-dtype bfloat16 "${@:7}" ${ZEBRAX_COMPILE_ARGS:-} --json \
    | .venv/bin/python -c 'import json, sys; print(json.dumps({"recipe": sys.argv[1], **json.load(sys.stdin)}))' "$1"
}

for size in "${@:-1b 3b 8b}"; do
  for s in $size; do
    case $s in
      1b) one 1b ild llama3_2_1b zebra-llama-1b-8mla-8m2 96 2048
          one 1b kd  llama3_2_1b zebra-llama-1b-8mla-8m2 192 2048
          one 1b dpo llama3_2_1b zebra-llama-1b-8mla-8m2 32 1024 ;;
      3b) one 3b ild llama3_2_3b zebra-llama-3b-14mla-14m2 96 2048
          one 3b kd  llama3_2_3b zebra-llama-3b-14mla-14m2 96 2048
          one 3b dpo llama3_2_3b zebra-llama-3b-14mla-14m2 32 1024 ;;
      8b) one 8b ild llama3_1_8b zebra-llama-8b-8mla-24m2 48 2048
          one 8b kd  llama3_1_8b zebra-llama-8b-8mla-24m2 64 2048 --accumulate 2  # 91.2 GiB a chip with one
          one 8b dpo llama3_1_8b zebra-llama-8b-8mla-24m2 32 1024 ;;
      *) echo "pod_recipes.sh: unknown size $s (1b, 3b or 8b)" >&2; exit 2 ;;
    esac
  done
done

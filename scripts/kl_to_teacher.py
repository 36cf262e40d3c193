"""KL(teacher ‖ model) of zebrax checkpoints on held-out text, as JSON (the baseline each training stage must beat).

    python scripts/kl_to_teacher.py TEACHER DATA.jsonl CKPT [CKPT ...] [--seq-len 256] [--num-sequences 8]
"""

from __future__ import annotations

import argparse
import json
import platform

import jax.numpy as jnp

import zebrax
from zebrax.config import LAYER_LETTERS
from zebrax.select import calibration_tokens, kl_to_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("teacher")
    p.add_argument("data")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-sequences", type=int, default=8)
    args = p.parse_args()
    teacher = zebrax.load(args.teacher)
    tokens = calibration_tokens(args.data, teacher.tokenizer, seq_len=args.seq_len, num_sequences=args.num_sequences)
    want = jnp.asarray(teacher.logits(tokens))
    rows = []
    for path in args.checkpoints:
        model = zebrax.load(path)
        rows.append({"checkpoint": path, "layer_map": "".join(LAYER_LETTERS[s.mixer] for s in model.config.plan()),
                     "kl_to_teacher": round(float(kl_to_teacher(want, jnp.asarray(model.logits(tokens)))), 4),
                     "cache_bytes_per_token": model.cache_bytes_per_token()})
    print(json.dumps({"teacher": args.teacher, "data": args.data, "tokens": int(tokens.size),
                      "teacher_cache_bytes_per_token": teacher.cache_bytes_per_token(),
                      "cpu": platform.processor() or platform.machine(), "models": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Convert a Llama checkpoint (HF directory, .safetensors/.bin beside a config.json, or .gguf) to zebrax.

    python scripts/convert.py SRC DST [--dtype bfloat16]

The same as `zebrax convert`; copy this file to script a batch of conversions.
"""

import argparse

import zebrax

parser = argparse.ArgumentParser()
parser.add_argument("src")
parser.add_argument("dst")
parser.add_argument("--dtype", default="float32")
args = parser.parse_args()
model = zebrax.load(zebrax.convert(args.src, args.dst, dtype=args.dtype))
print(f"{args.dst}: {model}, {model.cache_bytes_per_token()} bytes of KV cache per token")

"""``zebrax <command>``: the command line. gin files and bindings are parsed here and nowhere else.

    zebrax convert SRC DST [--dtype float32|bfloat16] [--overwrite]
    zebrax build TEACHER DST [--preset NAME] [--mla-layers 0,2,… --attention-layers … --kv-lora-rank N …] [--seed S]
    zebrax assemble --mla-student A --linear-student M --mla-layers LIST DST
    zebrax select --teacher T --mla-student A --linear-student M --num-mla N --data FILE --out scores.json
    zebrax export CKPT DST [--overwrite]
    zebrax generate CKPT --prompt TEXT [--chat] [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]
                    [--prefill-chunk N]
    zebrax info CKPT_OR_PRESET [--json]
    zebrax bench forward CKPT [--batch B] [--seq-len L] [--repeats R]
    zebrax bench ssd [--lengths L ...] [--repeats R]
    zebrax bench attention [--contexts N ...] [--batch B] [--repeats R]
    zebrax bench decode CKPT [--contexts N ...] [--batches B ...] [--models …] [--model NAME=CKPT] [--plot PNG]
    zebrax bench long-prompt CKPT [--length N] [--new-tokens N] [--prefill-chunk N]
    zebrax eval CKPT --data FILE ... [--teacher T] [--seq-len L] [--out FILE]
    zebrax long-eval needle MODEL ... [--lengths N ...] [--depths D ...] [--samples N] [--out F] [--plot PNG]
    zebrax long-eval positions MODEL ... --data FILE ... --length N [--out F] [--plot PNG]
    zebrax long-eval layers TEACHER STUDENT [--length N] [--together K ...] [--out F]
    zebrax lm-eval --model zebrax --model_args pretrained=CKPT[,batch_size=B] --tasks … [lm_eval's arguments]
    zebrax generate-data TEACHER --prompts FILE --out FILE
    zebrax tokenize DATA ... --out DIR --teacher T --seq-len L [--pack]
    zebrax long-docs CONVERSATIONS ... --teacher T --length N --count K --out FILE [--kind ledger|recall] [--seed S]
    zebrax teacher-logits CORPUS --teacher T --top-k K
    zebrax distill --gin_file FILE ... [--gin_param BINDING ...] --workdir DIR
    zebrax ablate GIN_FILE ... [--seeds N] [--root DIR] [--baseline NAME] [--gin_param BINDING ...]
    zebrax compile PROGRAM --topology v5p-16 [--teacher T --student S | --model M] [--gin_file FILE ...] …
    zebrax run [--gin_file FILE ...] [--gin_param BINDING ...]

gin files and bindings go through ``zebrax.app.presets``, given with ``--gin_file`` and ``--gin_param`` wherever a
command takes them; each command (``commands.py``) hands the objects they build to the library.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from pathlib import Path

from zebrax.app import commands
from zebrax.app.aot import PROGRAMS
from zebrax.generate import PREFILL_CHUNK
from zebrax.init.assemble import EMBEDDINGS_FROM
from zebrax.mixers import kinds
from zebrax.models.decoder import REMAT_POLICIES
from zebrax.ops.sharded import AXES

# -- argument types -----------------------------------------------------------------------------

def _layers(text: str) -> list[int] | str:
    """``0,2,4`` → [0, 2, 4]; ``all`` and ``none`` pass through. An empty list (an unset shell variable), a part that
    is no index and an index given twice are refused."""
    if text in ("all", "none"):
        return text
    expected = "expected comma-separated layer indices (e.g. 0,2,4), 'all' or 'none'"
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    layers = [int(part) for part in parts]
    twice = sorted({i for i in layers if layers.count(i) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r}: layer {twice[0]} is given twice")
    return layers


def _number(kind, ok, expected: str):
    """An argparse type: ``kind(text)`` where ``ok`` holds, else one line naming the value and what was expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


COUNT = _number(int, lambda v: v >= 1, "an integer >= 1")
INDEX = _number(int, lambda v: v >= 0, "an integer >= 0")
SEED = _number(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")
TEMPERATURE = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
TOP_P = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _output_file(text: str) -> Path:
    """An argparse type for a file a command writes, checked before any work: a local path (no object-store URI),
    its folder exists and it is no folder itself."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text}: an object-store URI; this file is written to a local disk")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; expected a file to write")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot write in {folder}")
    return path


def _add_bench_mesh(parser) -> None:
    parser.add_argument("--mesh", type=_mesh, help="shard the models over this host's devices, e.g. fsdp=8 or "
                                                   "data=2,fsdp=4 (default: one device)")


def _pairs(text: str, value, expected: str) -> dict:
    """``a=1,b=2`` → {"a": value("1"), "b": value("2")}; ``expected`` names the form in the error."""
    try:
        return {k.strip(): value(v.strip()) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None


def _mesh(text: str) -> dict:
    """``fsdp=4,tensor=2`` → {"fsdp": 4, "tensor": 2}."""
    mesh = _pairs(text, int, "AXIS=SIZE pairs, e.g. fsdp=4,tensor=2")
    if not set(mesh) <= set(AXES):
        raise argparse.ArgumentTypeError(f"{text!r}: the mesh axes are {', '.join(AXES)}")
    return mesh


def _impl(text: str):
    """``pallas`` → "pallas"; ``attention=pallas,ssd=chunked`` → {"attention": "pallas", "ssd": "chunked"}."""
    return _pairs(text, str, "a name or OP=NAME pairs, e.g. attention=pallas") if "=" in text else text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zebrax", description="Zebra-Llama hybrids in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF safetensors / .bin / GGUF Llama → zebrax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST (atomically)")
    c.set_defaults(fn=commands.cmd_convert)

    h = sub.add_parser("build", help="a Zebra-Llama hybrid initialised from a Llama checkpoint")
    h.add_argument("teacher", metavar="TEACHER")
    h.add_argument("dst", metavar="DST")
    h.add_argument("--preset", help="a hybrid preset of configs/models/ (e.g. zebra-smollm2-135m-6mla-24m2)")
    h.add_argument("--mla-layers", type=_layers, help="0,2,4 | all | none (default: all)")
    h.add_argument("--attention-layers", type=_layers, help="layers that keep the teacher's attention")
    h.add_argument("--linear", choices=[k.name for k in kinds().values() if k.linear],
                   help="the kind of the other layers (default: mamba2; gdn: Gated DeltaNet)")
    h.add_argument("--kv-lora-rank", type=COUNT)
    h.add_argument("--q-lora-rank", type=COUNT)
    h.add_argument("--qk-rope-head-dim", type=COUNT)
    h.add_argument("--rope-factor", type=_number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"))
    h.add_argument("--seed", type=_number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"), default=0,
                   help="for the fresh Mamba2 (or GDN) parameters")
    h.add_argument("--overwrite", action="store_true")
    h.set_defaults(fn=commands.cmd_build)

    a = sub.add_parser("assemble", help="a hybrid from an all-MLA and an all-linear (Mamba2 or GDN) student")
    a.add_argument("--mla-student", required=True)
    a.add_argument("--linear-student", required=True, help="the all-Mamba2 (or all-GDN) student")
    a.add_argument("--mla-layers", type=_layers, required=True, help="e.g. 0,5,10,14")
    a.add_argument("--embeddings-from", choices=EMBEDDINGS_FROM, default="linear",
                   help="the student whose embeddings, final norm and head the hybrid takes")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("dst", metavar="DST")
    a.set_defaults(fn=commands.cmd_assemble)

    s = sub.add_parser("select", help="SMART: score each layer as MLA in the all-linear student, place N MLA layers")
    s.add_argument("--teacher", required=True)
    s.add_argument("--mla-student", required=True)
    s.add_argument("--linear-student", required=True, help="the all-Mamba2 (or all-GDN) student")
    s.add_argument("--num-mla", type=COUNT, required=True)
    s.add_argument("--data", required=True, help="jsonl of {text} / {messages} / {input_ids}")
    s.add_argument("--out", type=_output_file, required=True, help="scores.json")
    s.add_argument("--seq-len", type=COUNT, default=256)
    s.add_argument("--num-sequences", type=COUNT, default=8)
    s.add_argument("--first", type=INDEX, default=0)
    s.add_argument("--last", type=INDEX, default=None, help="default: layers - 2")
    s.set_defaults(fn=commands.cmd_select)

    e = sub.add_parser("export", help="zebrax checkpoint → HF directory (safetensors)")
    e.add_argument("ckpt")
    e.add_argument("dst")
    e.add_argument("--format", choices=["hf", "amd", "mambainllama", "zebrax"],
                   help="hybrids: AMD's Zebra-Llama or MambaInLlama layout, or zebrax's own for any other mix (Gated "
                        "DeltaNet, MLA with attention); default: the one its layers fit")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(fn=commands.cmd_export)

    g = sub.add_parser("generate", help="continue a prompt (or answer it as a chat with --chat)")
    g.add_argument("ckpt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=COUNT, default=128)
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0)
    g.add_argument("--top-p", type=TOP_P, default=1.0)
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--prefill-chunk", type=COUNT, default=PREFILL_CHUNK,
                   help=f"prefill a longer prompt this many tokens at a time (default {PREFILL_CHUNK})")
    g.set_defaults(fn=commands.cmd_generate)

    i = sub.add_parser("info", help="layers, parameter count and cache bytes of a checkpoint or preset")
    i.add_argument("target", metavar="CKPT_OR_PRESET")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=commands.cmd_info)

    b = sub.add_parser("bench", help="benchmarks (JSON on stdout)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bf = bsub.add_parser("forward", help="prefill tokens/s, zebrax vs transformers, same weights")
    bf.add_argument("ckpt")
    bf.add_argument("--batch", type=COUNT, default=4)
    bf.add_argument("--seq-len", type=COUNT, default=256)
    bf.add_argument("--repeats", type=COUNT, default=5)
    _add_bench_mesh(bf)
    bf.set_defaults(fn=commands.cmd_bench)
    bs = bsub.add_parser("ssd", help="SSD impls vs the reference scan; Mamba2 LM forward vs transformers")
    bs.add_argument("--lengths", type=COUNT, nargs="+", default=[512, 2048, 8192])
    bs.add_argument("--repeats", type=COUNT, default=5)
    bs.set_defaults(fn=commands.cmd_bench)
    ba = bsub.add_parser("attention", help="decode step: MLA absorbed vs materialised vs GQA; flash vs reference")
    ba.add_argument("--contexts", type=COUNT, nargs="+", default=[1024, 8192, 32768])
    ba.add_argument("--batch", type=COUNT, default=1)
    ba.add_argument("--repeats", type=COUNT, default=5)
    ba.set_defaults(fn=commands.cmd_bench)

    bd = bsub.add_parser("decode", help="decode tokens/s against context and batch: the teacher CKPT, its hybrids, "
                                        "transformers' generate (JSON; --plot PNG)")
    bd.add_argument("ckpt", help="the teacher (a Llama checkpoint)")
    bd.add_argument("--contexts", type=COUNT, nargs="+", default=[1024, 4096])
    bd.add_argument("--batches", type=COUNT, nargs="+", default=[1, 8])
    bd.add_argument("--models", nargs="+", metavar="NAME",
                    help="default all: teacher, transformers (its generate), and hybrids built from the teacher's "
                         "weights: zebra (--num-mla MLA layers, the rest Mamba2), mamba2 (all), mambainllama (half "
                         "attention)")
    bd.add_argument("--model", action="append", default=[], metavar="NAME=CKPT", help="a trained model too")
    bd.add_argument("--num-mla", type=COUNT, default=6)
    bd.add_argument("--mla-layers", type=_layers, help="zebra's MLA layers (default: SMART's spacing of --num-mla)")
    bd.add_argument("--smart", help="a smart.json of zebrax distill: zebra's MLA layers from it")
    bd.add_argument("--kv-lora-rank", type=COUNT)
    bd.add_argument("--q-lora-rank", type=COUNT)
    bd.add_argument("--qk-rope-head-dim", type=COUNT)
    bd.add_argument("--new-tokens", type=_number(int, lambda v: v >= 2, "an integer >= 2"), default=16)
    bd.add_argument("--repeats", type=COUNT, default=3)
    bd.add_argument("--transformers-max-tokens", type=INDEX, default=8192,
                    help="time transformers only where batch × context is at most this")
    bd.add_argument("--plot", type=_output_file, help="write the plot here (PNG)")
    _add_bench_mesh(bd)
    bd.set_defaults(fn=commands.cmd_bench)
    bt = bsub.add_parser("train", help="a KD step of a hybrid of CKPT: tokens/s, FLOP/s against the matmul peak")
    bt.add_argument("ckpt")
    bt.add_argument("--batch", type=COUNT, default=4)
    bt.add_argument("--seq-len", type=COUNT, default=256)
    bt.add_argument("--steps", type=COUNT, default=5)
    bt.add_argument("--num-mla", type=COUNT, default=6)
    bt.add_argument("--kv-lora-rank", type=COUNT, default=64)
    _add_bench_mesh(bt)
    bt.set_defaults(fn=commands.cmd_bench)
    bl = bsub.add_parser("long-prompt", help="one long prompt through generate: time and peak memory")
    bl.add_argument("ckpt")
    bl.add_argument("--length", type=COUNT, default=32768)
    bl.add_argument("--new-tokens", type=COUNT, default=8)
    bl.add_argument("--prefill-chunk", type=COUNT, default=PREFILL_CHUNK,
                    help=f"prefill this many tokens at a time (default {PREFILL_CHUNK}; the length: at once)")
    bl.set_defaults(fn=commands.cmd_bench)

    v = sub.add_parser("eval", help="perplexity on text/jsonl files, and KL(teacher ‖ model) with --teacher (JSON)")
    v.add_argument("ckpt")
    v.add_argument("--data", nargs="+", required=True, help=".txt (paragraphs), .jsonl/.parquet ({text}/{messages})")
    v.add_argument("--teacher", help="a checkpoint of the same vocabulary: also KL(teacher ‖ model) per token")
    v.add_argument("--seq-len", type=_number(int, lambda v: v >= 2, "an integer >= 2"), default=1024,
                   help="window length (long texts: windows overlapping by 1)")
    v.add_argument("--batch-size", type=COUNT, default=8)
    v.add_argument("--max-rows", type=INDEX, default=0, help="evaluate only the first N rows (0: all)")
    v.add_argument("--out", type=_output_file, help="also write the JSON here")
    v.set_defaults(fn=commands.cmd_eval)

    le = sub.add_parser("long-eval", help="does a model use its context: needle maps and loss against position "
                                          "(JSON; --plot PNG, models side by side)")
    lesub = le.add_subparsers(dest="long_eval", required=True, metavar="needle|positions|layers")
    models_help = "checkpoints, each CKPT or NAME=CKPT (the name in the JSON and the plot)"
    ln = lesub.add_parser("needle", help="RULER's single needle on its noise haystack: retrieval accuracy and the "
                                         "value's log-probability over depth x context length")
    ln.add_argument("models", nargs="+", metavar="MODEL", help=models_help)
    ln.add_argument("--lengths", type=COUNT, nargs="+", default=[1024, 2048, 4096], help="prompt lengths in tokens")
    ln.add_argument("--depths", type=_number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), nargs="+",
                    default=[0.0, 0.25, 0.5, 0.75, 1.0], help="where the needle sits (0: first, 1: last)")
    ln.add_argument("--samples", type=COUNT, default=2, help="needles a cell (the same for every model)")
    ln.add_argument("--seed", type=SEED, default=0)
    ln.add_argument("--batch-size", type=COUNT, default=4)
    ln.add_argument("--prefill-chunk", type=COUNT, default=PREFILL_CHUNK)
    lp = lesub.add_parser("positions", help="NLL against position over the first --length tokens of long documents")
    lp.add_argument("models", nargs="+", metavar="MODEL", help=models_help)
    lp.add_argument("--data", nargs="+", required=True, help=".txt (paragraphs), .jsonl/.parquet ({text}/{messages}); "
                                                            "each record one document")
    lp.add_argument("--length", type=_number(int, lambda v: v >= 2, "an integer >= 2"), required=True)
    lp.add_argument("--batch-size", type=COUNT, default=1)
    lp.add_argument("--chunk", type=COUNT, default=PREFILL_CHUNK, help="tokens fed a step")
    lp.add_argument("--max-docs", type=INDEX, default=0, help="the first N documents long enough (0: all)")
    ll = lesub.add_parser("layers", help="which layers carry the teacher's retrieval: the needle's value "
                                         "log-probability with each layer in turn a student's")
    ll.add_argument("teacher", metavar="TEACHER")
    ll.add_argument("student", metavar="STUDENT", help="a student of one kind (all-GDN, all-MLA, …) of the teacher")
    ll.add_argument("--length", type=COUNT, default=256, help="prompt length in tokens")
    ll.add_argument("--depths", type=_number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), nargs="+",
                    default=[0.0, 0.5, 1.0], help="where the needle sits (0: first, 1: last)")
    ll.add_argument("--samples", type=COUNT, default=2, help="needles a depth")
    ll.add_argument("--seed", type=SEED, default=0)
    ll.add_argument("--together", type=COUNT, nargs="*", default=[],
                    help="also swap the K layers that cost least at once, for each K")
    for parser in (ln, lp, ll):
        parser.add_argument("--out", type=_output_file, help="also write the JSON here")
        if parser is not ll:
            parser.add_argument("--plot", type=_output_file, help="write the plot here (PNG)")
        parser.set_defaults(fn=commands.cmd_long_eval)

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-eval's command line with the model zebrax: zebrax lm-eval --model zebrax --model_args "
                        "pretrained=CKPT[,batch_size=8] --tasks … (every lm_eval argument; --help: lm-eval's)")

    g = sub.add_parser("generate-data", help="the teacher's replies to a prompt file, as chat records (resumable)")
    g.add_argument("teacher")
    g.add_argument("--prompts", required=True, help="jsonl of {'messages': [...]} or {'prompt': ...}")
    g.add_argument("--out", type=_output_file, required=True, help="jsonl to write; a re-run completes it")
    g.add_argument("--batch-size", type=COUNT, default=16)
    g.add_argument("--max-new-tokens", type=COUNT, default=128)
    g.add_argument("--temperature", type=TEMPERATURE, default=0.7)
    g.add_argument("--top-p", type=TOP_P, default=0.9)
    g.add_argument("--seed", type=SEED, default=0)
    g.set_defaults(fn=commands.cmd_generate_data)

    t = sub.add_parser("tokenize", help="data files → a tokenized corpus of rows (ArrayRecord shards) that "
                                        "distill reads as it trains (distill.data = ('DIR',))")
    t.add_argument("data", nargs="+", help="jsonl, parquet or txt files of text or chat records")
    t.add_argument("--out", required=True, help="the corpus directory to write (whole or not at all)")
    t.add_argument("--teacher", required=True, help="the zebrax checkpoint whose tokenizer to use, or 'tiny' "
                                                    "(bytes, as distill.teacher = 'tiny')")
    t.add_argument("--seq-len", type=_number(int, lambda v: v >= 2, "an integer >= 2"), required=True,
                   help="tokens a row (distill.seq_len: a row predicts at least one next token)")
    t.add_argument("--pack", action="store_true", help="several documents a row (distill.pack = True)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing corpus at --out")
    t.set_defaults(fn=commands.cmd_tokenize)

    ld = sub.add_parser("long-docs", help="long chats for a context-extension stage (distill.long_data): a teacher's "
                                          "conversations in one chat, notes handed over, a question on one last")
    ld.add_argument("conversations", nargs="+", help="jsonl or parquet of chat records (messages), e.g. the "
                                                     "teacher's replies (distill.generated_data)")
    ld.add_argument("--teacher", required=True, help="the zebrax checkpoint whose tokenizer and chat template count "
                                                     "the tokens")
    ld.add_argument("--length", type=_number(int, lambda v: v >= 64, "an integer >= 64"), required=True,
                    help="tokens a document at most (distill.kd_long_seq_len)")
    ld.add_argument("--count", type=COUNT, required=True, help="documents")
    ld.add_argument("--kind", choices=("ledger", "recall"), default="ledger",
                    help="ledger: notes handed over, a question on one last; recall: earlier answers asked for word "
                         "for word, and repeated")
    ld.add_argument("--notes", type=COUNT, default=8, help="notes handed over a document, at most (ledger)")
    ld.add_argument("--recalls", type=COUNT, default=2, help="answers repeated a document, at most (recall)")
    ld.add_argument("--seed", type=SEED, default=0)
    ld.add_argument("--out", required=True, help="the jsonl file to write")
    ld.set_defaults(fn=commands.cmd_long_docs)

    tl = sub.add_parser("teacher-logits", help="the teacher's top-k logits at every position of a tokenized corpus, "
                                               "stored beside its rows: KD with distill.kd_top_k = K then runs "
                                               "without the teacher")
    tl.add_argument("corpus", help="a corpus made by zebrax tokenize")
    tl.add_argument("--teacher", required=True, help="the zebrax checkpoint of the teacher")
    tl.add_argument("--top-k", type=COUNT, required=True, help="logits kept a position (distill.kd_top_k)")
    tl.add_argument("--batch-size", type=COUNT, default=8, help="rows a forward pass")
    tl.set_defaults(fn=commands.cmd_teacher_logits)

    d = sub.add_parser("distill", help="ILD → SMART → KD → DPO from gin files, resumable in --workdir")
    d.add_argument("--gin_file", action="append", required=True, metavar="FILE",
                   help="e.g. configs/experiments/tiny_cpu.gin (repeatable; later files override)")
    d.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="e.g. --gin_param 'kd/TrainConfig.steps = 10' (repeatable)")
    d.add_argument("--workdir", required=True, help="where the run lives; the same command resumes it")
    d.add_argument("--coordinator", help="host:port of process 0 in a multi-host run (jax.distributed; not needed "
                                         "on a TPU pod, SLURM or Open MPI, which JAX detects)")
    d.add_argument("--num-processes", type=COUNT, help="processes in a multi-host run")
    d.add_argument("--process-id", type=INDEX, help="this process's index in a multi-host run")
    d.set_defaults(fn=commands.cmd_distill)

    a = sub.add_parser("ablate", help="experiments × seeds (each gin file a zebrax distill experiment, stages they "
                                      "agree on shared): a table of KL and perplexity, mean ± sd")
    a.add_argument("gin_files", nargs="+", metavar="GIN_FILE", help="e.g. configs/ablations/*.gin")
    a.add_argument("--seeds", type=COUNT, default=5, help="seeds 0 … N−1 of each experiment (default 5)")
    a.add_argument("--root", default="runs/ablations", help="ROOT/NAME/seed_S work directories, ROOT/ablations.md "
                                                            "(a local directory)")
    a.add_argument("--baseline", help="the experiment every other is compared with, seed by seed (default: method "
                                      "if it is among them, else the first)")
    a.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="applied to every experiment, e.g. 'kd/TrainConfig.steps = 10' (repeatable)")
    a.set_defaults(fn=commands.cmd_ablate)

    x = sub.add_parser("compile", help="compile a training step, prefill or decode step for a TPU slice, here, "
                                       "deviceless: memory a chip, cost-model time, collectives")
    x.add_argument("program", choices=PROGRAMS)
    x.add_argument("--topology", required=True, help="a TPU slice: v5p-16 (cores on v4/v5p, chips on v5e/v6e) or "
                                                     "v5p:2x2x2")
    x.add_argument("--teacher", help="training, smart and eval: the teacher, a preset (llama3_1_8b) or a checkpoint")
    x.add_argument("--student", help="training, smart and eval: the hybrid, a preset or a checkpoint")
    x.add_argument("--model", help="prefill and decode: a preset or a checkpoint")
    x.add_argument("--mesh", type=_mesh, help="sizes over every chip of the slice, e.g. fsdp=4,tensor=2 (default: all "
                                              "fsdp for training, smart and eval; for prefill and decode the rows "
                                              "over data, the heads over tensor)")
    x.add_argument("--batch", type=COUNT, help="sequences a step (training: the stage's global batch)")
    x.add_argument("--seq-len", type=COUNT, help="tokens a sequence (training, smart, eval, prefill)")
    x.add_argument("--context", type=COUNT, help="decode: the cache's length in tokens; prefill with --chunk: the "
                                                 "prompt's")
    x.add_argument("--chunk", type=COUNT, help="prefill: the prompt fed this many tokens at a time (the step that "
                                               "appends the last chunk, costed for the whole prompt)")
    x.add_argument("--accumulate", type=COUNT, help="training: micro-batches a step")
    x.add_argument("--remat", nargs="?", const="full", choices=("none", *REMAT_POLICIES), metavar="POLICY",
                   help="training: the students recompute each block in the backward pass, keeping what POLICY "
                        f"names ({', '.join(REMAT_POLICIES)}; alone: full; none: no remat)")
    x.add_argument("--impl", type=_impl,
                   help="prefill and decode: the ops' implementations, e.g. pallas or attention=pallas,ssd=chunked "
                        "(default auto: the XLA paths on a TPU until a kernel is measured faster there)")
    x.add_argument("--compute-dtype", choices=("float32", "bfloat16"), help="the dtype matmuls run in")
    x.add_argument("--loss-chunk", type=INDEX, help="training: tokens a chunk of the LM heads and losses (0: whole)")
    x.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                   help="training: an experiment's gin (its objective, optimizer and stage settings)")
    x.add_argument("--gin_param", action="append", default=[], metavar="BINDING", help="e.g. 'distill.remat = True'")
    x.add_argument("--json", action="store_true", help="one JSON object (printed whether or not it fits)")
    x.set_defaults(fn=commands.cmd_compile)

    r = sub.add_parser("run", help="the main job: convert → distill → evaluate → benchmark → runs/NAME/report.md "
                                   "(default: configs/experiments/default.gin, the embedded SmolLM2)")
    r.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                   help="the experiment (default configs/experiments/default.gin; repeatable)")
    r.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="e.g. --gin_param 'run.prompt = \"Hi\"' (repeatable)")
    r.set_defaults(fn=commands.cmd_run)
    return p


class _UsageError(Exception):
    """A command line argparse refuses (an unknown flag, a value out of range): one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the command, the flag and the value, without the usage text;
    its sub-commands' parsers are of this class too."""

    def error(self, message: str):
        command = self.prog.removeprefix("zebrax").strip()
        raise _UsageError(f"{command + ': ' if command else ''}{message} (zebrax {command} --help)".replace("  ", " "))


def _show_warning(message, category, filename, lineno, file=None, line=None, *, default=warnings.showwarning):
    from zebrax.errors import ZebraxWarning

    if issubclass(category, ZebraxWarning):
        print(f"zebrax: warning: {message}", file=sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 1 on a ZebraxError, 2 on a command line argparse refuses, 128 + signal number
    on SIGINT or SIGTERM, each failure one line on stderr. A signal removes whatever the command was writing
    (``checkpoint.atomic_directory``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own arguments, untouched by zebrax's parser
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        args = argparse.Namespace(fn=lambda _: commands.cmd_lm_eval(argv[1:]))
    else:
        try:
            args = build_parser().parse_args(argv)
        except _UsageError as e:
            print(f"zebrax: error: {e}", file=sys.stderr)
            return 2
    from zebrax import interrupts
    from zebrax.errors import Interrupted, ZebraxError

    shown, warnings.showwarning = warnings.showwarning, _show_warning
    unraisable, sys.unraisablehook = sys.unraisablehook, _unraisable
    try:
        with interrupts.raising(take_over=True):
            try:
                args.fn(args)
            except ZebraxError:
                interrupts.check()  # a library that turned the signal into its own error: report the signal
                raise
            interrupts.check()
    except Interrupted as e:
        _after_failure()
        print(f"zebrax: error: {e}; nothing was left half-written", file=sys.stderr)
        return 128 + e.signum
    except ZebraxError as e:
        _after_failure()
        print(f"zebrax: error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning, sys.unraisablehook = shown, unraisable
    return 0


def _after_failure() -> None:
    """Before the one line: silence the libraries' loggers (orbax's commit threads log their own failure of the same
    write) and remove what a background writer recreated after the cleanup."""
    from zebrax.files import remove_leftovers

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    remove_leftovers()


def _unraisable(hook_args, *, default=sys.unraisablehook):
    """A signal that lands in a garbage-collector callback cannot raise there; ``interrupts`` remembers it, so
    Python's "Exception ignored" report would only add lines to the one that follows."""
    from zebrax.errors import Interrupted

    if not isinstance(hook_args.exc_value, Interrupted):
        default(hook_args)


def entry() -> None:
    """The ``zebrax`` console script. After a failure the process ends at once: orbax's and tensorstore's
    background threads would otherwise print tracebacks at interpreter shutdown after the one line."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

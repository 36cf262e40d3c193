"""The commands of ``zebrax``: each takes the parsed arguments (``cli.build_parser``) and hands the objects they
name to the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from zebrax.mixers import legend


def cmd_convert(args):
    import zebrax

    dst = zebrax.convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {dst}")


def cmd_build(args):
    import zebrax

    config = None
    if args.preset:
        from zebrax.app.presets import preset_config
        from zebrax.config import HybridConfig
        from zebrax.errors import ZebraxError

        config = preset_config(args.preset)
        if not isinstance(config, HybridConfig):
            raise ZebraxError(f"--preset {args.preset}: not a hybrid preset (it builds a {type(config).__name__})")
    names = ("mla_layers", "attention_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "rope_factor",
             "linear")
    recipe = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    dst = zebrax.build(args.teacher, args.dst, config=config, seed=args.seed, overwrite=args.overwrite, **recipe)
    report = json.loads((Path(dst) / "build_report.json").read_text())
    errors = [(r["q_relative_error"], r["kv_relative_error"]) for r in report["layers"] if r["mixer"] == "mla"]
    summary = f"layers {report['layer_map']} ({legend(report['layer_map'])})"
    if errors:
        q, kv = (sum(e) / len(errors) for e in zip(*errors, strict=True))
        summary += f"; mean SVD truncation error q {q:.3f}, kv {kv:.3f}"
    print(f"wrote {dst}: {summary}")


def cmd_assemble(args):
    import shutil

    from zebrax import checkpoint
    from zebrax.init import assemble

    source = args.linear_student if args.embeddings_from == "linear" else args.mla_student
    with checkpoint.writing(args.dst, overwrite=args.overwrite,
                                     sources=[args.mla_student, args.linear_student]) as tmp:
        students = []
        for path in (args.mla_student, args.linear_student):
            config = checkpoint.load_config(path)
            students.append((config, checkpoint.load_params(path, config)))
        config, params = assemble(*students, args.mla_layers, embeddings_from=args.embeddings_from)
        checkpoint.save(tmp, config, params)
        if checkpoint.tokenizer_dir(source) is not None:
            shutil.copytree(checkpoint.tokenizer_dir(source), tmp / "tokenizer")
    print(f"wrote {args.dst}: layers {config.layer_map()} ({legend(config.layer_map())})")


def cmd_select(args):
    import zebrax
    from zebrax import select

    teacher = zebrax.load(args.teacher)
    tokens = select.calibration_tokens(args.data, teacher.tokenizer, seq_len=args.seq_len,
                                       num_sequences=args.num_sequences)
    result = select.scores(teacher, zebrax.load(args.mla_student), zebrax.load(args.linear_student), tokens)
    result["num_mla"] = args.num_mla
    result["mla_layers"] = select.place(result["scores"], args.num_mla, first=args.first, last=args.last)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}: MLA layers {result['mla_layers']} ({result['seconds']} s, "
          f"{result['compilations']} compilation)")


def cmd_export(args):
    from zebrax.convert.export import export

    print(f"wrote {export(args.ckpt, args.dst, overwrite=args.overwrite, format=args.format)}")


def cmd_generate(args):
    import zebrax

    model = zebrax.load(args.ckpt)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    prefill_chunk=args.prefill_chunk)
    if args.chat:
        print(model.chat(args.prompt, **sampling))
        return
    prompt = model.encode(args.prompt)
    out = model.generate([prompt], **sampling)[0]
    print(args.prompt + model.decode(out[len(prompt):]))


def cmd_info(args):
    from zebrax.app.info import describe

    info = describe(args.target)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key in ("config", "layers"):
            continue
        if key == "layer_map":
            value = f"{value}  ({legend(value)})"
        elif key == "kv_cache_ratio" and value is not None:
            value = f"{100 * value:.2f}% of the all-attention teacher's per-token cache"
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"{key:>22}: {shown}")


def cmd_bench(args):
    import zebrax
    from zebrax.app import bench

    if args.bench == "forward":
        result = bench.bench_forward(zebrax.load(args.ckpt, mesh=_bench_mesh(args)), batch=args.batch,
                                     seq_len=args.seq_len, repeats=args.repeats)
    elif args.bench == "ssd":
        result = bench.bench_ssd(lengths=tuple(args.lengths), repeats=args.repeats)
    elif args.bench == "decode":
        result = _bench_decode(args)
    elif args.bench == "train":
        result = bench.bench_train(zebrax.load(args.ckpt, mesh=_bench_mesh(args)), batch=args.batch,
                                   seq_len=args.seq_len, steps=args.steps, num_mla=args.num_mla,
                                   recipe={"kv_lora_rank": args.kv_lora_rank})
    elif args.bench == "long-prompt":
        zebrax.load(args.ckpt)  # a bad checkpoint fails here, with zebrax's message
        result = bench.bench_long_prompt(args.ckpt, length=args.length, new_tokens=args.new_tokens,
                                         prefill_chunk=args.prefill_chunk)
    else:
        result = bench.bench_attention(contexts=tuple(args.contexts), batch=args.batch, repeats=args.repeats)
    print(json.dumps(result, indent=2))


def _bench_mesh(args):
    """The mesh of ``--mesh`` over this process's devices, or None (one device)."""
    if args.mesh is None:
        return None
    from zebrax.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(**args.mesh))


def _bench_decode(args) -> dict:
    import zebrax
    from zebrax.app import bench_decode
    from zebrax.app.plots import plot_decode

    mesh = _bench_mesh(args)
    extra = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            from zebrax.errors import InvalidArgument

            raise InvalidArgument(f"--model {item!r}: expected NAME=CKPT (e.g. --model zebra-kd=runs/smollm2/kd)")
        extra[name] = zebrax.load(path, mesh=mesh)
    mla_layers = args.mla_layers
    if args.smart:
        mla_layers = json.loads(Path(args.smart).read_text())["mla_layers"]
    recipe = {k: getattr(args, k) for k in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim")
              if getattr(args, k) is not None}
    result = bench_decode.bench_decode(
        zebrax.load(args.ckpt, mesh=mesh), contexts=tuple(args.contexts), batches=tuple(args.batches),
        models=tuple(args.models or bench_decode.MODELS),
        extra=extra, num_mla=args.num_mla, mla_layers=mla_layers, recipe=recipe, new_tokens=args.new_tokens,
        repeats=args.repeats, transformers_max_tokens=args.transformers_max_tokens)
    if args.plot:
        plot_decode(result, args.plot)
        result["plot"] = str(args.plot)
    return result


def cmd_eval(args):
    import itertools

    import zebrax
    from zebrax.data import codec_for
    from zebrax.evaluate import eval_rows, evaluate

    model = zebrax.load(args.ckpt)
    teacher = zebrax.load(args.teacher) if args.teacher else None
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        from zebrax.errors import InvalidArgument

        raise InvalidArgument(f"--teacher {args.teacher}: its vocabulary ({teacher.config.vocab_size}) is not the "
                              f"model's ({model.config.vocab_size}); KL needs the same tokens")
    rows = eval_rows(args.data, codec_for(model, args.ckpt), args.seq_len)
    if args.max_rows:
        rows = itertools.islice(rows, args.max_rows)
    result = evaluate(model.module, model.params, rows, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                      source=", ".join(args.data),
                      **({"teacher": teacher.module, "teacher_params": teacher.params} if teacher else {}))
    result = {"model": str(args.ckpt), "teacher": args.teacher, "data": [str(f) for f in args.data],
              "seq_len": args.seq_len, **result}
    text = json.dumps(result, indent=2)
    if args.out:
        from zebrax.files import write_text_atomic

        write_text_atomic(args.out, text + "\n")
    print(text)


def _named_models(items: list[str]) -> dict:
    """``CKPT`` or ``NAME=CKPT`` → {name: loaded model}; one vocabulary for all (they read the same tokens)."""
    import zebrax
    from zebrax.errors import InvalidArgument

    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name or item, item)
        if not name or not path or name in models:
            raise InvalidArgument(f"{item!r}: expected CKPT or NAME=CKPT, each name once")
        models[name] = zebrax.load(path)
    vocabularies = {m.config.vocab_size for m in models.values()}
    if len(vocabularies) > 1:
        raise InvalidArgument(f"long-eval: the models' vocabularies differ ({sorted(vocabularies)}); they must read "
                              "the same tokens")
    return models


def cmd_long_eval(args):
    from zebrax import long_context
    from zebrax.app.plots import plot_needles, plot_positions
    from zebrax.data import codec_for, read_records

    if args.long_eval == "layers":
        from zebrax.api import load

        result = long_context.layer_retrieval(load(args.teacher), load(args.student), length=args.length,
                                              depths=args.depths, samples=args.samples, seed=args.seed,
                                              together=args.together)
        _print_json({"measure": "layers", "teacher": args.teacher, "student": args.student, "results": result},
                    args.out)
        return
    models = _named_models(args.models)
    progress = _progress(args.long_eval)
    if args.long_eval == "needle":
        results = {name: long_context.needle_map(m, lengths=args.lengths, depths=args.depths, samples=args.samples,
                                                 seed=args.seed, batch_size=args.batch_size,
                                                 prefill_chunk=args.prefill_chunk, progress=progress(name))
                   for name, m in models.items()}
        plot = plot_needles
    else:
        first = next(iter(models.values()))
        codec = codec_for(first, args.models[0])
        documents = []
        for f in args.data:
            for _, record in read_records(f):
                text = record.get("text")
                documents.append(codec.encode(text) if isinstance(text, str) else codec.chat(record["messages"], False))
        long_enough = [d for d in documents if len(d) >= args.length]
        if args.max_docs:
            documents = long_enough[:args.max_docs]
        results = {name: long_context.position_nll(m, documents, length=args.length, batch_size=args.batch_size,
                                                   chunk=args.chunk, progress=progress(name))
                   for name, m in models.items()}
        plot = plot_positions
    out = {"measure": args.long_eval, "models": dict(zip(models, args.models, strict=True)), "results": results}
    if args.plot:
        plot(results, args.plot)
        out["plot"] = str(args.plot)
    _print_json(out, args.out)


def _print_json(out: dict, path) -> None:
    """``out`` as JSON on stdout, and written to ``path`` (atomically) when given."""
    text = json.dumps(out, indent=2)
    if path:
        from zebrax.files import write_text_atomic

        write_text_atomic(path, text + "\n")
    print(text)


def _progress(what: str):
    """``progress(name)`` → a callback printing "[long-eval needle] NAME: done/total" to stderr."""

    def for_model(name: str):
        return lambda done, total: print(f"[long-eval {what}] {name}: {done}/{total}", file=sys.stderr, flush=True)

    return for_model


def cmd_lm_eval(argv: list[str]) -> None:
    from zebrax.app.lm_eval import cli

    cli(argv)


def cmd_generate_data(args):
    import zebrax
    from zebrax.data import generate_data

    out = generate_data(zebrax.load(args.teacher), args.prompts, args.out, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    print(f"wrote {out}")


def cmd_tokenize(args):
    from zebrax import corpus, data
    from zebrax.api import load_tokenizer

    if args.teacher == "tiny":
        codec = data.ByteCodec()
    else:
        tokenizer = load_tokenizer(args.teacher)
        if tokenizer is None:
            raise data.DataError(f"{args.teacher}: no tokenizer/ (expected a zebrax checkpoint with its tokenizer, "
                                 f"or 'tiny' for the byte codec of the tiny experiments)")
        codec = data.TokenizerCodec(tokenizer)
    m = corpus.tokenize(args.data, args.out, codec, args.seq_len, pack=args.pack, tokenizer=str(args.teacher),
                        overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), **{k: m[k] for k in ("rows", "documents", "documents_counting_none",
                                                                    "real_tokens", "counted_tokens")},
                      "seconds": round(m["seconds"], 2), "tokens_per_second": round(m["real_tokens"] / m["seconds"])},
                     indent=2))


def cmd_long_docs(args):
    from zebrax import data
    from zebrax.api import load_tokenizer
    from zebrax.files import write_text_atomic
    from zebrax.long_documents import ledger_chats, recall_chats

    tokenizer = load_tokenizer(args.teacher)
    if tokenizer is None:
        raise data.DataError(f"{args.teacher}: no tokenizer/ (expected a zebrax checkpoint with its tokenizer and chat "
                             f"template)")
    conversations = []
    for f in args.conversations:
        for where, record in data.read_records(f):
            if "messages" not in record:
                raise data.DataError(f"{where}: a conversation needs 'messages', it has {sorted(record)}")
            conversations.append(record["messages"])
    codec = data.TokenizerCodec(tokenizer)
    if args.kind == "ledger":
        docs = ledger_chats(conversations, codec, length=args.length, count=args.count, seed=args.seed,
                            notes=args.notes)
    else:
        docs = recall_chats(conversations, codec, length=args.length, count=args.count, seed=args.seed,
                            recalls=args.recalls)
    write_text_atomic(args.out, "".join(json.dumps(d) + "\n" for d in docs))
    tokens = [d["tokens"] for d in docs]
    print(json.dumps({"out": str(args.out), "documents": len(docs), "conversations": len(conversations),
                      "tokens": {"min": min(tokens), "mean": round(sum(tokens) / len(tokens), 1), "max": max(tokens)}},
                     indent=2))


def cmd_teacher_logits(args):
    from zebrax import checkpoint, corpus, data
    from zebrax.api import load_tokenizer

    config = checkpoint.load_config(args.teacher)
    tokenizer = load_tokenizer(args.teacher)
    corpus.Corpus(args.corpus)  # a path that is no corpus fails here, before the teacher is read
    entry = corpus.teacher_logits(args.corpus, config, checkpoint.load_params(args.teacher, config), args.top_k,
                                  teacher=str(args.teacher), teacher_sha256=checkpoint.content_sha256(args.teacher),
                                  codec_sha256=None if tokenizer is None else data.TokenizerCodec(tokenizer).sha256(),
                                  batch_size=args.batch_size)
    rows = corpus.Corpus(args.corpus).manifest["real_tokens"]
    print(json.dumps({"corpus": str(args.corpus), "k": entry["k"], "shards": len(entry["files"]),
                      "seconds": round(entry["seconds"], 2), "tokens_per_second": round(rows / entry["seconds"])},
                     indent=2))


def cmd_compile(args):
    from zebrax.app import aot
    from zebrax.app.presets import call_configurable, parse_gin
    from zebrax.errors import ZebraxError

    experiment = None
    if args.gin_file or args.gin_param:
        experiment = call_configurable(parse_gin(args.gin_file, args.gin_param), "zebrax.distill")
    report = aot.compile(args.program, topology=args.topology, teacher=args.teacher, student=args.student,
                         model=args.model, mesh=args.mesh, batch=args.batch, seq_len=args.seq_len,
                         context=args.context, accumulate=args.accumulate, remat=args.remat,
                         compute_dtype=args.compute_dtype, loss_chunk=args.loss_chunk, experiment=experiment,
                         impl=args.impl or "auto", chunk=args.chunk)
    print(report.to_json() if args.json else report)
    if not report.fits:
        total = report.per_chip_bytes["total"]
        raise ZebraxError(f"{args.program} does not fit {args.topology}: {total / 2**30:.2f} GiB a chip against "
                          f"{report.hbm_bytes / 2**30:.2f} GiB of HBM")


def cmd_distill(args):
    from zebrax.app.presets import call_configurable, parse_gin
    from zebrax.distill import pipeline
    from zebrax.hosts import distributed

    distributed(args.coordinator, args.num_processes, args.process_id)
    gin = parse_gin(args.gin_file, args.gin_param)
    experiment = call_configurable(gin, "zebrax.distill")
    evals = pipeline.run(experiment, args.workdir, config_text=gin.config_str())
    print(json.dumps(evals, indent=2))


def cmd_ablate(args):
    from zebrax.app.ablate import ablate, table

    rows = ablate(args.gin_files, args.seeds, args.root, args.gin_param, baseline=args.baseline)
    print(table(rows), end="")


def cmd_run(args):
    from zebrax.app.presets import DEFAULT_EXPERIMENT, call_configurable, parse_gin

    gin = parse_gin(args.gin_file or [DEFAULT_EXPERIMENT], args.gin_param)
    call_configurable(gin, "zebrax.run", call_configurable(gin, "zebrax.distill"), config_text=gin.config_str())

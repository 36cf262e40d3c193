"""lm-eval through zebrax: the model ``zebrax`` for lm-evaluation-harness 0.4.x.

Importing this module registers it, so ``lm_eval.simple_evaluate(model="zebrax", model_args="pretrained=CKPT")``
works; ``zebrax lm-eval ARGS...`` is lm-eval's own command line with it registered (lm-eval has no plugin hook for
models). Model arguments: ``pretrained`` (a zebrax checkpoint with a tokenizer), ``batch_size`` (8), ``max_length``
(the checkpoint's ``max_position_embeddings``, as lm-eval's ``hf`` model has it; past it only with ``extrapolate``),
``max_gen_toks`` (256), ``prefill_chunk`` (prompts longer than it are prefilled that many tokens at a time),
``dtype`` (the checkpoint's), ``add_bos_token`` and ``prefix_token_id`` (as ``hf`` has them), ``impl`` ("auto"),
``tokenizer`` (the directory tasks that make their own data, RULER's, read with ``AutoTokenizer``: the checkpoint's
``tokenizer/``, which ``zebrax lm-eval`` adds to ``--model_args``; another must tokenize as it does); any other is
refused by name, but for those lm-eval passes to every model (``LM_EVAL_ARGS``), which mean nothing here.

It scores exactly what lm-eval's ``hf`` model scores: the same tokenisation (``tok_encode``), the same truncation
of context + continuation to the last ``max_length + 1`` tokens (and of a prompt to generate from to its last
``max_length - max_gen_toks``), the same rolling windows, the same stop-sequence handling. Every cut is counted
(``truncated``) and reported in one warning a call, never silent. Shapes are bucketed (rows padded to a power-of-two
length of at least 32, then to whole 512s; batches padded to ``batch_size`` rows) so lm-eval's many lengths compile a
handful of programs, not one each; the LM head runs 512 tokens at a time, so no call holds a batch's
``[B, L, vocab]`` logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as lm_utils
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from zebrax.generate import PREFILL_CHUNK
from zebrax.losses import HEAD_CHUNK, token_chunks, token_logprobs
from zebrax.models.decoder import LMHead

MIN_BUCKET = 32
DEFAULT_MAX_LENGTH = 2048  # lm-eval's hf model's, for a checkpoint that states no context
# what lm-eval hands every model besides its model_args: --device and --max_batch_size (simple_evaluate), and
# trust_remote_code=True with --trust_remote_code (EvaluatorConfig); --batch_size is zebrax's own batch_size
LM_EVAL_ARGS = ("device", "max_batch_size", "trust_remote_code")
# RULER's tasks that build their samples on this machine (the others read essays, SQuAD or HotpotQA from the Hub)
OFFLINE_RULER = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")


def bucket(length: int) -> int:
    """The padded length of a row of ``length`` tokens: the next power of two >= 32 up to ``HEAD_CHUNK``, then the
    next multiple of it."""
    if length <= HEAD_CHUNK:
        return max(MIN_BUCKET, 1 << (length - 1).bit_length())
    return -(-length // HEAD_CHUNK) * HEAD_CHUNK


@functools.lru_cache(maxsize=4)
def _scorer(module):
    """jitted ``(params, tokens [B, L], mask [B, L], targets [B, L]) -> (log p(target) [B, L], target is argmax
    [B, L])``, float32; the LM head ``HEAD_CHUNK`` tokens at a time (``token_chunks``)."""
    head = LMHead(module.config)

    @jax.jit
    def score(params, tokens, mask, targets):
        hidden = module.apply({"params": params}, tokens, token_mask=mask, hidden_only=True)[0]

        def per_token(h, t):
            logits = head.apply({"params": params}, h)
            return token_logprobs(logits, t), jnp.argmax(logits, axis=-1) == t

        return token_chunks(per_token, (hidden, targets), min(HEAD_CHUNK, tokens.shape[1]))

    return score


def _positive(name: str, value, auto: int | None = None) -> int:
    """A model argument that must be an integer >= 1, as lm-eval hands it over (an int, or a string such as ``"8"``);
    with ``auto``, lm-eval's automatic sizes (``"auto"``, ``"auto:4"``) mean ``auto``. InvalidArgument otherwise."""
    from zebrax.errors import InvalidArgument

    if auto is not None and str(value).startswith("auto"):
        return auto
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"lm-eval model zebrax: {name}={value!r} must be an integer >= 1")
    return value


def _check_same_tokenizer(path: str, own, pretrained: str) -> None:
    """InvalidArgument unless the tokenizer at ``path`` tokenizes as the checkpoint's own (its whole pipeline and
    chat template, ``TokenizerCodec.sha256``): a task sizing its prompts with another would measure other lengths."""
    from transformers import AutoTokenizer

    from zebrax.data import TokenizerCodec
    from zebrax.errors import InvalidArgument

    try:
        other = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"lm-eval model zebrax: tokenizer={path}: not a tokenizer directory ({e})") from None
    if TokenizerCodec(other).sha256() != TokenizerCodec(own).sha256():
        raise InvalidArgument(f"lm-eval model zebrax: tokenizer={path} does not tokenize as {pretrained}'s own "
                              "tokenizer/; tasks that size their prompts with it would measure other lengths")


def with_tokenizer(argv: list[str]) -> list[str]:
    """lm-eval's arguments with ``tokenizer=CKPT/tokenizer`` added to ``--model_args`` where ``--model zebrax`` has a
    local ``pretrained=CKPT`` holding one and no ``tokenizer``: RULER's tasks read the tokenizer from the model
    arguments (``tokenizer``, else ``pretrained``, which for zebrax is no tokenizer directory)."""
    from pathlib import Path

    from lm_eval.utils import simple_parse_args_string

    model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"),
                 next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), None))
    if model != "zebrax":
        return argv
    out = list(argv)
    for i, a in enumerate(out):
        value = out[i + 1] if a == "--model_args" and i + 1 < len(out) else (
            a.split("=", 1)[1] if a.startswith("--model_args=") else None)
        if value is None or value.lstrip().startswith("{"):
            continue
        args = simple_parse_args_string(value)
        found = Path(str(args.get("pretrained", ""))) / "tokenizer"
        if "tokenizer" in args or not args.get("pretrained") or not found.is_dir():
            continue
        value = f"{value},tokenizer={found}"
        if a == "--model_args":
            out[i + 1] = value
        else:
            out[i] = f"--model_args={value}"
    return out


def _check_names(names) -> None:
    """InvalidArgument naming the model arguments ``ZebraxLM`` does not take, and listing those it does."""
    import inspect

    from zebrax.errors import InvalidArgument

    own = [p for p in inspect.signature(ZebraxLM.__init__).parameters if p not in ("self", "lm_eval_args")]
    unknown = [n for n in names if n not in own and n not in LM_EVAL_ARGS]
    if unknown:
        raise InvalidArgument(f"lm-eval model zebrax: unknown model argument{'s' * (len(unknown) > 1)} "
                              f"{', '.join(unknown)}; it takes {', '.join(own)} (and lm-eval's own "
                              f"{', '.join(LM_EVAL_ARGS)}, which mean nothing to it)")


@register_model("zebrax")
class ZebraxLM(TemplateLM):
    def __init__(self, pretrained: str, batch_size=8, max_length: int | None = None, max_gen_toks: int = 256,
                 prefill_chunk=PREFILL_CHUNK, extrapolate: bool = False, dtype: str | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, impl: str = "auto",
                 tokenizer: str | None = None, **lm_eval_args):
        from zebrax.api import load
        from zebrax.errors import ConfigError, InvalidArgument

        _check_names([*lm_eval_args])
        batch_size = _positive("batch_size", batch_size, auto=8)
        max_length = None if max_length is None else _positive("max_length", max_length)
        max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self.prefill_chunk = _positive("prefill_chunk", prefill_chunk)
        if str(extrapolate) not in ("True", "False"):
            raise InvalidArgument(f"lm-eval model zebrax: extrapolate={extrapolate!r} must be True or False")
        super().__init__()
        self.model = load(pretrained, dtype=dtype, impl=impl)
        if self.model.tokenizer is None:
            raise ConfigError(f"{pretrained}: has no tokenizer/; lm-eval works on text")
        if tokenizer is not None:
            _check_same_tokenizer(tokenizer, self.model.tokenizer, pretrained)
        trained = getattr(self.model.config, "max_position_embeddings", None)
        if max_length is not None and trained is not None and max_length > trained and str(extrapolate) != "True":
            raise InvalidArgument(f"lm-eval model zebrax: max_length={max_length} is past {pretrained}'s "
                                  f"max_position_embeddings={trained}, the longest context it was built for; add "
                                  "extrapolate=True to measure past it")
        self.tokenizer = self.model.tokenizer
        self.pretrained = str(pretrained)
        self.batch_size = batch_size
        self.max_length = max_length or trained or DEFAULT_MAX_LENGTH
        self.max_gen_toks = max_gen_toks
        # requests whose context was cut to fit max_length, by request type (lm-eval's hf model cuts them silently)
        self.truncated = {"loglikelihood": 0, "generate_until": 0}
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._score = _scorer(self.model.module)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``--model_args`` win over lm-eval's own flags (``--batch_size`` defaults to 1 and is always passed).
        InvalidArgument for a missing ``pretrained`` or an unknown argument, before anything is loaded."""
        from zebrax.errors import InvalidArgument

        _check_names(arg_dict)
        if "pretrained" not in arg_dict:
            raise InvalidArgument("lm-eval model zebrax: model_args need pretrained=CKPT (a zebrax checkpoint)")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- tokens, as lm-eval's hf model has them ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = lm_utils._add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and lm_utils.has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- scoring --------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``[((context, continuation) or None, context ids, continuation ids)]`` → ``[(Σ log p(continuation),
        continuation is the greedy one)]``: the input is context + continuation cut to its last ``max_length + 1``
        tokens, less the last; the continuation is scored at the input's last positions."""
        rows, cut = [], 0
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            cut += len(context) + len(continuation) > len(whole)
            rows.append((whole[:-1], whole[1:], len(continuation)))
        self._report_cut("loglikelihood", cut, len(rows), f"context + continuation cut to their last "
                         f"max_length + 1 = {self.max_length + 1} tokens")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="zebrax loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket(len(rows[chunk[0]][0]))
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets, mask = np.zeros_like(tokens), np.zeros(tokens.shape, bool)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                tokens[r, :len(inp)], targets[r, :len(tgt)], mask[r, :len(inp)] = inp, tgt, True
            logp, greedy = map(np.asarray, self._score(self.model.params, tokens, mask, targets))
            for r, i in enumerate(chunk):
                n, cont = len(rows[i][0]), rows[i][2]
                out[i] = (float(logp[r, n - cont:n].astype(np.float64).sum()), bool(greedy[r, n - cont:n].all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole text: lm-eval's rolling windows of ``max_length`` tokens, a context of one token,
        the first token conditioned on ``prefix_token_id``."""
        windows, owners = [], []  # disjoint windows: nothing is cut
        for k, (string,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(w)))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, scores, strict=True):
            totals[k] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, ``do_sample``) continuations, cut at the first stop sequence (``until`` and EOS)."""
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="zebrax generate_until", disable=disable_tqdm)
        cut = 0
        for indices in groups.values():
            kwargs = lm_utils.normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = lm_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                from zebrax.errors import InvalidArgument

                raise InvalidArgument(f"generate_until: max_gen_toks={max_gen_toks} must be less than max_length="
                                      f"{self.max_length}")
            sampling = {"temperature": float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                        "top_p": float(kwargs.get("top_p", 1.0) or 1.0)}
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                whole = [self.tok_encode(requests[i].args[0]) for i in chunk]
                prompts = [ids[-(self.max_length - max_gen_toks):] for ids in whole]
                cut += sum(len(w) > len(p) for w, p in zip(whole, prompts, strict=True))
                done = self.model.generate(prompts, max_new_tokens=max_gen_toks, prefill_chunk=self.prefill_chunk,
                                           **sampling)
                for i, prompt, row in zip(chunk, prompts, done, strict=True):
                    text = self.tokenizer.decode(row[len(prompt):], skip_special_tokens=True)
                    out[i] = lm_utils.postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        self._report_cut("generate_until", cut, len(requests), "prompts cut to their last max_length - max_gen_toks "
                         "tokens")
        return out

    def _report_cut(self, kind: str, cut: int, total: int, what: str) -> None:
        """Count ``cut`` requests of ``total`` in ``truncated[kind]`` and say so in one warning (none when 0)."""
        from zebrax.errors import warn

        self.truncated[kind] += cut
        if cut:
            warn(f"lm-eval model zebrax: {cut} of {total} {kind} requests did not fit max_length={self.max_length} "
                 f"({what}); the task they measure is not the one asked for")


def cli(argv: list[str]) -> int:
    """``zebrax lm-eval ARGS...``: lm-eval's command line (``lm_eval ARGS...``) with the model ``zebrax``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from zebrax.data import DataError
    from zebrax.errors import InvalidArgument

    saved, sys.argv = sys.argv, ["zebrax lm-eval", *with_tokenizer(argv)]
    try:
        cli_evaluate()
    except ValueError as e:
        if not str(e).startswith("Tasks not found"):
            raise
        raise InvalidArgument(f"lm-eval: {e} (lm-eval's task names, `lm-eval ls tasks`, or those of an "
                              f"--include_path)") from None
    except ConnectionError as e:  # ``datasets`` cannot reach the Hub for a task's data
        raise DataError(f"lm-eval: {str(e).splitlines()[0]}: the task reads its data from the Hub, which this "
                        f"machine cannot reach (give it the Hub, or its cache in HF_DATASETS_CACHE); RULER's tasks "
                        f"that make their data here are {', '.join(OFFLINE_RULER)}") from None
    finally:
        sys.argv = saved
    return 0

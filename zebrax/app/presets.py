"""gin, at the edge: the configurables ``configs/`` binds (model configs, ``zebra_hybrid``, ``distill``,
``TrainConfig``, ``run``), the parsing of gin files and bindings, and the model presets of ``configs/models/``. gin
files and bindings are parsed here and nowhere else; the library below takes the objects they build."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

from zebrax.errors import ZebraxError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_EXPERIMENT = CONFIGS / "experiments" / "default.gin"

_REGISTERED = []
MACRO = "gin.macro"  # the selector gin files a macro (``NAME = value``) under, with the macro's name as its scope


def registry():
    """The ``gin`` module with every zebrax configurable registered (once per process)."""
    import gin

    if not _REGISTERED:
        from zebrax.app.job import run
        from zebrax.config import LlamaConfig, Mamba2Config, Mamba2LMConfig, RopeScaling
        from zebrax.distill.experiment import Experiment
        from zebrax.distill.trainer import TrainConfig
        from zebrax.recipe import from_teacher

        for fn in (LlamaConfig, RopeScaling, Mamba2Config, Mamba2LMConfig, model, run):
            gin.external_configurable(fn, module="zebrax")
        gin.external_configurable(from_teacher, name="zebra_hybrid", module="zebrax")
        gin.external_configurable(Experiment, name="distill", module="zebrax")
        gin.external_configurable(TrainConfig, module="zebrax")
        gin.add_config_file_search_path(str(CONFIGS / "models"))
        gin.add_config_file_search_path(str(CONFIGS))  # include 'stages/kd.gin'
        _REGISTERED.append(True)
    return gin


def parse_gin(files: list[str | Path], bindings: list[str]):
    """Parse gin ``files`` then ``bindings`` into a fresh config; returns the ``gin`` module. ZebraxError names a
    missing file, a binding gin refuses with the names it could have meant, or a binding in a scope nothing uses."""
    gin = registry()
    gin.clear_config()
    for f in files:
        if not Path(f).is_file():
            raise ZebraxError(f"{f}: gin file not found")
    # an `include 'NAME.gin'` is found in configs/models/ after gin has logged "Path not found" for the bare name
    unfound = lambda record: not record.getMessage().startswith("Path not found")  # noqa: E731
    logging.getLogger().addFilter(unfound)
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], bindings)
    except (ValueError, KeyError, SyntaxError, OSError) as e:
        raise ZebraxError(f"gin: {' '.join(str(e).split())}{_gin_names(gin, str(e))}") from None
    finally:
        logging.getLogger().removeFilter(unfound)
    _check_scopes(gin)
    return gin


def _check_scopes(gin) -> None:
    """ZebraxError for a binding in a scope no reference of the config enters (``kdd/TrainConfig.steps`` where only
    ``distill.kd = @kd/TrainConfig()`` is bound): gin would keep it and apply it nowhere. A reference
    ``@a/b/F()`` enters the scopes ``a`` and ``a/b``."""
    config = gin.config._CONFIG
    used = set()
    for ref in gin.config.iterate_references(config):
        if ref.configurable.selector != MACRO:
            used.update("/".join(ref.scopes[:i]) for i in range(1, len(ref.scopes) + 1))
    for scope, selector in config:
        if scope and selector != MACRO and scope not in used:
            params = ", ".join(f"{scope}/{selector.split('.')[-1]}.{name}" for name in config[(scope, selector)])
            raise ZebraxError(f"gin: {params}: the scope {scope!r} is not one this config uses, so the binding "
                              f"would apply nowhere (scopes used: {', '.join(sorted(used)) or 'none'}; a reference "
                              "such as distill.kd = @kd/TrainConfig() uses one)")


def _gin_names(gin, message: str) -> str:
    """What a misspelt binding could have named: the configurable's parameters, or the configurables."""
    unknown_param = re.search(r"Configurable '([^']+)' doesn't have a parameter named", message)
    if unknown_param:
        fn = gin.config._REGISTRY.get_match(unknown_param.group(1)).wrapped
        return f" (its parameters: {', '.join(inspect.signature(fn).parameters)})"
    if "No configurable matching" in message:
        names = sorted({name.split(".")[-1] for name in gin.config._REGISTRY._selector_map})
        return f" (configurables: {', '.join(names)})"
    return ""


def call_configurable(gin, name: str, *args, **kwargs):
    """The configurable ``name`` called with the parsed bindings (and ``args``, ``kwargs``). A ZebraxError raised
    inside stays one line: gin's note on the call it came through becomes the binding's scope
    (``kd/TrainConfig.steps = …``), or is dropped."""
    try:
        return gin.get_configurable(name)(*args, **kwargs)
    except ZebraxError as e:
        message, _, note = str(e).partition("\n  In call to configurable ")
        called = re.match(r"'([^']+)'.*? in scope '([^']+)'$", note.splitlines()[0] if note else "")
        if called and message.startswith(f"{called[1]}."):
            message = f"{called[2]}/{message}"
        elif called:
            message = f"{message} (in {called[2]}/{called[1]})"
        raise ZebraxError(message) from None


def model(config):
    """What a preset binds: ``model.config = @LlamaConfig()`` (or any other config class)."""
    return config


def preset_config(name: str):
    """A model config from ``configs/models/NAME.gin`` (or a path to a .gin file)."""
    path = Path(name) if name.endswith(".gin") else CONFIGS / "models" / f"{name}.gin"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "models").glob("*.gin"))
        raise ZebraxError(f"{name}: neither a zebrax checkpoint nor a preset; presets: {', '.join(known)}")
    gin = parse_gin([path], [])
    return gin.get_configurable(model)()

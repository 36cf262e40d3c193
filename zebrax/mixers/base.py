"""``MixerKind``: everything the rest of zebrax knows about one kind of mixer, in one record.

A kind is a folder of ``zebrax/mixers/`` (``config.py``, ``layer.py``, ``init.py``, ``kind.py``) whose ``kind.py``
declares ``KIND = MixerKind(...)``; the registry (``zebrax.mixers``) imports it by name. Every table that depends on
the kinds is derived from these records: the configs a plan accepts (``HybridConfig``), the letters of a layer map,
the decoder's modules, the ops and their implementations, the remat policies, the logical-axis rules, the
initialisation from a teacher's attention, the recipe on a teacher, the students SMART compares and the names in the
reference code's checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

FAMILIES = ("attention", "linear")


@dataclasses.dataclass(frozen=True)
class MixerKind:
    """One kind of mixer.

    - ``name``: its name in plans and configs (``"mamba2"``); ``letter``: its letter in a layer map (``"S"``);
      ``title``: what people call it (``"Mamba2"``).
    - ``family``: ``"attention"`` (each token attends over a cache that grows with the tokens: GQA, MLA) or
      ``"linear"`` (a state of constant size: Mamba2, Gated DeltaNet). A hybrid's linear layers are those of the
      linear family; SMART places layers of an attention kind into an all-linear student.
    - ``config``: its config class; ``width``: the field of it that must equal the model's hidden size (None: the
      config holds no width, as GQA's heads × head_dim need not equal it).
    - ``module``: its Flax module, constructed ``(config, dtype, param_dtype, impl)``, called ``(x, slots, cache) ->
      (y, cache)``, with ``init_cache(config, batch, max_len, dtype)``; ``scope``: the name of its parameters inside
      a layer (``self_attn`` or ``mixer``).
    - ``op``: the op whose implementation it takes (kinds may share one), ``impls`` that op's implementations.
    - ``inputs`` and ``outputs``: its input and output projections, the ``Linear`` names a remat policy may keep
      (``models.decoder.remat_policies``: ``save_qkv_proj`` keeps the inputs of every kind, ``save_out_proj`` the
      outputs).
    - ``teacher``: the teacher's own mixer: its layers keep the teacher's config (``HybridConfig.attention``) and
      weights. ``from_attention``: the kind's parameters from a teacher layer's attention, ``(attention params,
      AttentionConfig, config, key) -> (params, report)``; None for the teacher's own kind.
    - ``recipe``: the config a Llama teacher's layers take as this kind, ``(LlamaConfig, **arguments) -> config``
      (``recipe.from_teacher``).
    - ``summary``: fields of its config that identify a model holding it (``zebrax info``).
    - ``hf_module``: its module's name in a hybrid's HF checkpoint (``model.layers.{i}.<hf_module>.*``) and
      ``hf_tensors`` its tensors there: HF name under the module → (our path under ``scope``, layout).
    - ``axes``: the logical-axis rules of axis names only it uses (``zebrax.sharding.rules``).
    """

    name: str
    letter: str
    title: str
    family: str
    config: type
    module: type
    scope: str
    op: str
    impls: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    hf_module: str
    hf_tensors: dict[str, tuple[tuple[str, ...], Any]]
    width: str | None = "d_model"
    teacher: bool = False
    from_attention: Callable | None = None
    recipe: Callable | None = None
    summary: tuple[str, ...] = ()
    axes: dict[str, str | None] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"MixerKind {self.name!r}: family={self.family!r} is not one of {FAMILIES}")
        if (self.from_attention is None) != self.teacher:
            raise ValueError(f"MixerKind {self.name!r}: every kind but the teacher's own is made from_attention")

    @property
    def linear(self) -> bool:
        return self.family == "linear"

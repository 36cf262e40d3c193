"""libtpu on a machine without a TPU. With libtpu installed (``zebrax compile`` needs it), JAX's start-up and
libtpu's deviceless compiler look for the TPU this host does not have and print warnings on every run. Where the
host has no TPU (no ``/dev/accel*``, no ``/dev/vfio``), ``quiet_libtpu`` gives libtpu the three settings it would
otherwise look for; on a TPU host it changes nothing. Called before JAX is imported (``zebrax/__init__.py``)."""

from __future__ import annotations

import glob
import os

NO_TPU_SETTINGS = {
    "TPU_SKIP_MDS_QUERY": "1",  # no metadata server to ask
    "TPU_ACCELERATOR_TYPE": "v5p-8",  # any valid name: a deviceless compile takes its topology from its caller
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no chips to guard: several processes may compile at once
}


def has_tpu() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_libtpu() -> None:
    if not has_tpu():
        for name, value in NO_TPU_SETTINGS.items():
            os.environ.setdefault(name, value)

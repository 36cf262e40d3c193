"""Pallas kernels for zebrax, importable on their own (``jax.experimental.pallas``).

Each kernel lives in its own subpackage with a pure-``jax.numpy`` reference and a ``jax.custom_vjp``
wrapper; zebrax reaches them only through ``zebrax.ops`` (``impl="pallas"`` / ``"auto"``).
See README.md in this folder for the plan and the rules every kernel follows.
"""

"""Gated DeltaNet: ``config.py``, ``layer.py``, ``init.py`` (its recipe, from attention), ``kind.py``."""

"""Mamba2: ``config.py``, ``layer.py``, ``init.py`` (recipe, from attention), ``kind.py``."""

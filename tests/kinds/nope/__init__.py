"""A throwaway attention-like kind: ``config.py``, ``layer.py``, ``init.py``, ``kind.py``."""

"""A throwaway linear kind: ``config.py``, ``layer.py``, ``init.py``, ``kind.py``."""

"""Grouped-query attention, the teacher's own mixer: ``config.py``, ``layer.py``, ``kind.py``."""

"""Multi-head Latent Attention: ``config.py``, ``layer.py``, ``init.py`` (recipe, SVD), ``kind.py``."""

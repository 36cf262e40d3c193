"""Two throwaway mixer kinds, each a folder of its own as the kinds of ``zebrax.mixers`` are, registered by one line
(``zebrax.mixers.register``): ``ema`` (linear: a gated moving average per channel) and ``nope`` (attention-like: GQA
without RoPE). ``tests/test_kinds.py`` builds, runs, decodes, exports and compiles a hybrid with each."""

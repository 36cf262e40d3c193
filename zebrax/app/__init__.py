"""The programs built on the library: the command line (``cli.py``, ``commands.py``), gin and the model presets
(``presets.py``), the main job and its report (``job.py``, ``report.py``), ablations (``ablate.py``), programs compiled
for a TPU slice (``aot.py``, ``tpu.py``, ``traffic.py``), benchmarks (``bench.py``, ``bench_decode.py``), ``info.py``,
lm-eval's model (``lm_eval.py``), and the one plotting and one timing helper (``plots.py``, ``timing.py``). The
library never imports this package."""

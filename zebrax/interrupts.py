"""SIGINT and SIGTERM as an exception, so that every writer cleans up on them as on any failure.

``SIGTERM`` is what ``timeout``, Slurm pre-emption and ``docker stop`` send; by default it kills Python without
running a single ``finally``. Inside ``raising()`` both signals raise ``Interrupted`` (a ``KeyboardInterrupt``,
so no ``except Exception`` swallows it) and are remembered: one that arrives where Python cannot raise (a
garbage-collector callback prints "Exception ignored" and carries on) still fails the work at its next
``check()``, which writers call before they commit.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from zebrax.errors import Interrupted

_pending: list[int] = []


def _raise(signum, frame):
    _pending.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raise ``Interrupted`` if a signal arrived (and was swallowed, or turned into another error by a library on the
    way: orbax reports an interrupted save as "initialization failed") since ``raising()`` began."""
    if _pending:
        raise Interrupted(_pending[-1])


@contextlib.contextmanager
def raising(take_over: bool = False):
    """Within the block, SIGINT and SIGTERM raise ``Interrupted``. Only on the main thread, and, unless
    ``take_over`` (the command line, which owns its process), only for signals still at Python's defaults."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {s: signal.getsignal(s) for s in defaults}
    mine = [s for s in defaults if take_over or previous[s] is defaults[s] or previous[s] is _raise]
    outermost = not any(previous[s] is _raise for s in defaults)
    if outermost:
        _pending.clear()
    for s in mine:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])

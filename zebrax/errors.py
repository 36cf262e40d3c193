"""Errors and warnings meant for people: each names the file, key or field at fault and what was expected."""

import warnings


class ZebraxError(Exception):
    """Base class of every error zebrax raises on purpose; the CLI prints it as one line."""


class ConfigError(ZebraxError, ValueError):
    """A configuration field has a value the model cannot be built with."""


class ConversionError(ZebraxError):
    """A checkpoint cannot be read or does not match its config."""


class CheckpointError(ZebraxError):
    """A zebrax checkpoint directory is missing, incomplete or of an unknown format."""


class InvalidArgument(ZebraxError, ValueError):
    """A call's argument is out of range (e.g. ``max_new_tokens < 1``)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (``zebrax.interrupts``); whatever was being written has been removed.
    A ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class ZebraxWarning(UserWarning):
    """Something a user should know that does not stop the work (the CLI prints it as one line)."""


def warn(message: str) -> None:
    warnings.warn(message, ZebraxWarning, stacklevel=3)

"""Ctrl-C for the processes seglab's commands run in.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a
finalizer (a weakref callback or a ``__del__``, of which PyTorch and its DataLoader run many per
step) the exception cannot propagate: Python prints "Exception ignored in ..." and goes on. A
user's Ctrl-C was lost that way and `seglab train` ran on to its last epoch. So the command line
records every interrupt as well as raising it, and the loops of training, evaluation and
prediction call :func:`raise_if_interrupted` once per batch: an interrupt that a finalizer
swallowed still stops the command within a batch. Only seglab's command line installs the
handler (it owns its process), never ``import seglab``.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

__all__ = ["handle_interrupts", "raise_if_interrupted"]

_interrupted = False
_previous_hook = sys.unraisablehook


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def _quiet_about_interrupts(unraisable: "sys.UnraisableHookArgs") -> None:
    """No "Exception ignored" traceback for an interrupt a finalizer swallowed: the next batch
    raises it again (:func:`raise_if_interrupted`)."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        return
    _previous_hook(unraisable)


def handle_interrupts() -> bool:
    """Record Ctrl-C for :func:`raise_if_interrupted`, where Python's own handler is in place
    and this is the main thread (signal handlers can only be set there). Returns whether the
    handler was installed."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    global _previous_hook
    signal.signal(signal.SIGINT, _on_interrupt)
    if sys.unraisablehook is not _quiet_about_interrupts:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_about_interrupts
    return True


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if the user interrupted the command, even where the first raise
    was swallowed; one flag read otherwise."""
    if _interrupted:
        raise KeyboardInterrupt

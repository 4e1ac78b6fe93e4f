"""When a worker may be stopped: at once while it trains, never half way through its bookkeeping.

Ctrl-C and SIGTERM become ``KeyboardInterrupt``. Under ``guard`` (the worker loop) they do so at
once only inside ``live`` (a trial's training); anywhere else (asking for a trial, saving its record,
telling the study how it ended) the signal is held and raised at the next ``live`` or ``check``,
so that a trial never ends with half a record or finished but not told. A second signal while one
is held is raised at once: a worker stuck waiting on its storage can still be stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_live = True  # outside ``guard``, a signal is raised where it lands
_held = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _held
    if _live or _held:
        _held = False
        raise KeyboardInterrupt
    _held = True


def check() -> None:
    """Raise the signal held since the last check, if any."""
    global _held
    if _held:
        _held = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Hold signals from here on except inside ``live``; one still held at the end is raised.

    In a thread other than the main one (where Python delivers signals) it changes nothing.
    """
    global _live, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    outer, _live, _held = _live, False, False
    try:
        yield
        check()
    finally:
        _live, _held = outer, False
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def live() -> Iterator[None]:
    """Let a signal stop the work inside at once; one held before it is raised on entry."""
    global _live
    outer, _live = _live, True
    try:
        check()
        yield
    finally:
        _live = outer


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Inside ``live``: hold signals for the work inside, and raise one that came on leaving."""
    global _live
    outer, _live = _live, False
    try:
        yield
    finally:
        _live = outer
    if outer:
        check()

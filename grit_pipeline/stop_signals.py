"""SIGTERM and SIGINT during ``grit build``: the first one asks the build to stop, a second one insists."""

from __future__ import annotations

import contextlib
import signal
import threading


class BuildInterrupted(BaseException):
    """SIGTERM or SIGINT during a build (a BaseException, like KeyboardInterrupt, so no handler swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP: dict[str, int] = {}  # the first stop signal received during the build: {"signum": N}


def _on_signal(signum, frame):
    # Raising here could land inside a Ray call and be mangled into a SystemError: the first signal only asks the
    # build to stop (checked after every batch and every second while shards are assembled); a second one insists.
    if _STOP:
        raise BuildInterrupted(signum)
    _STOP["signum"] = signum


def stopped_by() -> int | None:
    """The number of the first stop signal this build received, or None."""
    return _STOP.get("signum")


def check_stop() -> None:
    """Raise :class:`BuildInterrupted` if a stop signal has arrived."""
    if _STOP:
        raise BuildInterrupted(_STOP["signum"])


def catch_signals() -> None:
    """SIGTERM and SIGINT raise :class:`BuildInterrupted` in the main thread. Called again once Ray is up, as
    ``ray.init`` installs handlers of its own in the driver."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def signals_interrupt():
    """While the build runs, SIGTERM and SIGINT stop it cleanly; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _STOP.clear()
    catch_signals()
    try:
        yield
    finally:  # _STOP stays set: the build's error handling still needs to know a signal stopped it
        for sig, previous in old.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

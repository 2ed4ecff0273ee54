"""SIGINT and SIGTERM as a user's request to stop: the one home of signal handling.

Handlers can only be installed from the main thread; elsewhere (a program's
main() called from another thread) every helper here leaves the signals their
usual meaning.
"""
import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal ended the work; the exit status is then 128 + signum.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way holds it up.
    """

    def __init__(self, signum):
        """Remember which signal it was."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def handled(handler, signals=STOP_SIGNALS):
    """handler(signum, frame) for signals during the block, the previous handlers after; yields {signal: previous}."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield previous
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def interrupting(signals=STOP_SIGNALS):
    """A context in which signals raise Interrupted; later ones are ignored while the block unwinds (clean-up)."""
    def interrupt(signum, frame):
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum)
    return handled(interrupt, signals)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT and SIGTERM until the block ends, then act on the first one that came."""
    received = []
    try:
        with handled(lambda signum, frame: received.append(signum)):
            yield
    finally:
        if received:
            signal.raise_signal(received[0])


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a request (`requested`) to stop at the next safe point.

    A second signal acts at once, as it would without this handler.
    """

    def __init__(self):
        """No signal yet."""
        self.signum = None
        self._handlers = self._previous = None

    @property
    def requested(self):
        """True once a signal has arrived."""
        return self.signum is not None

    def _handle(self, signum, frame):
        """Record the signal and give it back its previous meaning."""
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        """Install the handlers."""
        self._handlers = handled(self._handle)
        self._previous = self._handlers.__enter__()
        return self

    def __exit__(self, *exc):
        """Put the previous handlers back."""
        return self._handlers.__exit__(*exc)

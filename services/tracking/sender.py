"""A tracker's background thread: the federation never waits for a tracker.

The server only pokes it when a round was recorded (a set Event: no I/O, no lock held). The
thread then calls the tracker's ``sync``, which reads the run folder and sends what was not
sent, at most once every MIN_INTERVAL_S seconds. A failure is logged once, then retried with backoff (while the tracker stays down, the
rounds pile up in the run folder, not in memory); when it answers again, everything missed goes
at once and that is logged too. At the end ``finish`` gives it a bounded time for the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

log = logging.getLogger("bouquet.tracking")

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
# At most one send per this many seconds: fast rounds (a second or less) are sent a few at a time,
# so a tracker costs a round almost nothing however short rounds are; a tracker lags by this much.
MIN_INTERVAL_S = 5.0


class Tracker(Protocol):
    name: str

    @property
    def where(self) -> str: ...

    def sync(self, final: bool = False) -> int: ...

    def finished(self) -> bool: ...


class Sender:
    """Runs ``make()`` (the tracker, built in the thread: its first requests may hang on a slow server)
    and its ``sync`` in a daemon thread."""

    def __init__(self, name: str, make: Callable[[], Tracker], resend_hint: str, min_interval: float = MIN_INTERVAL_S) -> None:
        self.name = name
        self.min_interval = min_interval
        self._make = make
        self._hint = resend_hint
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Event()
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.complete = False
        self._thread = threading.Thread(target=self._loop, name=f"tracking-{name}", daemon=True)

    def start(self) -> "Sender":
        self._thread.start()
        return self

    def poke(self) -> None:
        """A round was recorded: send it when the thread gets to it."""
        self._wake.set()

    def finish(self, timeout: float) -> bool:
        """The run ended: send the rest (and the end) within ``timeout`` seconds. True when all
        was sent; otherwise it is logged with how to send it later."""
        self._stop.set()
        self._wake.set()
        self._done.wait(timeout)
        if not self.complete:
            log.error(
                "%s: not everything was sent within %g s (%s); the run folder has it all: %s",
                self.name, timeout, self.last_error or "still sending", self._hint,
            )
        return self.complete

    # -- the thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        tracker: Tracker | None = None
        delay = RETRY_FIRST_S
        try:
            while True:
                final = self._stop.is_set()
                try:
                    tracker = tracker or self._make()
                    sent = tracker.sync(final=final)
                except Exception as error:  # any failure of the tracker's client: retried, never raised
                    self._failed(tracker, error)
                    if final:
                        time.sleep(delay)
                    elif self._wake.wait(delay):
                        self._wake.clear()
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self._recovered(tracker, sent)
                delay = RETRY_FIRST_S
                if final:
                    self.complete = tracker.finished()
                    return
                self._stop.wait(self.min_interval)  # rounds recorded meanwhile go in the next send
                self._wake.wait()
                self._wake.clear()
        finally:
            self._done.set()

    def _failed(self, tracker: Tracker | None, error: Exception) -> None:
        self.last_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            where = tracker.where if tracker else self.name
            log.warning("%s cannot be reached (%s); the run goes on, its records stay in the run folder and are sent when it answers", where, self.last_error)

    def _recovered(self, tracker: Tracker, sent: int) -> None:
        if self.failing_since is not None:
            log.info("%s answers again after %.0f s: sent the %d round(s) it missed", tracker.where, time.monotonic() - self.failing_since, sent)
            self.failing_since = None
            self.last_error = None

"""A graceful stop of the merge stage: Ctrl-C on the driver, or ``mergeit stop`` from anywhere.

Asking a stop writes a marker object under the ledger root (``_stop/<run id>``, or ``_stop/STOP``
from ``mergeit stop``, which does not know the run). Every merge task looks for it (``TaskStop``,
at most every ``CHECK_S`` seconds) before it hands more groups to its requests and before a
queued group's first request: once it is there no new group is sent, the requests in flight finish or time out and are recorded in the ledger,
and the groups not sent end ``failed`` with ``interrupted`` (not in the ledger: the next run sends
them). In batch mode the driver stops polling and staging; submitted batches stay recorded and the
next run resumes them. The stage is then not current and the run exits non-zero; nothing paid is
lost or paid again.

On the driver (``DriverStop.catching_interrupts``) the first Ctrl-C asks the stop; a second one
aborts at once (Python's KeyboardInterrupt), as an impatient user expects. Spark's JVM ignores
SIGINT (pyspark starts it so); executor tasks ignore it while they run (``ignoring_interrupts``),
since a terminal's Ctrl-C reaches every process of the foreground group, local-mode Python workers
included, and a worker killed mid-request loses what it paid.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterator

from ..fs import Location, resolve

log = logging.getLogger(__name__)

STOP_DIR = "_stop"
ANY_RUN = "STOP"
CHECK_S = 2.0
ERROR_INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class StopMarker:
    """Where the stop of one run is asked: shipped to tasks (a path and an id)."""
    ledger_root: Location
    run_id: str

    def _paths(self) -> list[Location]:
        return [self.ledger_root / STOP_DIR / self.run_id, self.ledger_root / STOP_DIR / ANY_RUN]

    def asked(self) -> bool:
        return any(p.exists() for p in self._paths())

    def ask(self, why: str) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._paths()[0].write_bytes(f"{stamp} {why}\n".encode())


def ask_stop(ledger_root: Location | str, why: str = "mergeit stop") -> Location:
    """Ask every merge pass running under ``ledger_root`` to stop (``mergeit stop``)."""
    marker = StopMarker(resolve(ledger_root), ANY_RUN)   # its own path is then the one for any run
    marker.ask(why)
    return marker.ledger_root / STOP_DIR / ANY_RUN


def clear_stops(ledger_root: Location | str) -> None:
    """Forget the stops asked before a pass starts (each applies to the runs then in progress)."""
    (resolve(ledger_root) / STOP_DIR).delete_tree()


@dataclass
class TaskStop:
    """A task's view of the marker: looked up at most every ``CHECK_S`` seconds; once seen, kept."""
    marker: StopMarker
    _seen: bool = False
    _next: float = 0.0

    def asked(self) -> bool:
        now = time.monotonic()
        if not self._seen and now >= self._next:
            self._seen, self._next = self.marker.asked(), now + CHECK_S
        return self._seen


@dataclass
class DriverStop:
    """The driver's view: asked by its own Ctrl-C or by the marker (``mergeit stop``)."""
    marker: StopMarker
    event: threading.Event = field(default_factory=threading.Event)

    def asked(self) -> bool:
        if not self.event.is_set() and self.marker.asked():
            self.event.set()
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the stop is asked."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.asked() or self.event.wait(min(left, CHECK_S)):
                return True
        return self.asked()

    @contextmanager
    def catching_interrupts(self) -> Iterator["DriverStop"]:
        """While the block runs, the first SIGINT asks the stop, a second aborts. Only the main
        thread can take signals; elsewhere (a notebook's worker thread) this does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum: int, frame: object) -> None:
            if self.event.is_set():
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.event.set()
            self.marker.ask("Ctrl-C")
            log.warning("stopping: no new LLM requests; those in flight finish and are recorded. "
                        "Ctrl-C again to abort at once")

        signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@contextmanager
def ignoring_interrupts() -> Iterator[None]:
    """SIGINT ignored while a task runs in a Python worker's main thread (see the module doc)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

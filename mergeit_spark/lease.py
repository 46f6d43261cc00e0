"""One run per run root: a lease with a heartbeat.

Every run and increment takes the lease on its root before it reads any state, and gives it back
when it ends. A lease is a generation: state record ``lease-<n>`` (holder id, host, pid, when it
started, its last heartbeat), made by an exclusive create (:meth:`TableStore.create_state`:
``O_EXCL`` on POSIX, a conditional PUT on S3), and the highest generation is the current lease.
A run takes the root by creating generation n + 1 where generation n is released or dead, so of
two runs starting (or taking over) at once exactly one gets it, on any store with an exclusive
create and no rename; the other fails at once with :class:`RootBusy`, naming the holder. Only the
holder writes its generation (heartbeats, then ``released``); older generations are removed. The
holder's driver renews the heartbeat every ``run.lease_timeout_s / 4`` seconds from a daemon
thread. A lease whose heartbeat is older than
``run.lease_timeout_s`` belongs to a run that died (a killed driver leaves its lease behind): the
next run takes it over, and only then rolls back what that run left unfinished; on the holder's
own host a holder whose process is gone is known dead at once (a killed local driver). A holder that
finds its lease taken over (it stalled past the timeout) stops before its next stage
(:class:`LeaseLost`) rather than write beside the run that took it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .session import connect_session_id, interrupt_connect_session
from .tables import STATE_DIR, TableStore

log = logging.getLogger("mergeit.lease")

LEASE = "lease-"  # the store's state records: lease-<generation>


class RootBusy(RuntimeError):
    """Another run holds the run root."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run (its heartbeat had stopped too long)."""


class RunLease:
    """The lease on one run root, for one run: :meth:`acquire`, then :meth:`release` (or use it
    as a context manager)."""

    def __init__(self, store: TableStore, timeout_s: float) -> None:
        self.store = store
        self.timeout_s = float(timeout_s)
        self.holder = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self.generation = -1

    def record(self) -> dict[str, Any]:
        record = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": self.started, "heartbeat": time.time(), "timeout_s": self.timeout_s}
        session = connect_session_id(self.store.spark)
        return dict(record, connect_session=session) if session else record

    def acquire(self) -> "RunLease":
        """Take the lease, or take over one whose heartbeat stopped; else raise :class:`RootBusy`."""
        for _ in range(3):
            generation, current = current_lease(self.store)
            if current is not None and not current.get("released"):
                age = time.time() - float(current.get("heartbeat", 0))
                if age <= self.timeout_s and not _holder_gone(current):
                    raise RootBusy(f"run root {self.store.root} is held by another run ({describe(current, age)}); "
                                   "wait for it to end. A run that died gives the root up "
                                   f"{self.timeout_s:g} s after its last heartbeat (run.lease_timeout_s)")
                log.warning("taking over the lease on %s of a run that stopped beating (%s)",
                            self.store.root, describe(current, age))
            if self.store.create_state(_name(generation + 1), self.record()):
                self.generation = generation + 1
                if current is not None and not current.get("released"):
                    self._stop_dead_holders_operations(current)
                self._start_heartbeat()
                self._remove_older()
                return self
        raise RootBusy(f"run root {self.store.root}: the lease changed hands three times while this run "
                       "tried to take it; another run is starting there")

    def _stop_dead_holders_operations(self, dead: dict[str, Any]) -> None:
        """A dead holder that ran through Spark Connect may have left operations running on the
        server (a killed client does not stop them): interrupt them, so that they stop paying
        for requests and writing beside this run."""
        session = dead.get("connect_session")
        if not session or connect_session_id(self.store.spark) is None:
            return
        try:
            stopped = interrupt_connect_session(self.store.spark, session)
            log.warning("interrupted %d operation(s) the dead run left on the Spark Connect server", len(stopped))
        except Exception as exc:  # noqa: BLE001 - a server restarted since has none left
            log.warning("could not interrupt the dead run's Spark Connect session %s: %s", session, exc)

    def _remove_older(self) -> None:
        for name in self.store.state_names(LEASE):
            if _generation(name) < self.generation:
                self.store.write_state(name, None)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="mergeit-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next beat
                log.warning("could not renew the lease on %s: %s", self.store.root, exc)
            if self.lost:
                return

    def renew(self) -> None:
        """A new heartbeat, unless another run has taken the lease over (then :attr:`lost`)."""
        if not self.held():
            self.lost = True
            log.error("the lease on %s was taken over by another run", self.store.root)
            return
        self.store.write_state(_name(self.generation), self.record())

    def held(self) -> bool:
        """Whether this run's generation is still the current lease."""
        generation, current = current_lease(self.store)
        return generation == self.generation and current is not None and current.get("holder") == self.holder

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another run has taken the lease over."""
        if self.lost:
            raise LeaseLost(f"run root {self.store.root}: another run took this run's lease over (its "
                            "heartbeat was older than run.lease_timeout_s); this run stops here")

    def release(self) -> None:
        """Stop the heartbeat and give the lease back (unless another run holds it now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.generation >= 0 and self.held():
            self.store.write_state(_name(self.generation), dict(self.record(), released=time.time()))

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def current_lease(store: TableStore) -> tuple[int, dict[str, Any] | None]:
    """The current lease: (its generation, its record); (-1, None) when the root never had one.
    A record that is not whole (being written this instant, or by a run killed between its
    create and its write: POSIX only, a PUT is whole) stands for a holder that beat when the file
    was last modified, so that it is taken over once that is older than the timeout."""
    names = store.state_names(LEASE)
    if not names:
        return -1, None
    latest = max(names, key=_generation)
    record = store.read_state(latest)
    if record is None:
        modified = store.location(STATE_DIR, f"{latest}.json").info().mtime
        stamp = modified.timestamp() if modified is not None else time.time()
        record = {"holder": "(a record not written whole)", "started": stamp, "heartbeat": stamp}
    return _generation(latest), record


def _name(generation: int) -> str:
    return f"{LEASE}{generation:012d}"


def _generation(name: str) -> int:
    try:
        return int(name[len(LEASE):])
    except ValueError:
        return -1


def describe(record: dict[str, Any], age: float) -> str:
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(record.get("started", 0))))
    return (f"holder {record.get('holder')}, host {record.get('host')}, pid {record.get('pid')}, "
            f"started {started}, last heartbeat {age:.0f} s ago")


def _holder_gone(record: dict[str, Any]) -> bool:
    """The holder ran on this host and its process is gone: its lease is dead, whatever its age."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False

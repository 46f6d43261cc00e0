"""Table writes on background threads, so that one write's driver-side Delta work (planning, the
log, the commit) overlaps the next step's Spark tasks."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from pyspark import InheritableThread
from pyspark.sql import DataFrame, SparkSession

Result = TypeVar("Result")


class BackgroundCall(Generic[Result]):
    """``call()`` on its own thread, which carries the session's local properties (job group,
    scheduler pool); :meth:`result` waits for it, then returns its value or raises its error."""

    def __init__(self, call: Callable[[], Result]) -> None:
        self._call: Callable[[], Result] = call
        self._value: Result | None = None
        self._error: BaseException | None = None
        # Spark Connect wants the session whose tags the thread carries; a classic session ignores it.
        self._thread = InheritableThread(target=self._run, session=SparkSession.getActiveSession())
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as error:  # noqa: BLE001 - handed over by result()
            self._error = error

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Result:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Writes:
    """Writes running in the background while the caller's next step computes. ``wait`` joins
    them all: every write runs to its end, then the first failure is raised. The cached rows they
    write are released once they are done, rather than held until the run ends."""

    def __init__(self) -> None:
        self._running: list[BackgroundCall] = []
        self._cached: list[DataFrame] = []

    def start(self, *calls: Callable[[], Any], release: tuple[DataFrame, ...] = ()) -> None:
        """Run ``calls`` in the background; unpersist ``release`` once they (and every write
        started before) are done."""
        self._running += [BackgroundCall(call) for call in calls]
        self._cached += release

    def wait(self) -> list[Any]:
        running = self.join()
        return [call.result() for call in running]

    def join(self) -> list[BackgroundCall]:
        """Wait for every write started and release their cached rows; their failures are left
        to :meth:`wait`."""
        running, self._running = self._running, []
        for call in running:
            call.join()
        cached, self._cached = self._cached, []
        for df in cached:
            df.unpersist()
        return running

"""One asyncio event loop per Spark task, fed continuously.

``RequestPump`` runs the merge requests of one task: an event loop in a background thread for the
whole life of the task. The task's own thread (the one Spark calls with Arrow batches) feeds jobs
into a bounded ``asyncio.Queue``; ``workers`` coroutines take jobs from it one at a time and hand
each to ``handle(job)``, whose result goes back to the task's thread. There is no barrier between batches of input: a slow job
holds up one worker, not the others, and the queue is topped up as soon as there is room, so the
number of jobs in progress stays at ``workers`` until the input runs dry.

``handle`` must deal with a job's own failures (it returns a result for every job); an exception
out of it is fatal for the task (e.g. the ledger cannot be written): the loop stops and the next
call from the task's thread raises it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from contextlib import AbstractAsyncContextManager
from typing import Any, Awaitable, Callable, Iterator, Sequence

Handler = Callable[[Any], Awaitable[Any]]
_END = object()
_POLL_S = 0.25


class RequestPump:
    """``with RequestPump(session, workers, queue_size) as pump``: ``put`` jobs (blocks while the
    queue is full), ``take`` the results ready so far, ``finish`` for the rest.

    ``session()`` is an async context manager yielding ``handle``; it is entered inside the loop
    (clients, limiters and batchers bound to the loop live there) and left when the pump closes.
    """

    def __init__(self, session: Callable[[], AbstractAsyncContextManager[Handler]], workers: int,
                 queue_size: int) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._session = session
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue | None = None
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="merge-loop", daemon=True)

    # -- the task's thread ------------------------------------------------------------------------
    def __enter__(self) -> "RequestPump":
        self._thread.start()
        self._ready.wait()
        self._raise_if_failed()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done.is_set():
            self._loop.call_soon_threadsafe(self._cancel_all)
        self._thread.join()

    def put(self, jobs: Sequence[Any]) -> None:
        """Queue ``jobs`` in order; returns once the last one is queued."""
        if not jobs:
            return
        self._raise_if_failed()
        future = asyncio.run_coroutine_threadsafe(self._put_all(jobs), self._loop)
        while True:
            try:
                future.result(timeout=_POLL_S)
                return
            except concurrent.futures.TimeoutError:
                if self._done.is_set():
                    self._raise_if_failed()
            except concurrent.futures.CancelledError:
                self._raise_if_failed()
                raise RuntimeError("the merge loop stopped while jobs were queued") from None

    def take(self) -> list[Any]:
        """Every result ready now (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def finish(self, min_rows: int = 1) -> Iterator[list[Any]]:
        """End of input: let the workers empty the queue; yields the remaining results in lists
        of at least ``min_rows`` (the last one may be shorter) as they arrive."""
        self.put([_END] * self.workers)
        self._finished = True
        rows: list[Any] = []
        while not self._done.is_set():
            try:
                rows.append(self._results.get(timeout=_POLL_S))
            except queue.Empty:
                continue
            rows.extend(self.take())
            if len(rows) >= min_rows:
                yield rows
                rows = []
        self._thread.join()
        self._raise_if_failed()
        rows.extend(self.take())
        if rows:
            yield rows

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the loop's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to the task's thread
            if not isinstance(exc, asyncio.CancelledError) or self._error is None:
                self._error = self._error or exc
        finally:
            self._ready.set()
            self._cancel_all()
            pending = asyncio.all_tasks(self._loop)
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()
            self._done.set()

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    async def _main(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        async with self._session() as handle:
            self._ready.set()
            workers = [asyncio.create_task(self._worker(handle)) for _ in range(self.workers)]
            try:
                await asyncio.gather(*workers)
            except BaseException as exc:
                self._error = self._error or exc
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                raise

    async def _worker(self, handle: Handler) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            if job is _END:
                return
            self._results.put(await handle(job))

    async def _put_all(self, jobs: Sequence[Any]) -> None:
        assert self._queue is not None
        for job in jobs:
            await self._queue.put(job)

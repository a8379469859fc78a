"""Micro-batching: concurrent requests waiting at most a few milliseconds for each other, then run together.

onnxruntime and faiss amortise their per-call cost over a batch (on a GPU the difference is large; on 2 CPU cores
it is small for big models, see benchmarks/serve_load.py). Written by hand because no kept library does this for
an asyncio server around a synchronous model: one worker thread takes the first waiting item and, when others are
already queued, gathers more for up to ``max_wait`` seconds or ``max_batch`` items; it runs ``fn`` on the list and
hands each caller its result. A lone query runs at once. Given :class:`Arrivals` (the service counts queries it
has received and not yet handed over), it waits only while such queries are on their way: with 8 clients a batch
never fills to 32, and waiting the whole ``max_wait`` for queries that cannot come halved a small model's
throughput (benchmarks/serve_load.py). The queue is bounded: when it is full, :meth:`MicroBatcher.submit`
raises :class:`Overloaded` at once (the service answers 503 with Retry-After) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """The batcher's queue is full: try again shortly."""


# The current request's arrival: [True] until its first query is handed to a batcher.
_arrival: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("cmalign_arrival", default=None)
POLL = 0.0005  # seconds between looks at the queue while queries are on their way


class Arrivals:
    """Queries received and not yet handed to a batcher. Counted on the event loop (one thread); batcher threads
    only read the count. One count for the whole service: a batch may wait (at most max_wait) for a query that
    turns out to be bound for another index."""

    def __init__(self):
        self.count = 0

    def arrive(self) -> list[bool]:
        """A query request came in (call in the request's task, before its handler)."""
        self.count += 1
        state = [True]
        _arrival.set(state)
        return state

    def handed(self) -> None:
        """The current request's first query reached a batcher (later ones of the same request do not count)."""
        state = _arrival.get()
        if state is not None and state[0]:
            state[0] = False
            self.count -= 1

    def left(self, state: list[bool]) -> None:
        """The request ended (answered, refused or failed) without handing a query over, or after it."""
        if state[0]:
            state[0] = False
            self.count -= 1


@dataclass
class _Item:
    payload: object
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """``fn(list of payloads) -> list of results`` (same length and order), called from one worker thread."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32, max_wait: float = 0.005,
                 queue_size: int = 256, name: str = "batcher", on_batch: Callable[[int, float], None] | None = None,
                 arrivals: Arrivals | None = None):
        self.fn, self.max_batch, self.max_wait, self.name = fn, max_batch, max_wait, name
        self.arrivals = arrivals
        self.on_batch = on_batch  # (batch size, seconds the first item waited) for the metrics
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._work, name=f"cmalign-{name}", daemon=True)
        self._stopped = False
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def submit(self, payload):
        if self._stopped:
            raise Overloaded(f"{self.name} is shutting down")
        loop = asyncio.get_running_loop()
        item = _Item(payload, loop.create_future(), loop)
        if self.arrivals is not None:  # before the put: the worker must not wait for this very query
            self.arrivals.handed()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Overloaded(f"{self.name}: {self._queue.maxsize} queries already waiting") from None
        return await item.future

    def _gather(self, first: _Item) -> list[_Item]:
        batch = [first]
        if self._queue.empty() and (self.arrivals is None or self.arrivals.count <= 0):
            # nobody else waiting: run now. Waiting max_wait for queries that may never come cost every query at
            # concurrency 1 the whole wait (measured: p50 7.4 ms against 1.9 ms); under load, queries queue up
            # while a batch runs, and those are gathered below.
            return batch
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._coming():
                    break
                try:  # without Arrivals: wait out max_wait; with them, look again shortly
                    item = self._queue.get(timeout=remaining if self.arrivals is None else min(remaining, POLL))
                except queue.Empty:
                    continue
            if item is None:  # stop: finish this batch, then leave
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _coming(self) -> bool:
        """Whether more queries may come soon: always without Arrivals, else while received ones are on their way."""
        return self.arrivals is None or self.arrivals.count > 0

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._gather(first)
            if self.on_batch:
                self.on_batch(len(batch), time.perf_counter() - first.enqueued)
            try:
                results = self.fn([i.payload for i in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
            except Exception as e:  # one bad batch must not stop the worker; each caller gets the error
                for i in batch:
                    i.loop.call_soon_threadsafe(_settle, i.future, None, e)
                continue
            for i, r in zip(batch, results, strict=True):
                if isinstance(r, Exception):
                    i.loop.call_soon_threadsafe(_settle, i.future, None, r)
                else:
                    i.loop.call_soon_threadsafe(_settle, i.future, r, None)

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop (graceful shutdown)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
            self._thread.join(timeout)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the caller went away (cancelled request)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

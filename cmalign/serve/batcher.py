"""Micro-batching: concurrent requests waiting at most a few milliseconds for each other, then run together.

onnxruntime and faiss amortise their per-call cost over a batch (on a GPU the difference is large; on 2 CPU cores
it is small for big models, see benchmarks/serve_load.py). Written by hand because no kept library does this for
an asyncio server around a synchronous model: one worker thread takes the first waiting item and, when others are
already queued, gathers more for up to ``max_wait`` seconds or ``max_batch`` items; it runs ``fn`` on the list and
hands each caller its result. A lone query runs at once. The queue
is bounded: when it is full, :meth:`MicroBatcher.submit` raises :class:`Overloaded` at once (the service answers
503 with Retry-After) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """The batcher's queue is full: try again shortly."""


@dataclass
class _Item:
    payload: object
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """``fn(list of payloads) -> list of results`` (same length and order), called from one worker thread."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 32, max_wait: float = 0.005,
                 queue_size: int = 256, name: str = "batcher", on_batch: Callable[[int, float], None] | None = None):
        self.fn, self.max_batch, self.max_wait, self.name = fn, max_batch, max_wait, name
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
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Overloaded(f"{self.name}: {self._queue.maxsize} queries already waiting") from None
        return await item.future

    def _gather(self, first: _Item) -> list[_Item]:
        batch = [first]
        if self._queue.empty():
            # nobody else waiting: run now. Waiting max_wait for queries that may never come cost every query at
            # concurrency 1 the whole wait (measured: p50 7.4 ms against 1.9 ms); under load, queries queue up
            # while a batch runs, and those are gathered below.
            return batch
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:  # stop: finish this batch, then leave
                self._queue.put(None)
                break
            batch.append(item)
        return batch

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

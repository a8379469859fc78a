"""Ordered map over a thread pool with a bounded look-ahead.

`ThreadPoolExecutor.map` submits every item at once, so on a corpus it would decode all images
before the first batch is embedded; this keeps at most ``depth`` batches in flight, which is what
overlaps decoding with inference at a fixed memory cost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 2, depth: int | None = None) -> Iterator[R]:
    depth = depth or 2 * workers
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

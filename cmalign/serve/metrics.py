"""Prometheus metrics of one service: requests by endpoint and status, latency per stage (decode, encode, search,
metadata), micro-batch sizes and waits, queue depth, overload refusals. One registry per service, so two apps in
one process (tests) do not share counters.

With several worker processes (``serve --workers N``) a scrape reaches one worker at random, so each worker writes
its values to prometheus_client's multiprocess files and every scrape sums all workers' (its multiprocess mode;
the directory is made by :func:`cmalign.serve.run.serve` and named by ``PROMETHEUS_MULTIPROC_DIR``)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("decode", "encode", "search", "metadata")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cmalign_requests", "HTTP requests by endpoint and status", ("endpoint", "status"),
                                registry=r)
        self.request_seconds = Histogram("cmalign_request_seconds", "Request latency by endpoint", ("endpoint",),
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("cmalign_stage_seconds", "Latency of each stage of a query", ("stage",),
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cmalign_batch_size", "Queries per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_wait = Histogram("cmalign_batch_wait_seconds", "How long a batch's first query waited",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.overloaded = Counter("cmalign_overloaded", "Queries refused with 503 (queue full)", registry=r)
        self.queue_depth = Gauge("cmalign_queue_depth", "Queries waiting for a micro-batch", registry=r,
                                 multiprocess_mode="livesum")  # all live workers' queues
        for stage in STAGES:  # present from the start, at 0
            self.stage_seconds.labels(stage)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_batch(self, size: int, waited: float) -> None:
        self.batch_size.observe(size)
        self.batch_wait.observe(waited)

    def exposition(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, path=shared)
        return generate_latest(every_worker)

    @staticmethod
    def worker_stopped() -> None:
        """A stopped worker's queue no longer counts (its counters and histograms still do)."""
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), shared)

"""`serve --workers N`: N processes answer on one port, each with its own copy of every index.

One process answers with one core of Python at most (HTTP parsing, validation and JSON run under its GIL), which
caps a small model's service far below what onnxruntime and faiss could do (docs/serve.md). uvicorn's supervisor
binds the port, spawns the workers, restarts one that dies and stops them all on SIGINT/SIGTERM; each worker
imports this module and calls :func:`app`. Spawned processes share nothing with the parent, so the config travels
in an environment variable, and the metrics in prometheus_client's multiprocess files."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from cmalign.serve.config import IndexEntry, ServeConfig

CONFIG_ENV = "CMALIGN_SERVE_CONFIG"
APP = f"{__name__}:app"  # what uvicorn imports in each worker


def config_to_env(cfg: ServeConfig) -> str:
    return json.dumps(asdict(cfg))


def config_from_env() -> ServeConfig:
    data = json.loads(os.environ[CONFIG_ENV])
    data["indexes"] = [IndexEntry(**e) for e in data["indexes"]]
    return ServeConfig(**data).validate()


def threads_per_worker(cfg: ServeConfig) -> int | None:
    """Unless told, a worker's onnxruntime and faiss share the cores with the other workers instead of each taking
    them all (N workers × all cores' threads would oversubscribe the machine N times)."""
    if cfg.threads is not None or cfg.workers == 1:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // cfg.workers)


def app():
    """A worker's app (uvicorn's factory); its indexes load in the lifespan, before it takes a connection."""
    from cmalign.serve.app import create_app
    from cmalign.serve.run import configure_logging

    cfg = config_from_env()
    configure_logging(cfg)
    return create_app(cfg)

"""`serve(cfg)`: load every index (a bad one fails here, before the port opens), then run uvicorn until SIGINT or
SIGTERM; uvicorn stops taking connections, finishes the requests in flight, and the batchers drain. With
``workers`` > 1, uvicorn's supervisor runs that many processes on the port (cmalign.serve.workers)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace

from cmalign.serve.config import ServeConfig


def serve(cfg: ServeConfig, log=print, ready=None) -> None:
    """Blocks until the server stops. ``ready(url)`` is called just before it starts listening."""
    import uvicorn

    from cmalign.serve.app import create_app
    from cmalign.serve.engine import Engine

    cfg = cfg.validate()
    engine = Engine(cfg).load(log)
    url = f"http://{cfg.host}:{cfg.port}/"
    names = ", ".join(engine.indexes)
    options = dict(host=cfg.host, port=cfg.port, log_level="info", access_log=False, timeout_graceful_shutdown=10,
                   log_config=_log_config())
    if cfg.workers > 1:
        engine.close()  # it proved every index loads; each worker loads its own copy
        del engine
        _serve_workers(cfg, options, log, names, url, ready)
        return
    configure_logging(cfg)
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, engine), **options))
    log(f"serving {names} on {url}  (API: {url}docs, metrics: {url}metrics; Ctrl-C stops)")
    if ready:
        ready(url)
    server.run()


def _serve_workers(cfg: ServeConfig, options: dict, log, names: str, url: str, ready) -> None:
    import uvicorn

    from cmalign.serve.workers import APP, CONFIG_ENV, config_to_env, threads_per_worker

    worker_cfg = replace(cfg, threads=threads_per_worker(cfg))
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # an operator's own directory is theirs to manage
    metrics_dir = tempfile.mkdtemp(prefix="cmalign-serve-metrics-") if own_dir else os.environ[
        "PROMETHEUS_MULTIPROC_DIR"]
    saved = {k: os.environ.get(k) for k in (CONFIG_ENV, "PROMETHEUS_MULTIPROC_DIR")}
    os.environ.update({CONFIG_ENV: config_to_env(worker_cfg), "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    try:
        log(f"serving {names} on {url} with {cfg.workers} worker processes ({worker_cfg.threads} onnxruntime/faiss "
            f"thread(s) each, every worker holds its own copy of the indexes; API: {url}docs, metrics summed over "
            f"workers: {url}metrics; Ctrl-C stops)")
        if ready:
            ready(url)
        _run_supervisor(uvicorn.Config(APP, factory=True, workers=cfg.workers, **options))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_supervisor(config) -> None:
    """uvicorn.run's --workers path, with the port bound as a TCP socket: uvicorn binds it with proto 0, so asyncio
    never sets TCP_NODELAY on the workers' connections and every keep-alive request after the first waits ~40 ms
    for the client's delayed ACK (uvicorn issue #3149, open; measured here before this: 2 workers answered a
    quarter of one worker's queries/s at concurrency 8, two thirds at 32)."""
    import inspect
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    bound = config.bind_socket()  # uvicorn's own checks and log line
    sock = socket.socket(bound.family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=bound.detach())
    sock.set_inheritable(True)
    # older uvicorn releases take the workers' target; newer ones build it themselves
    target = {"target": uvicorn.Server(config).run} if "target" in inspect.signature(Multiprocess).parameters else {}
    try:
        Multiprocess(config, sockets=[sock], **target).run()
    finally:
        sock.close()


def configure_logging(cfg: ServeConfig) -> None:
    logging.getLogger("cmalign.serve").setLevel(logging.INFO)
    logging.getLogger("cmalign.serve.access").setLevel(logging.INFO if cfg.log_requests else logging.WARNING)


def _log_config() -> dict:
    """uvicorn's own lines plus cmalign's access log (one JSON object per request) on stderr."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = {**LOGGING_CONFIG, "loggers": dict(LOGGING_CONFIG["loggers"])}
    cfg["formatters"] = {**LOGGING_CONFIG["formatters"], "plain": {"format": "%(message)s"}}
    cfg["handlers"] = {**LOGGING_CONFIG["handlers"],
                       "cmalign": {"class": "logging.StreamHandler", "formatter": "plain",
                                   "stream": "ext://sys.stderr"}}
    cfg["loggers"]["cmalign.serve"] = {"handlers": ["cmalign"], "level": "INFO", "propagate": False}
    return cfg

"""`serve(cfg)`: load every index (a bad one fails here, before the port opens), then run uvicorn until SIGINT or
SIGTERM; uvicorn stops taking connections, finishes the requests in flight, and the batchers drain."""

from __future__ import annotations

import logging

from cmalign.serve.config import ServeConfig


def serve(cfg: ServeConfig, log=print, ready=None) -> None:
    """Blocks until the server stops. ``ready(url)`` is called once it listens."""
    import uvicorn

    from cmalign.serve.app import create_app
    from cmalign.serve.engine import Engine

    engine = Engine(cfg.validate()).load(log)
    app = create_app(cfg, engine)
    logging.getLogger("cmalign.serve").setLevel(logging.INFO)
    logging.getLogger("cmalign.serve.access").setLevel(logging.INFO if cfg.log_requests else logging.WARNING)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=10, log_config=_log_config())
    server = uvicorn.Server(config)
    url = f"http://{cfg.host}:{cfg.port}/"
    log(f"serving {', '.join(engine.indexes)} on {url}  (API: {url}docs, metrics: {url}metrics; Ctrl-C stops)")
    if ready:
        ready(url)
    server.run()


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

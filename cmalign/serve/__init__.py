"""`cmalign serve`: a mixed-modality search service over joint indexes, with a web page (no torch needed).

    config.py    what a service is: indexes, address, limits (TOML / JSON / clip-retrieval's indices_paths.json)
    engine.py    the served indexes: index + export + micro-batcher, one batch = one ORT call and one faiss search
    batcher.py   micro-batching with a bounded queue (503 + Retry-After when full)
    inputs.py    request fields checked, each refusal naming its field
    app.py       the ASGI app: clip back's API, the typed /v1 API, operations, corpus images, the page
    limits.py    the request body limit, enforced as the body arrives
    metrics.py   Prometheus metrics of one service
    run.py       `serve(cfg)`: load, then uvicorn until SIGINT/SIGTERM (graceful)
    static/      the web page (plain HTML/CSS/JS, no build step)

Public names load on first use (fastapi is imported only when one is needed)."""

from cmalign._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "config": ("ServeConfig", "IndexEntry", "load_serve_config"),
    "engine": ("Engine",),
    "app": ("create_app",),
    "run": ("serve",),
})

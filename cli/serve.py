"""`cmalign serve`: options → :func:`cmalign.serve.run.serve` (a search service with a web page, no torch)."""

from __future__ import annotations

from typing import Annotated

import typer

HELP = (
    "Serve joint indexes over HTTP: a web page at /, clip-retrieval's API (POST /knn-service, /metadata, "
    "GET /indices-list; its clients and clip front work unchanged), a typed API (/v1/search, /v1/embed; OpenAPI "
    "at /docs), /healthz, /readyz and Prometheus /metrics. Queries are encoded by the export recorded in each "
    "index (ONNX runtime, no torch) and micro-batched. Listens on 127.0.0.1 unless --host says otherwise."
)


def serve_command(
    indexes: Annotated[list[str] | None, typer.Argument(help="Index directories (each served under its directory "
                                                        "name).", show_default=False)] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="TOML or JSON file naming indexes "
                                               "([indexes.NAME] path/export) and any setting below; clip-retrieval's "
                                               "indices_paths.json works too.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 1234].")] = None,
    provider: Annotated[str | None, typer.Option(help="onnxruntime provider: cpu or cuda [default: cpu].")] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Search faiss GPU copies (faiss-gpu).",
                                             show_default=False)] = None,
    allow_url_fetch: Annotated[bool | None, typer.Option("--allow-url-fetch/--no-url-fetch",
                                                         help="Let clip back's image_url make the server fetch "
                                                         "images from the web [default: off].",
                                                         show_default=False)] = None,
    max_batch: Annotated[int | None, typer.Option(help="Most queries per micro-batch [default: 32].")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Longest a query waits for others [default: 5].")] = None,
    queue_size: Annotated[int | None, typer.Option(help="Waiting queries before 503 [default: 256].")] = None,
    max_k: Annotated[int | None, typer.Option(help="Largest k (num_images) served [default: 1000].")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes answering on the port, each with its own copy of "
                                                "the indexes: past one core of Python, for small models "
                                                "[default: 1].")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime/faiss threads (default: theirs; with --workers, "
                                                "cores / workers each).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log.")] = False,
):
    from cmalign.serve.config import load_serve_config
    from cmalign.serve.run import serve

    cfg = load_serve_config(indexes, config, host=host, port=port, provider=provider, gpu=gpu,
                            allow_url_fetch=allow_url_fetch, max_batch=max_batch, max_wait_ms=max_wait_ms,
                            queue_size=queue_size, max_k=max_k, workers=workers, threads=threads,
                            log_requests=False if quiet else None)
    serve(cfg, log=lambda m: typer.echo(m, err=True))

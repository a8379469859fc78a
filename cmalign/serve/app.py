"""The HTTP service: clip-retrieval's `clip back` API (so its clients and `clip front` work unchanged), cmalign's own
typed API (/v1, with an OpenAPI schema at /docs), operations endpoints, corpus images, and the web page at /.

    from cmalign.serve import ServeConfig, create_app, Engine
    app = create_app(cfg, Engine(cfg).load())      # any ASGI server; `cmalign serve` runs uvicorn

Every refusal is a 4xx with ``{"error": ..., "field": ...}``; only a bug is a 500.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal, get_type_hints

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, create_model
from starlette.concurrency import run_in_threadpool

import cmalign
from cmalign.index.joint import Hit as IndexHit
from cmalign.serve import inputs
from cmalign.serve.batcher import Overloaded
from cmalign.serve.config import ServeConfig
from cmalign.serve.engine import Engine, Query, ServedIndex, UnknownIndex
from cmalign.serve.inputs import BadInput
from cmalign.serve.limits import BodyLimit

STATIC = Path(__file__).parent / "static"
access_log = logging.getLogger("cmalign.serve.access")
log = logging.getLogger("cmalign.serve")

# clip back's request fields that cmalign does not implement: accepted, ignored, and said so in a header
IGNORED_KNN_FIELDS = ("use_mclip", "use_safety_model", "use_violence_detector", "aesthetic_score",
                      "aesthetic_weight", "verbose")
KNN_FIELDS = ("text", "image", "image_url", "embedding_input", "modality", "num_images", "num_result_ids",
              "indice_name", "deduplicate", *IGNORED_KNN_FIELDS)
QUERY_FIELDS = ("text", "image", "image_url", "embedding_input")
# The routes whose requests reach a batcher; the decorators below use these names, so the two cannot drift apart.
KNN_PATH, SEARCH_PATH, SEARCH_IMAGE_PATH, EMBED_PATH = "/knn-service", "/v1/search", "/v1/search/image", "/v1/embed"
QUERY_PATHS = frozenset((KNN_PATH, SEARCH_PATH, SEARCH_IMAGE_PATH, EMBED_PATH))
# Up to this many hits a query's rows are read on the event loop (~0.1 ms for 10); more go to a worker thread.
INLINE_HITS = 100


def route_path(scope) -> str:
    """The request's path as the routes see it. ASGI's ``path`` includes the ``root_path`` that a proxy's prefix
    (uvicorn ``--root-path``) or a mount puts in front; the route table does not."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


class Observe:
    """Pure ASGI middleware: each request's count, latency and access-log line. (FastAPI's ``@app.middleware``
    wraps every request in Starlette's BaseHTTPMiddleware, whose streams and task group cost more than a tiny
    model's whole query: profiled under load, it was the largest item in the event loop.)"""

    def __init__(self, app, metrics, queue_depth, log_requests: bool, arrivals=None):
        self.app, self.metrics, self.queue_depth, self.log_requests = app, metrics, queue_depth, log_requests
        self.arrivals = arrivals

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        # a query on its way to a batcher, which waits for it (cmalign.serve.batcher.Arrivals)
        arrival = self.arrivals.arrive() if self.arrivals is not None and route_path(scope) in QUERY_PATHS else None

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if arrival is not None:
                self.arrivals.left(arrival)
            seconds = time.perf_counter() - t0
            endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            self.metrics.queue_depth.set(self.queue_depth())
            if self.log_requests:
                client = scope.get("client")
                access_log.info(json.dumps({"method": scope["method"], "path": scope["path"], "status": status,
                                            "ms": round(1000 * seconds, 2), "client": client[0] if client else None,
                                            "pid": os.getpid()}))  # which worker (serve --workers)


# -- the typed API's models ---------------------------------------------------------------------------------
class SearchRequest(BaseModel):
    index: str | None = Field(None, description="served index name (default: the first)")
    text: str | None = Field(None, description="a text query")
    image: str | None = Field(None, description="an image query, base64 (or a data: URL)")
    id: int | None = Field(None, description="more like this: an item id of the index")
    vector: list[float] | None = Field(None, description="a query vector of the index's dim")
    modality: Literal["any", "image", "text"] = "any"
    k: int = 10


class EmbedRequest(BaseModel):
    index: str | None = None
    text: str | None = None
    image: str | None = Field(None, description="base64 (or a data: URL)")


# A search hit as the library returns it (cmalign.index.joint.Hit, the schema follows its fields), plus its image URL
Hit = create_model("Hit", **{name: (hint, ...) for name, hint in get_type_hints(IndexHit).items()},
                   url=(str, Field(description="the item's image (an image row's own, a caption's paired image)")))


class SearchResponse(BaseModel):
    index: str
    query: dict
    hits: list[Hit]


class EmbedResponse(BaseModel):
    index: str
    dim: int
    vector: list[float]


def create_app(cfg: ServeConfig, engine: Engine | None = None) -> FastAPI:
    """The ASGI app over ``engine`` (loaded here, at startup, when not given loaded)."""
    engine = engine or Engine(cfg)

    @asynccontextmanager
    async def lifespan(app):
        if not engine.ready:
            await run_in_threadpool(engine.load, log.info)
        yield
        engine.close()  # graceful: queued queries are answered before the workers stop
        engine.metrics.worker_stopped()

    app = FastAPI(title="cmalign search", version=cmalign.__version__, lifespan=lifespan,
                  description="Mixed-modality search over joint image+text indexes aligned with TPC-CMA.")
    app.state.engine, app.state.cfg = engine, cfg
    metrics = engine.metrics

    # -- errors: a 4xx that names the field, and the server stays up ------------------------------------
    @app.exception_handler(BadInput)
    async def _bad_input(request, e: BadInput):
        return JSONResponse({"error": e.message, "field": e.field}, status_code=e.status)

    @app.exception_handler(UnknownIndex)
    async def _unknown_index(request, e: UnknownIndex):
        return JSONResponse({"error": f"unknown index {e.name!r}; served: {', '.join(e.known)}",
                             "field": "index"}, status_code=404)

    @app.exception_handler(Overloaded)
    async def _overloaded(request, e: Overloaded):
        metrics.overloaded.inc()
        return JSONResponse({"error": f"overloaded ({e}); retry shortly"}, status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return JSONResponse({"error": first.get("msg", "invalid request"), "field": ".".join(loc) or "body"},
                            status_code=422)

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    # -- access log and request metrics: outermost, so a refused body is logged and counted as the 413 it is ---
    app.add_middleware(Observe, metrics=metrics, queue_depth=engine.queue_depth, log_requests=cfg.log_requests,
                       arrivals=engine.arrivals)

    def served(name: str | None) -> ServedIndex:
        if not engine.ready:
            raise Overloaded("the indexes are still loading")
        return engine.get(name)

    def image_urls(request: Request, index: str):
        """``item id -> its image's URL`` for one response: Starlette's url_for walks every route on each call
        (profiled: ~0.1 ms a call, ten a search), so it runs once and the id goes on its end."""
        prefix = str(request.url_for("corpus_image", index=index, item_id=0))[:-1]
        return lambda item_id: f"{prefix}{item_id}"

    async def pixels(served_index: ServedIndex, data: bytes, field: str):
        def decode():
            t0 = time.perf_counter()
            im = inputs.decode_image(data, field, cfg.max_pixels)
            p = served_index.model.preprocess([im])[0]
            metrics.observe_stage("decode", time.perf_counter() - t0)
            return p

        return await run_in_threadpool(decode)

    async def run_query(served_index: ServedIndex, kind: str, value, k: int, modality: str) -> list[dict]:
        result = await served_index.search(Query(kind, value, k, modality))
        if k <= INLINE_HITS:  # a few rows of the id table: less than the hop to a worker thread and back
            return served_index.hits(result)
        return await run_in_threadpool(served_index.hits, result)

    # -- clip-retrieval's API -----------------------------------------------------------------------------
    @app.post(KNN_PATH, tags=["clip-retrieval"])
    async def knn_service(request: Request):
        """clip back's knn service: one of text / image (base64) / image_url / embedding_input; `modality`
        image | text (clip back) or all; results as clip back gives them, with `modality` added."""
        body = await json_body(request)
        idx = served(_opt_str(body, "indice_name"))
        given = [f for f in QUERY_FIELDS if body.get(f) is not None]
        if len(given) != 1:
            raise BadInput("text", f"give exactly one of {', '.join(QUERY_FIELDS)} (got {', '.join(given) or 'none'})")
        field = given[0]
        modality = inputs.modality(body.get("modality"), default="image")
        num_images = inputs.count(body.get("num_images"), "num_images", cfg.max_k, 40)
        num_ids = inputs.count(body.get("num_result_ids"), "num_result_ids", cfg.max_k, num_images)
        dedupe = bool(body.get("deduplicate", True))
        if field == "text":
            kind, value = "text", inputs.text(body["text"], "text", cfg.max_text_chars)
        elif field == "image":
            kind, value = "image", await pixels(idx, inputs.image_bytes(body["image"], "image"), "image")
        elif field == "image_url":
            if not cfg.allow_url_fetch:
                raise BadInput("image_url", "fetching images by URL is off on this server (start it with "
                                            "--allow-url-fetch); send the image as base64 in 'image'", status=400)
            kind, value = "image", await pixels(idx, await run_in_threadpool(_fetch, body["image_url"],
                                                                             cfg.max_body_bytes), "image_url")
        else:
            kind, value = "vector", inputs.vector(body["embedding_input"], "embedding_input", idx.dim)
        k = max(num_images, num_ids)
        hits = await run_query(idx, kind, value, k, modality)
        if dedupe:
            # duplicates take places in the top k: search wider until num_images distinct items (or all there are)
            while len(unique := _dedupe(hits)) < num_images and k < min(len(idx.index), 8 * cfg.max_k):
                k *= 4
                hits = await run_query(idx, kind, value, k, modality)
            hits = unique
        url = image_urls(request, idx.name)
        out = [{"id": h["id"], "similarity": h["score"], "caption": h["caption"],
                "url": url(h["id"]), "image_path": h["image_path"],
                "modality": h["modality"], "pair_id": h["pair_id"], "label": h["label"]} for h in hits[:num_images]]
        ignored = sorted(k for k in body if k not in KNN_FIELDS or (k in IGNORED_KNN_FIELDS and body[k]))
        headers = {"X-Cmalign-Ignored-Fields": ",".join(ignored)} if ignored else None
        return JSONResponse(out, headers=headers)

    @app.post("/metadata", tags=["clip-retrieval"])
    async def metadata(request: Request):
        """clip back's metadata service: ``{"indice_name", "ids": [...]}`` → ``[{"id", "metadata": {...}}]``."""
        body = await json_body(request)
        idx = served(_opt_str(body, "indice_name"))
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BadInput("ids", "expected a list of item ids (whole numbers)")
        if len(ids) > cfg.max_k:
            raise BadInput("ids", f"{len(ids)} ids, over the limit of {cfg.max_k}")
        bad = [i for i in ids if not 0 <= i < len(idx.index)]
        if bad:
            raise BadInput("ids", f"no such item(s) {bad[:5]} (the index holds ids 0..{len(idx.index) - 1})")
        out, url = [], image_urls(request, idx.name)
        for i in ids:
            row = idx.row(i)
            row.pop("id")
            out.append({"id": i, "metadata": {**row, "url": url(i)}})
        return out

    @app.get("/indices-list", tags=["clip-retrieval"])
    async def indices_list():
        return list(engine.indexes) if engine.ready else [e.name for e in cfg.indexes]

    # -- cmalign's typed API --------------------------------------------------------------------------------
    @app.get("/v1/indexes", tags=["search"])
    async def list_indexes():
        return [i.describe() for i in engine.indexes.values()]

    @app.post(SEARCH_PATH, response_model=SearchResponse, tags=["search"])
    async def v1_search(request: Request, req: SearchRequest):
        """Query by text, image (base64), an item id ("more like this") or a vector."""
        idx = served(req.index)
        given = [f for f in ("text", "image", "id", "vector") if getattr(req, f) is not None]
        if len(given) != 1:
            raise BadInput("text", f"give exactly one of text, image, id, vector (got {', '.join(given) or 'none'})")
        k = inputs.count(req.k, "k", cfg.max_k, 10)
        field = given[0]
        if field == "text":
            kind, value = "text", inputs.text(req.text, "text", cfg.max_text_chars)
        elif field == "image":
            kind, value = "image", await pixels(idx, inputs.image_bytes(req.image, "image"), "image")
        elif field == "id":
            # more like this: the item itself (score 1) is left out of its own results
            out = await typed_hits(request, idx, "vector", idx.vector_of(req.id), k + 1, req.modality,
                                   {"kind": "id", "id": req.id})
            out["hits"] = [h for h in out["hits"] if h["id"] != req.id][:k]
            for rank, h in enumerate(out["hits"], 1):
                h["rank"] = rank
            out["query"]["k"] = k
            return out
        else:
            kind, value = "vector", inputs.vector(req.vector, "vector", idx.dim)
        return await typed_hits(request, idx, kind, value, k, req.modality, {"kind": field})

    @app.post(SEARCH_IMAGE_PATH, response_model=SearchResponse, tags=["search"])
    async def v1_search_image(request: Request, file: UploadFile = File(..., description="an image file"),
                              index: str | None = Form(None), modality: Literal["any", "image", "text"] = Form("any"),
                              k: int = Form(10)):
        """Query by an uploaded image (multipart/form-data, as a browser's file picker sends it)."""
        idx = served(index)
        k = inputs.count(k, "k", cfg.max_k, 10)
        data = await file.read()
        if not data:
            raise BadInput("file", "empty upload")
        value = await pixels(idx, data, "file")
        return await typed_hits(request, idx, "image", value, k, modality, {"kind": "image", "file": file.filename})

    async def typed_hits(request, idx, kind, value, k, modality, query):
        hits = await run_query(idx, kind, value, k, modality)
        url = image_urls(request, idx.name)
        for h in hits:
            h["url"] = url(h["id"])
        return {"index": idx.name, "query": {**query, "modality": modality, "k": k}, "hits": hits}

    @app.post(EMBED_PATH, response_model=EmbedResponse, tags=["search"])
    async def v1_embed(req: EmbedRequest):
        """A text or an image to its vector in the index's space."""
        idx = served(req.index)
        if (req.text is None) == (req.image is None):
            raise BadInput("text", "give exactly one of text, image")
        if req.text is not None:
            v = await idx.embed("text", inputs.text(req.text, "text", cfg.max_text_chars))
        else:
            v = await idx.embed("image", await pixels(idx, inputs.image_bytes(req.image, "image"), "image"))
        return {"index": idx.name, "dim": idx.dim, "vector": [float(x) for x in v]}

    # -- corpus images: only paths the index records ------------------------------------------------------
    @app.get("/image/{index}/{item_id}", name="corpus_image", tags=["corpus"])
    async def corpus_image(index: str, item_id: int, size: int | None = None):
        idx = served(index)
        if not 0 <= item_id < len(idx.index):
            raise BadInput("item_id", f"no such item (ids 0..{len(idx.index) - 1})")
        size = inputs.count(size, "size", 1024, 0) if size is not None else None
        path = idx.image_path_of(item_id)
        content = await run_in_threadpool(_render_recorded_image, path, size)
        if isinstance(content, Path):
            return FileResponse(content)
        if content is None:
            return JSONResponse({"error": f"the image recorded for item {item_id} ({path}) is not readable here",
                                 "field": "item_id"}, status_code=404)
        return Response(content, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # -- operations -------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["operations"])
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        if not engine.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "indexes": list(engine.indexes)}

    @app.get("/metrics", tags=["operations"])
    async def prometheus():
        metrics.queue_depth.set(engine.queue_depth())
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    # -- the web page -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def json_body(request: Request) -> dict:
    """The body as JSON whatever the Content-Type says (clip-retrieval's client sends none)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput("body", f"not valid JSON ({e})", status=400) from None
    if not isinstance(body, dict):
        raise BadInput("body", f"expected a JSON object, got {type(body).__name__ if raw else 'an empty body'}",
                       status=400)
    return body


def _opt_str(body: dict, field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise BadInput(field, f"expected a string, got {type(value).__name__}")
    return value


def _dedupe(hits: list[dict]) -> list[dict]:
    """clip back's deduplicate: drop an item identical to a higher-ranked one (same modality, image and caption,
    as generated and scraped captions repeat)."""
    seen, out = set(), []
    for h in hits:
        key = (h["modality"], h["image_path"] if h["modality"] == "image" else "", h["caption"])
        if key not in seen:
            seen.add(key)
            out.append(h)
    return out


def _fetch(url, limit: int) -> bytes:
    """image_url, when the operator allowed fetching: http(s) only, bounded size and time."""
    import urllib.request

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise BadInput("image_url", "expected an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (scheme checked above)
            data = r.read(limit + 1)
    except OSError as e:
        raise BadInput("image_url", f"cannot fetch ({type(e).__name__}: {e})") from None
    if len(data) > limit:
        raise BadInput("image_url", f"image over {limit:,} bytes", status=413)
    return data


def _render_recorded_image(path: str, size: int | None):
    """PNG bytes (or a Path to send as is) of an image the index records; None when it is not readable."""
    import io

    from PIL import Image

    from cmalign.data.synth import image_for_key

    try:
        if path.startswith("synth/"):
            im = image_for_key(path)  # the generated set: rendered again from its key (a pure function)
        else:
            file = Path(path)
            if not file.is_file():
                return None
            if size is None:
                return file
            with Image.open(file) as f:
                f.load()
                im = f.convert("RGB")
    except (OSError, ValueError, KeyError):
        return None
    if size is not None and max(im.size) > size:
        im = im.copy()
        im.thumbnail((size, size))
    elif size is not None and max(im.size) < size:  # the generated set's 64 px scenes, shown larger: crisp pixels
        scale = size / max(im.size)
        im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()

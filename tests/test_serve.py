"""`cmalign serve`: clip-retrieval's API and the typed one on an aligned joint index, every bad input a 4xx naming
its field, micro-batching, overload, metrics, corpus images, and a real server on 127.0.0.1 under a bounded load."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.server import CMALIGN, Server
from PIL import Image

from cmalign.data.synth import image_for_key
from cmalign.serve.batcher import Arrivals, MicroBatcher, Overloaded
from cmalign.serve.config import IndexEntry, ServeConfig, load_serve_config


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


@pytest.fixture(scope="module")
def cfg(aligned_index):
    return ServeConfig(indexes=[IndexEntry("val", str(aligned_index["index"]))], max_pixels=100_000,
                       max_body_bytes=2_000_000, max_k=200, log_requests=False).validate()


@pytest.fixture(scope="module")
def client(cfg):
    from cmalign.serve.app import create_app

    with TestClient(create_app(cfg)) as c:  # the context runs the lifespan: indexes load, batchers stop after
        yield c


@pytest.fixture(scope="module")
def query_image():
    return image_for_key("synth/0/val/000007")  # an image of the served corpus


# -- clip-retrieval's API ------------------------------------------------------------------------------------
def test_knn_service_answers_as_clip_back_with_one_modality_or_both(client):
    for modality, allowed in (("image", {"image"}), ("text", {"text"}), ("all", {"image", "text"})):
        r = client.post("/knn-service", json={"text": "a large red circle", "modality": modality, "num_images": 12,
                                              "indice_name": "val"})
        assert r.status_code == 200, r.text
        hits = r.json()
        assert isinstance(hits, list) and len(hits) == 12
        assert {h["modality"] for h in hits} <= allowed
        for h in hits:  # clip back's fields, and ours
            assert {"id", "similarity", "caption", "url"} <= set(h) and isinstance(h["id"], int)
        sims = [h["similarity"] for h in hits]
        assert sims == sorted(sims, reverse=True)
        assert hits[0]["url"].endswith(f"/image/val/{hits[0]['id']}")


def test_knn_service_takes_a_body_without_content_type_and_ignores_what_it_does_not_implement(client):
    # clip-retrieval's ClipClient posts data=json.dumps(...) with no Content-Type header, and sends every flag
    body = {"text": "two blue squares", "image": None, "image_url": None, "embedding_input": None,
            "deduplicate": True, "use_safety_model": True, "use_violence_detector": True, "indice_name": "val",
            "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 5,
            "num_result_ids": 5, "verbose": False}
    r = client.post("/knn-service", content=json.dumps(body).encode(), headers={"content-type": ""})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 5
    assert r.headers["x-cmalign-ignored-fields"] == "aesthetic_score,aesthetic_weight,use_safety_model," \
                                                    "use_violence_detector"


def test_knn_service_by_image_and_by_embedding_agree(client, query_image):
    by_image = client.post("/knn-service", json={"image": _b64(query_image), "modality": "all", "num_images": 8,
                                                 "deduplicate": False}).json()
    vector = client.post("/v1/embed", json={"image": _b64(query_image)}).json()["vector"]
    by_vector = client.post("/knn-service", json={"embedding_input": vector, "modality": "all", "num_images": 8,
                                                  "deduplicate": False}).json()
    assert [h["id"] for h in by_image] == [h["id"] for h in by_vector]
    assert by_image[0]["image_path"] == "synth/0/val/000007"  # the image finds itself first


def test_deduplicate_drops_repeated_captions(client):
    kw = {"text": "two large circles on black", "modality": "text", "num_images": 30, "num_result_ids": 60}
    plain = client.post("/knn-service", json={**kw, "deduplicate": False}).json()
    deduped = client.post("/knn-service", json={**kw, "deduplicate": True}).json()
    captions = [h["caption"] for h in plain]
    assert len(set(captions)) < len(captions)  # the generated set repeats captions
    assert len({h["caption"] for h in deduped}) == len(deduped) == 30


def test_metadata_and_indices_list(client):
    assert client.get("/indices-list").json() == ["val"]
    hits = client.post("/knn-service", json={"text": "a green star", "modality": "all", "num_images": 3}).json()
    ids = [h["id"] for h in hits]
    meta = client.post("/metadata", content=json.dumps({"indice_name": "val", "ids": ids})).json()
    assert [m["id"] for m in meta] == ids
    for m, h in zip(meta, hits, strict=True):
        assert m["metadata"]["caption"] == h["caption"] and m["metadata"]["url"] == h["url"]
    assert client.post("/metadata", json={"indice_name": "val", "ids": []}).json() == []


# -- the typed API -------------------------------------------------------------------------------------------
def test_v1_search_by_text_image_id_and_vector(client, query_image, aligned_index):
    from cmalign.export.runtime import ExportedModel

    text = client.post("/v1/search", json={"text": "a red circle", "k": 7, "modality": "image"}).json()
    assert text["index"] == "val" and len(text["hits"]) == 7
    assert {h["modality"] for h in text["hits"]} == {"image"} and [h["rank"] for h in text["hits"]] == list(range(1, 8))
    # the same as the library's Searcher (what `cmalign search --json` prints)
    from cmalign.index.searcher import Searcher

    expected = Searcher(aligned_index["index"]).text("a red circle", k=7, modality="image")[0]
    assert [h["id"] for h in text["hits"]] == [h.id for h in expected]
    image = client.post("/v1/search", json={"image": "data:image/png;base64," + _b64(query_image), "k": 5}).json()
    assert image["hits"][0]["image_path"] == "synth/0/val/000007"
    # more like this: the item's neighbours, without itself
    item = image["hits"][0]["id"]
    more = client.post("/v1/search", json={"id": item, "k": 5}).json()
    assert len(more["hits"]) == 5 and item not in [h["id"] for h in more["hits"]]
    assert more["hits"][0]["id"] == image["hits"][1]["id"]
    model = ExportedModel(aligned_index["export"])
    vec = model.encode_texts(["a red circle"])[0]
    by_vector = client.post("/v1/search", json={"vector": vec.tolist(), "k": 7, "modality": "image"}).json()
    assert [h["id"] for h in by_vector["hits"]] == [h["id"] for h in text["hits"]]


def test_v1_search_by_uploaded_file_and_embed(client, query_image, aligned_index):
    from cmalign.export.runtime import ExportedModel

    r = client.post("/v1/search/image", files={"file": ("q.png", _png(query_image), "image/png")},
                    data={"modality": "text", "k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["hits"]) == 4 and {h["modality"] for h in body["hits"]} == {"text"}
    assert body["query"]["file"] == "q.png"
    model = ExportedModel(aligned_index["export"])
    e_text = client.post("/v1/embed", json={"text": "one small yellow ring"}).json()
    assert e_text["dim"] == 128
    np.testing.assert_allclose(e_text["vector"], model.encode_texts(["one small yellow ring"])[0], atol=1e-6)
    e_image = client.post("/v1/embed", json={"image": _b64(query_image)}).json()
    np.testing.assert_allclose(e_image["vector"], model.encode_images([query_image])[0], atol=1e-5)


def test_openapi_schema_describes_the_typed_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/search/image", "/v1/embed", "/knn-service"} <= set(schema["paths"])
    assert "SearchRequest" in schema["components"]["schemas"]


# -- bad input: a 4xx naming the field; the server stays up -------------------------------------------------------
BAD = [
    ("/knn-service", b"{not json", 400, "body"),
    ("/knn-service", b"[1, 2]", 400, "body"),
    ("/knn-service", b"", 400, "body"),
    ("/knn-service", {"text": ""}, 422, "text"),
    ("/knn-service", {"text": "   "}, 422, "text"),
    ("/knn-service", {"text": 7}, 422, "text"),
    ("/knn-service", {"text": "x" * 5000}, 422, "text"),
    ("/knn-service", {"text": "a", "indice_name": "nope"}, 404, "index"),
    ("/knn-service", {"text": "a", "indice_name": 3}, 422, "indice_name"),
    ("/knn-service", {"text": "a", "image": "AAAA"}, 422, "text"),
    ("/knn-service", {}, 422, "text"),
    ("/knn-service", {"image": "not base64!"}, 422, "image"),
    ("/knn-service", {"image": base64.b64encode(b"not an image").decode()}, 422, "image"),
    ("/knn-service", {"text": "a", "num_images": 0}, 422, "num_images"),
    ("/knn-service", {"text": "a", "num_images": 10_000}, 422, "num_images"),
    ("/knn-service", {"text": "a", "num_images": "5"}, 422, "num_images"),
    ("/knn-service", {"text": "a", "modality": "video"}, 422, "modality"),
    ("/knn-service", {"embedding_input": [0.1] * 3}, 422, "embedding_input"),
    ("/knn-service", {"embedding_input": [0.0] * 128}, 422, "embedding_input"),
    ("/knn-service", {"embedding_input": ["a"] * 128}, 422, "embedding_input"),
    ("/knn-service", {"image_url": "http://127.0.0.1:9/x.png"}, 400, "image_url"),
    ("/metadata", {"indice_name": "val", "ids": [10 ** 9]}, 422, "ids"),
    ("/metadata", {"indice_name": "val", "ids": "1,2"}, 422, "ids"),
    ("/v1/search", {"text": "a", "k": 0}, 422, "k"),
    ("/v1/search", {"text": "a", "k": 201}, 422, "k"),
    ("/v1/search", {"text": "a", "k": "ten"}, 422, "k"),
    ("/v1/search", {"text": "a", "modality": "both"}, 422, "modality"),
    ("/v1/search", {"id": -1}, 422, "id"),
    ("/v1/search", {"vector": [1.0] * 127}, 422, "vector"),
    ("/v1/search", {"text": "a", "index": "nope"}, 404, "index"),
    ("/v1/embed", {}, 422, "text"),
]


@pytest.mark.parametrize("path, body, status, field", BAD, ids=[f"{p}-{i}" for i, (p, *_ ) in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(client, path, body, status, field):
    r = client.post(path, content=body) if isinstance(body, bytes) else client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]
    assert client.get("/readyz").status_code == 200
    assert client.app.state.engine.arrivals.count == 0  # a refused query is no longer awaited by the batchers


def test_nan_vectors_oversized_images_and_bodies_are_refused(client):
    nan = json.dumps({"embedding_input": [float("nan")] * 128})  # json.dumps writes NaN, as Python clients do
    r = client.post("/knn-service", content=nan)
    assert r.status_code == 422 and r.json()["field"] == "embedding_input" and "NaN" in r.json()["error"]
    big = Image.new("RGB", (400, 400))  # 160,000 pixels over this server's 100,000: refused from the header
    r = client.post("/v1/search", json={"image": _b64(big)})
    assert r.status_code == 413 and r.json()["field"] == "image"
    r = client.post("/knn-service", content=b"x" * 2_100_000)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_corpus_images_are_only_those_the_index_records(client):
    hits = client.post("/v1/search", json={"text": "a red circle", "k": 1, "modality": "image"}).json()["hits"]
    r = client.get(hits[0]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert np.array_equal(served, np.asarray(image_for_key(hits[0]["image_path"])))
    thumb = Image.open(io.BytesIO(client.get(hits[0]["url"] + "?size=128").content))
    assert max(thumb.size) == 128
    assert client.get("/image/val/999999").status_code == 422
    assert client.get("/image/val/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/image/other/1").status_code == 404


def test_health_ready_metrics_and_page(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready", "indexes": ["val"]}
    client.post("/v1/search", json={"text": "a blue ring"})
    text = client.get("/metrics").text
    for stage in ("decode", "encode", "search", "metadata"):
        assert f'cmalign_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'cmalign_requests_total{endpoint="/v1/search",status="200"}' in text
    page = client.get("/")
    assert page.status_code == 200 and "cmalign search" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_the_served_sessions_do_not_spin_between_batches(client):
    """Spinning intra-op threads take the cores the event loop needs (benchmarks/serve_load.py measures it)."""
    model = client.app.state.engine.indexes["val"].model
    for session in model._sessions.values():
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


# -- micro-batching and overload ------------------------------------------------------------------------------------
def test_micro_batcher_batches_concurrent_items_and_refuses_when_full():
    release = threading.Event()
    sizes = []

    def fn(items):
        sizes.append(len(items))
        release.wait(5)
        return [i * 2 for i in items]

    batcher = MicroBatcher(fn, max_batch=4, max_wait=0.05, queue_size=6)

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))  # the worker takes it and blocks in fn
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]  # queue: 6 waiting
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.submit(99)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    batcher.close()
    assert first == 0 and rest == [2, 4, 6, 8, 10, 12]
    assert sizes == [1, 4, 2]  # then the waiting six in batches of at most 4


def _blocked_batcher(arrivals, max_wait=2.0):
    """A batcher whose worker is held in its first batch until ``release`` is set; ``sizes`` records batches."""
    release, sizes = threading.Event(), []

    def fn(items):
        sizes.append(len(items))
        release.wait(5)
        return items

    return MicroBatcher(fn, max_batch=8, max_wait=max_wait, queue_size=8, arrivals=arrivals), release, sizes


def test_with_arrivals_a_batch_does_not_wait_for_queries_that_are_not_coming():
    """Queued queries run as soon as the worker is free when nothing else is on its way, not after max_wait
    (which halved a small model's throughput at concurrency 8); without the signal the batch waits it out."""
    for arrivals, at_least, at_most in ((Arrivals(), 0.0, 1.0), (None, 1.9, 5.0)):
        batcher, release, sizes = _blocked_batcher(arrivals)

        async def main(batcher=batcher, release=release):
            first = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0.1)  # the worker holds item 0
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            release.set()
            out = await asyncio.gather(first, *rest)
            return out, time.perf_counter() - t0

        out, seconds = asyncio.run(main())
        batcher.close()
        assert out == [0, 1, 2] and sizes == [1, 2]
        assert at_least <= seconds < at_most, (arrivals, seconds)


def test_a_query_is_awaited_under_a_proxy_prefix_too():
    """Behind a proxy that adds a prefix (uvicorn --root-path), ASGI's path carries the prefix; the middleware still
    tells the batchers a query is on its way (before, such a service silently fell back to greedy batches)."""
    from cmalign.serve.app import Observe
    from cmalign.serve.metrics import ServiceMetrics

    arrivals, seen = Arrivals(), {}

    async def app(scope, receive, send):
        seen[scope["path"]] = arrivals.count
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    observed = Observe(app, ServiceMetrics(), lambda: 0, log_requests=False, arrivals=arrivals)

    async def request(path, root_path=""):
        scope = {"type": "http", "method": "POST", "path": path, "root_path": root_path, "headers": []}
        await observed(scope, None, lambda message: asyncio.sleep(0))

    async def main():
        for path, root in (("/v1/search", ""), ("/search/v1/search", "/search"), ("/search/knn-service", "/search"),
                           ("/search/healthz", "/search")):
            await request(path, root)

    asyncio.run(main())
    assert seen == {"/v1/search": 1, "/search/v1/search": 1, "/search/knn-service": 1, "/search/healthz": 0}
    assert arrivals.count == 0


def test_with_arrivals_a_batch_waits_for_a_query_already_received():
    """A request the server has received but not yet handed over (still being parsed, say) joins the batch."""
    arrivals = Arrivals()
    batcher, release, sizes = _blocked_batcher(arrivals)

    async def late_request():
        state = arrivals.arrive()  # as the middleware does, in the request's own task
        await asyncio.sleep(0.3)
        try:
            return await batcher.submit("late")
        finally:
            arrivals.left(state)

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(batcher.submit(1))
        late = asyncio.ensure_future(late_request())
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, queued, late)

    assert asyncio.run(main()) == [0, 1, "late"]
    batcher.close()
    assert sizes == [1, 2] and arrivals.count == 0  # item 1 waited for the late one, then ran with it


def test_an_error_in_a_batch_reaches_each_caller_and_the_worker_goes_on():
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return items

    batcher = MicroBatcher(fn, max_batch=8, max_wait=0.0, queue_size=8)

    async def main():
        with pytest.raises(ValueError, match="boom"):
            await batcher.submit("bad")
        return await batcher.submit("ok")

    assert asyncio.run(main()) == "ok"
    batcher.close()


# -- a real server on 127.0.0.1 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(aligned_index):
    s = Server(str(aligned_index["index"]), "--max-k", "200")
    yield s
    s.stop()


def test_a_bounded_load_of_valid_and_invalid_requests_gets_no_5xx(server, query_image):
    """A few hundred requests at concurrency 16: every valid one 200, every invalid one 4xx, the server ready after,
    and concurrent queries were micro-batched (batches of more than one query in /metrics)."""
    image = _b64(query_image)
    valid = [("/knn-service", {"text": f"a {c} star", "modality": "all", "num_images": 10}) for c in
             ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")] + \
            [("/v1/search", {"image": image, "k": 5}), ("/v1/search", {"text": "three small rings", "k": 20})]
    invalid = [("/knn-service", {"text": ""}), ("/knn-service", "{oops"), ("/v1/search", {"k": 0, "text": "a"}),
               ("/knn-service", {"image": "####"}), ("/v1/search", {"vector": [1.0]}),
               ("/knn-service", {"text": "a", "indice_name": "missing"})]
    jobs = [(p, b, True) for p, b in valid * 20] + [(p, b, False) for p, b in invalid * 15]
    rng = np.random.default_rng(0)
    jobs = [jobs[i] for i in rng.permutation(len(jobs))]

    def send(job):
        path, body, ok = job
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return server.request("POST", path, data, {"Content-Type": "application/json"})[0], ok

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    assert len(results) == 290
    assert [s for s, ok in results if ok and s != 200] == []
    assert [s for s, ok in results if not ok and not 400 <= s < 500] == []
    assert server.request("GET", "/readyz")[0] == 200
    metrics = server.request("GET", "/metrics")[1].decode()
    value = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if line[:1] != "#"}
    count, total = value["cmalign_batch_size_count"], value["cmalign_batch_size_sum"]
    # 200 valid queries (and the wider searches deduplication asks for) in fewer batches than queries
    assert total >= 200 and count < total


def test_concurrent_embeds_are_batched_and_each_gets_its_own_vector(server, aligned_index):
    """/v1/embed goes through the micro-batcher with the searches: concurrent texts share onnxruntime calls, and
    every caller still gets the vector of its own text."""
    from cmalign.export.runtime import ExportedModel

    texts = [f"{n} small {c} rings" for n in ("one", "two", "three") for c in ("red", "blue", "green", "pink")] * 4
    metrics = server.request("GET", "/metrics")[1].decode()
    before = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if line[:1] != "#"}

    def embed(text):
        status, body, _ = server.request("POST", "/v1/embed", json.dumps({"text": text}).encode(),
                                         {"Content-Type": "application/json"})
        assert status == 200, body
        return json.loads(body)["vector"]

    with ThreadPoolExecutor(16) as pool:
        vectors = np.array(list(pool.map(embed, texts)), np.float32)
    np.testing.assert_allclose(vectors, ExportedModel(aligned_index["export"]).encode_texts(texts), atol=1e-5)
    metrics = server.request("GET", "/metrics")[1].decode()
    after = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if line[:1] != "#"}
    batches = after["cmalign_batch_size_count"] - before["cmalign_batch_size_count"]
    assert after["cmalign_batch_size_sum"] - before["cmalign_batch_size_sum"] == len(texts) and batches < len(texts)


def test_a_full_queue_answers_503_with_retry_after(aligned_index):
    s = Server(str(aligned_index["index"]), "--queue-size", "1", "--max-batch", "1", "--max-wait-ms", "0", "-q")
    try:
        body = json.dumps({"text": "a large purple hexagon in the center", "num_images": 50}).encode()
        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(lambda _: s.request("POST", "/knn-service", body), range(192)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        assert all(r[2].get("retry-after") == "1" for r in results if r[0] == 503)
        assert s.request("GET", "/readyz")[0] == 200
    finally:
        code, out = s.stop()
    # SIGTERM: a graceful stop (uvicorn finishes, then re-raises the signal it caught: exit status −15)
    assert code in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Finished server process" in out


def test_several_workers_share_the_port_and_report_summed_metrics(aligned_index):
    """--workers 2: both processes answer queries on one port, every /metrics scrape (whichever worker answers it)
    counts all of them, and SIGTERM stops the workers and removes their metrics files."""
    metrics_dirs = set(Path(tempfile.gettempdir()).glob("cmalign-serve-metrics-*"))
    s = Server(str(aligned_index["index"]), "--workers", "2")
    assert len(set(Path(tempfile.gettempdir()).glob("cmalign-serve-metrics-*")) - metrics_dirs) == 1
    try:
        body = json.dumps({"text": "a small green triangle", "k": 5}).encode()
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: s.request("POST", "/v1/search", body,
                                                         {"Content-Type": "application/json"})[0], range(240)))
        assert statuses == [200] * 240
        for _ in range(6):  # scrapes land on either worker
            metrics = s.request("GET", "/metrics")[1].decode()
            value = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if line[:1] != "#"}
            assert value['cmalign_requests_total{endpoint="/v1/search",status="200"}'] == 240
            assert value["cmalign_batch_size_sum"] == 240
    finally:
        code, out = s.stop()
    assert code in (0, -signal.SIGTERM), out
    pids = {json.loads(line)["pid"] for line in out.splitlines() if line.startswith('{"method": "POST"')}
    assert len(pids) == 2, out[-3000:]
    assert "with 2 worker processes" in out and "Stopping parent process" in out
    assert set(Path(tempfile.gettempdir()).glob("cmalign-serve-metrics-*")) == metrics_dirs


def test_serve_refuses_a_missing_index_and_duplicate_names_with_one_line(tmp_path, aligned_index):
    r = subprocess.run([CMALIGN, "serve", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    cfg_file = tmp_path / "serve.toml"
    cfg_file.write_text(f'port = 4321\n[indexes.a]\npath = "{aligned_index["index"]}"\n')
    cfg = load_serve_config([str(aligned_index["index"])], str(cfg_file))
    assert [e.name for e in cfg.indexes] == ["a", "val"] and cfg.port == 4321 and cfg.host == "127.0.0.1"
    (tmp_path / "indices_paths.json").write_text(json.dumps({"x": "idx/x", "y": "idx/y"}))  # clip back's file
    cfg = load_serve_config(None, str(tmp_path / "indices_paths.json"))
    assert [(e.name, e.path) for e in cfg.indexes] == [("x", str(tmp_path / "idx/x")), ("y", str(tmp_path / "idx/y"))]
    from cmalign.errors import ConfigError

    with pytest.raises(ConfigError, match="unique"):
        load_serve_config([str(aligned_index["index"]), str(aligned_index["index"])])
    with pytest.raises(ConfigError, match="unknown setting"):
        cfg_file.write_text("prot = 1\n")
        load_serve_config(None, str(cfg_file))


def test_workers_get_the_whole_config_and_share_the_cores(tmp_path, monkeypatch):
    """What a spawned worker rebuilds from the environment is the config the parent was given, and unless told
    otherwise each of N workers takes cores / N threads; workers below 1 are refused naming the setting."""
    from cmalign.errors import ConfigError
    from cmalign.serve.workers import CONFIG_ENV, config_from_env, config_to_env, threads_per_worker

    cfg_file = tmp_path / "serve.toml"
    cfg_file.write_text('workers = 3\nmax_k = 77\n[indexes.a]\npath = "idx/a"\nexport = "ex/a"\n')
    cfg = load_serve_config(["idx/b"], str(cfg_file), max_batch=8)
    monkeypatch.setenv(CONFIG_ENV, config_to_env(cfg))
    assert config_from_env() == cfg and cfg.workers == 3 and cfg.indexes[0].export == str(tmp_path / "ex/a")
    cores = len(os.sched_getaffinity(0))
    assert threads_per_worker(cfg) == max(1, cores // 3)
    assert threads_per_worker(ServeConfig(workers=1)) is None  # one worker: onnxruntime's and faiss's defaults
    assert threads_per_worker(ServeConfig(workers=2, threads=5)) == 5
    with pytest.raises(ConfigError, match="workers must be a whole number >= 1"):
        load_serve_config(["idx/b"], workers=0)


def test_serve_runs_without_torch(aligned_index, tmp_path):
    (tmp_path / "sitecustomize.py").write_text('import sys\nfor m in ("torch", "torchvision", "open_clip", "sklearn", '
                                               '"matplotlib"):\n    sys.modules[m] = None\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    s = Server(str(aligned_index["index"]), "-q", env=env)
    try:
        status, body, _ = s.request("POST", "/v1/search", json.dumps({"text": "a red circle", "k": 3}).encode(),
                                    {"Content-Type": "application/json"})
        assert status == 200 and len(json.loads(body)["hits"]) == 3
    finally:
        s.stop()

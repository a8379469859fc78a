"""`cmalign serve` under load against the limit the machine allows: throughput and p50/p99 latency at several
concurrencies, text and image queries, micro-batching on and off, side by side in one run, for each setup.

    .venv/bin/python benchmarks/serve_load.py [--work runs/bench-serve] [--requests 300] [--concurrency 1,8,32]
        [--setups tiny:fp32,tiny:int8,ViT-B-32:fp32] [--images 17000] [--vit-images 17000]

Setups: the export of the cached base model (fp32 and its int8 graphs) and a ViT-B-32 export with random weights,
each over a 102,000-vector joint index (the generated train split at 17,000 scenes, 5 captions each; embedding it
with ViT-B-32 takes ~15 min on 2 cores, once: --work keeps every step). The reference ("limit") is what the
machine does without HTTP: the bare onnxruntime session's items/s at the micro-batch size plus the bare faiss
search time per query, both measured here in the same run. Client threads run on the same cores as the server (2
here), so they take part of the machine the server could use; the figures say so.
Results: benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CMALIGN = str(Path(sys.executable).parent / "cmalign")


def _prepare(work: Path, model: str, variant: str, data: str) -> Path:
    """The model's export, the corpus embedded with one graph variant, one joint index (each step kept)."""
    export = work / model / "export"
    emb, idx = work / model / f"emb-{variant}", work / model / f"idx-{variant}"
    if not (export / "manifest.json").is_file():
        if model == "tiny":
            from cmalign.model.base import ensure_base_model

            source = [str(ensure_base_model()), "--int8"]
        else:  # random weights: nothing here can download the pretrained ones; the speed is the same
            source = ["--model", model]
        subprocess.run([CMALIGN, "export", *source, "--out", str(export), "--retrieval-images", "0", "-q"],
                       check=True)
    if not (emb / "manifest.json").is_file():
        subprocess.run([CMALIGN, "embed", str(export), "--data", data, "--out", str(emb), "--variant", variant],
                       check=True)
    if not (idx / "manifest.json").is_file():
        subprocess.run([CMALIGN, "index", str(emb), "--out", str(idx)], check=True)
    return idx


def _limit(idx: Path, batch: int, reps: int = 20) -> dict:
    """Bare onnxruntime at the micro-batch size and bare faiss search: what the service could reach at best."""
    from cmalign.data.synth import image_for_key
    from cmalign.index.searcher import Searcher

    s = Searcher(idx)
    texts = [f"a small {c} star in the top left" for c in ("red", "blue", "green", "pink")] * (batch // 4 + 1)
    texts = texts[:batch]
    pixels = s.model.preprocess([image_for_key(f"synth/0/val/{i:06d}") for i in range(batch)])
    out = {}
    for kind, run in (("text", lambda: s.model.encode_texts(texts)), ("image", lambda: s.model.encode_pixels(pixels))):
        run()
        t = [0.0] * reps
        for r in range(reps):
            t0 = time.perf_counter()
            run()
            t[r] = time.perf_counter() - t0
        out[f"{kind}_encode_items_per_s"] = batch / statistics.median(t)
    q = s.model.encode_texts(texts)
    s.index.search(q, 10)
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        s.index.search(q, 10)
        t.append(time.perf_counter() - t0)
    out["search_s_per_query"] = statistics.median(t) / batch
    for kind in ("text", "image"):
        per_item = 1 / out[f"{kind}_encode_items_per_s"] + out["search_s_per_query"]
        out[f"{kind}_limit_qps"] = 1 / per_item
    return out


def query_bodies() -> dict[str, bytes]:
    """The /v1/search bodies every row sends: a text query, and an image query (a scene of the generated corpus)."""
    from cmalign.data.synth import image_for_key

    buf = io.BytesIO()
    image_for_key("synth/0/val/000007").save(buf, format="PNG")
    return {"text": json.dumps({"text": "a large red circle in the center", "k": 10}).encode(),
            "image": json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "k": 10}).encode()}


def _load(port: int, body: bytes, requests: int, concurrency: int) -> dict:
    def worker(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        lat = []
        codes = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            lat.append(time.perf_counter() - t0)
            codes.append(r.status)
        conn.close()
        return lat, codes

    per = [requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parts = list(pool.map(worker, per))
    wall = time.perf_counter() - t0
    lat = sorted(x for p in parts for x in p[0])
    codes = [c for p in parts for c in p[1]]
    return {"qps": len(lat) / wall, "wall_s": wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "mean_latency_ms": 1000 * sum(lat) / len(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "non_200": sum(c != 200 for c in codes)}


def _server_seconds(port: int) -> dict:
    """Cumulative server-side seconds from /metrics: in the app per /v1/search request, and per query stage."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        for name, key in (('cmalign_request_seconds_sum{endpoint="/v1/search"}', "app"),
                          ('cmalign_request_seconds_count{endpoint="/v1/search"}', "requests")):
            if line.startswith(name):
                out[key] = float(line.split()[-1])
        if line.startswith("cmalign_stage_seconds_sum{"):
            out[line.split('"')[1]] = float(line.split()[-1])
        for name, key in (("cmalign_batch_size_sum", "batched_queries"), ("cmalign_batch_size_count", "batches")):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                out[key] = out.get(key, 0.0) + float(line.split()[-1])
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process, its threads and its live child processes (`--workers`)
    (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = {int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()}
    return own + sum(_cpu_seconds(c) for c in children if Path(f"/proc/{c}").exists())


def _cpu_split(server_s: float, client_s: float, wall: float, cores: int) -> dict:
    """Where the machine's cores went during a load: the server, the client threads, and idle. The limit assumes
    every core serves; the client's share is taken from it (it runs here only because there is no second
    machine), so the service is also judged against the cores it was left."""
    return {"server_cores": round(server_s / wall, 3), "client_cores": round(client_s / wall, 3),
            "idle_cores": round(max(cores - (server_s + client_s) / wall, 0.0), 3)}


def _breakdown(before: dict, after: dict, client_ms: float) -> dict:
    """Mean milliseconds per request: client-measured latency, time inside the app, and per stage (a batched
    stage's time is shared by the queries of its batch, so stages are per query, not per request)."""
    n = max(after.get("requests", 0) - before.get("requests", 0), 1)
    ms = {k: 1000 * (after.get(k, 0) - before.get(k, 0)) / n for k in ("app", "decode", "encode", "search",
                                                                         "metadata")}
    ms["client_latency"] = client_ms
    ms["outside_app (HTTP, JSON, client)"] = client_ms - ms["app"]
    return {k: round(v, 3) for k, v in ms.items()}


def _serve(idx: Path, port: int, max_batch: int, workers: int):
    proc = subprocess.Popen([CMALIGN, "serve", str(idx), "--port", str(port), "--max-batch", str(max_batch), "-q",
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def _index_vectors(idx: Path) -> int:
    m = json.loads((idx / "manifest.json").read_text())
    return int(m.get("ntotal") or m.get("vectors") or sum(m.get("counts", {}).values()) or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-serve")
    ap.add_argument("--requests", type=int, default=300, help="per row (ViT-B-32: a third)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--setups", default="tiny:fp32,tiny:int8,ViT-B-32:fp32",
                    help="model:variant pairs (tiny = the embedded base)")
    ap.add_argument("--images", type=int, default=17000,
                    help="generated scenes in the tiny model's corpus (x6 vectors: 17000 -> 102,000)")
    ap.add_argument("--vit-images", type=int, default=17000, help="scenes in ViT-B-32's corpus (x6 vectors)")
    ap.add_argument("--workers", default="1,2", help="server processes (serve --workers); batching off is measured "
                    "with the first only")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    bodies = query_bodies()
    rows, limits = [], {}
    cores = os.cpu_count() or 1
    for setup in args.setups.split(","):
        model, variant = setup.split(":")
        images = args.images if model == "tiny" else args.vit_images
        idx = _prepare(Path(args.work), model, variant, f"generated:train:{images}")
        limit = limits[setup] = _limit(idx, 32)
        limit["index_vectors"] = _index_vectors(idx)
        requests = args.requests if model == "tiny" else max(32, args.requests // 3)
        worker_counts = [int(w) for w in args.workers.split(",")]
        runs = [(w, "on", 32) for w in worker_counts] + [(worker_counts[0], "off", 1)]
        for workers, batching, max_batch in runs:
            proc = _serve(idx, args.port, max_batch, workers)
            try:
                for kind, body in bodies.items():
                    _load(args.port, body, 20, 4)  # warm-up
                    for c in (int(x) for x in args.concurrency.split(",")):
                        seen = _server_seconds(args.port)
                        server0, client0 = _cpu_seconds(proc.pid), time.process_time()
                        r = _load(args.port, body, requests, c)
                        cpu = _cpu_split(_cpu_seconds(proc.pid) - server0, time.process_time() - client0,
                                         r.pop("wall_s"), cores)
                        after = _server_seconds(args.port)
                        r["mean_ms"] = _breakdown(seen, after, r.pop("mean_latency_ms"))
                        batches = after.get("batches", 0) - seen.get("batches", 0)
                        r.update(model=model, variant=variant, kind=kind, concurrency=c, batching=batching,
                                 workers=workers,
                                 share_of_limit=r["qps"] / limit[f"{kind}_limit_qps"], cpu=cpu,
                                 mean_batch=(after.get("batched_queries", 0) - seen.get("batched_queries", 0))
                                 / batches if batches else None,
                                 share_of_limit_on_server_cores=r["qps"] / (limit[f"{kind}_limit_qps"]
                                                                           * (cores - cpu["client_cores"]) / cores))
                        r["p99_over_p50"] = r["p99_ms"] / r["p50_ms"]
                        rows.append(r)
                        print(f"{setup:14s} {kind:5s} c={c:2d} workers {workers} batching {batching:3s}: "
                              f"{r['qps']:7.1f} q/s "
                              f"({100 * r['share_of_limit']:5.1f} % of the limit), p50 {r['p50_ms']:7.1f} ms, "
                              f"p99 {r['p99_ms']:7.1f} ms, non-200 {r['non_200']}; per request: in the app "
                              f"{r['mean_ms']['app']:.2f} ms (encode {r['mean_ms']['encode']:.2f}, search "
                              f"{r['mean_ms']['search']:.2f}), outside "
                              f"{r['mean_ms']['outside_app (HTTP, JSON, client)']:.2f} ms; cores: server "
                              f"{cpu['server_cores']:.2f}, client {cpu['client_cores']:.2f}, idle "
                              f"{cpu['idle_cores']:.2f} ({100 * r['share_of_limit_on_server_cores']:5.1f} % of the "
                              f"limit on the cores the client left); mean batch "
                              f"{r['mean_batch'] if r['mean_batch'] is None else round(r['mean_batch'], 1)}",
                              flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    result = {"benchmark": "serve_load", "command": " ".join(sys.argv),
              "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}", "limits": limits, "rows": rows,
              "date": time.strftime("%Y-%m-%d"),
              "note": "client threads share the server's cores: cpu gives each row's split (cores busy in the server, "
                      "in the client, idle) and share_of_limit_on_server_cores judges the service against the cores "
                      "the client left it"}
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps(limits, indent=2))


if __name__ == "__main__":
    main()

"""`cmalign serve` under load against the limit the machine allows: throughput and p50/p99 latency at several
concurrencies, text and image queries, micro-batching on and off, side by side in one run.

    .venv/bin/python benchmarks/serve_load.py [--work runs/bench-serve] [--requests 300] [--concurrency 1,8,32]

The corpus is the generated train split embedded with the export of the cached base model (10,000 images and
50,000 captions: a 60,000-vector joint index). The reference ("limit") is what the machine does without HTTP:
the bare onnxruntime session's items/s at the micro-batch size plus the bare faiss search time per query, both
measured here in the same run. Client threads run on the same cores as the server (2 here), so they take part of
the machine the server could use; the figures say so. Results: benchmarks/results/serve_load.json.
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


def _prepare(work: Path) -> Path:
    """Export of the cached base, the train split embedded, one joint index (each step kept when present)."""
    from cmalign.model.base import ensure_base_model

    export, emb, idx = work / "export", work / "emb", work / "idx"
    if not (export / "manifest.json").is_file():
        subprocess.run([CMALIGN, "export", str(ensure_base_model()), "--out", str(export), "--retrieval-images", "0",
                        "-q"], check=True)
    if not (emb / "manifest.json").is_file():
        subprocess.run([CMALIGN, "embed", str(export), "--data", "generated:train", "--out", str(emb)], check=True)
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
    return {"qps": len(lat) / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "non_200": sum(c != 200 for c in codes)}


def _serve(idx: Path, port: int, max_batch: int):
    proc = subprocess.Popen([CMALIGN, "serve", str(idx), "--port", str(port), "--max-batch", str(max_batch), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-serve")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--port", type=int, default=18765)
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    from cmalign.data.synth import image_for_key

    idx = _prepare(Path(args.work))
    limit = _limit(idx, 32)
    buf = io.BytesIO()
    image_for_key("synth/0/val/000007").save(buf, format="PNG")
    bodies = {"text": json.dumps({"text": "a large red circle in the center", "k": 10}).encode(),
              "image": json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "k": 10}).encode()}
    rows = []
    for batching, max_batch in (("on", 32), ("off", 1)):
        proc = _serve(idx, args.port, max_batch)
        try:
            for kind, body in bodies.items():
                _load(args.port, body, 20, 4)  # warm-up
                for c in (int(x) for x in args.concurrency.split(",")):
                    r = _load(args.port, body, args.requests, c)
                    r.update(kind=kind, concurrency=c, batching=batching,
                             share_of_limit=r["qps"] / limit[f"{kind}_limit_qps"])
                    r["p99_over_p50"] = r["p99_ms"] / r["p50_ms"]
                    rows.append(r)
                    print(f"{kind:5s} c={c:2d} batching {batching:3s}: {r['qps']:7.1f} q/s "
                          f"({100 * r['share_of_limit']:5.1f} % of the limit), p50 {r['p50_ms']:6.1f} ms, "
                          f"p99 {r['p99_ms']:6.1f} ms, non-200 {r['non_200']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    result = {"benchmark": "serve_load", "command": " ".join(sys.argv), "index_vectors": 60000,
              "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}", "limit": limit, "rows": rows,
              "note": "client threads share the server's cores"}
    Path(args.result).write_text(json.dumps(result, indent=2))
    print(json.dumps(limit, indent=2))


if __name__ == "__main__":
    main()
